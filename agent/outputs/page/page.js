// site-agent operator page: renders the agent's view, live over server-sent events (/events).
// Every string from the agent goes into the DOM as text (textContent), never as markup.
// When the stream breaks, /view.json says whether the agent is still there; if it is not, the
// page says "agent unreachable since HH:MM" and keeps the last figures, greyed.
"use strict";

(function () {
  const STALE_AFTER_MS = 15000; // the agent republishes at least every 5 s
  const PROBE_TIMEOUT_MS = 3000;
  const POLL_MS = 5000;

  let source = null;
  let lastViewAt = null; // Date the last view arrived
  let downSince = null; // Date the agent was first found unreachable
  let polling = null; // interval id while the stream is refused (too many clients)
  let probing = false;

  const $ = (id) => document.getElementById(id);

  function pad(n) {
    return String(n).padStart(2, "0");
  }
  function hhmm(d) {
    return pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function hhmmss(d) {
    return hhmm(d) + ":" + pad(d.getSeconds());
  }

  function isNum(x) {
    return typeof x === "number" && isFinite(x);
  }
  function power(w) {
    if (!isNum(w)) return "–";
    const kw = w / 1000;
    if (Math.abs(kw) >= 1000) return (kw / 1000).toFixed(2) + " MW";
    return kw.toFixed(1) + " kW";
  }
  function usd(x, digits) {
    if (!isNum(x)) return "–";
    const s = "$" + Math.abs(x).toFixed(digits === undefined ? 2 : digits);
    return x < -0.005 ? "−" + s : s;
  }
  function rate(x) {
    return isNum(x) ? usd(x) + "/h" : "–";
  }
  function mwh(x) {
    return isNum(x) ? x.toFixed(3) + " MWh" : "–";
  }
  function price(x) {
    return isNum(x) ? "$" + x.toFixed(2) + "/MWh" : "–";
  }
  function time(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d.getTime()) ? "–" : hhmm(d);
  }

  function setText(id, text) {
    const node = $(id);
    if (node) node.textContent = text;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function emptyItem(list, text) {
    list.appendChild(el("li", "empty", text));
  }

  function money(td, x, fmt) {
    td.textContent = fmt(x);
    td.classList.toggle("neg", isNum(x) && x < -0.005);
  }

  // --- rendering -------------------------------------------------------------------------------

  function renderPower(view) {
    const p = view.power || {};
    setText("site-power", power(p.site_w));
    setText("site-limit", power(p.limit_w));
    setText("planned-power", power(p.planned_w));
    setText("interconnect", power(p.interconnect_w));
    setText("binding", p.binding && p.binding.length ? p.binding.join(", ") : "–");
    $("meter-row").hidden = !isNum(p.meter_w);
    setText("meter-power", power(p.meter_w));
    $("cooling-row").hidden = !isNum(p.cooling_w);
    setText("cooling-power", power(p.cooling_w));
    // The live 4CP account: the latest month's peak-interval demand and the season's charge.
    const f = view.fourcp;
    const peak = f && isNum(f.peak_w);
    $("fourcp-peak-row").hidden = !peak;
    if (peak) {
      setText(
        "fourcp-peak",
        power(f.peak_w) + " in " + String(f.month) + " (" + String(f.source) + "), season est. " +
          usd(f.season_charge_usd),
      );
    }
    const full = isNum(p.interconnect_w) && p.interconnect_w > 0 ? p.interconnect_w : p.limit_w;
    const fill = $("power-fill");
    const mark = $("power-limit-mark");
    if (isNum(full) && full > 0 && isNum(p.site_w)) {
      fill.style.width = Math.min(100, (100 * p.site_w) / full).toFixed(2) + "%";
      fill.classList.toggle("over", isNum(p.limit_w) && p.site_w > p.limit_w);
    } else {
      fill.style.width = "0";
    }
    if (isNum(full) && full > 0 && isNum(p.limit_w)) {
      mark.style.left = "calc(" + Math.min(100, (100 * p.limit_w) / full).toFixed(2) + "% - 1px)";
    }
    $("power-bar").setAttribute(
      "aria-label",
      "site power " + power(p.site_w) + " against its limit " + power(p.limit_w)
    );
    const pr = view.price || {};
    let text = price(pr.realtime_usd_per_mwh);
    if (isNum(pr.age_s)) text += " (" + Math.round(pr.age_s) + " s old)";
    setText("price", text);
    setText("effective-price", price(pr.effective_usd_per_mwh));
    setText("hashprice", isNum(pr.hashprice_usd_per_ph_day) ? "$" + pr.hashprice_usd_per_ph_day.toFixed(2) + "/PH/day" : "–");
    setText("fourcp", isNum(pr.fourcp_risk) ? Math.round(pr.fourcp_risk * 100) + " %" : "–");
  }

  function renderChart(view) {
    const svg = $("history-chart");
    clear(svg);
    const h = view.history || {};
    const pts = (h.points || []).filter((q) => Array.isArray(q) && isNum(q[0]));
    if (pts.length < 2) return;
    const t0 = pts[0][0];
    const t1 = pts[pts.length - 1][0];
    let top = 0;
    for (const q of pts) {
      if (isNum(q[1])) top = Math.max(top, q[1]);
      if (isNum(q[2])) top = Math.max(top, q[2]);
    }
    if (top <= 0 || t1 <= t0) return;
    const ns = "http://www.w3.org/2000/svg";
    function line(col, cls) {
      const coords = [];
      for (const q of pts) {
        if (!isNum(q[col])) continue;
        const x = (300 * (q[0] - t0)) / (t1 - t0);
        const y = 58 - (56 * q[col]) / top;
        coords.push(x.toFixed(1) + "," + y.toFixed(1));
      }
      const poly = document.createElementNS(ns, "polyline");
      poly.setAttribute("points", coords.join(" "));
      poly.setAttribute("class", cls);
      svg.appendChild(poly);
    }
    line(2, "limit");
    line(1, "site");
  }

  const COLUMNS = [
    ["power", "Power"],
    ["revenue", "Revenue"],
    ["cost", "Cost"],
    ["margin", "Margin"],
    ["day-energy", "24 h energy"],
    ["day-revenue", "24 h revenue"],
    ["day-cost", "24 h cost"],
    ["day-margin", "24 h margin"],
  ];

  function fillRow(tr, label, now, day, grid) {
    clear(tr);
    tr.appendChild(el("td", "", label));
    const cells = {};
    for (const [col, title] of COLUMNS) {
      const td = el("td");
      td.dataset.col = col;
      td.dataset.label = title;
      cells[col] = td;
      tr.appendChild(td);
    }
    now = now || {};
    day = day || {};
    const pw = power(now.power_w);
    cells.power.textContent = grid && pw !== "–" ? pw + " back" : pw;
    money(cells.revenue, now.revenue_usd_per_h, rate);
    money(cells.cost, now.cost_usd_per_h, rate);
    money(cells.margin, now.margin_usd_per_h, rate);
    cells["day-energy"].textContent = grid ? "–" : mwh(day.energy_mwh);
    money(cells["day-revenue"], day.revenue_usd, usd);
    money(cells["day-cost"], day.cost_usd, usd);
    money(cells["day-margin"], day.margin_usd, usd);
  }

  function renderWorkloads(view) {
    const table = $("workloads");
    const body = table.tBodies[0];
    clear(body);
    for (const w of view.workloads || []) {
      const tr = el("tr");
      tr.dataset.key = String(w.key);
      fillRow(tr, w.label, w.now, w.day, w.key === "grid_events");
      body.appendChild(tr);
    }
    const foot = table.tFoot;
    clear(foot);
    const tr = el("tr");
    tr.dataset.key = "total";
    const total = view.total || {};
    fillRow(tr, "Site total", total.now, total.day, false);
    foot.appendChild(tr);
    const h = view.history || {};
    let note = "Now: rates this control cycle. 24 h: summed over each cycle";
    if (h.since) note += " since " + time(h.since) + " (" + h.cycles + " cycles)";
    setText("history-note", note + ".");
  }

  function renderPlan(view) {
    const plan = view.plan;
    const list = $("plan-actions");
    clear(list);
    if (!plan) {
      setText("plan-summary", "no plan yet: waiting for the first control cycle");
      return;
    }
    let summary = plan.summary || "no change";
    if (view.mode && view.mode !== "auto") summary = view.mode + " mode: " + summary;
    setText("plan-summary", summary);
    setText("plan-value", rate(plan.value_usd_per_h));
    setText("plan-cost", rate(plan.cost_usd_per_h));
    setText("plan-margin", rate(plan.margin_usd_per_h));
    for (const a of plan.actions || []) {
      const li = el("li");
      let what = a.kind + " " + a.device;
      if (a.job) what += " (job " + a.job + ")";
      what += " → " + a.target;
      if (isNum(a.delta_w)) what += " (" + (a.delta_w > 0 ? "+" : "−") + power(Math.abs(a.delta_w)) + ")";
      li.appendChild(el("span", "", what));
      li.appendChild(el("span", "reason", a.reason));
      list.appendChild(li);
    }
    if (plan.actions_total > (plan.actions || []).length) {
      emptyItem(list, "and " + (plan.actions_total - plan.actions.length) + " more");
    }
    if (!plan.actions_total) emptyItem(list, "no actions: every device is where the plan wants it");
  }

  function renderEvents(view) {
    const list = $("events");
    clear(list);
    for (const e of view.events || []) {
      const li = el("li");
      li.dataset.event = String(e.id);
      let badge;
      if (e.compliant === true) badge = el("span", "badge ok", "compliant");
      else if (e.compliant === false) badge = el("span", "badge bad", "short by " + power(e.shortfall_w));
      else badge = el("span", "badge warn", "not measured");
      li.appendChild(badge);
      li.appendChild(el("span", "", " " + e.id + " · " + e.program + " (" + e.kind + (e.mandatory ? ", mandatory" : "") + ")"));
      let detail = "target ≤ " + power(e.target_w) + ", measured " + power(e.site_w) + ", until " + time(e.end);
      if (isNum(e.payment_usd_per_mwh) && e.payment_usd_per_mwh > 0) detail += ", pays " + price(e.payment_usd_per_mwh);
      if (isNum(e.penalty_usd_per_mwh) && e.penalty_usd_per_mwh > 0) detail += ", penalty " + price(e.penalty_usd_per_mwh);
      li.appendChild(el("span", "reason", detail));
      list.appendChild(li);
    }
    if (!(view.events || []).length) emptyItem(list, "none");
  }

  function renderFaults(view) {
    const list = $("faults");
    clear(list);
    for (const f of view.faults || []) {
      const li = el("li");
      li.appendChild(el("span", "badge bad", f.device));
      li.appendChild(el("span", "reason", f.reason));
      list.appendChild(li);
    }
    if (!(view.faults || []).length) emptyItem(list, "none");
    setText("faults-count", "(" + (view.faults_total || 0) + ")");
    const derates = view.derates;
    $("derates-block").hidden = !Array.isArray(derates);
    if (Array.isArray(derates)) {
      const dl = $("derates");
      clear(dl);
      for (const d of derates) {
        const li = el("li");
        li.appendChild(el("span", "badge warn", d.device));
        li.appendChild(el("span", "reason", d.reason));
        dl.appendChild(li);
      }
      if (!derates.length) emptyItem(dl, "none");
      setText("derates-count", "(" + derates.length + ")");
    }
    const sl = $("sources");
    clear(sl);
    for (const s of view.sources || []) {
      const li = el("li");
      li.appendChild(el("span", s.up ? "badge ok" : "badge bad", s.up ? "up" : "down"));
      let text = " " + s.name;
      if (isNum(s.age_s)) text += ", last good " + Math.round(s.age_s) + " s ago";
      li.appendChild(el("span", "", text));
      if (s.error) li.appendChild(el("span", "reason", s.error));
      sl.appendChild(li);
    }
    if (!(view.sources || []).length) emptyItem(sl, "none yet");
  }

  function render(view) {
    setText("site", view.site || "site");
    document.title = (view.site || "site") + ": site-agent";
    const mode = view.mode === "auto" ? "automatic control" : view.mode + " mode" + (view.safe_reason ? " (" + view.safe_reason + ")" : "");
    setText("mode", mode);
    renderPower(view);
    renderChart(view);
    renderWorkloads(view);
    renderPlan(view);
    renderEvents(view);
    renderFaults(view);
  }

  // --- connection state ----------------------------------------------------------------------

  function statusLine(extra) {
    const when = lastViewAt ? "updated " + hhmmss(lastViewAt) : "waiting for data";
    setText("status", extra ? extra + " · " + when : "live · " + when);
  }

  function onView(view) {
    lastViewAt = new Date();
    if (downSince !== null) {
      downSince = null;
      document.body.classList.remove("stale");
      $("banner").hidden = true;
    }
    render(view);
    statusLine(polling !== null ? "polling (live stream busy)" : "");
  }

  function markDown() {
    if (downSince === null) downSince = new Date();
    document.body.classList.add("stale");
    const banner = $("banner");
    let text = "Connection lost: agent unreachable since " + hhmm(downSince) + ".";
    text += lastViewAt ? " The figures below are the last received, at " + hhmmss(lastViewAt) + "." : " No figures received yet.";
    banner.textContent = text;
    banner.hidden = false;
    setText("status", "agent unreachable since " + hhmm(downSince));
  }

  // Ask /view.json whether the agent is there; render what it says, or mark it down.
  async function probe() {
    if (probing) return;
    probing = true;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), PROBE_TIMEOUT_MS);
    try {
      const reply = await fetch("/view.json", { cache: "no-store", signal: ctl.signal });
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      onView(await reply.json());
      return true;
    } catch (err) {
      markDown();
      return false;
    } finally {
      clearTimeout(timer);
      probing = false;
    }
  }

  function startPolling() {
    if (polling !== null) return;
    polling = setInterval(probe, POLL_MS);
    // Try the live stream again now and then: a viewer may have left.
    setTimeout(() => {
      clearInterval(polling);
      polling = null;
      connect();
    }, 30000);
  }

  function connect() {
    if (source) source.close();
    source = new EventSource("/events");
    source.addEventListener("view", (ev) => {
      let view;
      try {
        view = JSON.parse(ev.data);
      } catch (err) {
        return; // a garbled message changes nothing
      }
      onView(view);
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: too many viewers) or not an event stream: poll instead.
        probe().then((up) => (up ? startPolling() : setTimeout(connect, POLL_MS)));
      } else {
        probe(); // the browser reconnects by itself; meanwhile say whether the agent is there
      }
    };
  }

  // A stream can stall without an error (a hung agent, a sleeping laptop): check it.
  setInterval(() => {
    if (lastViewAt === null || Date.now() - lastViewAt.getTime() > STALE_AFTER_MS) probe();
  }, STALE_AFTER_MS / 3);

  connect();
})();

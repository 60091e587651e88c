"""The operator page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Selenium drives the system browser through ``/usr/bin/chromedriver`` (Selenium Manager is never
asked to download anything). The page is served by the real metrics listener: from a hand-built
AgentState with known figures, and from a real Agent polling LuxOS simulators over pyasic with a
real HTTP price feed. Screenshots go to ``$SITE_AGENT_ARTIFACTS`` (default ``tests/artifacts/``).
The browser's console log must stay free of errors; computed colours are checked for WCAG AA
contrast in the browser, live and greyed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.control.settlement import FourCpInterval, fourcp_figures
from agent.outputs.metrics import MetricsService
from agent.outputs.page import History, OperatorPage, energy_price_usd_per_mwh, workload_rates
from tests.page_helpers import PageServer, contrast_ratio, css_variables, parse_colour
from tests.sample_state import NOW, sample_config, sample_state
from tests.test_e2e_miners import S19, S21, running_site, truth

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SITE_AGENT_ARTIFACTS", ROOT / "tests" / "artifacts"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver): /usr/bin/chromium or /usr/bin/chromedriver is missing",
    ),
]

Driver = Any  # selenium.webdriver.Chrome; selenium ships no type information for mypy strict

# Text the page shows, and the colours it must keep readable, live and greyed.
TEXT_SELECTORS = [
    "#site-power",
    ".big .of",
    ".facts dt",
    ".facts dd",
    ".workloads thead th",
    ".workloads td",
    ".workloads td.neg",
    ".summary",
    ".reason",
    ".badge",
    ".card h2",
    ".card h3",
    ".note",
    ".top h1",
    "#status",
    "#banner",
    ".foot",
    ".foot a",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Driver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="site-agent-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1100",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def tab(browser: Driver) -> Iterator[Driver]:
    """The browser with its console log drained, left on a blank page afterwards."""
    browser.get("about:blank")
    browser.get_log("browser")  # entries from earlier tests (their servers are gone)
    browser.set_window_size(1280, 1100)
    try:
        yield browser
    finally:
        browser.get("about:blank")


async def call(fn: Any, *args: Any) -> Any:
    """Selenium blocks: run it in a thread so the servers on this event loop keep serving."""
    return await asyncio.to_thread(fn, *args)


async def js(driver: Driver, script: str, *args: Any) -> Any:
    return await call(driver.execute_script, script, *args)


async def text(driver: Driver, selector: str) -> str:
    value = await js(
        driver,
        "const n = document.querySelector(arguments[0]); return n ? n.textContent : null;",
        selector,
    )
    return "" if value is None else str(value)


async def until_text(driver: Driver, selector: str, pattern: str, timeout_s: float = 20.0) -> str:
    """Wait until the element's text matches ``pattern`` (a regex); returns the text."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        last = await text(driver, selector)
        if re.search(pattern, last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector}: {last!r} never matched {pattern!r} in {timeout_s} s")
        await asyncio.sleep(0.05)


async def cell(driver: Driver, key: str, col: str) -> str:
    return await text(driver, f'tr[data-key="{key}"] td[data-col="{col}"]')


async def console_errors(driver: Driver) -> list[str]:
    entries = await call(driver.get_log, "browser")
    return [e["message"] for e in entries if e.get("level") == "SEVERE"]


def _save_screenshot(driver: Driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"page-{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    assert path.stat().st_size > 1000
    return path


async def screenshot(driver: Driver, name: str) -> Path:
    """Save a PNG of the page as a test artefact."""
    path: Path = await call(_save_screenshot, driver, name)
    return path


_COLOURS_JS = """
const out = [];
for (const sel of arguments[0]) {
  const nodes = Array.from(document.querySelectorAll(sel))
    .filter((n) => n.getClientRects().length && n.textContent.trim() && !n.closest('[hidden]'))
    .slice(0, 4);
  for (const n of nodes) {
    let bg = null;
    for (let p = n; p; p = p.parentElement) {
      const b = getComputedStyle(p).backgroundColor;
      if (b && b !== 'rgba(0, 0, 0, 0)' && b !== 'transparent') { bg = b; break; }
    }
    out.push([sel, getComputedStyle(n).color, bg || 'rgb(255, 255, 255)']);
  }
}
return out;
"""


async def assert_readable(driver: Driver) -> int:
    """Every visible text element's computed colour has 4.5:1 on its background."""
    pairs = await js(driver, _COLOURS_JS, TEXT_SELECTORS)
    bad = []
    for selector, fg, bg in pairs:
        ratio = contrast_ratio(parse_colour(fg), parse_colour(bg))
        if ratio < 4.5:
            bad.append(f"{selector}: {fg} on {bg} = {ratio:.2f}:1")
    assert not bad, "below WCAG AA:\n" + "\n".join(bad)
    return len(pairs)


@pytest.fixture
async def known_site() -> AsyncIterator[PageServer]:
    """The sample site (tests/sample_state.py) with an hour of history behind it."""
    state = sample_state()
    config = sample_config()
    assert state.snapshot is not None
    history = History(max_gap_s=7200)
    rates = workload_rates(
        state.snapshot, energy_price_usd_per_mwh(state.snapshot, state.plan), 0.0
    )
    history.record(NOW - timedelta(hours=1), 18_898.0, 14_000.0, rates)
    page = OperatorPage(state, config, history=history, clock=lambda: NOW)
    server = PageServer(state, config, page)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_page_loads_with_the_right_figures_on_desktop_and_phone(
    tab: Driver, known_site: PageServer
) -> None:
    browser = tab
    await call(browser.get, known_site.url + "/")
    await until_text(browser, "#site-power", r"^18\.9 kW$")
    assert await text(browser, "#site-limit") == "14.0 kW"
    assert await text(browser, "#planned-power") == "13.8 kW"
    assert await text(browser, "#interconnect") == "500.0 kW"
    assert await text(browser, "#binding") == "event:ev-1"
    assert await text(browser, "#price") == "$812.50/MWh (60 s old)"
    assert await text(browser, "#site") == "west-1"
    assert re.match(r"live · updated \d\d:\d\d:\d\d$", await text(browser, "#status"))
    # Mining: 10.098 kW; 8.20 $/h of energy at 812.5 $/MWh against 1.155 $/h of hashprice.
    assert await cell(browser, "mining", "power") == "10.1 kW"
    assert await cell(browser, "mining", "cost") == "$8.20/h"
    assert await cell(browser, "mining", "margin") == "−$7.05/h"
    # The hour behind it at the same rates (the history recorded one cycle an hour earlier).
    assert await cell(browser, "mining", "day-energy") == "0.010 MWh"
    assert await cell(browser, "mining", "day-cost") == "$8.20"
    assert await cell(browser, "mining", "day-margin") == "−$7.05"
    # The SLA job: 4 of 8 GPUs of a 4.8 kW node, 4 GPUs × 2.5 $/GPU-h at full cap.
    assert await cell(browser, "ai_sla", "power") == "2.4 kW"
    assert await cell(browser, "ai_sla", "revenue") == "$10.00/h"
    assert await cell(browser, "ai_sla", "margin") == "$8.05/h"
    assert await cell(browser, "ai_sla", "day-revenue") == "$10.00"
    assert await cell(browser, "ai_filler", "power") == "0.0 kW"
    assert await cell(browser, "grid_events", "power") == "1.1 kW back"
    assert await cell(browser, "total", "power") == "14.9 kW"
    assert await cell(browser, "total", "margin") == "−$0.95/h"
    neg = await js(
        browser,
        "return document.querySelector('tr[data-key=mining] td[data-col=margin]')"
        ".classList.contains('neg')",
    )
    assert neg is True
    # The plan and its reasons, the event and its compliance, faults and sources.
    assert await text(browser, "#plan-summary") == "shed 1 miner for event ev-1"
    actions = await text(browser, "#plan-actions")
    assert "sleep m-002 → sleep (−3.5 kW)" in actions
    assert "price 812.5 above breakeven 131" in actions
    event = await text(browser, '#events li[data-event="ev-1"]')
    assert "short by 4.9 kW" in event
    assert "ercot-ers (emergency, mandatory)" in event
    assert "target ≤ 14.0 kW, measured 18.9 kW" in event
    assert "m-004" in await text(browser, "#faults")
    assert "ignored sleep command" in await text(browser, "#faults")
    assert await text(browser, "#faults-count") == "(1)"
    assert "connection refused" in await text(browser, "#sources")
    # Derates: nothing in this agent reports them yet, so the block stays hidden.
    assert await js(browser, "return document.getElementById('derates-block').hidden") is True
    assert (
        await js(browser, "return document.querySelectorAll('#history-chart polyline').length") == 2
    )
    assert await assert_readable(browser) > 20
    await screenshot(browser, "desktop")

    # A phone: one column, the workload table as labelled blocks, nothing wider than the screen.
    await call(browser.set_window_size, 390, 844)
    width = await js(browser, "return [document.documentElement.scrollWidth, window.innerWidth];")
    assert width[0] <= width[1], f"page {width[0]} px wide on a {width[1]} px screen"
    label = await js(
        browser,
        "return getComputedStyle(document.querySelector("
        "'tr[data-key=mining] td[data-col=power]'), '::before').content",
    )
    assert label == '"Power"'
    assert await assert_readable(browser) > 20
    await screenshot(browser, "phone")
    await call(browser.set_window_size, 1280, 1100)
    errors = await console_errors(browser)
    assert not errors, errors


async def test_page_says_the_agent_is_down_and_keeps_the_last_figures_greyed(
    tab: Driver, known_site: PageServer
) -> None:
    browser = tab
    await call(browser.get, known_site.url + "/")
    await until_text(browser, "#site-power", r"^18\.9 kW$")
    assert await js(browser, "return document.getElementById('banner').hidden") is True
    live_colour = await js(
        browser, "return getComputedStyle(document.getElementById('site-power')).color"
    )
    port = known_site.server.port
    await known_site.close()  # the agent goes away: its listener closes every stream
    status = await until_text(browser, "#status", r"^agent unreachable since \d\d:\d\d$")
    banner = await text(browser, "#banner")
    assert status in banner
    assert re.search(r"the last received, at \d\d:\d\d:\d\d", banner)
    assert await js(browser, "return document.getElementById('banner').hidden") is False
    # The last figures stay, greyed, and still readable.
    assert await text(browser, "#site-power") == "18.9 kW"
    assert await cell(browser, "mining", "margin") == "−$7.05/h"
    assert await js(browser, "return document.body.classList.contains('stale')") is True
    grey = await js(browser, "return getComputedStyle(document.getElementById('site-power')).color")
    assert parse_colour(grey) == css_variables()["stale"]
    assert grey != live_colour
    await assert_readable(browser)
    await screenshot(browser, "agent-down")

    # The agent comes back on the same port: the page reconnects by itself and says so.
    await known_site.start(port)
    await until_text(browser, "#status", r"^live · updated", timeout_s=20)
    assert await js(browser, "return document.body.classList.contains('stale')") is False
    assert await js(browser, "return document.getElementById('banner').hidden") is True


async def test_page_follows_a_real_agent_within_2_s_of_a_price_spike(tab: Driver) -> None:
    # The same site, simulators and price feed as the miners' end-to-end test.
    browser = tab
    async with running_site(20.0) as (agent, fleet, server):
        metrics = next(s for s in agent.components.services if isinstance(s, MetricsService))
        deadline = time.monotonic() + 30
        while not metrics.started.is_set() or agent.state.plan is None:
            assert time.monotonic() < deadline, "agent never planned"
            await asyncio.sleep(0.05)
        await call(browser.get, f"http://127.0.0.1:{metrics.port}/")
        await until_text(browser, "#price", r"^\$20\.00/MWh", timeout_s=15)
        await until_text(browser, "#site", r"^e2e$")
        await until_text(browser, 'tr[data-key="mining"] td[data-col="power"]', r"kW$")

        server.prices[0] = 500.0  # above every miner's breakeven
        spiked = time.monotonic()
        await until_text(browser, "#price", r"^\$500\.00/MWh", timeout_s=2.0)
        seen_after_s = time.monotonic() - spiked
        assert seen_after_s < 2.0
        # The plan reacts: it is made against the new price, and the miners go to sleep (the
        # plan that held the sleep actions lasts one cycle; the page shows the current plan).
        await until_text(browser, "#effective-price", r"^\$500\.00/MWh$", timeout_s=5)
        await until_text(browser, 'tr[data-key="mining"] td[data-col="margin"]', r".", timeout_s=5)
        deadline = time.monotonic() + 15
        while not all(truth(fleet, a)["sleeping"] for a in S19 + S21):
            assert time.monotonic() < deadline, "miners never slept"
            await asyncio.sleep(0.1)
        # Asleep, the fleet draws tens of watts: the mining row follows the measured power.
        await until_text(browser, 'tr[data-key="mining"] td[data-col="power"]', r"^0\.\d kW$", 10)
        await screenshot(browser, "price-spike")
        errors = await console_errors(browser)
        assert not errors, errors
        print(f"price spike shown on the page after {seen_after_s:.2f} s")


async def test_page_shows_the_live_4cp_account(tab: Driver, known_site: PageServer) -> None:
    browser = tab
    at = datetime(2023, 7, 18, 21, 45, tzinfo=UTC)
    june = FourCpInterval(datetime(2023, 6, 27, 21, 45, tzinfo=UTC), 30_000 * 900, 900, 900, 1)
    july = FourCpInterval(at, 20_000 * 600, 600, 600, 1)
    known_site.page.state.fourcp = fourcp_figures([june, july], 60.0)
    known_site.page.publish()
    await call(browser.get, known_site.url + "/")
    shown = await until_text(browser, "#fourcp-peak", r"^20\.0 kW")
    assert shown == "20.0 kW in 2023-07 (meter), season est. $750.00"
    assert await js(browser, "return document.getElementById('fourcp-peak-row').hidden") is False
    errors = await console_errors(browser)
    assert not errors, errors

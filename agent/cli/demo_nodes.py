"""The demo's GPU hosts as node agents in their own processes, over a real Mosquitto (issue 11).

* :func:`serve_sim_node` is ``site-agent sim node --config node.yaml``: the real node agent
  (:func:`agent.cli.node_daemon.serve_node`, the same loop, link, journal and ``/metrics`` as
  ``site-agent node``) with the simulated NVML and simulated jobs drivers registered
  (:class:`~agent.cli.demo_drivers.SimulatedGpus`). The live ``node`` command never registers
  them: it refuses simulated NVML.
* :class:`NodeProcesses` is what ``site-agent demo`` (and the tests) run: a Mosquitto on the demo's
  loopback net with one user per node and the shipped node ACL, one ``sim node`` process per
  GPU host of the site config, and the controller's config, whose ``remote_nodes:`` replaces the
  in-process ``gpu_nodes:``. The jobs each host runs are the ones the simulated scheduler
  places on it in the in-process demo, so both demos run the same work. A scraper reads each
  node's own ``/metrics`` (power, caps, jobs, AI revenue), which the demo shows and settles.
  Leaving the context stops the nodes (SIGTERM, then SIGKILL after a grace) and then the broker.
  The children run in their own sessions, so a terminal's Ctrl-C reaches only the demo, which
  stops them in that order; each also gets SIGTERM from the kernel if the demo dies first
  (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.cli.demo_drivers import GpuSimulation
from agent.control.config import AgentConfig
from agent.control.node_config import RemoteNodesConfig
from agent.runtime.gpu_fleet import expand_gpu_nodes
from drivers.errors import AgentError
from drivers.inputs import decode_utf8, one_line

ROOT = Path(__file__).resolve().parents[2]
ACL = ROOT / "configs" / "mosquitto-nodes.acl"
BROKER_THIRD_OCTET = 8  # the broker listens on 127.<net>.8.1, beside the miners and the meter
PR_SET_PDEATHSIG = 1
MAX_SCRAPE_BYTES = 4 * 1024 * 1024  # a node's /metrics is tens of kB
NODE_COMMAND = (sys.executable, "-m", "agent.cli.main", "sim", "node")


async def serve_sim_node(config_path: Path) -> int:
    """``site-agent sim node``: a node agent over simulated GPUs and jobs, until SIGTERM."""
    from agent.cli.common import load_or_report
    from agent.cli.demo_drivers import SimulatedGpus
    from agent.cli.node_daemon import serve_node
    from agent.control.redaction import secrets_in
    from agent.outputs.logs import setup_logging
    from drivers.errors import AgentError

    cfg = load_or_report(config_path)
    if cfg is None:
        return 2
    if cfg.node is None:
        print(f"{config_path}: a node agent needs a node: section (id, broker)", file=sys.stderr)
        return 2
    setup_logging(secrets=secrets_in(cfg))
    try:
        await serve_node(cfg, config_path, drivers=SimulatedGpus().registry())
    except AgentError as exc:
        print(f"site-agent sim node cannot run: {exc}", file=sys.stderr)
        return 2
    return 0


def broker_binaries() -> tuple[str, str] | str:
    """(mosquitto, mosquitto_passwd), or why the demo cannot start a broker."""
    found = []
    for name in ("mosquitto", "mosquitto_passwd"):
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
        if path is None:
            return f"{name} is not installed (Debian package mosquitto)"
        found.append(path)
    return found[0], found[1]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True)
class NodeTelemetry:
    """One node's own ``/metrics``, as last scraped."""

    power_w: float | None = None
    cap_w: float | None = None
    ai_usd_per_h: float = 0.0
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (class, state) -> count
    envelope_w: float | None = None
    applied_seq: int = 0
    scraped: int = 0


def parse_node_metrics(text: str, node_id: str) -> NodeTelemetry:
    """The figures the demo shows, from a node agent's ``/metrics`` text."""
    out = NodeTelemetry()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "site_agent_gpu_node_power_watts":
                out.power_w = (out.power_w or 0.0) + s.value
            elif s.name == "site_agent_gpu_node_power_cap_watts":
                out.cap_w = s.value
            elif s.name == "site_agent_ai_revenue_usd_per_hour":
                out.ai_usd_per_h = s.value
            elif s.name == "site_agent_jobs":
                key = (s.labels["job_class"], s.labels["state"])
                out.jobs[key] = int(s.value)
            elif s.name == "site_agent_node_envelope_watts" and s.labels.get("node") == node_id:
                out.envelope_w = s.value
            elif s.name == "site_agent_node_applied_seq" and s.labels.get("node") == node_id:
                out.applied_seq = int(s.value)
    return out


async def scrape(host: str, port: int, *, timeout_s: float = 2.0) -> str:
    """``GET /metrics`` of a node agent on loopback (HTTP/1.0, bounded); ValueError if not 200."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(MAX_SCRAPE_BYTES + 1)
            while len(data) <= MAX_SCRAPE_BYTES and (more := await reader.read(65536)):
                data += more
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ValueError(f"metrics of 127.0.0.1:{port}: {one_line(head.decode('latin-1'), 80)}")
    return decode_utf8(body, f"metrics of {host}:{port}", max_bytes=MAX_SCRAPE_BYTES)


@dataclass(slots=True)
class _Node:
    node_id: str
    config_path: Path
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    telemetry: NodeTelemetry = field(default_factory=NodeTelemetry)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


class NodeProcesses:
    """A broker and one ``sim node`` process per GPU host of ``config``; see the module doc."""

    def __init__(
        self,
        config: AgentConfig,
        simulation: GpuSimulation,
        *,
        net: int,
        binaries: tuple[str, str],
        workdir: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.config = config
        self.net = net
        self.mosquitto, self.mosquitto_passwd = binaries
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="demo-")
        self.workdir = workdir or Path(self._tmp.name if self._tmp else ".")
        self.start_timeout_s = start_timeout_s
        self.broker_host = f"127.{net}.{BROKER_THIRD_OCTET}.1"
        self.broker_port = free_port(self.broker_host)
        self.broker: subprocess.Popen[bytes] | None = None
        specs = [spec for _, spec in expand_gpu_nodes(config)]
        users = ["controller", *(spec.device_id for spec in specs)]
        self.passwords = {user: secrets.token_hex(12) for user in users}
        self.nodes: dict[str, _Node] = {}
        self.placement = placed_jobs(config, simulation)
        self._scraper: asyncio.Task[None] | None = None

    # --- configs ------------------------------------------------------------------------------

    def broker_dict(self, user: str) -> dict[str, Any]:
        return {
            "host": self.broker_host,
            "port": self.broker_port,
            "username": user,
            "password": self.passwords[user],
            "reconnect_initial_s": 0.2,
            "reconnect_max_s": 2,
            "timeout_s": 5,
        }

    def node_dict(self, node_id: str, line_index: int, port: int) -> dict[str, Any]:
        """A node agent's config: the site's control and economics, one GPU host, its jobs."""
        cfg = self.config
        line = cfg.gpu_nodes[line_index].model_dump(mode="json", exclude={"count", "id"})
        line.pop("scheduler_node", None)
        host_w = line["gpus"] * line["max_cap_w"] + line["host_overhead_w"]
        ai = cfg.ai.model_dump(mode="json", exclude={"sim_jobs", "scheduler"})
        return {
            "site": {"id": cfg.site.id, "interconnect_limit_kw": max(1.0, host_w / 1000 * 2)},
            "control": cfg.control.model_dump(mode="json"),
            "economics": {
                "pool_fee": cfg.economics.pool_fee,
                "hashprice": {"usd_per_ph_day": cfg.economics.hashprice.usd_per_ph_day},
            },
            "gpu_nodes": [{"id": node_id, **line}],
            "ai": {**ai, "scheduler": "sim", "sim_jobs": self.placement.get(node_id, [])},
            # The node decides at the controller's price (its link); this only fills the schema.
            "prices": {"realtime": {"type": "constant", "value": 0}},
            "metrics": {"host": "127.0.0.1", "port": port},
            "store": {"path": str(self.workdir / f"{node_id}.db")},
            "node": {
                "id": node_id,
                "broker": self.broker_dict(node_id),
                "fail_after_s": 30,
                "journal_path": str(self.workdir / f"{node_id}.json"),
                "views_interval_s": 0.5,
            },
        }

    def controller_config(self) -> AgentConfig:
        """The demo's config with its GPU hosts as node agents (``remote_nodes:``)."""
        cfg = self.config
        remote = RemoteNodesConfig.model_validate(
            {
                "broker": self.broker_dict("controller"),
                "nodes": [
                    {
                        "id": spec.device_id,
                        "max_w": spec.gpus * spec.max_cap_w + spec.host_overhead_w,
                        "timeout_s": 10,
                    }
                    for _, spec in expand_gpu_nodes(cfg)
                ],
                "ack_timeout_s": 5,
                "beat_interval_s": 1,
            }
        )
        return cfg.model_copy(update={"gpu_nodes": [], "remote_nodes": remote})

    # --- processes ----------------------------------------------------------------------------

    def _start_broker(self) -> None:
        passwd = self.workdir / "passwd"
        passwd.touch(mode=0o600)
        for user, password in self.passwords.items():
            subprocess.run(
                [self.mosquitto_passwd, "-b", str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        acl = self.workdir / "acl"
        acl.write_text(ACL.read_text())
        acl.chmod(0o600)
        conf = self.workdir / "mosquitto.conf"
        root = "user root\n" if os.geteuid() == 0 else ""  # else it drops to user mosquitto
        conf.write_text(
            f"listener {self.broker_port} {self.broker_host}\n{root}"
            f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
            "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        )
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.broker = subprocess.Popen(
                [self.mosquitto, "-c", str(conf)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
            )

    async def _wait_listening(self, host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = asyncio.get_running_loop().time() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"not listening on {host}:{port}") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def _start_node(self, node: _Node) -> None:
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(
                [*NODE_COMMAND, "--config", str(node.config_path)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
            )

    async def __aenter__(self) -> NodeProcesses:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._start_broker()
        assert self.broker is not None
        try:
            await self._wait_listening(self.broker_host, self.broker_port, self.broker)
        except RuntimeError as exc:
            log = (self.workdir / "mosquitto.log").read_text()[-600:]
            raise RuntimeError(f"mosquitto: {exc}: {log}") from None
        for i, spec in expand_gpu_nodes(self.config):
            node_id = spec.device_id
            port = free_port("127.0.0.1")
            path = self.workdir / f"{node_id}.yaml"
            path.write_text(json.dumps(self.node_dict(node_id, i, port)))  # JSON is YAML
            path.chmod(0o600)
            self.nodes[node_id] = _Node(node_id, path, port, self.workdir / f"{node_id}.log")
        for node in self.nodes.values():
            self._start_node(node)
        for node in self.nodes.values():
            assert node.proc is not None
            try:
                await self._wait_listening("127.0.0.1", node.metrics_port, node.proc)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"node {node.node_id}: {exc}: {node.log_path.read_text()[-800:]}"
                ) from None
        self._scraper = asyncio.create_task(self._scrape_forever())

    async def _scrape_forever(self, every_s: float = 0.5) -> None:
        while True:
            for node in self.nodes.values():
                with contextlib.suppress(OSError, TimeoutError, ValueError, AgentError):
                    text = await scrape("127.0.0.1", node.metrics_port)
                    scraped = node.telemetry.scraped + 1
                    node.telemetry = parse_node_metrics(text, node.node_id)
                    node.telemetry.scraped = scraped
            await asyncio.sleep(every_s)

    @property
    def node_ids(self) -> list[str]:
        return [spec.device_id for _, spec in expand_gpu_nodes(self.config)]

    def telemetry(self) -> dict[str, NodeTelemetry]:
        return {n.node_id: n.telemetry for n in self.nodes.values()}

    def pids(self) -> dict[str, int]:
        return {n.node_id: n.proc.pid for n in self.nodes.values() if n.proc is not None}

    async def stop(self, grace_s: float = 8.0) -> dict[str, int | None]:
        """Stop the nodes (SIGTERM, SIGKILL after ``grace_s``), then the broker; exit codes."""
        if self._scraper is not None:
            self._scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scraper
            self._scraper = None
        procs = [n.proc for n in self.nodes.values() if n.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        codes = {n.node_id: (n.proc.returncode if n.proc else None) for n in self.nodes.values()}
        if self.broker is not None:
            self.broker.terminate()
            try:
                self.broker.wait(5)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
            self.broker = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return codes


def placed_jobs(config: AgentConfig, simulation: GpuSimulation) -> dict[str, list[dict[str, Any]]]:
    """Per GPU host id, the jobs the in-process simulated scheduler placed there (pinned)."""
    by_sched = {spec.scheduler_node: spec.device_id for _, spec in expand_gpu_nodes(config)}
    out: dict[str, list[dict[str, Any]]] = {d: [] for d in by_sched.values()}
    if simulation.scheduler is None:
        return out
    for job in simulation.scheduler.jobs():
        node_id = by_sched.get(job.node or "")
        if node_id is None:
            continue  # not placed (no room): the in-process demo would not run it either
        out[node_id].append(
            {
                "job_class": job.job_class,
                "gpus": job.gpus,
                "node": node_id,
                "utilization_pct": job.utilization_pct,
            }
        )
    return out

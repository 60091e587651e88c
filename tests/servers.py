"""Real servers for tests, started on loopback from their Debian packages.

Each class starts the real binary on a free port in a temporary folder, waits until it
listens, and stops it (SIGTERM, then SIGKILL). Fixtures skip with a reason when the binary is
missing; ``make test`` installs the packages when it runs as root.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from simulators.common import Connections

# Not the global generator: a test that seeds it would make two runs pick the same ports.
_RANDOM = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, for a server started a moment later.

    Chosen at random below the kernel's ephemeral range: a port the kernel handed out (to a
    client's connection, or to another test's ``bind(host, 0)``) could be taken again before
    our server binds it; ports below that range are only ever taken on purpose.
    """
    top = min(_ephemeral_low(), 65536) - 1
    for _ in range(200):
        port = _RANDOM.randint(max(1024, top - 12000), top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(
    host: str, port: int, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``host:port`` accepts a TCP connection, or raise (at once if ``proc`` died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


async def await_listening(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Wait, without blocking the loop, until ``host:port`` accepts a TCP connection, or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{host}:{port} did not come back") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


PORT_80 = "binding port 80 (the Antminer web API) needs root"


class _Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


async def connect_as_it_closes(
    address: str,
    port: int,
    request: bytes,
    connections: Connections,
    close: Callable[[], Awaitable[None]],
    moment: str,
) -> None:
    """A client connects and sends ``request`` just as a simulated miner goes down (``close``).

    ``moment``: ``accept-task`` closes once asyncio has accepted the socket but not yet built
    its transport; ``transport-pending`` once the transport is built but ``connection_made`` has
    not run. Asserts what a miner that is down owes that client: no answer, the connection let
    go of, and no socket left for the garbage collector ("unclosed" ``ResourceWarning``).
    """
    loop = asyncio.get_running_loop()
    # A blocking client: the kernel completes its handshake without the event loop.
    client = socket.create_connection((address, port), timeout=10)
    try:
        client.sendall(request)
        deadline = loop.time() + 10.0
        if moment == "accept-task":
            while not accept_task_pending():
                assert loop.time() < deadline, "asyncio never accepted the connection"
                await asyncio.sleep(0)
        else:
            while connections.accepting == 0:
                assert loop.time() < deadline, "the simulator never accepted the connection"
                await asyncio.sleep(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await close()
            try:
                reply = await asyncio.to_thread(client.recv, 4096)
            except ConnectionResetError:
                reply = b""
            assert reply == b"", f"a miner that is down answered: {reply!r}"
            deadline = loop.time() + 10.0
            while not connections.settled:
                assert loop.time() < deadline, "the dropped connection was never let go of"
                await asyncio.sleep(0.01)
            gc.collect()  # a half-built transport would warn here
        assert len(connections) == 0
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert leaked == []
    finally:
        client.close()


def accept_task_pending() -> bool:
    """asyncio accepted a socket and scheduled the task that builds its transport (the window
    in which a listener's close races it; see ``simulators.common.close_listener``)."""
    return any(
        getattr(t.get_coro(), "__name__", "") == "_accept_connection2" for t in asyncio.all_tasks()
    )


@asynccontextmanager
async def started_or_skip(server: S, reason: str) -> AsyncIterator[S]:
    """``server`` started for the block and stopped after it; the test skips with ``reason``
    when the kernel refuses a port (the Antminer web API's port 80 needs root)."""
    try:
        await server.start()
    except PermissionError:
        pytest.skip(reason)
    try:
        yield server
    finally:
        await server.stop()


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or skip the test saying which Debian package provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.skip(
            f"{name} not installed (Debian package {package}; `make test` as root installs it)"
        )
    return path


class Mosquitto:
    """A real Mosquitto broker on 127.0.0.1 with password authentication.

    ``users`` maps username to password; anonymous clients are refused. ``stop()`` and
    ``start()`` can be called mid-test to simulate a broker outage on the same port.
    """

    def __init__(
        self, workdir: Path, users: dict[str, str] | None = None, acl: str | None = None
    ) -> None:
        self.binary = require_binary("mosquitto", "mosquitto")
        self.passwd = require_binary("mosquitto_passwd", "mosquitto")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users or {"agent": "agent-secret", "operator": "operator-secret"}
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        pwfile = workdir / "passwd"
        pwfile.touch()
        for user, password in self.users.items():
            subprocess.run([self.passwd, "-b", str(pwfile), user, password], check=True)
        pwfile.chmod(0o600)
        acl_line = ""
        if acl is not None:  # optional topic ACL (mosquitto acl_file syntax); none by default
            acl_file = workdir / "acl"
            acl_file.write_text(acl)
            acl_file.chmod(0o600)
            acl_line = f"acl_file {acl_file}\n"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            # As root, mosquitto would drop to user "mosquitto", who cannot read pytest's tmp dir.
            "user root\n"
            "allow_anonymous false\n"
            f"password_file {pwfile}\n"
            f"{acl_line}"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    def start(self) -> None:
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=log
            )
        try:
            wait_listening(self.host, self.port, proc=self.proc)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start: {self.log_path.read_text()[-2000:]}"
            ) from None

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (a clean shutdown), or with ``kill`` SIGKILL (a crash)."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping ``targets`` every ``scrape_interval_s``.

    Storage lives in ``workdir``; ``rule_files`` are loaded and evaluated at the scrape
    interval. :meth:`query` runs an instant PromQL query over the HTTP API (blocking: call it
    from a thread when the scraped endpoint runs on the test's event loop).
    """

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        job: str = "site-agent",
        scrape_interval_s: float = 1.0,
        rule_files: tuple[Path, ...] = (),
    ) -> None:
        self.binary = require_binary("prometheus", "prometheus")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"
        self.conf = workdir / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        lines = [
            "global:",
            f"  scrape_interval: {interval}",
            f"  evaluation_interval: {interval}",
            f"  scrape_timeout: {interval}",
        ]
        if rule_files:
            lines.append("rule_files:")
            lines += [f"  - {json.dumps(str(p))}" for p in rule_files]
        lines += [
            "scrape_configs:",
            f"  - job_name: {json.dumps(job)}",
            "    static_configs:",
            f"      - targets: {json.dumps(targets)}",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.conf}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={self.host}:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        try:
            wait_listening(self.host, self.port, timeout_s=20, proc=self.proc)
            deadline = time.monotonic() + 20
            while self._get("/-/ready")[0] != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("prometheus never became ready")
                time.sleep(0.1)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"prometheus did not start: {self.log_path.read_text()[-2000:]}"
            ) from None

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError:
            return 0, b""

    def api(self, path: str, **params: str) -> Any:
        """GET an HTTP API path; the ``data`` of the answer, or raise with Prometheus' error."""
        query = urllib.parse.urlencode(params)
        status, body = self._get(f"{path}?{query}" if query else path)
        answer = json.loads(body) if body else {}
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {status} {answer.get('error', body)}")
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the list of result series (empty when it returns no data)."""
        data = self.api("/api/v1/query", query=promql)
        result: list[dict[str, Any]] = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime import sdnotify
from agent.runtime.sdnotify import LoopWatchdog, Notifier, watchdog_interval_s


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket like the one systemd passes in NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_each_notification_sends_the_exact_bytes(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.ready("control loop running, 12 miners")
    assert sock.recv(4096) == b"READY=1\nSTATUS=control loop running, 12 miners"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("curtailed for event ev-1")
    assert sock.recv(4096) == b"STATUS=curtailed for event ev-1"
    assert n.stopping("SIGTERM")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM"


def test_status_cannot_inject_other_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert Notifier({"NOTIFY_SOCKET": path}).status("ok\nREADY=1")
    assert sock.recv(4096) == b"STATUS=ok READY=1"


def test_abstract_socket_address() -> None:
    name = f"site-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_means_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_vanished_listener_is_logged_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.watchdog()
    assert not n.watchdog()
    warnings = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(warnings) == 1


def test_module_functions_use_os_environ(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(sdnotify, "_default", None)
    assert sdnotify.ready()
    assert sock.recv(4096) == b"READY=1"
    monkeypatch.setattr(sdnotify, "_default", None)


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    # Meant for another process (we inherited the environment): not ours to feed.
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.settimeout(0)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        pass
    sock.settimeout(2.0)
    return got


def test_loop_watchdog_feeds_only_while_the_loop_beats(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = listener
    now = [100.0]
    dog = LoopWatchdog(Notifier({"NOTIFY_SOCKET": path}), max_stall_s=45.0, clock=lambda: now[0])
    assert dog.feed_once()
    now[0] += 40.0  # a long cycle (device timeouts), still under max_stall_s
    assert dog.feed_once()
    assert _drain(sock) == [b"WATCHDOG=1", b"WATCHDOG=1"]
    now[0] += 10.0  # 50 s without progress: stuck
    assert not dog.feed_once()
    assert not dog.feed_once()
    assert _drain(sock) == []
    assert dog.stalled
    assert sum("no progress" in r.getMessage() for r in caplog.records) == 1
    dog.beat()
    assert dog.feed_once()
    assert _drain(sock) == [b"WATCHDOG=1"]
    assert not dog.stalled


async def test_loop_watchdog_task_pings_at_half_the_timeout(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    dog = LoopWatchdog(Notifier({"NOTIFY_SOCKET": path}), max_stall_s=0.5, timeout_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(dog.run(stop))
    for _ in range(6):  # the loop keeps beating for 0.3 s: about 6 pings at 0.05 s
        dog.beat()
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 1.0)
    pings = _drain(sock)
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 10  # loose: a loaded 2-core CI machine delays timers


async def test_loop_watchdog_without_systemd_returns_at_once() -> None:
    dog = LoopWatchdog(Notifier({}), max_stall_s=1.0)
    await asyncio.wait_for(dog.run(asyncio.Event()), 1.0)

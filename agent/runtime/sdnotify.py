"""systemd's ``sd_notify`` protocol in pure Python: readiness, watchdog, stopping, status.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path,
or an abstract name written with a leading ``@``). Each notification is one datagram of
newline-separated ``KEY=VALUE`` lines. Outside systemd the variable is unset and every call is a
no-op, so the same code runs under systemd, in a shell and in tests.

The watchdog (``WatchdogSec=``) must follow the control loop, not a side timer that would keep
a stuck agent alive. But one control cycle may legitimately outlast the watchdog (a cycle of
device calls that each time out), so :class:`LoopWatchdog` splits the job: the control loop calls
:meth:`LoopWatchdog.beat` at each step it completes, and a small task sends ``WATCHDOG=1`` every
half timeout only while the last beat is younger than ``max_stall_s``. A stuck loop stops
beating, the pings stop, and systemd restarts the service; a blocked event loop stops both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 1.0


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # systemd also knows vsock addresses; the agent never runs behind one


class Notifier:
    """Sends notifications to the socket named by ``NOTIFY_SOCKET`` in ``env``.

    Failures are logged once and reported by the return value, never raised: a service manager
    that stopped listening must not stop the agent.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", raw)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send ``message`` (``KEY=VALUE`` lines). True if sent, False if disabled or failed."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s", self._address.lstrip("\0"), exc)
                self._failed = True
            return False
        if self._failed:
            log.info("sd_notify works again")
            self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        return self.notify(_with_status("READY=1", status))

    def watchdog(self) -> bool:
        """Feed the watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
        return self.notify(_with_status("STOPPING=1", status))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows (``STATUS=...``)."""
        return self.notify(_with_status(None, text))


def _with_status(head: str | None, status: str | None) -> str:
    lines = [head] if head else []
    if status is not None:
        # A newline would start a new KEY=VALUE line: a status must not inject assignments.
        lines.append("STATUS=" + " ".join(status.splitlines()))
    return "\n".join(lines)


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds; None if there is none.

    ``WATCHDOG_USEC`` holds the timeout; ``WATCHDOG_PID``, when set, names the process it is
    meant for (a child that inherited the environment must not think it is watched).
    """
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class LoopWatchdog:
    """Feeds systemd's watchdog while the control loop makes progress (see module docstring).

    ``max_stall_s``: the longest the loop may go without a :meth:`beat` and still count as
    alive; set it above the longest legitimate step (a full round of device timeouts and
    retries), and it may exceed ``WatchdogSec=``.
    """

    def __init__(
        self,
        notifier: Notifier,
        max_stall_s: float,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_stall_s <= 0:
            raise ValueError(f"max_stall_s must be > 0 (got {max_stall_s})")
        self._notifier = notifier
        self._max_stall_s = max_stall_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._last_beat = clock()
        self.stalled = False

    def beat(self) -> None:
        """The control loop completed a step (snapshot built, plan made, actions run)."""
        self._last_beat = self._clock()
        if self.stalled:
            log.info("control loop is making progress again")
            self.stalled = False

    def stall_s(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last_beat

    def feed_once(self) -> bool:
        """Send ``WATCHDOG=1`` if the loop is alive; return whether it was sent."""
        if self.stall_s() > self._max_stall_s:
            if not self.stalled:
                log.error(
                    "control loop made no progress for %.0f s; no longer feeding the watchdog",
                    self.stall_s(),
                )
                self.stalled = True
            return False
        return self._notifier.watchdog()

    async def run(self, stop: asyncio.Event) -> None:
        """Feed every half watchdog timeout until ``stop`` is set; returns at once if systemd
        set no watchdog (``timeout_s`` overrides the timeout read from the environment)."""
        timeout_s = self._timeout_s if self._timeout_s is not None else watchdog_interval_s()
        if timeout_s is None or not self._notifier.enabled:
            return
        period_s = timeout_s / 2
        while not stop.is_set():
            self.feed_once()
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except TimeoutError:
                continue


_default: Notifier | None = None


def default() -> Notifier:
    """The process's notifier, built from ``os.environ`` on first use."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def ready(status: str | None = None) -> bool:
    return default().ready(status)


def watchdog() -> bool:
    return default().watchdog()


def stopping(status: str | None = None) -> bool:
    return default().stopping(status)


def status(text: str) -> bool:
    return default().status(text)

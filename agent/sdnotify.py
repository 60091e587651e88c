"""systemd's ``sd_notify`` protocol in pure Python: readiness, watchdog, stopping, status.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path,
or an abstract name written with a leading ``@``). Each notification is one datagram of
newline-separated ``KEY=VALUE`` lines. Outside systemd the variable is unset and every call is a
no-op, so the same code runs under systemd, in a shell and in tests.

The watchdog (``WatchdogSec=``) is fed by the control loop itself, not by a side timer: a loop
that is stuck stops feeding it and systemd restarts the service. :func:`watchdog_interval_s`
says how long systemd waits; feed at half of that.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

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

"""This test process's own loopback network and free ports, so two suites can run side by side.

Simulated miners listen on fixed vendor ports (4028, 80, 443...), so two test runs on one machine
must not share their addresses. Every test that binds takes its addresses from ``ip()``: they lie
in ``127.NET.0.0/16``, a /16 that this process reserves for its whole life with an exclusive
``flock`` on ``/tmp/site-agent-net-NET.lock`` (the kernel drops the lock when the process ends, even
when it is killed). Test modules mostly keep their own third octets (the demo test moves the demo's
127.42.0-1.x miners here, beside test_e2e_miners' .0-1), and each stops its servers when done.
Ports for servers that bind 127.0.0.1 come from ``free_port``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from pathlib import Path
from typing import IO

from tests.servers import free_port

__all__ = ["NET", "free_port", "ip", "on_net", "subnet"]

# Second octets a test process may take. 127.0.x.x is left to the system (127.0.0.1, resolvers);
# the walk starts from the pid so concurrent runs rarely even try the same lock.
_FIRST, _LAST = 100, 249
_LOCK_DIR = Path(os.environ.get("SITE_AGENT_NET_LOCK_DIR", "/tmp"))


def _reserve() -> tuple[int, IO[bytes]]:
    span = _LAST - _FIRST + 1
    start = os.getpid() % span
    for k in range(span):
        net = _FIRST + (start + k) % span
        handle = (_LOCK_DIR / f"site-agent-net-{net}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return net, handle
    raise RuntimeError(f"every loopback /16 127.{_FIRST}-{_LAST}.0.0 is held by another test run")


# The handle stays open (and the lock held) until the process exits.
NET, _LOCK = _reserve()


def ip(third: int, fourth: int) -> str:
    """``127.NET.third.fourth``: an address of this process's own /16."""
    if not (0 <= third <= 255 and 1 <= fourth <= 254):
        raise ValueError(f"no host address 127.{NET}.{third}.{fourth}")
    return f"127.{NET}.{third}.{fourth}"


def subnet(third: int, prefix: int = 24) -> str:
    """The network ``127.NET.third.0/prefix`` (prefix 24..32), e.g. for a pyasic scan."""
    return str(ipaddress.IPv4Network(f"127.{NET}.{third}.0/{prefix}", strict=False))


def on_net(address: str) -> str:
    """``address`` moved into this process's /16 (same third and fourth octets)."""
    packed = ipaddress.IPv4Address(address).packed
    return f"127.{NET}.{packed[2]}.{packed[3]}"

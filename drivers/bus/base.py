"""What a message-bus transport promises: sessions that publish, subscribe and yield messages.

The agent's MQTT bridge (``agent/outputs/mqtt.py``) speaks only these types; ``drivers/bus/mqtt.py``
implements them on aiomqtt. Every transport failure surfaces as :class:`BusError`, so the
bridge's reconnect loop catches one exception type and never a vendor one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from drivers.errors import AgentError


class BusError(AgentError):
    """The broker is unreachable, refused us, or the connection was lost mid-call."""


@dataclass(frozen=True, slots=True)
class BusMessage:
    """One message received from the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class LastWill:
    """What the broker publishes for us when we vanish without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class BusSettings:
    """How to reach the broker. ``password`` is the plain secret (resolved from config)."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = 30
    timeout_s: float = 5.0
    will: LastWill | None = None

    def __repr__(self) -> str:  # never print the password
        return (
            f"BusSettings(host={self.host!r}, port={self.port}, client_id={self.client_id!r}, "
            f"username={self.username!r}, tls={self.tls_ca is not None})"
        )


@runtime_checkable
class BusSession(Protocol):
    """One live connection. Any method raises :class:`BusError` once the connection is gone."""

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None: ...

    async def subscribe(self, pattern: str, qos: int = 1) -> None: ...

    def messages(self) -> AsyncIterator[BusMessage]: ...


@runtime_checkable
class Bus(Protocol):
    """Opens sessions; ``async with bus.session() as s`` connects, and disconnects on exit."""

    def session(self) -> AbstractAsyncContextManager[BusSession]: ...


def topic_matches(topic: str, pattern: str) -> bool:
    """Whether ``topic`` matches the MQTT subscription ``pattern`` (``+`` one level, ``#`` rest).

    Topics starting with ``$`` (broker internals) match no pattern that starts with a wildcard,
    as in MQTT 3.1.1 section 4.7.2.
    """
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    levels, wanted = topic.split("/"), pattern.split("/")
    for i, want in enumerate(wanted):
        if want == "#":
            return i == len(wanted) - 1  # "#" is valid only last; it matches the parent too
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(levels) == len(wanted)

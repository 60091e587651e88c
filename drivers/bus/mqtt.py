"""The MQTT transport on aiomqtt: one :class:`MqttBus` opens connected :class:`MqttSession` s.

aiomqtt (and paho below it) errors become :class:`~drivers.bus.base.BusError` here, with
``raise ... from``, so nothing above ``drivers/`` sees a vendor exception. A session is one
connection; reconnecting is the caller's loop (the agent's bridge), because only it knows what
to republish after a reconnect. TLS uses the CA and optional client certificate from settings.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiomqtt

from drivers.bus.base import BusError, BusMessage, BusSettings


class MqttSession:
    """A connected aiomqtt client behind the :class:`~drivers.bus.base.BusSession` protocol."""

    def __init__(self, client: aiomqtt.Client, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        try:
            # QoS 1/2 waits for the broker's acknowledgement, bounded by the timeout.
            await self._client.publish(
                topic, payload, qos=qos, retain=retain, timeout=self._timeout_s
            )
        except aiomqtt.MqttError as exc:
            raise BusError(f"publish to {topic} failed: {exc}") from exc

    async def subscribe(self, pattern: str, qos: int = 1) -> None:
        try:
            await self._client.subscribe(pattern, qos=qos, timeout=self._timeout_s)
        except aiomqtt.MqttError as exc:
            raise BusError(f"subscribe to {pattern} failed: {exc}") from exc

    async def messages(self) -> AsyncIterator[BusMessage]:
        try:
            async for msg in self._client.messages:
                payload = msg.payload
                if isinstance(payload, str):
                    data = payload.encode()
                elif isinstance(payload, bytes | bytearray):
                    data = bytes(payload)
                elif payload is None:
                    data = b""
                else:  # int/float payloads only come from our own local publishes
                    data = str(payload).encode()
                yield BusMessage(msg.topic.value, data, int(msg.qos), bool(msg.retain))
        except aiomqtt.MqttError as exc:
            raise BusError(f"connection lost: {exc}") from exc


class MqttBus:
    """Connects to one broker with fixed settings; each :meth:`session` is a fresh connection."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        will = None
        if s.will is not None:
            will = aiomqtt.Will(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        tls_context = None
        if s.tls_ca is not None or s.tls_cert is not None:
            tls_context = ssl.create_default_context(
                cafile=str(s.tls_ca) if s.tls_ca is not None else None
            )
            if s.tls_cert is not None:
                tls_context.load_cert_chain(
                    str(s.tls_cert), str(s.tls_key) if s.tls_key is not None else None
                )
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            will=will,
            keepalive=s.keepalive_s,
            timeout=s.timeout_s,
            tls_context=tls_context,
            # Commands older than this connection must not be replayed after an outage: a
            # clean session drops whatever the broker queued for a previous one.
            clean_session=True,
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[MqttSession]:
        try:
            client = self._client()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BusError(f"cannot set up MQTT client: {exc}") from exc
        try:
            async with client:
                yield MqttSession(client, self.settings.timeout_s)
        except aiomqtt.MqttError as exc:
            raise BusError(f"MQTT broker {self.settings.host}:{self.settings.port}: {exc}") from exc

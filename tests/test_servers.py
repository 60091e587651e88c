"""The test servers themselves: a broker that refuses strangers and accepts our users."""

from __future__ import annotations

import aiomqtt
import pytest

from tests.servers import Mosquitto

pytestmark = pytest.mark.mqtt


async def test_mosquitto_accepts_users_and_refuses_anonymous(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, username="agent", password="agent-secret"
    ) as client:
        await client.subscribe("t/x", qos=1)
        await client.publish("t/x", b"hello", qos=1)
        async for message in client.messages:
            assert message.payload == b"hello"
            break
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port):
            pass

"""A miner or a GPU that answers nonsense: over a real socket to unmodified pyasic, and
through the NVML driver.

The reply is the LuxOS simulator's own answer, captured over TCP, then altered the way a broken
or hostile miner would: a NaN or a boolean where a number belongs, a power past any real miner,
a reply that never ends, one nested thousands deep. The driver must turn each into
``BadReply`` (one line, naming the device) and never into a reading or a traceback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from drivers.errors import BadReply
from drivers.gpus.nvml import NvmlGpus
from drivers.inputs import RejectionCounter
from drivers.miners.pyasic_driver import READ_COMMAND, PyasicMiner
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.nvml import H100_SXM, SimNvml
from tests.loopback import ip

pytestmark = pytest.mark.hostile

REAL = ip(40, 1)
FAKE = ip(40, 2)
PORT = 4028  # pyasic's LuxOS port is fixed


async def exchange(host: str, command: str) -> bytes:
    reader, writer = await asyncio.open_connection(host, PORT)
    writer.write(json.dumps({"command": command}).encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


@pytest.fixture
async def genuine() -> AsyncIterator[dict[str, bytes]]:
    """The simulator's real answers to the two commands the driver sends."""
    async with LuxosFleet([MinerSpec(REAL, "s19jpro")]):
        yield {
            "version": await exchange(REAL, "version"),
            READ_COMMAND: await exchange(REAL, READ_COMMAND),
        }


async def serve(answers: dict[str, bytes]) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.loads(await reader.read(4096))
        writer.write(answers[request["command"]])
        await writer.drain()
        writer.close()

    return await asyncio.start_server(client, FAKE, PORT)


def altered(reply: bytes, change: Callable[[dict[str, object]], None]) -> bytes:
    data = json.loads(reply.rstrip(b"\x00"))
    change(data)
    return json.dumps(data).encode()


def set_watts(value: object) -> Callable[[dict[str, object]], None]:
    def change(data: dict[str, object]) -> None:
        data["power"][0]["POWER"][0]["Watts"] = value  # type: ignore[index]

    return change


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda r: altered(r, set_watts(float("nan"))), "power Watts: expected a finite number"),
        (lambda r: altered(r, set_watts(True)), "power Watts: expected a number, got True"),
        (lambda r: altered(r, set_watts(5e6)), "power Watts: expected 0 to 100000"),
        (lambda r: altered(r, set_watts("1e999")), "power Watts: expected a finite number"),
        (lambda r: r + b" " * (300 * 1024), "reply larger than 262,144 bytes"),
        (lambda r: b"[" * 50_000 + b"]" * 50_000, "read: reply is not JSON"),
    ],
)
async def test_nonsense_replies_are_bad_replies(
    genuine: dict[str, bytes], make: Callable[[bytes], bytes], words: str
) -> None:
    answers = dict(genuine)
    answers[READ_COMMAND] = make(genuine[READ_COMMAND])
    server = await serve(answers)
    try:
        counter = RejectionCounter()
        miner = PyasicMiner.luxos(
            FAKE, asyncio.Semaphore(4), device_id="m1", timeout_s=5, rejections=counter
        )
        with pytest.raises(BadReply) as info:
            await miner.read()
        text = str(info.value)
        assert text.startswith("m1: ")
        assert words in text, text
        assert "\n" not in text
        if "Watts" in words:  # a parsed reply with a bad number: counted as a rejected input
            assert sum(n for (source, _), n in counter.counts().items() if source == "miner") == 1
        # The genuine answer still reads: nothing was poisoned by the bad one.
        answers[READ_COMMAND] = genuine[READ_COMMAND]
        reading = await miner.read()
        assert 0 < reading.power_w < 100_000
    finally:
        server.close()
        await server.wait_closed()


class BrokenNvml(SimNvml):
    """The NVML stand-in with one reading gone wrong, as a wedged driver reports it."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__([H100_SXM])
        self.field, self.value = field, value

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        if self.field == "power":
            return self.value  # type: ignore[return-value]
        return super().nvmlDeviceGetPowerUsage(handle)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        if self.field == "temperature":
            return self.value  # type: ignore[return-value]
        return super().nvmlDeviceGetTemperature(handle, sensor)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("power", 0xFFFFFFFF, "power usage: expected 0 to 10000 W, got 4.29497e+06 W"),
        ("power", float("nan"), "power usage: expected a finite number"),
        ("temperature", True, "temperature: expected a number, got True"),
        ("temperature", 10**400, "temperature: "),
    ],
)
async def test_nonsense_gpu_readings_are_bad_replies(field: str, value: object, words: str) -> None:
    counter = RejectionCounter()
    async with NvmlGpus(BrokenNvml(field, value), rejections=counter) as gpus:
        with pytest.raises(BadReply) as info:
            await gpus.read_all()
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert sum(n for (source, _), n in counter.counts().items() if source == "gpu") == 1

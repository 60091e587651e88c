"""The stock Antminer's web client (``drivers/miners/antminer_web.py``): digest auth and bounds.

Against the Antminer simulator: sleep and wake through the client, the nonce reused with a
counting ``nc`` (one exchange a call once a challenge is known), wrong credentials refused as
``AuthFailed`` with nothing written. Against hostile servers on loopback: an endless reply, a
reply that is not HTTP, a challenge for another algorithm; each is an error, never a hang or an
unbounded buffer. A session keeps one connection across calls, reads chunked replies, and
opens another connection when the server closes one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from drivers.errors import AuthFailed
from drivers.miners.antminer_web import MAX_BODY_BYTES, AntminerWeb, WebError
from drivers.miners.base import MinerMode
from drivers.miners.pyasic_driver import PyasicMiner
from simulators.antminer import AntminerFleet, antminer_specs
from simulators.luxos_model import Timing
from tests.loopback import ip

STOCK = ip(155, 1)
HOSTILE = ip(155, 9)


@pytest.fixture
async def antminers() -> AsyncIterator[AntminerFleet]:
    fleet = AntminerFleet(
        antminer_specs(1, STOCK), timing=Timing(wake_ramp_s=0.2, sleep_ramp_s=0.1)
    )
    try:
        await fleet.start()
    except PermissionError:
        pytest.skip("binding port 80 (the Antminer web API) needs root")
    try:
        yield fleet
    finally:
        await fleet.stop()


async def test_digest_nonce_is_reused_with_a_counting_nc(antminers: AntminerFleet) -> None:
    web = AntminerWeb(STOCK)
    conf = await web.get("get_miner_conf")
    assert conf["bitmain-work-mode"] == "0"
    assert web._nc == 1  # challenged once, answered once
    info = await web.get("get_system_info")
    assert info["minertype"].startswith("Antminer")
    assert web._nc == 2  # same nonce, next count: no second challenge


async def test_sleep_and_wake_through_the_web_client(antminers: AntminerFleet) -> None:
    m = PyasicMiner.for_firmware(
        STOCK, "antminer", asyncio.Semaphore(4), timeout_s=3.0, credentials=("root", "root")
    )
    await m.sleep()
    assert antminers.truth(STOCK)["sleeping"]
    assert antminers.truth(STOCK)["conf_writes"] == 1
    for _ in range(100):
        if (await m.read()).mode is MinerMode.SLEEPING:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("never read asleep")
    await m.wake()
    assert not antminers.truth(STOCK)["sleeping"]


async def test_wrong_web_password_is_auth_failed_and_writes_nothing(
    antminers: AntminerFleet,
) -> None:
    m = PyasicMiner.for_firmware(
        STOCK, "antminer", asyncio.Semaphore(4), timeout_s=3.0, credentials=("root", "nope")
    )
    with pytest.raises(AuthFailed, match="credentials refused"):
        await m.sleep()
    assert not antminers.truth(STOCK)["sleeping"]
    assert antminers.truth(STOCK)["conf_writes"] == 0


async def _serve(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await answer(writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, HOSTILE, 0)


def _port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def test_an_endless_reply_is_refused_at_the_cap() -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
        for _ in range(MAX_BODY_BYTES // 4096 + 8):
            writer.write(b"1," * 2048)
            await writer.drain()
        await asyncio.sleep(5)

    server = await _serve(endless)
    async with server:
        web = AntminerWeb(HOSTILE, port=_port(server))
        with pytest.raises(ValueError, match="larger than"):
            async with asyncio.timeout(5):
                await web.get("stats")


async def test_a_reply_that_is_not_http_or_not_digest_is_an_error() -> None:
    async def garbage(writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\xff garbage\r\n\r\n{{{")

    async def basic(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Digest realm="x", nonce="n", '
            b'algorithm="SHA-256"\r\nContent-Length: 0\r\n\r\n'
        )

    async def server_error(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")

    for answer, error, text in (
        (garbage, ValueError, "not HTTP"),
        (basic, ValueError, "SHA-256"),
        (server_error, WebError, "HTTP 500"),
    ):
        server = await _serve(answer)
        async with server:
            web = AntminerWeb(HOSTILE, port=_port(server))
            with pytest.raises(error, match=text):
                async with asyncio.timeout(5):
                    await web.get("stats")


async def test_a_session_keeps_one_connection_and_reads_chunked_and_closing_replies() -> None:
    connections = 0
    replies = [
        b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"a": 1}\n',
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"b"\r\n4\r\n: 2}\r\n0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{"c": 3}',
    ]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while replies:
                await reader.readuntil(b"\r\n\r\n")
                reply = replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if b"close" in reply:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, HOSTILE, 0)
    async with server:
        web = AntminerWeb(HOSTILE, port=_port(server))
        async with asyncio.timeout(5), web.session() as s:
            assert await s.get("one") == {"a": 1}
            assert await s.get("two") == {"b": 2}
            assert await s.get("three") == {"c": 3}
            assert connections == 1  # three calls on one keep-alive connection
            replies.append(b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{"d": 4}')
            assert await s.get("four") == {"d": 4}  # the server closed: a new connection
        assert connections == 2

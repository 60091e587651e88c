"""Helpers for the operator-page tests: WCAG contrast, the page behind a real listener, raw SSE.

``contrast_ratio`` is the WCAG 2.1 formula (relative luminance of sRGB, (L1 + 0.05) / (L2 +
0.05)); the page tests use it on the colours the style sheet declares and on the colours a real
browser computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from agent.control.config import AgentConfig
from agent.outputs.metrics import MetricsServer, build_registry
from agent.outputs.page import OperatorPage
from agent.runtime.state import AgentState

PAGE_DIR = Path(__file__).resolve().parent.parent / "agent" / "outputs" / "page"


def _channel(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def relative_luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = (_channel(v / 255.0) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    hi, lo = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def parse_colour(text: str) -> tuple[int, int, int]:
    """``#rrggbb``, ``#rgb`` or ``rgb(r, g, b)`` / opaque ``rgba(...)`` as a triple."""
    text = text.strip()
    if m := re.fullmatch(r"#([0-9a-fA-F]{6})", text):
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if m := re.fullmatch(r"#([0-9a-fA-F]{3})", text):
        r, g, b = (int(c * 2, 16) for c in m.group(1))
        return r, g, b
    if m := re.fullmatch(r"rgba?\((\d+),\s*(\d+),\s*(\d+)(?:,\s*([\d.]+))?\)", text):
        if m.group(4) is not None and float(m.group(4)) < 1.0:
            raise ValueError(f"translucent colour {text}: blend it first")
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    raise ValueError(f"not a colour: {text}")


def css_variables() -> dict[str, tuple[int, int, int]]:
    """The colour custom properties declared in page.css (``--name: #hex;``)."""
    css = (PAGE_DIR / "page.css").read_text()
    return {
        m.group(1): parse_colour(m.group(2))
        for m in re.finditer(r"--([a-z-]+):\s*(#[0-9a-fA-F]{3,6});", css)
    }


class PageServer:
    """The real metrics listener with the operator page on it, fed by ``state``."""

    def __init__(self, state: AgentState, config: AgentConfig | None, page: OperatorPage) -> None:
        self.state = state
        self.page = page
        self.server = MetricsServer(build_registry(state, config), "127.0.0.1", 0, routes=page)
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self, port: int = 0) -> None:
        self.server.requested_port = port
        await self.server.start()
        self.stop = asyncio.Event()
        self._task = asyncio.create_task(self.page.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.server.close()


@contextlib.asynccontextmanager
async def page_server(
    state: AgentState, config: AgentConfig | None = None, **page_kw: object
) -> AsyncIterator[PageServer]:
    page = OperatorPage(state, config, **page_kw)  # type: ignore[arg-type]
    server = PageServer(state, config, page)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def http_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Read a response's status line and headers."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def open_stream(
    port: int, path: str = "/events", method: str = "GET", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP request on a fresh connection (``rcvbuf`` shrinks the client's receive buffer)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def next_view(reader: asyncio.StreamReader, timeout_s: float = 15.0) -> bytes:
    """The data line of the next ``view`` message on an SSE stream."""
    async with asyncio.timeout(timeout_s):
        event = None
        while True:
            line = (await reader.readline()).rstrip(b"\n")
            if not line and reader.at_eof():
                raise EOFError("stream ended")
            if line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: ") and event == b"view":
                return line[6:]

"""The stock Antminer web API (CGI behind HTTP digest auth), as a small bounded client.

pyasic's ``AntminerModernWebAPI`` builds a new ``httpx.AsyncClient`` (and its TLS context) for
every call, answers every digest challenge afresh (two exchanges a call) and turns every failure
into ``{"success": False}``. Sleep and wake are three calls (read the config, write it with the
new ``miner-mode``, read it back), so on a fleet that is most of a spike's CPU. This client sends
the same requests pyasic does, but:

* ``async with web.session() as s:`` gives calls that share one HTTP/1.1 keep-alive connection
  (a sleep is three calls: one TCP connection instead of three or four); ``web.get``/``post``
  alone are one HTTP/1.0 exchange on a connection of their own (``Connection: close``). A
  reply is read by its ``Content-Length`` (or chunks, or to EOF) under a byte cap; a reply that
  does not keep the connection open ends it, and the session's next call opens another;
* the server's digest nonce is kept and reused with a counting ``nc`` (RFC 7616); a 401 (a stale
  or unknown nonce) takes the new challenge and retries once;
* every failure is raised: ``OSError`` for the connection, :class:`WebError` for an HTTP status
  other than 200 (401 after a fresh challenge means the credentials are wrong), ``ValueError``
  for a reply that is not one JSON object.

The caller bounds the time (``asyncio.timeout``) and maps the errors to :mod:`drivers.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

WEB_PORT = 80
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 256 * 1024
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]+))')


class WebError(Exception):
    """The web API answered an HTTP status other than 200."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def parse_challenge(header: str) -> dict[str, str]:
    """The parameters of a ``WWW-Authenticate: Digest ...`` header (``ValueError`` if not one)."""
    if not header[:7].lower() == "digest ":
        raise ValueError("the web API asked for an authentication other than Digest")
    params = {k.lower(): (q if q else b) for k, q, b in _PARAM.findall(header[7:2048])}
    if "nonce" not in params or "realm" not in params:
        raise ValueError("digest challenge without nonce or realm")
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm != "MD5":
        raise ValueError(f"digest algorithm {algorithm!r} is not supported")
    return params


class AntminerWeb:
    """One miner's web API: ``get``/``post`` of a CGI by name, JSON in and out.

    ``get``/``post`` make one call on a connection of their own; ``async with web.session() as
    s`` gives calls that share one keep-alive connection (each session its own: concurrent
    sessions never interleave on a socket). The digest nonce is shared by all of them.
    """

    __slots__ = ("_challenge", "_nc", "address", "password", "port", "username")

    def __init__(
        self, address: str, username: str = "root", password: str = "root", port: int = WEB_PORT
    ) -> None:
        self.address = address
        self.username = username
        self.password = password
        self.port = port
        self._challenge: dict[str, str] | None = None
        self._nc = 0

    async def get(self, cgi: str) -> dict[str, Any]:
        async with self.session(keep_alive=False) as s:
            return await s.get(cgi)

    async def post(self, cgi: str, doc: dict[str, Any]) -> dict[str, Any]:
        async with self.session(keep_alive=False) as s:
            return await s.post(cgi, doc)

    @contextlib.asynccontextmanager
    async def session(self, keep_alive: bool = True) -> AsyncIterator[WebSession]:
        """Calls sharing one connection (HTTP/1.1 keep-alive), closed on exit."""
        s = WebSession(self, keep_alive)
        try:
            yield s
        finally:
            s.drop()

    def authorization(self, method: str, uri: str) -> str | None:
        c = self._challenge
        if c is None:
            return None
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = secrets.token_hex(8)
        ha1 = _md5(f"{self.username}:{c['realm']}:{self.password}")
        ha2 = _md5(f"{method}:{uri}")
        qop = "auth" if "auth" in c.get("qop", "").split(",") else ""
        if qop:
            response = _md5(f"{ha1}:{c['nonce']}:{nc}:{cnonce}:auth:{ha2}")
        else:
            response = _md5(f"{ha1}:{c['nonce']}:{ha2}")
        parts = [
            f'username="{self.username}"',
            f'realm="{c["realm"]}"',
            f'nonce="{c["nonce"]}"',
            f'uri="{uri}"',
            f'response="{response}"',
            'algorithm="MD5"',
        ]
        if qop:
            parts += [f'qop="{qop}"', f"nc={nc}", f'cnonce="{cnonce}"']
        if "opaque" in c:
            parts.append(f'opaque="{c["opaque"]}"')
        return "Digest " + ", ".join(parts)

    def challenged(self, header: str) -> None:
        """Take the server's (fresh) digest challenge."""
        self._challenge = parse_challenge(header)
        self._nc = 0

    def forget(self) -> None:
        self._challenge = None


class WebSession:
    """Calls on one connection of an :class:`AntminerWeb` (made by ``AntminerWeb.session``)."""

    __slots__ = ("_conn", "_keep", "_web")

    def __init__(self, web: AntminerWeb, keep_alive: bool) -> None:
        self._web = web
        self._keep = keep_alive
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, cgi: str) -> dict[str, Any]:
        return await self._call("GET", cgi, b"")

    async def post(self, cgi: str, doc: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", cgi, json.dumps(doc).encode())

    def drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def _call(self, method: str, cgi: str, body: bytes) -> dict[str, Any]:
        uri = f"/cgi-bin/{cgi}.cgi"
        status, headers, reply = await self._exchange(method, uri, body)
        if status == 401:
            # No nonce yet, or the server no longer takes ours: answer its fresh challenge.
            self._web.challenged(headers.get("www-authenticate", ""))
            status, headers, reply = await self._exchange(method, uri, body)
        if status != 200:
            if status == 401:
                self._web.forget()
            raise WebError(status, cgi)
        doc = json.loads(reply)
        if not isinstance(doc, dict):
            raise ValueError(f"{cgi}: reply is not a JSON object")
        return doc

    async def _exchange(
        self, method: str, uri: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        keep = self._keep
        head = [
            f"{method} {uri} HTTP/1.{1 if keep else 0}",
            f"Host: {self._web.address}",
            "Connection: keep-alive" if keep else "Connection: close",
            "Accept: application/json",
        ]
        auth = self._web.authorization(method, uri)
        if auth is not None:
            head.append(f"Authorization: {auth}")
        if method == "POST":
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if self._conn is None:
            self._conn = await asyncio.open_connection(
                self._web.address, self._web.port, limit=MAX_HEAD_BYTES
            )
        reader, writer = self._conn
        reusable = False
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            reply, reusable = await _read_body(reader, headers)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the web API closed without a complete reply") from exc
        except asyncio.LimitOverrunError as exc:
            raise ValueError(f"reply head larger than {MAX_HEAD_BYTES:,} bytes") from exc
        finally:
            if not (keep and reusable):
                self.drop()  # also on every error and on cancellation
        return status, headers, reply


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[bytes, bool]:
    """The reply body under the byte cap, and whether the connection may carry another call."""
    closing = headers.get("connection", "").lower() == "close"
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise ValueError(f"reply larger than {MAX_BODY_BYTES:,} bytes or unreadable length")
        return await reader.readexactly(int(length)), not closing
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if len(body) + size > MAX_BODY_BYTES:
                raise ValueError(f"reply larger than {MAX_BODY_BYTES:,} bytes")
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are expected
                return body, not closing
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    # Neither: the body runs to EOF, and the connection ends with it.
    body = await reader.read(MAX_BODY_BYTES + 1)
    while body and len(body) <= MAX_BODY_BYTES:
        more = await reader.read(MAX_BODY_BYTES + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"reply larger than {MAX_BODY_BYTES:,} bytes")
    return body, False


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError("reply is not HTTP")
    headers: dict[str, str] = {}
    for line in lines[1:64]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers

"""The stock Antminer web API (CGI behind HTTP digest auth), as a small bounded client.

pyasic's ``AntminerModernWebAPI`` builds a new ``httpx.AsyncClient`` (and its TLS context) for
every call, answers every digest challenge afresh (two exchanges a call) and turns every failure
into ``{"success": False}``. Sleep and wake are three calls (read the config, write it with the
new ``miner-mode``, read it back), so on a fleet that is most of a spike's CPU. This client sends
the same requests pyasic does, but:

* each call is one HTTP/1.0 exchange on its own connection (``Connection: close``), the reply
  read to EOF under a byte cap;
* the server's digest nonce is kept and reused with a counting ``nc`` (RFC 7616); a 401 (a stale
  or unknown nonce) takes the new challenge and retries once;
* every failure is raised: ``OSError`` for the connection, :class:`WebError` for an HTTP status
  other than 200 (401 after a fresh challenge means the credentials are wrong), ``ValueError``
  for a reply that is not one JSON object.

The caller bounds the time (``asyncio.timeout``) and maps the errors to :mod:`drivers.errors`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
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
    """One miner's web API: ``get``/``post`` of a CGI by name, JSON in and out."""

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
        return await self._call("GET", cgi, b"")

    async def post(self, cgi: str, doc: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", cgi, json.dumps(doc).encode())

    async def _call(self, method: str, cgi: str, body: bytes) -> dict[str, Any]:
        uri = f"/cgi-bin/{cgi}.cgi"
        status, headers, reply = await self._exchange(method, uri, body)
        if status == 401:
            # No nonce yet, or the server no longer takes ours: answer its fresh challenge.
            self._challenge = parse_challenge(headers.get("www-authenticate", ""))
            self._nc = 0
            status, headers, reply = await self._exchange(method, uri, body)
        if status != 200:
            if status == 401:
                self._challenge = None
            raise WebError(status, cgi)
        doc = json.loads(reply)
        if not isinstance(doc, dict):
            raise ValueError(f"{cgi}: reply is not a JSON object")
        return doc

    def _authorization(self, method: str, uri: str) -> str | None:
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

    async def _exchange(
        self, method: str, uri: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        head = [
            f"{method} {uri} HTTP/1.0",
            f"Host: {self.address}",
            "Connection: close",
            "Accept: application/json",
        ]
        auth = self._authorization(method, uri)
        if auth is not None:
            head.append(f"Authorization: {auth}")
        if method == "POST":
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        reader, writer = await asyncio.open_connection(
            self.address, self.port, limit=MAX_HEAD_BYTES
        )
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            raw_head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(raw_head)
            reply = await reader.read(MAX_BODY_BYTES + 1)
            while reply and len(reply) <= MAX_BODY_BYTES:
                more = await reader.read(MAX_BODY_BYTES + 1 - len(reply))
                if not more:
                    break
                reply += more
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the web API closed without a complete reply") from exc
        except asyncio.LimitOverrunError as exc:
            raise ValueError(f"reply head larger than {MAX_HEAD_BYTES:,} bytes") from exc
        finally:
            writer.close()
        if len(reply) > MAX_BODY_BYTES:
            raise ValueError(f"reply larger than {MAX_BODY_BYTES:,} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) < len(reply):
            reply = reply[: int(length)]
        return status, headers, reply


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

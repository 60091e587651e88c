"""HTTP price server: a real JSON price feed on loopback, with fault modes, for tests and demos.

It plays a list of prices (or one column of a price CSV) at ``speed`` × real time and answers
``GET /price`` with::

    {"data": [{"time": "2026-11-23T01:45:00Z", "price": 41.5, "unit": "USD/MWh", "index": 7}]}

``time`` is the wall-clock instant the current price was published (so a client's freshness
check sees a live feed), ``index`` the position in the played series. ``GET /hashprice``,
``/btc`` and ``/difficulty`` serve fixed numbers set by the test, for hashprice feeds.

Fault modes (``server.fault = ...`` or ``POST /fault {"mode": ...}``): ``ok``, ``down`` (HTTP
503), ``garbage`` (not JSON), ``nan`` (a NaN price literal), ``missing`` (no price field),
``string`` (the price as text), ``stale`` (timestamp two days old), ``future`` (one day ahead),
``slow`` (answers after ``slow_s``). Hostile modes, for the bounded-input tests: ``trickle``
(headers at once, then the body one byte every ``trickle_s``: per-read timeouts never fire),
``huge`` (a 2 MB body), ``flood`` (2 MB chunked, with no length announced), ``deep``
(arrays nested 10,000 deep), ``overflow`` (a price of 1e308,
infinite once converted from USD/kWh), ``bool`` (the price ``true``), ``duplicate`` (the price
key twice). ``POST /fault`` validates every field (a known mode; ``slow_s`` and ``trickle_s``
finite, 0–600 s) and changes nothing on a bad request. It imports neither ``agent`` nor
``drivers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

FAULT_MODES = (
    "ok",
    "down",
    "garbage",
    "nan",
    "missing",
    "string",
    "stale",
    "future",
    "slow",
    "trickle",
    "huge",
    "flood",
    "deep",
    "overflow",
    "bool",
    "duplicate",
)
MAX_FAULT_BODY_BYTES = 4096
MAX_DELAY_S = 600.0


def read_csv_column(path: Path, column: str) -> list[float]:
    """The numbers of one CSV column, as they are (unparseable cells become NaN on purpose)."""
    values: list[float] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                values.append(float(row[column]))
            except (TypeError, ValueError):
                values.append(math.nan)
    return values


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _delay(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds")
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY_S:
        raise ValueError(f"{name} must be 0 to {MAX_DELAY_S:g} s, got {value!r}")
    return float(value)


def _finite_arg(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` parse as floats otherwise)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class PriceServer:
    """Serves prices over HTTP on ``host:port`` (port 0: pick a free one)."""

    def __init__(
        self,
        prices: Sequence[float],
        *,
        interval_s: float = 900.0,
        speed: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        unit: str = "USD/MWh",
        clock: Callable[[], float] = time.monotonic,
        slow_s: float = 5.0,
    ) -> None:
        if not prices:
            raise ValueError("need at least one price")
        if not host.startswith("127."):
            raise ValueError("the price server listens on loopback only")
        self.prices = list(prices)
        self.interval_s = interval_s
        self.speed = speed
        self.host = host
        self.port = port
        self.unit = unit
        self.slow_s = slow_s
        self.trickle_s = 0.2
        self.fault = "ok"
        self.requests = 0
        self.numbers: dict[str, float] = {"hashprice": 50.0, "btc": 100_000.0, "difficulty": 1e14}
        self._clock = clock
        self._clock0 = clock()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def index(self) -> int:
        """The position of the price being served now (the series loops)."""
        elapsed_s = (self._clock() - self._clock0) * self.speed
        return int(elapsed_s // self.interval_s) % len(self.prices)

    def _body(self, price: float, key: str = "price") -> str | None:
        """The JSON text for the current fault mode; None means answer 503."""
        now = datetime.now(UTC)
        if self.fault == "down":
            return None
        if self.fault == "garbage":
            return '{"data": [{"price": 41.5,, oops'
        if self.fault == "deep":
            return "[" * 10_000 + "]" * 10_000
        if self.fault in ("huge", "flood"):
            return json.dumps({"data": [{"price": price, "pad": "x" * 2_000_000}]})
        if self.fault == "stale":
            now -= timedelta(days=2)
        elif self.fault == "future":
            now += timedelta(days=1)
        entry: dict[str, object] = {
            "time": now.isoformat().replace("+00:00", "Z"),
            key: price,
            "unit": self.unit,
            "index": self.index(),
        }
        if self.fault == "nan":
            entry[key] = math.nan  # json.dumps writes the bare NaN literal real feeds send
        elif self.fault == "missing":
            del entry[key]
        elif self.fault == "string":
            entry[key] = str(price)
        elif self.fault == "overflow":
            entry[key] = 1e308
        elif self.fault == "bool":
            entry[key] = True
        elif self.fault == "duplicate":
            text = json.dumps(entry)
            return '{"data": [' + text[:-1] + f', "{key}": {price * 100}' + "}]}"
        return json.dumps({"data": [entry]})

    async def _answer(self, request: web.Request, body: str | None) -> web.StreamResponse:
        self.requests += 1
        if self.fault == "slow":
            await asyncio.sleep(self.slow_s)
        if body is None:
            return web.Response(status=503, text="price feed down")
        if self.fault == "flood":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            data = body.encode()
            for i in range(0, len(data), 65536):
                await response.write(data[i : i + 65536])
            await response.write_eof()
            return response
        if self.fault == "trickle":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for i in range(len(body)):
                await response.write(body[i : i + 1].encode())
                await asyncio.sleep(self.trickle_s)
            await response.write_eof()
            return response
        return web.Response(text=body, content_type="application/json")

    async def _price(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._body(self.prices[self.index()]))

    async def _number(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.numbers:
            raise web.HTTPNotFound(text=f"unknown feed {name[:40]}")
        return await self._answer(request, self._body(self.numbers[name], key="value"))

    async def _set_fault(self, request: web.Request) -> web.Response:
        """``{"mode": M, "slow_s": S, "trickle_s": T}``: every field checked before any change."""
        if (request.content_length or 0) > MAX_FAULT_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_FAULT_BODY_BYTES, actual_size=request.content_length or 0
            )
        raw = await request.content.read(MAX_FAULT_BODY_BYTES + 1)
        try:
            if len(raw) > MAX_FAULT_BODY_BYTES:
                raise ValueError(f"body over {MAX_FAULT_BODY_BYTES} bytes")
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            if not isinstance(data, dict) or "mode" not in data:
                raise ValueError('expected {"mode": ...}')
            unknown = sorted(str(k) for k in data if k not in ("mode", "slow_s", "trickle_s"))
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}")
            mode = data["mode"]
            if not isinstance(mode, str) or mode not in FAULT_MODES:
                raise ValueError(f"unknown mode {str(mode)[:40]!r}; one of {FAULT_MODES}")
            delays = {k: _delay(k, data[k]) for k in ("slow_s", "trickle_s") if k in data}
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise web.HTTPBadRequest(text=str(exc)[:200]) from None
        self.fault = mode
        self.slow_s = delays.get("slow_s", self.slow_s)
        self.trickle_s = delays.get("trickle_s", self.trickle_s)
        return web.json_response({"mode": mode})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/price", self._price)
        app.router.add_get("/{name}", self._number)
        app.router.add_post("/fault", self._set_fault)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        # Bind the socket ourselves so that port 0 resolves to the port actually bound.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PriceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve(args: argparse.Namespace) -> None:
    prices = read_csv_column(Path(args.csv), args.column) if args.csv else [args.constant]
    server = PriceServer(prices, speed=args.speed, host=args.host, port=args.port)
    await server.start()
    print(f"price server on {server.url}/price ({len(prices)} prices, speed {args.speed:g})")
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--csv", help="price CSV to play")
    parser.add_argument("--column", default="HB_WEST")
    parser.add_argument("--constant", type=_finite_arg, default=40.0, help="price when no CSV")
    parser.add_argument("--speed", type=_finite_arg, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

"""Generic HTTP JSON price poller: one GET, a value (and optional timestamp) found by field path.

Any JSON price feed fits: ``value_path="data.0.price"`` walks dict keys and list indexes,
``unit`` converts to the project's unit (USD/MWh for energy, USD per PH/s per day for
hashprice), ``time_path`` optionally names the reading's timestamp (ISO 8601 with a zone, or
epoch seconds). Every answer is validated; what is wrong becomes :class:`BadInput` with a
message naming the URL, the path and what was expected:

* malformed JSON, a missing field, a value that is not a number (strings, booleans), NaN/inf;
* a timestamp more than ``max_future_s`` ahead of our clock or older than ``max_age_s``.

Transport failures (refused, reset, timeout, HTTP status ≥ 400) become :class:`SourceError`.
A failed poll never replaces the last good reading: ``last_good`` and ``age_s()`` say what we
have and how old it is, ``last_error`` why the newest poll failed. The coordinator calls
``latest()`` on the ``poll_interval_s`` schedule (or runs :meth:`HttpJsonSource.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import ConfigDict, Field, field_validator

from drivers.errors import BadInput, SourceError
from drivers.inputs import (
    InputRejected,
    RejectionRecorder,
    SourceTimeout,
    StrictSettings,
    deadline,
    finite_in_range,
    load_json,
    record,
)
from drivers.prices.base import PriceReading

if TYPE_CHECKING:  # httpx loads with the first request, not with a config
    import httpx

log = logging.getLogger(__name__)

# A price answer is well under a kilobyte; anything this big is a fault or an attack.
MAX_BODY_BYTES = 256 * 1024
# Physical ranges after conversion. Energy: ERCOT's cap is 5,000 USD/MWh, negative prices are
# real. Hashprice: the all-time high was about 4,000 USD/PH/day; zero or less is no reading.
# Raw inputs of computed hashprice (BTC price, difficulty): positive and well inside a float.
PRICE_RANGE_USD_PER_MWH = (-100_000.0, 100_000.0)
HASHPRICE_RANGE_USD_PER_PH_DAY = (1e-6, 100_000.0)
RAW_RANGE = (-1e30, 1e30)  # the hashprice formula checks the signs
HASHPRICE_UNITS = frozenset({"USD/PH/day", "USD/TH/day", "usd_per_ph_day", "usd_per_th_day"})

# Factor to the project's unit: energy → USD/MWh, hashprice → USD per PH/s per day,
# "raw" leaves the number as it is (BTC price, difficulty) for computed hashprice.
UNIT_FACTORS: dict[str, float] = {
    "USD/MWh": 1.0,
    "USD/kWh": 1000.0,
    "cents/kWh": 10.0,
    "USD/PH/day": 1.0,
    "USD/TH/day": 1000.0,
    "raw": 1.0,
    # The same units spelled as identifiers (the spelling agent/control/config.py uses).
    "usd_per_mwh": 1.0,
    "usd_per_kwh": 1000.0,
    "cents_per_kwh": 10.0,
    "usd_per_ph_day": 1.0,
    "usd_per_th_day": 1000.0,
}
Unit = Literal[
    "USD/MWh",
    "USD/kWh",
    "cents/kWh",
    "USD/PH/day",
    "USD/TH/day",
    "raw",
    "usd_per_mwh",
    "usd_per_kwh",
    "cents_per_kwh",
    "usd_per_ph_day",
    "usd_per_th_day",
]


class HttpJsonSettings(StrictSettings):
    """Config of an HTTP JSON price feed (``type: http_json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["http_json"] = "http_json"
    url: str = Field(description="http(s) URL answering JSON")
    value_path: str = Field(min_length=1, description="dot path to the number, e.g. data.0.price")
    time_path: str | None = Field(default=None, description="dot path to the timestamp")
    unit: Unit = "USD/MWh"
    interval_s: float = Field(
        default=900.0, gt=0, le=86400 * 31, description="length of a priced interval"
    )
    poll_interval_s: float = Field(default=60.0, gt=0, le=86400)
    # The total deadline of one poll: connect, headers and the whole body together.
    timeout_s: float = Field(default=5.0, gt=0, le=600)
    max_future_s: float = Field(
        default=300.0, ge=0, le=86400 * 365, description="tolerated clock skew ahead"
    )
    max_age_s: float = Field(
        default=3600.0, gt=0, le=86400 * 365, description="older timestamps are rejected"
    )
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=64, le=64 << 20)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url


def value_range(unit: str) -> tuple[float, float, str]:
    """The physical range of a value in the project's unit (after conversion), and its name."""
    if unit in HASHPRICE_UNITS:
        return (*HASHPRICE_RANGE_USD_PER_PH_DAY, "USD/PH/day")
    if unit == "raw":
        return (*RAW_RANGE, "")
    return (*PRICE_RANGE_USD_PER_MWH, "USD/MWh")


class _Missing(Exception):
    """A field path does not resolve; carries the part that failed."""


def resolve_path(document: Any, path: str) -> Any:
    """Walk ``a.0.b`` through dicts (keys) and lists (indexes); raise ``_Missing`` if absent."""
    node = document
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            raise _Missing(".".join(walked))
    return node


def parse_timestamp(raw: Any) -> datetime:
    """An ISO-8601 string with a zone, or epoch seconds; ValueError otherwise."""
    if isinstance(raw, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(raw, int | float):
        if not math.isfinite(raw):
            raise ValueError("not finite")
        return datetime.fromtimestamp(raw, tz=UTC)
    if isinstance(raw, str):
        stamp = datetime.fromisoformat(raw.strip())
        if stamp.tzinfo is None:
            raise ValueError("no time zone")
        return stamp.astimezone(UTC)
    raise ValueError(f"a {type(raw).__name__} is not a timestamp")


def _now_utc() -> datetime:
    return datetime.now(UTC)


class HttpJsonSource:
    """Polls one JSON URL for one price; a :class:`~drivers.prices.base.PriceSource`.

    Use as an async context manager (it owns an ``httpx.AsyncClient``), or pass ``client``.
    ``clock`` gives "now" in UTC for timestamp checks and the reading's ``at``.
    """

    def __init__(
        self,
        settings: HttpJsonSettings,
        *,
        name: str | None = None,
        clock: Callable[[], datetime] = _now_utc,
        client: httpx.AsyncClient | None = None,
        rejections: RejectionRecorder | None = None,
    ) -> None:
        self.settings = settings
        self._rejections = rejections
        self._name = name or f"http:{settings.url}"
        self._clock = clock
        self._client = client
        self._owns_client = client is None
        self.last_good: PriceReading | None = None
        self.last_error: SourceError | None = None
        self._failing = False

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = self._new_client()
        return self

    def _new_client(self) -> httpx.AsyncClient:
        import httpx  # loads with the first request, not with the config that names this source

        return httpx.AsyncClient(timeout=self.settings.timeout_s)

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def poll_interval_s(self) -> float:
        return self.settings.poll_interval_s

    def age_s(self, now: datetime | None = None) -> float | None:
        """Seconds since the last good reading was received, or None if there is none."""
        if self.last_good is None:
            return None
        return ((now or self._clock()) - self.last_good.at).total_seconds()

    async def fetch_json(self) -> Any:
        """GET the URL and decode JSON: SourceError on transport, BadInput on the body."""
        import httpx

        if self._client is None:
            self._client = self._new_client()
            self._owns_client = True
        url = self.settings.url
        limit_s = self.settings.timeout_s
        try:
            # One deadline for the whole request: a peer that trickles its body a byte at a
            # time defeats httpx's per-read timeouts, not this.
            async with deadline(limit_s, self._name, f"{url}"):
                body = await self._read_body(self._client, url)
        except SourceTimeout:
            raise
        except httpx.TimeoutException as exc:
            raise SourceTimeout(self._name, f"no answer from {url} within {limit_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise SourceError(
                self._name, f"cannot reach {url}: {type(exc).__name__}: {exc}"
            ) from exc
        return load_json(body, self._name, max_bytes=self.settings.max_body_bytes, what=url)

    async def _read_body(self, client: httpx.AsyncClient, url: str) -> bytes:
        """The body, refused as soon as it passes the size cap (never held whole)."""
        cap = self.settings.max_body_bytes
        async with client.stream("GET", url, timeout=self.settings.timeout_s) as response:
            if response.status_code >= 400:
                raise SourceError(self._name, f"{url} answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise InputRejected(
                    self._name, "too_large", f"{url}: a body of {declared} bytes (limit {cap:,})"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > cap:
                    raise InputRejected(
                        self._name, "too_large", f"{url}: the body passed the {cap:,}-byte limit"
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    def reading_from(self, document: Any, received: datetime) -> PriceReading:
        """Validate a decoded answer into a reading (pure apart from ``received``)."""
        s = self.settings
        try:
            raw = resolve_path(document, s.value_path)
        except _Missing as exc:
            raise BadInput(
                self._name, f"{s.url}: field {s.value_path!r} is missing (no {exc.args[0]!r})"
            ) from None
        lo, hi, unit_name = value_range(s.unit)
        # Finite and in range *after* conversion to the project's unit (a huge USD/kWh
        # becomes inf in USD/MWh).
        value = finite_in_range(
            raw,
            lo,
            hi,
            f"{s.url}: field {s.value_path!r} (in {s.unit})",
            source=self._name,
            scale=UNIT_FACTORS[s.unit],
            unit=unit_name,
        )
        interval_start = received
        if s.time_path is not None:
            try:
                stamp_raw = resolve_path(document, s.time_path)
            except _Missing as exc:
                raise BadInput(
                    self._name,
                    f"{s.url}: field {s.time_path!r} is missing (no {exc.args[0]!r})",
                ) from None
            try:
                interval_start = parse_timestamp(stamp_raw)
            except (ValueError, OverflowError, OSError) as exc:
                raise BadInput(
                    self._name,
                    f"{s.url}: field {s.time_path!r}: expected an ISO-8601 timestamp with a "
                    f"zone or epoch seconds, got {stamp_raw!r} ({exc})",
                ) from None
            ahead_s = (interval_start - received).total_seconds()
            if ahead_s > s.max_future_s:
                raise BadInput(
                    self._name,
                    f"{s.url}: timestamp {interval_start.isoformat()} is {ahead_s:.0f} s in the "
                    f"future (tolerance {s.max_future_s:g} s)",
                )
            if -ahead_s > s.max_age_s:
                raise BadInput(
                    self._name,
                    f"{s.url}: timestamp {interval_start.isoformat()} is {-ahead_s:.0f} s old "
                    f"(at most {s.max_age_s:g} s accepted)",
                )
        return PriceReading(
            source=self._name,
            interval_start=interval_start,
            interval_s=s.interval_s,
            value=value,
            at=received,
        )

    async def latest(self) -> PriceReading:
        """Poll once: the new reading, or raise (and keep ``last_good`` unchanged)."""
        try:
            document = await self.fetch_json()
            reading = self.reading_from(document, self._clock())
        except SourceError as exc:
            self.last_error = exc
            if isinstance(exc, InputRejected | SourceTimeout):
                record(self._rejections, self._name, exc)
            if not self._failing:  # log the change, not every failed poll
                log.warning("price source %s failing: %s", self._name, exc.message)
                self._failing = True
            raise
        if self._failing:
            log.info("price source %s recovered", self._name)
            self._failing = False
        self.last_good = reading
        self.last_error = None
        return reading

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``poll_interval_s`` until ``stop`` is set; failures are kept, not raised."""
        while not stop.is_set():
            with contextlib.suppress(SourceError):  # kept in last_error, logged once
                await self.latest()
            try:
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
            except TimeoutError:
                continue

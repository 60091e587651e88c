"""Miners over pyasic: discovery, telemetry, sleep/wake and profiles for LuxOS miners.

pyasic is the transport (its RPC classes frame, send, parse and validate every command); this
module adds what a controller needs on top of it:

* every device call runs under its own ``asyncio.timeout`` and one bounded semaphore shared by
  the whole fleet (passed in), so a hung miner costs one slot for at most the timeout;
* pyasic's failures become :mod:`drivers.errors` exceptions carrying the device id:
  timeout → ``DeviceTimeout``, refused/reset/closed without reply → ``DeviceUnavailable``,
  undecodable reply or missing fields → ``BadReply``, STATUS "E" → ``CommandRejected``;
* pyasic 0.79.0 defects are worked around: LuxOS ``is_mining`` never turns False and
  ``_get_hashrate`` returns None early, so the mode comes from measured power and hashrate and
  the hashrate from the per-board ``chain_rate`` sum. pyasic's ``stop_mining`` & co. return
  False instead of raising, so we send the same RPC commands ourselves.

One reading is one round trip: ``power+stats+profiles+config+fans`` as a single multicommand,
sent with ``send_command`` directly because pyasic's ``multicommand`` re-derives the list of
valid commands through ``dir()`` on every call and silently retries command by command on
any error, which hides the error and doubles the load on a failing miner.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from drivers.errors import (
    BadReply,
    CommandNotApplied,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    Unsupported,
)
from drivers.inputs import (
    InputRejected,
    RejectionRecorder,
    finite_in_range,
    parse_number_text,
    record,
)
from drivers.miners.base import MinerMode, MinerProfile, MinerReading


def _import_pyasic() -> None:
    # pyasic calls logging.basicConfig() at import, which would install a stderr handler on
    # the root logger and set it to WARNING behind the entry point's back: undo exactly that.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import pyasic  # noqa: F401

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


_import_pyasic()

from pyasic import settings as pyasic_settings  # noqa: E402
from pyasic.errors import APIError  # noqa: E402
from pyasic.miners.backends.luxminer import LUXMiner  # noqa: E402
from pyasic.miners.factory import miner_factory  # noqa: E402
from pyasic.network import MinerNetwork  # noqa: E402
from pyasic.rpc.luxminer import LUXMinerRPCAPI  # noqa: E402

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_COMMAND = "power+stats+profiles+config+fans"
MAX_REPLY_BYTES = 256 * 1024
# Physical ranges of what a miner reports: a readout outside is nonsense, not a measurement.
MAX_MINER_W = 100_000.0
MAX_BOARD_GHS = 1e7
MAX_PROFILE_THS = 100_000.0
TEMP_RANGE_C = (-60.0, 250.0)
MAX_FAN_RPM = 100_000.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONCURRENCY = 200


class _StrictLuxRPC(LUXMinerRPCAPI):  # type: ignore[misc]
    """pyasic's LuxOS RPC with a transport that reports failures instead of hiding them.

    pyasic's ``_send_bytes`` turns a refused connection into the reply ``{}`` and waits up to
    100 s for a reply; here connection errors propagate (the caller maps them), an empty
    reply is an error, the caller's ``asyncio.timeout`` bounds the wait, and the socket is
    closed on every path, cancellation included.
    """

    async def _send_bytes(
        self,
        data: bytes,
        *,
        port: int | None = None,
        timeout: int = 100,  # noqa: ASYNC109 -- pyasic's signature; the caller's timeout rules
    ) -> bytes:
        reader, writer = await asyncio.open_connection(str(self.ip), port or self.port)
        try:
            writer.write(data)
            await writer.drain()
            # Bounded: a real reply is ~10 kB; a miner that streams forever is refused, not
            # buffered (the caller's timeout bounds the time, this the memory).
            reply = await reader.read(MAX_REPLY_BYTES + 1)
            while reply and len(reply) <= MAX_REPLY_BYTES:
                more = await reader.read(MAX_REPLY_BYTES + 1 - len(reply))
                if not more:
                    break
                reply += more
        finally:
            writer.close()
        if len(reply) > MAX_REPLY_BYTES:
            raise ValueError(f"reply larger than {MAX_REPLY_BYTES:,} bytes")
        if not reply:
            raise ConnectionResetError("connection closed without a reply")
        return reply


@dataclass(frozen=True, slots=True)
class ModeThresholds:
    """How measured power and hashrate map to a mode (fractions of the active profile)."""

    # Sleeping: hashrate below this fraction of the profile and power below this fraction of
    # the lowest profile's power (standby is a few tens of watts, a profile thousands).
    sleep_hashrate_frac: float = 0.02
    sleep_power_frac: float = 0.10
    # Mining: hashrate or power at least this fraction of the active profile's nominal.
    mining_frac: float = 0.90


class PyasicMiner:
    """One LuxOS miner reached through pyasic.

    Implements :class:`MinerTelemetry`, :class:`MinerSleepWake` and :class:`MinerPowerProfile`.
    Build it with :func:`discover` / :func:`scan_subnet` (identified by pyasic's factory) or
    :meth:`luxos` (firmware known from config, nothing sent until the first call).
    """

    def __init__(
        self,
        device_id: str,
        miner: LUXMiner,
        semaphore: asyncio.Semaphore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        thresholds: ModeThresholds | None = None,
        rejections: RejectionRecorder | None = None,
    ) -> None:
        if not isinstance(miner, LUXMiner):
            raise Unsupported(device_id, f"{miner!r} is not a LuxOS miner; only LuxOS is supported")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._device_id = device_id
        self._miner = miner
        # Swap in the strict transport (same port); a session opens on the first privileged call.
        rpc = _StrictLuxRPC(str(miner.ip), port=miner.rpc.port)
        miner.rpc = rpc
        self._rpc = rpc
        self._semaphore = semaphore
        self._timeout_s = timeout_s
        self._thresholds = thresholds or ModeThresholds()
        self._model = str(miner.raw_model) if miner.raw_model is not None else None
        self._profiles: tuple[MinerProfile, ...] = ()
        self._rejections = rejections

    @classmethod
    def luxos(
        cls,
        address: str,
        semaphore: asyncio.Semaphore,
        *,
        device_id: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        thresholds: ModeThresholds | None = None,
        rejections: RejectionRecorder | None = None,
    ) -> PyasicMiner:
        """A LuxOS miner at ``address`` without identification (model read lazily)."""
        ipaddress.IPv4Address(address)  # ValueError for a malformed address, before any I/O
        return cls(
            device_id or address,
            LUXMiner(address),
            semaphore,
            timeout_s=timeout_s,
            thresholds=thresholds,
            rejections=rejections,
        )

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def address(self) -> str:
        return str(self._miner.ip)

    @property
    def profiles(self) -> tuple[MinerProfile, ...]:
        """The profile ladder from the latest reading (empty before the first)."""
        return self._profiles

    # --- plumbing ------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one device exchange under the fleet semaphore and this call's timeout."""
        async with self._semaphore:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await fn()
            except TimeoutError as exc:  # before OSError: TimeoutError is an OSError
                raise DeviceTimeout(
                    self._device_id, f"{what}: no answer within {self._timeout_s:g} s"
                ) from exc
            except APIError as exc:
                text = str(exc)
                if text.startswith("Decode Error"):
                    raise BadReply(self._device_id, f"{what}: reply is not JSON") from exc
                raise CommandRejected(self._device_id, f"{what}: {text}") from exc
            except OSError as exc:
                raise DeviceUnavailable(self._device_id, f"{what}: {exc.strerror or exc}") from exc
            except (LookupError, TypeError, ValueError, RecursionError) as exc:
                # RecursionError: pyasic's json.loads on a reply nested thousands deep.
                raise BadReply(
                    self._device_id, f"{what}: malformed reply ({type(exc).__name__}: {exc})"
                ) from exc

    async def _privileged(self, what: str, command: str, *args: str) -> dict[str, Any]:
        """Send a session-guarded command, opening a session first when we have none."""

        async def exchange() -> dict[str, Any]:
            try:
                return await attempt()
            except APIError as exc:
                if "invalid session" not in str(exc).lower():
                    raise
                # A reboot or another client's logoff ended our session: open a new one, once.
                return await attempt()

        async def attempt() -> dict[str, Any]:
            if self._rpc.session_token is None:
                data = await self._rpc.session()
                sid = data["SESSION"][0]["SessionID"]
                if not sid:
                    data = await self._rpc.logon()
                    sid = data["SESSION"][0]["SessionID"]
                if not isinstance(sid, str) or not sid:
                    raise ValueError("logon returned no SessionID")
                self._rpc.session_token = sid
            try:
                reply: dict[str, Any] = await self._rpc.send_command(
                    command, self._rpc.session_token, *args
                )
            except APIError:
                # Forget the session on any refusal: the next attempt opens a fresh one.
                self._rpc.session_token = None
                raise
            return reply

        return await self._call(what, exchange)

    # --- telemetry -----------------------------------------------------------------------

    async def read(self) -> MinerReading:
        """One telemetry sample (one round trip)."""
        if self._model is None:
            await self._learn_model()
        raw: dict[str, Any] = await self._call("read", lambda: self._rpc.send_command(READ_COMMAND))
        try:
            return self._parse(raw)
        except InputRejected as exc:
            # Counted under one "miner" source: a label per device would not scale to a fleet.
            record(self._rejections, "miner", exc)
            raise BadReply(self._device_id, f"read: {exc.message}") from exc
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise BadReply(
                self._device_id, f"read: malformed reply ({type(exc).__name__}: {exc})"
            ) from exc

    async def _learn_model(self) -> None:
        data: dict[str, Any] = await self._call("version", self._rpc.version)
        try:
            model = data["VERSION"][0]["Type"]
        except (LookupError, TypeError) as exc:
            raise BadReply(self._device_id, "version: no VERSION[0].Type") from exc
        self._model = str(model).removeprefix("Antminer ")

    def _number(self, value: Any, lo: float, hi: float, what: str) -> float:
        """A reply's number (LuxOS sends some as text): finite, in range, never a boolean."""
        if isinstance(value, str):
            return parse_number_text(value, lo, hi, what, source=self._device_id)
        return finite_in_range(value, lo, hi, what, source=self._device_id)

    def _parse(self, raw: Mapping[str, Any]) -> MinerReading:
        num = self._number
        power_w = num(raw["power"][0]["POWER"][0]["Watts"], 0.0, MAX_MINER_W, "power Watts")
        board = raw["stats"][0]["STATS"][1]
        hashrate_ghs = 0.0
        temps: list[float] = []
        n = 1
        # pyasic's LuxOS hashrate getter returns None; sum the boards like its hashboards do.
        while f"chain_rate{n}" in board:
            hashrate_ghs += num(board[f"chain_rate{n}"], 0.0, MAX_BOARD_GHS, f"chain_rate{n}")
            chip = [int(t) for t in str(board.get(f"temp_chip{n}", ""))[:200].split("-") if t]
            temps.extend(num(t, *TEMP_RANGE_C, f"temp_chip{n}") for t in chip if t != 0)
            n += 1
        if n == 1:
            raise KeyError("STATS[1] has no chain_rate1")
        profiles = tuple(
            MinerProfile(
                name=str(p["Profile Name"]),
                power_w=num(p["Watts"], 0.0, MAX_MINER_W, "profile Watts"),
                hashrate_ths=num(p["Hashrate"], 0.0, MAX_PROFILE_THS, "profile Hashrate"),
            )
            for p in raw["profiles"][0]["PROFILES"]
        )
        self._profiles = profiles
        active = str(raw["config"][0]["CONFIG"][0]["Profile"])
        fans = tuple(
            int(num(f["RPM"], 0.0, MAX_FAN_RPM, "fan RPM")) for f in raw["fans"][0]["FANS"]
        )
        hashrate_ths = hashrate_ghs / 1000.0
        return MinerReading(
            device_id=self._device_id,
            address=self.address,
            model=self._model or "unknown",
            firmware="luxos",
            at=datetime.now(UTC),
            power_w=power_w,
            hashrate_ths=hashrate_ths,
            mode=self._mode(power_w, hashrate_ths, active, profiles),
            temperature_c=max(temps) if temps else None,
            profile=active,
            profiles=profiles,
            fans_rpm=fans,
        )

    def _mode(
        self,
        power_w: float,
        hashrate_ths: float,
        active: str,
        profiles: Sequence[MinerProfile],
    ) -> MinerMode:
        th = self._thresholds
        nominal = next((p for p in profiles if p.name == active), None)
        if nominal is None and profiles:
            nominal = max(profiles, key=lambda p: p.power_w)
        if nominal is None:
            raise ValueError("no profiles to judge the mode against")
        lowest_w = min(p.power_w for p in profiles)
        if (
            hashrate_ths < th.sleep_hashrate_frac * nominal.hashrate_ths
            and power_w < th.sleep_power_frac * lowest_w
        ):
            return MinerMode.SLEEPING
        if (
            hashrate_ths >= th.mining_frac * nominal.hashrate_ths
            or power_w >= th.mining_frac * nominal.power_w
        ):
            return MinerMode.MINING
        return MinerMode.WAKING

    # --- control -------------------------------------------------------------------------

    async def sleep(self) -> None:
        """Curtail to standby power (LuxOS ``curtail sleep``)."""
        await self._privileged("sleep", "curtail", "sleep")

    async def wake(self) -> None:
        """Leave standby (LuxOS ``curtail wakeup``); power ramps up over the next minutes."""
        await self._privileged("wake", "curtail", "wakeup")

    async def _ladder(self) -> tuple[MinerProfile, ...]:
        if not self._profiles:
            raw: dict[str, Any] = await self._call("profiles", self._rpc.profiles)
            try:
                num = self._number
                self._profiles = tuple(
                    MinerProfile(
                        str(p["Profile Name"]),
                        num(p["Watts"], 0.0, MAX_MINER_W, "profile Watts"),
                        num(p["Hashrate"], 0.0, MAX_PROFILE_THS, "profile Hashrate"),
                    )
                    for p in raw["PROFILES"]
                )
            except (LookupError, TypeError, ValueError, InputRejected) as exc:
                raise BadReply(self._device_id, "profiles: malformed PROFILES") from exc
        return self._profiles

    async def set_profile(self, profile: str) -> None:
        """Select a LuxOS profile by name (ATM is paused around the change, as LuxOS needs)."""
        names = [p.name for p in await self._ladder()]
        if profile not in names:
            raise CommandRejected(
                self._device_id, f"unknown profile {profile!r}; the miner offers {names}"
            )
        atm: dict[str, Any] = await self._call("atm", self._rpc.atm)
        try:
            atm_enabled = bool(atm["ATM"][0]["Enabled"])
        except (LookupError, TypeError) as exc:
            raise BadReply(self._device_id, "atm: no ATM[0].Enabled") from exc
        if atm_enabled:
            await self._privileged("set_profile", "atmset", "enabled=false")
        try:
            reply = await self._privileged("set_profile", "profileset", profile)
        finally:
            if atm_enabled:
                # Restore ATM even if profileset failed: leaving it off changes thermal safety.
                with contextlib.suppress(DeviceError):
                    await self._privileged("set_profile", "atmset", "enabled=true")
        try:
            applied = reply["PROFILE"][0]["Profile"]
        except (LookupError, TypeError) as exc:
            raise BadReply(self._device_id, "profileset: no PROFILE[0].Profile") from exc
        if applied != profile:
            raise CommandNotApplied(
                self._device_id, f"profileset {profile!r} answered profile {applied!r}"
            )

    async def set_power_limit(self, watts: float) -> str:
        """Select the highest profile at or below ``watts``; returns its name."""
        ladder = await self._ladder()
        fitting = [p for p in ladder if p.power_w <= watts]
        if not fitting:
            lowest = min((p.power_w for p in ladder), default=float("nan"))
            raise CommandRejected(
                self._device_id, f"no profile at or below {watts:g} W (lowest is {lowest:g} W)"
            )
        best = max(fitting, key=lambda p: p.power_w)
        await self.set_profile(best.name)
        return best.name


# --- fleet helpers -----------------------------------------------------------------------


async def read_fleet(
    miners: Iterable[PyasicMiner],
) -> dict[str, MinerReading | DeviceError]:
    """Read every miner concurrently; each result is a reading or the error it raised.

    Concurrency is bounded by the semaphore the miners share; only :class:`DeviceError`
    is captured, anything else (a bug) propagates.
    """
    miners = list(miners)

    async def one(m: PyasicMiner) -> MinerReading | DeviceError:
        try:
            return await m.read()
        except DeviceError as exc:
            return exc

    results = await asyncio.gather(*(one(m) for m in miners))
    return {m.device_id: r for m, r in zip(miners, results, strict=True)}


async def _identify(address: str, semaphore: asyncio.Semaphore, timeout_s: float) -> Any:
    async with semaphore:
        try:
            async with asyncio.timeout(timeout_s):
                found = await miner_factory.get_miner(address)
        except TimeoutError as exc:
            raise DeviceTimeout(address, f"identify: no answer within {timeout_s:g} s") from exc
        except OSError as exc:
            raise DeviceUnavailable(address, f"identify: {exc}") from exc
    if found is None:
        raise DeviceUnavailable(address, "identify: no miner answered on RPC 4028 or HTTP")
    return found


async def discover(
    addresses: Mapping[str, str] | Sequence[str],
    semaphore: asyncio.Semaphore,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    identify_timeout_s: float = 10.0,
    thresholds: ModeThresholds | None = None,
) -> dict[str, PyasicMiner | DeviceError]:
    """Identify miners by address with pyasic's factory (``get_miner``).

    ``addresses`` is a list of addresses (device id = address) or a mapping
    device id → address. Results are keyed by device id.
    """
    pairs = (
        list(addresses.items()) if isinstance(addresses, Mapping) else [(a, a) for a in addresses]
    )
    for _, address in pairs:
        ipaddress.IPv4Address(address)

    async def one(device_id: str, address: str) -> PyasicMiner | DeviceError:
        try:
            found = await _identify(address, semaphore, identify_timeout_s)
            return PyasicMiner(
                device_id, found, semaphore, timeout_s=timeout_s, thresholds=thresholds
            )
        except DeviceError as exc:
            if exc.device_id != device_id:
                return type(exc)(device_id, exc.message)
            return exc

    results = await asyncio.gather(*(one(d, a) for d, a in pairs))
    return {d: r for (d, _), r in zip(pairs, results, strict=True)}


async def scan_subnet(
    subnet: str,
    semaphore: asyncio.Semaphore,
    *,
    scan_concurrency: int = DEFAULT_CONCURRENCY,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    thresholds: ModeThresholds | None = None,
) -> list[PyasicMiner]:
    """Find LuxOS miners in ``subnet`` with pyasic's ``MinerNetwork.scan``.

    pyasic bounds a scan with the *process-global* setting ``network_scan_semaphore``, which
    defaults to unbounded: on a small controller an unbounded scan of a thousand hosts starves
    the event loop until pyasic's fixed 3 s factory timeouts expire and finds nothing. We set
    it to ``scan_concurrency`` for the duration of the scan and restore the previous value, so
    scans must not run concurrently with different limits (the agent scans once, at start).
    Miners found that are not LuxOS are logged and skipped.
    """
    if scan_concurrency < 1:
        raise ValueError(f"scan_concurrency must be >= 1, got {scan_concurrency}")
    network = ipaddress.IPv4Network(subnet, strict=False)
    previous = pyasic_settings.get("network_scan_semaphore")
    pyasic_settings.update("network_scan_semaphore", scan_concurrency)
    try:
        found = await MinerNetwork([*network.hosts()]).scan()
    finally:
        pyasic_settings.update("network_scan_semaphore", previous)
    miners: list[PyasicMiner] = []
    for m in found:
        if isinstance(m, LUXMiner):
            miners.append(
                PyasicMiner(str(m.ip), m, semaphore, timeout_s=timeout_s, thresholds=thresholds)
            )
        else:
            log.warning("scan %s: %s at %s is not LuxOS; skipped", subnet, m, m.ip)
    miners.sort(key=lambda m: ipaddress.IPv4Address(m.address))
    return miners


async def sleep_fleet(miners: Iterable[PyasicMiner]) -> dict[str, DeviceError | None]:
    """Command every miner to sleep concurrently; each result is None or the error."""
    return await _command_fleet(miners, lambda m: m.sleep())


async def wake_fleet(miners: Iterable[PyasicMiner]) -> dict[str, DeviceError | None]:
    """Command every miner to wake concurrently; each result is None or the error."""
    return await _command_fleet(miners, lambda m: m.wake())


async def _command_fleet(
    miners: Iterable[PyasicMiner], fn: Callable[[PyasicMiner], Awaitable[None]]
) -> dict[str, DeviceError | None]:
    miners = list(miners)

    async def one(m: PyasicMiner) -> DeviceError | None:
        try:
            await fn(m)
        except DeviceError as exc:
            return exc
        return None

    results = await asyncio.gather(*(one(m) for m in miners))
    return {m.device_id: r for m, r in zip(miners, results, strict=True)}

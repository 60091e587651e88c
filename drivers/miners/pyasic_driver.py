"""Miners over pyasic: one driver for every firmware family a site runs.

Each family has one power capability (:class:`MinerCapability`), mapped onto the policy's
ladder of operating points (``sleep`` plus the configured profiles of the miner's model):

* **LuxOS** (``PROFILES``): a ladder point is a LuxOS profile, set by name with ``profileset``
  (ATM paused around it). Writes need the miner's single session: the driver logs on, does its
  commands and logs off, and never borrows a session another client holds (pyasic's ``auth``
  would: it reuses whatever ``session`` returns). A session held elsewhere is retried a few
  times, then raised as :class:`SessionHeld` ("session held by another client").
* **Braiins OS+** (``POWER_TARGET``): a ladder point is a power target in watts
  (``SetPowerTarget`` over gRPC, token from the configured credentials). A target outside the
  firmware's range is refused by the firmware; its message is raised as ``CommandRejected``.
  pyasic's ``stop_mining``/``resume_mining``/``set_power_limit`` turn every failure into
  ``False``, and its gRPC client opens a connection per call plus one to log in: the driver
  sends pyasic's own stubs and messages itself, the login and the call on one connection.
  Readings come from the cgminer API on port 4028 (no login), in one multicommand.
* **Stock Antminer** (``SLEEP_ONLY``): sleep and wake set ``miner-mode`` through the web API
  (:mod:`drivers.miners.antminer_web`, digest auth, the mode read back); only the model's
  nominal point can run. It reports no power: the reading's power is estimated from the ladder
  at the measured hashrate and flagged ``power_estimated``. A reading is one ``stats`` RPC.
* **Whatsminer** (``POWER_LIMIT``): a ladder point is a power limit in watts (pyasic's token
  and AES path); a reading is one ``summary`` RPC.

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

Every reading is one round trip; LuxOS's is ``power+stats+profiles+config+fans`` as a single
multicommand, sent with ``send_command`` directly because pyasic's ``multicommand`` re-derives
the list of valid commands through ``dir()`` on every call and silently retries command by
command on any error, which hides the error and doubles the load on a failing miner.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

from drivers.errors import (
    AuthFailed,
    BadReply,
    CommandNotApplied,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    SessionHeld,
    Unsupported,
)
from drivers.inputs import (
    InputRejected,
    RejectionRecorder,
    finite_in_range,
    parse_number_text,
    record,
)
from drivers.miners.antminer_web import AntminerWeb, WebError, WebSession
from drivers.miners.base import MinerCapability, MinerMode, MinerProfile, MinerReading


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

import grpclib.const  # noqa: E402
from grpclib import GRPCError  # noqa: E402
from grpclib.client import Channel  # noqa: E402
from grpclib.const import Status as GrpcStatus  # noqa: E402
from pyasic import settings as pyasic_settings  # noqa: E402
from pyasic.config import MinerConfig, MiningModeConfig  # noqa: E402
from pyasic.errors import APIError  # noqa: E402
from pyasic.miners.backends.antminer import AntminerModern  # noqa: E402
from pyasic.miners.backends.braiins_os import BOSer  # noqa: E402
from pyasic.miners.backends.btminer import BTMiner, BTMinerV2, BTMinerV3  # noqa: E402
from pyasic.miners.backends.luxminer import LUXMiner  # noqa: E402
from pyasic.miners.factory import miner_factory  # noqa: E402
from pyasic.network import MinerNetwork  # noqa: E402
from pyasic.rpc.btminer import BTMinerRPCAPI  # noqa: E402
from pyasic.rpc.luxminer import LUXMinerRPCAPI  # noqa: E402
from pyasic.web.braiins_os.boser import BOSMinerGRPCStub  # noqa: E402
from pyasic.web.braiins_os.proto.braiins.bos.v1 import (  # noqa: E402
    LoginRequest,
    LoginResponse,
    PauseMiningRequest,
    Power,
    ResumeMiningRequest,
    SaveAction,
    SetPowerTargetRequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_COMMAND = "power+stats+profiles+config+fans"
# BOS+ on its cgminer API: rate, power and target, board temperatures, fans; one round trip.
BRAIINS_READ_COMMAND = "summary+tunerstatus+devs+fans"
MAX_REPLY_BYTES = 256 * 1024
# Physical ranges of what a miner reports: a readout outside is nonsense, not a measurement.
MAX_MINER_W = 100_000.0
MAX_BOARD_GHS = 1e7
MAX_MINER_MHS = 1e11
# bmminer's stats ``rate_unit``: what one unit of ``total_rateideal`` is, in GH/s.
_RATE_UNIT_GHS = {"MH": 1e-3, "GH": 1.0, "TH": 1e3}
MAX_PROFILE_THS = 100_000.0
TEMP_RANGE_C = (-60.0, 250.0)
MAX_FAN_RPM = 100_000.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONCURRENCY = 200


async def _strict_send_bytes(
    self: Any,
    data: bytes,
    *,
    port: int | None = None,
    timeout: int = 100,  # noqa: ASYNC109 -- pyasic's signature; the caller's timeout rules
) -> bytes:
    """pyasic's RPC transport, but failures are reported, not hidden.

    pyasic's ``_send_bytes`` turns a refused connection into the reply ``{}``, waits up to 100 s
    for a reply and leaves the socket open when cancelled; here connection errors propagate
    (the caller maps them), an empty reply is an error, the caller's ``asyncio.timeout`` bounds
    the wait, and the socket is closed on every path, cancellation included.
    """
    reader, writer = await asyncio.open_connection(str(self.ip), port or self.port)
    try:
        writer.write(data)
        await writer.drain()
        # Bounded: a real reply is ~10 kB; a miner that streams forever is refused, not
        # buffered (the caller's timeout bounds the time, this the memory).
        reply: bytes = await reader.read(MAX_REPLY_BYTES + 1)
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


class _StrictLuxRPC(LUXMinerRPCAPI):  # type: ignore[misc]
    """pyasic's LuxOS RPC with the strict transport above."""

    _send_bytes = _strict_send_bytes


@dataclass(frozen=True, slots=True)
class ModeThresholds:
    """How measured power and hashrate map to a mode (fractions of the active profile)."""

    # Sleeping: hashrate below this fraction of the profile and power below this fraction of
    # the lowest profile's power (standby is a few tens of watts, a profile thousands).
    sleep_hashrate_frac: float = 0.02
    sleep_power_frac: float = 0.10
    # Mining: hashrate or power at least this fraction of the active profile's nominal.
    mining_frac: float = 0.90


class Family(StrEnum):
    """A miner firmware family (the config's ``firmware`` key; ``auto`` asks pyasic)."""

    LUXOS = "luxos"
    BRAIINS = "braiins"
    ANTMINER = "antminer"
    WHATSMINER = "whatsminer"
    AUTO = "auto"


CAPABILITY: dict[Family, MinerCapability] = {
    Family.LUXOS: MinerCapability.PROFILES,
    Family.BRAIINS: MinerCapability.POWER_TARGET,
    Family.ANTMINER: MinerCapability.SLEEP_ONLY,
    Family.WHATSMINER: MinerCapability.POWER_LIMIT,
}

SESSION_HELD = "session held by another client"
# Stock Antminer get_miner_conf "bitmain-work-mode": 0 normal, 1 sleep (3 low power).
_STOCK_NORMAL, _STOCK_SLEEP = "0", "1"
# pyasic keeps a BOS+ token 59 minutes; so do we.
_BOS_TOKEN_S = 3540.0
# pyasic keeps a Whatsminer (btminer API 2) token 30 minutes, the firmware's life for one.
_BTMINER_TOKEN_S = 1800.0
# When a stock Antminer's model is not in the config's ladder: a generic S19-class figure.
_FALLBACK_J_PER_TH = 30.0


def family_of(miner: Any) -> Family | None:
    """The family of a pyasic miner object, or None for one this driver cannot drive."""
    if isinstance(miner, LUXMiner):
        return Family.LUXOS
    if isinstance(miner, BOSer):
        return Family.BRAIINS
    if isinstance(miner, AntminerModern):
        return Family.ANTMINER
    if isinstance(miner, BTMiner | BTMinerV2 | BTMinerV3):
        return Family.WHATSMINER
    return None


def _new_miner(family: Family, address: str) -> Any:
    """A pyasic miner object for a known family, without any I/O (model read later)."""
    if family is Family.LUXOS:
        return LUXMiner(address)
    if family is Family.BRAIINS:
        return BOSer(address)
    if family is Family.ANTMINER:
        return AntminerModern(address)
    if family is Family.WHATSMINER:
        return BTMinerV2(address)  # btminer API v2 (firmware before 2024.11; auto tells)
    raise ValueError(f"no pyasic class for {family}")


P = ParamSpec("P")
# Failures in a row, as the family pyasic's factory chose, before the miner is identified again.
MISFITS_BEFORE_REIDENTIFY = 2


def _checks_family(
    method: Callable[Concatenate[PyasicMiner, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[PyasicMiner, P], Coroutine[Any, Any, T]]:
    """Count a failure a wrong family would cause (:meth:`PyasicMiner._misfit`); a success
    clears the count."""

    @functools.wraps(method)
    async def checked(self: PyasicMiner, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            result = await method(self, *args, **kwargs)
        except (BadReply, CommandRejected, Unsupported) as exc:
            self._misfit(exc)
            raise
        self._misfits = 0
        return result

    return checked


class PyasicMiner:
    """One miner of any supported family, reached through pyasic.

    Implements :class:`MinerTelemetry`, :class:`MinerSleepWake` and :class:`MinerPowerProfile`
    (a profile name is a point of ``ladder``, the configured operating points of the model).
    Build it with :func:`discover` / :func:`scan_subnet` (identified by pyasic's factory),
    :meth:`luxos`, or :meth:`for_firmware` (``auto`` identifies on the first call).
    """

    def __init__(
        self,
        device_id: str,
        miner: Any,
        semaphore: asyncio.Semaphore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        thresholds: ModeThresholds | None = None,
        ladder: Sequence[MinerProfile] = (),
        credentials: tuple[str, str] | None = None,
        session_retries: int = 3,
        session_retry_wait_s: float = 0.5,
        session_release_s: float | None = 5.0,
        address: str | None = None,
        rejections: RejectionRecorder | None = None,
        identified: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if session_retries < 1:
            raise ValueError(f"session_retries must be >= 1, got {session_retries}")
        self._device_id = device_id
        self._semaphore = semaphore
        self._timeout_s = timeout_s
        self._thresholds = thresholds or ModeThresholds()
        self._ladder = tuple(ladder)
        self._credentials = credentials
        self._session_retries = session_retries
        self._session_retry_wait_s = session_retry_wait_s
        if session_release_s is not None and session_release_s < 0:
            raise ValueError(f"session_release_s must be >= 0, got {session_release_s}")
        self._session_release_s = session_release_s
        self._session_used_s = 0.0  # monotonic time our session last carried a command
        self._profiles: tuple[MinerProfile, ...] = ()
        self._model: str | None = None
        self._miner: Any = None
        self._family = Family.AUTO
        self._address = address or (str(miner.ip) if miner is not None else "")
        self._rejections = rejections
        self._web_api: AntminerWeb | None = None  # stock Antminer only (set on adoption)
        self._bos_token: str | None = None  # BOS+ gRPC token and when it was issued
        self._bos_token_at = -math.inf
        # The family came from pyasic's factory (``auto``, discover): it may be wrong (the
        # factory guesses from whichever port answers first, and under load it once took a
        # LuxOS miner for a Whatsminer), so a family that keeps failing is identified again.
        self._identified = identified
        self._misfits = 0
        if miner is not None:
            self._adopt(miner)

    def _adopt(self, miner: Any) -> None:
        family = family_of(miner)
        if family is None:
            raise Unsupported(
                self._device_id,
                f"{miner!r} is not a supported family (LuxOS, Braiins OS+, stock Antminer, "
                "Whatsminer)",
            )
        self._miner = miner
        self._family = family
        self._address = str(miner.ip)
        if family is Family.LUXOS:
            # Swap in the strict transport (same port).
            rpc = _StrictLuxRPC(str(miner.ip), port=miner.rpc.port)
            miner.rpc = rpc
            self._rpc = rpc
        elif getattr(miner, "rpc", None) is not None:
            # The same strict transport for the RPC of the other families.
            miner.rpc._send_bytes = types.MethodType(_strict_send_bytes, miner.rpc)
        if self._credentials is not None and family is Family.WHATSMINER:
            # btminer's privileged API: the admin password signs the token (user fixed).
            miner.rpc.pwd = self._credentials[1]
        elif self._credentials is not None and family is not Family.LUXOS:
            # BOS+ gRPC login, or the stock web UI's digest auth (LuxOS has no login).
            miner.web.username, miner.web.pwd = self._credentials
        if family is Family.ANTMINER:
            self._web_api = AntminerWeb(str(miner.ip), miner.web.username, miner.web.pwd)
        raw = getattr(miner, "raw_model", None)
        self._model = str(raw).removeprefix("Antminer ") if raw is not None else None

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
        return cls.for_firmware(
            address,
            Family.LUXOS,
            semaphore,
            device_id=device_id,
            timeout_s=timeout_s,
            thresholds=thresholds,
            rejections=rejections,
        )

    @classmethod
    def for_firmware(
        cls,
        address: str,
        firmware: Family | str,
        semaphore: asyncio.Semaphore,
        *,
        device_id: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        thresholds: ModeThresholds | None = None,
        ladder: Sequence[MinerProfile] = (),
        credentials: tuple[str, str] | None = None,
        rejections: RejectionRecorder | None = None,
    ) -> PyasicMiner:
        """A miner whose family the config names; ``auto`` is identified on the first call."""
        ipaddress.IPv4Address(address)  # ValueError for a malformed address, before any I/O
        family = Family(firmware)
        miner = None if family is Family.AUTO else _new_miner(family, address)
        return cls(
            device_id or address,
            miner,
            semaphore,
            timeout_s=timeout_s,
            thresholds=thresholds,
            ladder=ladder,
            credentials=credentials,
            address=address,
            rejections=rejections,
        )

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def address(self) -> str:
        return self._address

    @property
    def pyasic_miner(self) -> Any:
        """The pyasic object underneath (None until an ``auto`` miner is identified)."""
        return self._miner

    @property
    def family(self) -> Family:
        """The firmware family (``AUTO`` until identified)."""
        return self._family

    @property
    def capability(self) -> MinerCapability | None:
        return CAPABILITY.get(self._family)

    @property
    def profiles(self) -> tuple[MinerProfile, ...]:
        """The ladder from the latest reading (empty before the first)."""
        return self._profiles

    # --- plumbing ------------------------------------------------------------------------

    async def _ensure(self) -> None:
        """Identify a ``firmware: auto`` miner with pyasic's factory, once."""
        if self._miner is not None:
            return
        found = await _identify(self._address, self._semaphore, self._timeout_s * 2)
        try:
            self._adopt(found)
        except DeviceError as exc:
            raise Unsupported(self._device_id, exc.message) from exc
        self._identified = True

    def _misfit(self, exc: DeviceError) -> None:
        """A call failed in a way a wrong family would fail (a malformed reply, a refusal):
        after ``MISFITS_BEFORE_REIDENTIFY`` in a row, forget a family pyasic's factory chose,
        so that the next call identifies the miner again. A configured family is never
        second-guessed."""
        if not self._identified or self._miner is None:
            return
        self._misfits += 1
        if self._misfits < MISFITS_BEFORE_REIDENTIFY:
            return
        log.warning(
            "%s: %d failures in a row as %s (last: %s): identifying the miner again",
            self._device_id,
            self._misfits,
            self._family.value,
            exc.message,
        )
        self._miner = None
        self._family = Family.AUTO
        self._web_api = None
        self._model = None
        self._profiles = ()
        self._bos_token = None
        self._bos_token_at = -math.inf
        self._misfits = 0

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
                raise self._api_error(what, exc) from exc
            except WebError as exc:
                if exc.status == 401:
                    raise AuthFailed(self._device_id, f"{what}: credentials refused") from exc
                raise CommandRejected(self._device_id, f"{what}: {exc}") from exc
            except GRPCError as exc:
                # pyasic's BOS+ login runs outside its own error wrapping: a refused or failed
                # login reaches us as grpclib's error.
                raise self._grpc_error(what, exc) from exc
            except OSError as exc:
                raise DeviceUnavailable(self._device_id, f"{what}: {exc.strerror or exc}") from exc
            except (LookupError, TypeError, ValueError, RecursionError) as exc:
                # RecursionError: pyasic's json.loads on a reply nested thousands deep.
                raise BadReply(
                    self._device_id, f"{what}: malformed reply ({type(exc).__name__}: {exc})"
                ) from exc

    def _grpc_error(self, what: str, exc: GRPCError) -> DeviceError:
        message = exc.message or exc.status.name
        if exc.status is GrpcStatus.UNAUTHENTICATED:
            return AuthFailed(self._device_id, f"{what}: {message}")
        if exc.status is GrpcStatus.UNKNOWN:
            return BadReply(self._device_id, f"{what}: undecodable reply ({message!r})")
        if exc.status in (GrpcStatus.UNAVAILABLE, GrpcStatus.DEADLINE_EXCEEDED):
            return DeviceUnavailable(self._device_id, f"{what}: {message}")
        return CommandRejected(self._device_id, f"{what}: {message}")

    def _api_error(self, what: str, exc: APIError) -> DeviceError:
        cause = exc.__cause__
        if isinstance(cause, GRPCError):
            # pyasic's gRPC wrapper hides the status and the firmware's message in __cause__.
            return self._grpc_error(what, cause)
        if isinstance(cause, (ConnectionError, OSError)):
            return DeviceUnavailable(self._device_id, f"{what}: {cause}")
        text = str(exc)
        if text.startswith("Decode Error"):
            return BadReply(self._device_id, f"{what}: reply is not JSON")
        return CommandRejected(self._device_id, f"{what}: {text}")

    # --- LuxOS sessions ------------------------------------------------------------------

    async def _logon(self, what: str) -> str:
        """Open our own session; a session held elsewhere is retried, then SessionHeld.

        Each logon is its own exchange under its own timeout; the waits between attempts hold
        no semaphore slot.
        """
        last = ""
        for attempt in range(self._session_retries):
            try:
                data: dict[str, Any] = await self._call(what, self._rpc.logon)
            except CommandRejected as exc:
                if "session" not in exc.message.lower():
                    raise
                last = exc.message
            else:
                try:
                    sid = data["SESSION"][0]["SessionID"]
                except (LookupError, TypeError) as exc:
                    raise BadReply(self._device_id, f"{what}: logon without SESSION") from exc
                if isinstance(sid, str) and sid:
                    return sid
                last = "logon returned no SessionID"
            if attempt + 1 < self._session_retries:
                await asyncio.sleep(self._session_retry_wait_s)
        raise SessionHeld(
            self._device_id,
            f"{SESSION_HELD} ({self._session_retries} logon attempts refused: {last})",
        )

    async def _privileged(self, what: str, command: str, *args: str) -> dict[str, Any]:
        """Send a session-guarded command, logging on first when we hold no session.

        Every exchange (logon, the command) has its own timeout, so a slow miner that answers
        each within it is not failed for needing two.
        """
        for attempt in range(2):
            if self._rpc.session_token is None:
                self._rpc.session_token = await self._logon(what)
            token: str = self._rpc.session_token

            async def send(token: str = token) -> dict[str, Any]:
                out: dict[str, Any] = await self._rpc.send_command(command, token, *args)
                return out

            try:
                reply = await self._call(what, send)
            except CommandRejected as exc:
                self._rpc.session_token = None
                if attempt == 0 and "invalid session" in exc.message.lower():
                    # Our session expired (a minute idle) or a reboot ended it: log on again.
                    continue
                raise
            return reply
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _logoff(self) -> None:
        """Give the session back so technicians, fleet tools and a restarted agent can act.

        Best effort: a failed logoff only leaves the session to LuxOS's one-minute expiry.
        """
        token = self._rpc.session_token
        if token is None:
            return
        self._rpc.session_token = None
        with contextlib.suppress(DeviceError):
            await self._call("logoff", lambda: self._rpc.send_command("logoff", token))

    async def _after_command(self) -> None:
        self._session_used_s = time.monotonic()
        if self._session_release_s == 0:
            await self._logoff()

    def _session_idle(self) -> bool:
        """True when we hold a session that has been idle long enough to give back."""
        return (
            self._rpc.session_token is not None
            and self._session_release_s is not None
            and time.monotonic() - self._session_used_s >= self._session_release_s
        )

    async def aclose(self) -> None:
        """Release what the driver holds on the miner (the LuxOS session): call on shutdown."""
        if self._family is Family.LUXOS:
            await self._logoff()

    # --- privileged credentials, kept warm ----------------------------------------------

    def credential_stale(self) -> bool:
        """Whether a login token should be renewed ahead of need: missing or past half its life.

        BOS+ (gRPC token) and Whatsminer (btminer API 2 token) have one: renewing it while the
        site is calm means a curtailment sends its command at once, instead of a login first
        (on a spike of thousands of miners that login is most of the CPU, on both ends). LuxOS
        never: it allows one session holder, and holding the session would lock technicians
        and fleet tools out (we log on per command and give it back). A stock Antminer's digest
        nonce costs nothing to renew: its first call does.
        """
        if self._family is Family.BRAIINS:
            return time.monotonic() - self._bos_token_at > _BOS_TOKEN_S / 2
        rpc = getattr(self._miner, "rpc", None)
        if self._family is Family.WHATSMINER and isinstance(rpc, BTMinerRPCAPI):
            token = rpc.token
            # pyasic stamps its token with naive local time; so do we, to compare.
            half_life = timedelta(seconds=_BTMINER_TOKEN_S / 2)
            return token is None or token.timestamp < datetime.now() - half_life
        return False

    async def prepare(self) -> None:
        """Renew the login token if :meth:`credential_stale` (one bounded exchange).

        A failure raises, and changes nothing else: the next command logs in itself, and
        reports its own fault if that fails too.
        """
        if not self.credential_stale():
            return
        if self._family is Family.BRAIINS:
            web = self._miner.web

            async def login() -> None:
                async with Channel(web.ip, web.port) as channel:
                    await self._bos_login(channel, web.username, web.pwd)

            await self._call("login", login)
        elif self._family is Family.WHATSMINER:
            rpc = self._miner.rpc
            rpc.token = None  # pyasic answers with its cached token while it is under 30 min
            await self._call("get_token", rpc.get_token)

    # --- telemetry -----------------------------------------------------------------------

    @_checks_family
    async def read(self) -> MinerReading:
        """One telemetry sample."""
        await self._ensure()
        if self._family is Family.BRAIINS:
            return await self._read_braiins()
        if self._family is Family.ANTMINER:
            return await self._read_antminer()
        if self._family is Family.WHATSMINER:
            return await self._read_whatsminer()
        if self._model is None:
            await self._learn_model()
        read = self._call("read", lambda: self._rpc.send_command(READ_COMMAND))
        if self._session_idle():
            # Give an idle session back on its own connection, alongside the poll: nobody else
            # can log on while we hold it, and a command burst reuses it meanwhile.
            _, raw = await asyncio.gather(self._logoff(), read)
        else:
            raw = await read
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

    def _bmminer_boards(self, board: Mapping[str, Any]) -> tuple[float, list[float]]:
        """bmminer-style ``STATS[1]`` (LuxOS, stock): the boards' summed ``chain_rateN`` (GH/s;
        empty for an absent board) and their non-zero chip temperatures."""
        num = self._number
        hashrate_ghs = 0.0
        temps: list[float] = []
        n = 1
        while f"chain_rate{n}" in board and n <= 16:
            rate = board[f"chain_rate{n}"]
            if rate != "":
                hashrate_ghs += num(rate, 0.0, MAX_BOARD_GHS, f"chain_rate{n}")
            chip = [int(t) for t in str(board.get(f"temp_chip{n}", ""))[:200].split("-") if t]
            temps.extend(num(t, *TEMP_RANGE_C, f"temp_chip{n}") for t in chip if t != 0)
            n += 1
        if n == 1:
            raise KeyError("STATS[1] has no chain_rate1")
        return hashrate_ghs, temps

    def _parse(self, raw: Mapping[str, Any]) -> MinerReading:
        num = self._number
        power_w = num(raw["power"][0]["POWER"][0]["Watts"], 0.0, MAX_MINER_W, "power Watts")
        board = raw["stats"][0]["STATS"][1]
        # pyasic's LuxOS hashrate getter returns None. The per-board chain_rateN (numeric
        # strings) sum to the since-start average, which lags for minutes after a wake or a
        # profile change; "GHS 5s" is the current rate, so it wins when present.
        hashrate_ghs, temps = self._bmminer_boards(board)
        if "GHS 5s" in board:
            hashrate_ghs = num(board["GHS 5s"], 0.0, MAX_BOARD_GHS, "GHS 5s")
        if not math.isfinite(power_w) or not math.isfinite(hashrate_ghs):
            raise ValueError("power or hashrate is not finite")
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
            capability=MinerCapability.PROFILES,
        )

    async def _send(self, what: str, command: str) -> dict[str, Any]:
        """One RPC command (``a+b`` for a multicommand) on the miner's port 4028."""
        rpc = self._miner.rpc
        out: dict[str, Any] = await self._call(what, lambda: rpc.send_command(command))
        return out

    async def _learn_devdetails_model(self) -> None:
        """BOS+ and Whatsminer built without identification: the model from ``devdetails``."""
        raw = await self._send("devdetails", "devdetails")
        try:
            model = str(raw["DEVDETAILS"][0]["Model"])[:64]
        except (LookupError, TypeError) as exc:
            raise BadReply(self._device_id, "devdetails: no DEVDETAILS[0].Model") from exc
        self._model = model.removeprefix("Bitmain ").removeprefix("Antminer ") or None

    def _reading(self, parse: Callable[[], MinerReading]) -> MinerReading:
        """Run a reply parser; what the reply got wrong becomes ``BadReply`` (and is counted)."""
        try:
            return parse()
        except InputRejected as exc:
            # Counted under one "miner" source: a label per device would not scale to a fleet.
            record(self._rejections, "miner", exc)
            raise BadReply(self._device_id, f"read: {exc.message}") from exc
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise BadReply(
                self._device_id, f"read: malformed reply ({type(exc).__name__}: {exc})"
            ) from exc

    async def _read_braiins(self) -> MinerReading:
        """BOS+: one cgminer-API multicommand on port 4028 (no login, one connection).

        gRPC would need one HTTP/2 connection per call in pyasic (five for a reading, plus a
        login): the RPC port carries everything a reading needs in one round trip.
        """
        if self._model is None:
            await self._learn_devdetails_model()
        raw = await self._send("read", BRAIINS_READ_COMMAND)
        return self._reading(lambda: self._parse_braiins(raw))

    def _parse_braiins(self, raw: Mapping[str, Any]) -> MinerReading:
        num = self._number
        summary = raw["summary"][0]["SUMMARY"][0]
        tuner = raw["tunerstatus"][0]["TUNERSTATUS"][0]
        hashrate_ths = num(summary["MHS 5s"], 0.0, MAX_MINER_MHS, "MHS 5s") / 1e6
        power_w = num(
            tuner["ApproximateMinerPowerConsumption"], 0.0, MAX_MINER_W, "power consumption"
        )
        target_w = num(tuner["PowerLimit"], 0.0, MAX_MINER_W, "PowerLimit")
        chains = tuner.get("TunerChainStatus") or []
        paused = any(isinstance(c, dict) and c.get("Status") == "Paused" for c in chains[:64])
        temps = [
            num(d["Temperature"], *TEMP_RANGE_C, "Temperature")
            for d in raw["devs"][0]["DEVS"][:64]
            if "Temperature" in d
        ]
        fans = tuple(
            int(num(f["RPM"], 0.0, MAX_FAN_RPM, "fan RPM")) for f in raw["fans"][0]["FANS"][:64]
        )
        nominal_ths = (
            sum(
                num(d.get("Nominal MHS", 0.0), 0.0, MAX_MINER_MHS, "Nominal MHS")
                for d in raw["devs"][0]["DEVS"][:64]
            )
            / 1e6
        )
        profiles = self._ladder or (
            MinerProfile(f"{target_w:.0f}W", target_w, nominal_ths or hashrate_ths),
        )
        self._profiles = profiles
        active = self._point_at(target_w)
        judged = profiles
        if all(p.name != active for p in profiles):
            # Off the ladder: judge the mode against the target itself, at the hashrate the
            # ladder's curve gives for that power.
            judged = (*profiles, MinerProfile(active, target_w, self._hashrate_at_w(target_w)))
        mode = self._mode(power_w, hashrate_ths, active, judged)
        if paused and mode is MinerMode.MINING:
            mode = MinerMode.WAKING  # paused but still drawing: on its way down
        return MinerReading(
            device_id=self._device_id,
            address=self.address,
            model=self._model or "unknown",
            firmware="braiins",
            at=datetime.now(UTC),
            power_w=power_w,
            hashrate_ths=hashrate_ths,
            mode=mode,
            temperature_c=max(temps) if temps else None,
            profile=active,
            profiles=profiles,
            fans_rpm=fans,
            capability=MinerCapability.POWER_TARGET,
        )

    def _point_at(self, power_w: float) -> str:
        """The ladder point a power target stands for (its name), or ``"<W>W"`` if none."""
        for p in self._ladder:
            if abs(p.power_w - power_w) <= 1.0:
                return p.name
        return f"{power_w:.0f}W"

    async def _read_generic(self) -> MinerReading:
        """Stock Antminer and Whatsminer: pyasic's get_data, bounded, with a power estimate."""
        miner = self._miner
        data = await self._call(
            "read",
            lambda: miner.get_data(
                include=[
                    "hashrate",
                    "expected_hashrate",
                    "wattage",
                    "wattage_limit",
                    "hashboards",
                    "fans",
                    "is_mining",
                ]
            ),
        )
        hashrate = data.hashrate
        if hashrate is None and data.wattage is None:
            raise DeviceUnavailable(self._device_id, "read: no hashrate and no power in reply")
        hashrate_ths = float(hashrate) if hashrate is not None else 0.0
        estimated = data.wattage is None
        power_w = (
            float(data.wattage) if data.wattage is not None else self._estimate_w(hashrate_ths)
        )
        limit = float(data.wattage_limit) if data.wattage_limit else None
        if self._ladder:
            profiles = self._ladder
        else:
            # No configured ladder: the miner's own nominal point (its limit and sticker rate).
            expected = data.expected_hashrate
            nominal_ths = float(expected) if expected else hashrate_ths
            profiles = (MinerProfile("default", limit or power_w, nominal_ths),)
        self._profiles = profiles
        if self._family is Family.WHATSMINER and limit is not None:
            active = self._point_at(limit)
        else:  # stock firmware runs its nominal point (the top of the ladder) or sleeps
            active = max(profiles, key=lambda p: p.power_w).name
        temps = [float(b.temp) for b in data.hashboards if b.temp is not None]
        mode = self._mode(power_w, hashrate_ths, active, profiles)
        nominal_ths = max(p.hashrate_ths for p in profiles)
        if data.is_mining is False and hashrate_ths < 0.02 * nominal_ths:
            mode = MinerMode.SLEEPING
        return MinerReading(
            device_id=self._device_id,
            address=self.address,
            model=self._model or "unknown",
            firmware=self._family.value,
            at=datetime.now(UTC),
            power_w=power_w,
            hashrate_ths=hashrate_ths,
            mode=mode,
            temperature_c=max(temps) if temps else None,
            profile=active,
            profiles=profiles,
            fans_rpm=tuple(int(f.speed) for f in data.fans if f.speed is not None),
            power_estimated=estimated,
            capability=CAPABILITY[self._family],
        )

    async def _read_antminer(self) -> MinerReading:
        """Stock Antminer: one ``stats`` RPC (stock firmware refuses multicommands).

        It carries the rate, the sticker rate, chip temperatures, fans and the model; the web
        API (digest auth, two HTTP exchanges a call) is left to commands. The firmware reports
        no power: it is estimated from the ladder at the measured rate and flagged.
        """
        raw = await self._send("read", "stats")
        return self._reading(lambda: self._parse_antminer(raw))

    def _parse_antminer(self, raw: Mapping[str, Any]) -> MinerReading:
        num = self._number
        head, board = raw["STATS"][0], raw["STATS"][1]
        if self._model is None and isinstance(head.get("Type"), str):
            self._model = head["Type"][:64].removeprefix("Antminer ") or None
        hashrate_ghs, temps = self._bmminer_boards(board)
        if "GHS 5s" in board:
            hashrate_ghs = num(board["GHS 5s"], 0.0, MAX_BOARD_GHS, "GHS 5s")
        unit = _RATE_UNIT_GHS.get(str(board.get("rate_unit", "GH")), 1.0)
        ideal_ths = num(board.get("total_rateideal", 0.0), 0.0, MAX_BOARD_GHS, "rateideal")
        ideal_ths *= unit / 1000.0
        fan_count = int(num(board.get("fan_num", 0), 0.0, 16.0, "fan_num"))
        fans = tuple(
            int(num(board[f"fan{k}"], 0.0, MAX_FAN_RPM, "fan RPM"))
            for k in range(1, fan_count + 1)
            if f"fan{k}" in board
        )
        hashrate_ths = hashrate_ghs / 1000.0
        power_w = self._estimate_w(hashrate_ths)
        profiles = self._ladder or (
            MinerProfile("default", self._estimate_w(ideal_ths), ideal_ths or hashrate_ths),
        )
        self._profiles = profiles
        # Stock firmware runs its nominal point (the top of the ladder) or sleeps.
        active = max(profiles, key=lambda p: p.power_w).name
        return MinerReading(
            device_id=self._device_id,
            address=self.address,
            model=self._model or "unknown",
            firmware=Family.ANTMINER.value,
            at=datetime.now(UTC),
            power_w=power_w,
            hashrate_ths=hashrate_ths,
            mode=self._mode(power_w, hashrate_ths, active, profiles),
            temperature_c=max(temps) if temps else None,
            profile=active,
            profiles=profiles,
            fans_rpm=fans,
            power_estimated=True,
            capability=MinerCapability.SLEEP_ONLY,
        )

    async def _read_whatsminer(self) -> MinerReading:
        """Whatsminer: one ``summary`` RPC (power, limit, rate, fans and temperature)."""
        if self._model is None:
            await self._learn_devdetails_model()
        raw = await self._send("read", "summary")
        return self._reading(lambda: self._parse_whatsminer(raw))

    def _parse_whatsminer(self, raw: Mapping[str, Any]) -> MinerReading:
        num = self._number
        row = raw["SUMMARY"][0]
        hashrate_ths = num(row["MHS 5s"], 0.0, MAX_MINER_MHS, "MHS 5s") / 1e6
        power_w = num(row["Power"], 0.0, MAX_MINER_W, "Power")
        limit = num(row.get("Power Limit", 0), 0.0, MAX_MINER_W, "Power Limit") or None
        temps = [
            num(row[k], *TEMP_RANGE_C, k) for k in ("Temperature", "Chip Temp Max") if k in row
        ][:1]
        fans = tuple(
            int(num(row[k], 0.0, MAX_FAN_RPM, "fan RPM"))
            for k in ("Fan Speed In", "Fan Speed Out")
            if k in row
        )
        if self._ladder:
            profiles = self._ladder
        else:
            # No configured ladder: the miner's own nominal point (its limit and sticker rate).
            target = num(row.get("Target MHS", 0), 0.0, MAX_MINER_MHS, "Target MHS") / 1e6
            profiles = (MinerProfile("default", limit or power_w, target or hashrate_ths),)
        self._profiles = profiles
        active = self._point_at(limit) if limit is not None else profiles[-1].name
        return MinerReading(
            device_id=self._device_id,
            address=self.address,
            model=self._model or "unknown",
            firmware=Family.WHATSMINER.value,
            at=datetime.now(UTC),
            power_w=power_w,
            hashrate_ths=hashrate_ths,
            mode=self._mode(power_w, hashrate_ths, active, profiles),
            temperature_c=temps[0] if temps else None,
            profile=active,
            profiles=profiles,
            fans_rpm=fans,
            capability=MinerCapability.POWER_LIMIT,
        )

    def _hashrate_at_w(self, power_w: float) -> float:
        """The ladder's hashrate at a power (linear between points, proportional below)."""
        ladder = sorted(self._ladder, key=lambda p: p.power_w)
        if not ladder or power_w <= 0.0:
            return 0.0
        if power_w <= ladder[0].power_w:
            return ladder[0].hashrate_ths * power_w / ladder[0].power_w
        for lo, hi in itertools.pairwise(ladder):
            if power_w <= hi.power_w:
                f = (power_w - lo.power_w) / (hi.power_w - lo.power_w)
                return lo.hashrate_ths + f * (hi.hashrate_ths - lo.hashrate_ths)
        return ladder[-1].hashrate_ths

    def _estimate_w(self, hashrate_ths: float) -> float:
        """Power of a miner that reports none: the ladder's curve at the measured hashrate."""
        ladder = sorted(self._ladder, key=lambda p: p.hashrate_ths)
        if not ladder:
            return hashrate_ths * _FALLBACK_J_PER_TH
        if hashrate_ths <= 0.0:
            return 0.0
        if hashrate_ths <= ladder[0].hashrate_ths:
            return ladder[0].power_w * hashrate_ths / ladder[0].hashrate_ths
        for lo, hi in itertools.pairwise(ladder):
            if hashrate_ths <= hi.hashrate_ths and hi.hashrate_ths > lo.hashrate_ths:
                f = (hashrate_ths - lo.hashrate_ths) / (hi.hashrate_ths - lo.hashrate_ths)
                return lo.power_w + f * (hi.power_w - lo.power_w)
        top = ladder[-1]
        return top.power_w * hashrate_ths / top.hashrate_ths

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
            # <=: a paused miner's only known point may have no hashrate at all
            hashrate_ths <= th.sleep_hashrate_frac * nominal.hashrate_ths
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

    @_checks_family
    async def sleep(self) -> None:
        """Stop hashing at standby power (LuxOS curtail, BOS+ pause, stock miner-mode)."""
        await self._ensure()
        if self._family is Family.LUXOS:
            await self._privileged("sleep", "curtail", "sleep")
            await self._after_command()
        elif self._family is Family.BRAIINS:
            await self._bos_send("sleep", "pause_mining", PauseMiningRequest())
        else:
            await self._stock_mode("sleep", self._miner.stop_mining, _STOCK_SLEEP)

    @_checks_family
    async def wake(self) -> None:
        """Resume hashing; power ramps up over the next minutes."""
        await self._ensure()
        if self._family is Family.LUXOS:
            await self._privileged("wake", "curtail", "wakeup")
            await self._after_command()
        elif self._family is Family.BRAIINS:
            await self._bos_send("wake", "resume_mining", ResumeMiningRequest())
        else:
            await self._stock_mode("wake", self._miner.resume_mining, _STOCK_NORMAL)

    async def _stock_mode(self, what: str, fn: Callable[[], Awaitable[bool]], wanted: str) -> None:
        if self._family is not Family.ANTMINER:
            await self._bool_call(what, fn)
            return
        # Stock Antminer: the web UI's own sequence, through our digest client (pyasic's
        # stop_mining/resume_mining would answer True whatever happened): read the config,
        # write it back with the new miner-mode, read the mode back.
        async with self._stock_web().session() as web:  # three calls, one connection
            await self._stock_sequence(web, what, wanted)

    async def _stock_sequence(self, web: WebSession, what: str, wanted: str) -> None:
        conf: dict[str, Any] = await self._call(
            f"{what}: get_miner_conf", lambda: web.get("get_miner_conf")
        )
        try:
            config = MinerConfig.from_am_modern(conf)
            config.mining_mode = (
                MiningModeConfig.sleep() if wanted == _STOCK_SLEEP else MiningModeConfig.normal()
            )
            body = config.as_am_modern()
        except Exception as exc:  # pyasic's config parser on a hostile reply: any error
            raise BadReply(self._device_id, f"{what}: unusable get_miner_conf reply") from exc
        try:
            reply: dict[str, Any] = await self._call(what, lambda: web.post("set_miner_conf", body))
        except DeviceTimeout:
            # Stock firmware saves the config, then restarts bmminer before it answers (about
            # 20 s): a timeout here is not a failure until the read-back says so.
            log.info(
                "%s: %s: set_miner_conf slow to answer; reading the mode back",
                self._device_id,
                what,
            )
        else:
            if reply.get("stats") == "error":
                message = str(reply.get("msg", reply.get("code", "")))[:200]
                raise CommandRejected(self._device_id, f"{what}: set_miner_conf: {message}")
        await self._check_work_mode(web, what, wanted)

    def _stock_web(self) -> AntminerWeb:
        if self._web_api is None:
            raise Unsupported(self._device_id, "only a stock Antminer has the CGI web API")
        return self._web_api

    async def _check_work_mode(self, web: WebSession, what: str, wanted: str) -> None:
        """Stock Antminer: read the work mode back (an ignored write answers success too)."""
        conf: dict[str, Any] = await self._call("get_miner_conf", lambda: web.get("get_miner_conf"))
        mode = str(conf.get("bitmain-work-mode", ""))[:16]
        if mode != wanted:
            raise CommandNotApplied(
                self._device_id,
                f"{what}: miner-mode reads {mode or 'nothing'!r} after set_miner_conf, "
                f"wanted {wanted!r}",
            )

    async def _bool_call(self, what: str, fn: Callable[[], Awaitable[bool]]) -> None:
        # pyasic's stock and Whatsminer methods answer False instead of raising: make it loud.
        ok = await self._call(what, fn)
        if ok is False:
            raise CommandRejected(self._device_id, f"{what}: the firmware refused (pyasic: False)")

    async def _ladder_points(self) -> tuple[MinerProfile, ...]:
        if self._family is not Family.LUXOS:
            return self._ladder or self._profiles
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

    @_checks_family
    async def set_profile(self, profile: str) -> None:
        """Move to one ladder point: a LuxOS profile, a BOS+ power target, a power limit."""
        await self._ensure()
        points = await self._ladder_points()
        names = [p.name for p in points]
        point = next((p for p in points if p.name == profile), None)
        if point is None:
            raise CommandRejected(
                self._device_id, f"unknown profile {profile!r}; the miner offers {names}"
            )
        if self._family is Family.LUXOS:
            try:
                await self._luxos_profileset(profile)
            finally:
                await self._after_command()
        elif self._family is Family.BRAIINS:
            await self._braiins_target(round(point.power_w))
        elif self._family is Family.WHATSMINER:
            await self._bool_call(
                "set_profile", lambda: self._miner.set_power_limit(round(point.power_w))
            )
        elif point.power_w < max(p.power_w for p in points):
            # Stock firmware runs its nominal point only: a lower point is not reachable.
            raise Unsupported(
                self._device_id, f"stock firmware can only sleep or run; {profile!r} is neither"
            )

    async def _braiins_target(self, watts: int) -> None:
        request = SetPowerTargetRequest(
            power_target=Power(watt=watts),
            save_action=SaveAction(SaveAction.SAVE_AND_FORCE_APPLY),
        )
        reply = await self._bos_send("set_power_target", "set_power_target", request)
        applied = reply.get("powerTarget", {}).get("watt")
        if applied != watts:
            raise CommandNotApplied(self._device_id, f"power target {watts} W answered {applied!r}")

    async def _bos_send(self, what: str, method: str, message: Any) -> dict[str, Any]:
        """One privileged BOS+ gRPC call, the login (when no fresh token is held) on the same
        HTTP/2 connection. pyasic opens a connection per call and one more to log in; its
        stubs, messages and login exchange are used as they are."""
        web = self._miner.web

        async def exchange() -> dict[str, Any]:
            async with Channel(web.ip, web.port) as channel:
                stub = BOSMinerGRPCStub(channel)
                fresh = time.monotonic() - self._bos_token_at < _BOS_TOKEN_S
                token = self._bos_token if fresh else None
                for attempt in range(2):
                    if token is None:
                        token = await self._bos_login(channel, web.username, web.pwd)
                    try:
                        call = getattr(stub, method)
                        reply = await call(message, metadata=[("authorization", token)])
                    except GRPCError as exc:
                        if exc.status is GrpcStatus.UNAUTHENTICATED and attempt == 0:
                            token = self._bos_token = None  # expired or a reboot: log in again
                            continue
                        raise
                    out: dict[str, Any] = reply.to_pydict()
                    return out
                raise AssertionError("unreachable: the second attempt returns or raises")

        return await self._call(what, exchange)

    async def _bos_login(self, channel: Channel, username: str, password: str) -> str:
        """pyasic's BOS+ login exchange: the token comes back in the initial metadata."""
        request = LoginRequest(username=username, password=password)
        async with channel.request(
            "/braiins.bos.v1.AuthenticationService/Login",
            grpclib.const.Cardinality.UNARY_UNARY,
            LoginRequest,
            LoginResponse,
        ) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_initial_metadata()
            metadata: Mapping[str, Any] = stream.initial_metadata or {}
            token = metadata.get("authorization")
            await stream.recv_message()  # the reply (or the login's GRPCError)
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise BadReply(self._device_id, "login: no token in the reply's metadata")
        self._bos_token, self._bos_token_at = token, time.monotonic()
        return token

    async def _luxos_profileset(self, profile: str) -> None:
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
                # ATM then moves profiles on its own; the next reading shows where it went.
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

    @_checks_family
    async def set_power_limit(self, watts: float) -> str:
        """LuxOS: the highest profile at or below ``watts``; BOS+/Whatsminer: ``watts`` itself."""
        await self._ensure()
        if not math.isfinite(watts) or watts <= 0:
            raise CommandRejected(self._device_id, f"power limit must be > 0 W, got {watts}")
        if self._family is Family.BRAIINS:
            await self._braiins_target(round(watts))
            return self._point_at(round(watts))
        if self._family is Family.WHATSMINER:
            await self._bool_call("set_power_limit", lambda: self._miner.set_power_limit(watts))
            return f"{watts:.0f}W"
        if self._family is Family.ANTMINER:
            raise Unsupported(self._device_id, "stock firmware has no power limit")
        ladder = await self._ladder_points()
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
                device_id,
                found,
                semaphore,
                timeout_s=timeout_s,
                thresholds=thresholds,
                identified=True,
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
    """Find miners of the supported families in ``subnet`` with pyasic's ``MinerNetwork.scan``.

    pyasic bounds a scan with the *process-global* setting ``network_scan_semaphore``, which
    defaults to unbounded: on a small controller an unbounded scan of a thousand hosts starves
    the event loop until pyasic's fixed 3 s factory timeouts expire and finds nothing. We set
    it to ``scan_concurrency`` for the duration of the scan and restore the previous value, so
    scans must not run concurrently with different limits (the agent scans once, at start).
    Miners of other families are logged and skipped.
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
        if family_of(m) is not None:
            miners.append(
                PyasicMiner(str(m.ip), m, semaphore, timeout_s=timeout_s, thresholds=thresholds)
            )
        else:
            log.warning("scan %s: %s at %s is not a supported family; skipped", subnet, m, m.ip)
    miners.sort(key=lambda m: ipaddress.IPv4Address(m.address))
    return miners


async def prepare_fleet(miners: Iterable[PyasicMiner], most: int) -> dict[str, DeviceError | None]:
    """Renew at most ``most`` stale login tokens concurrently (:meth:`PyasicMiner.prepare`);
    each result is None or the error. The runtime's miner fleet does the same in the
    background (``MinerFleet.run``): benchmarks call this to reach that steady state."""
    stale = [m for m in miners if m.credential_stale()][:most]
    return await _command_fleet(stale, lambda m: m.prepare())


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

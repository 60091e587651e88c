"""OpenADR 2.0b VTN on loopback: a real ``openleadr`` server that registers VENs and pushes events.

For tests and the demo. It accepts every VEN whose name is allowed (all by default), records
each VEN's opt-in/opt-out answer per event and every telemetry value the VEN reports, and can be
told to push or cancel events from Python (:meth:`OpenAdrVtn.push_event`, ``cancel_event``) or
over HTTP on the same port::

    POST /control/event  {"ven_name": "site-1", "signal_name": "LOAD_DISPATCH",
                          "signal_type": "setpoint", "value": 500, "start": "...Z",
                          "duration_s": 3600, "market_context": "oadr://ercot/ers"}
    POST /control/cancel {"ven_name": "site-1", "event_id": "..."}

Events reach a VEN at its next poll (``poll_s``). It imports neither ``agent`` nor ``drivers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from aiohttp import web
from openleadr import OpenADRServer

log = logging.getLogger(__name__)

PREFIX = "/OpenADR2/Simple/2.0b"


@dataclass(frozen=True, slots=True)
class VtnTls:
    """Mutual TLS and message signing for the VTN (PEM file paths).

    ``ven_fingerprints`` maps a VEN name to its certificate's OpenADR fingerprint: a VEN is
    registered only if its TLS client certificate has that fingerprint.
    """

    http_cert: str
    http_key: str
    ca_file: str
    ven_fingerprints: dict[str, str]


@dataclass(frozen=True, slots=True)
class ReportedValue:
    """One telemetry value a VEN reported."""

    ven_id: str
    resource_id: str
    measurement: str
    at: datetime
    value: float


class OpenAdrVtn:
    """A real openleadr VTN on ``host:port`` (see the module docstring)."""

    def __init__(
        self,
        *,
        port: int,
        host: str = "127.0.0.1",
        vtn_id: str = "SITE-AGENT-TEST-VTN",
        poll_s: float = 1.0,
        allowed_vens: set[str] | None = None,
        tls: VtnTls | None = None,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError("the VTN simulator listens on loopback only")
        self.tls = tls
        self.host = host
        self.port = port
        self.vtn_id = vtn_id
        self.allowed_vens = allowed_vens
        self.registrations: dict[str, str] = {}  # ven_name → ven_id
        self.opt_responses: dict[str, str] = {}  # event_id → optIn/optOut (latest answer)
        self.reports: list[ReportedValue] = []
        self.delivered: list[str] = []  # event ids, in delivery order
        self.refused: list[str] = []  # VEN names whose registration was refused
        with warnings.catch_warnings():
            # openleadr 0.5.36 stores itself under a plain string key, which aiohttp ≥ 3.9 flags.
            warnings.simplefilter("ignore", web.NotAppKeyWarning)
            self._server = OpenADRServer(
                vtn_id=vtn_id,
                http_host=host,
                http_port=port,
                # openleadr sends the poll frequency in whole seconds: below 1 s a VEN reads 0.
                requested_poll_freq=timedelta(seconds=max(1, round(poll_s))),
                ven_lookup=self._ven_lookup,
                show_fingerprint=False,
                # With TLS the VTN also signs its messages with its certificate.
                cert=tls.http_cert if tls else None,
                key=tls.http_key if tls else None,
                http_cert=tls.http_cert if tls else None,
                http_key=tls.http_key if tls else None,
                http_ca_file=tls.ca_file if tls else None,
            )
        self._server.add_handler("on_create_party_registration", self._on_registration)
        self._server.add_handler("on_register_report", self._on_register_report)
        self._server.app.add_routes(
            [
                web.post("/control/event", self._control_event),
                web.post("/control/cancel", self._control_cancel),
            ]
        )

    @property
    def url(self) -> str:
        """The URL a VEN is configured with."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{PREFIX}"

    # --- openleadr handlers -----------------------------------------------------------------

    def _ven_lookup(self, ven_id: str) -> dict[str, Any]:
        for name, vid in self.registrations.items():
            if vid == ven_id:
                info = {"ven_id": vid, "ven_name": name, "registration_id": f"reg-{vid}"}
                if self.tls is not None:
                    info["fingerprint"] = self.tls.ven_fingerprints.get(name, "")
                return info
        return {}

    async def _on_registration(self, payload: dict[str, Any]) -> tuple[str, str] | bool:
        name = str(payload.get("ven_name"))
        if self.allowed_vens is not None and name not in self.allowed_vens:
            log.warning("VTN refused VEN %r", name)
            self.refused.append(name)
            return False
        if self.tls is not None:
            expected = self.tls.ven_fingerprints.get(name)
            if expected is None or payload.get("fingerprint") != expected:
                log.warning("VTN refused VEN %r: certificate fingerprint mismatch", name)
                self.refused.append(name)
                return False
        ven_id = self.registrations.setdefault(name, f"ven-{name}")
        return ven_id, f"reg-{ven_id}"

    async def _on_register_report(
        self,
        ven_id: str,
        resource_id: str,
        measurement: str,
        unit: str,
        scale: str,
        min_sampling_interval: timedelta,
        max_sampling_interval: timedelta,
    ) -> tuple[Any, timedelta]:
        callback = partial(
            self._on_update_report, ven_id=ven_id, resource_id=resource_id, measurement=measurement
        )
        return callback, min_sampling_interval

    async def _on_update_report(
        self, data: list[tuple[datetime, float]], ven_id: str, resource_id: str, measurement: str
    ) -> None:
        for at, value in data:
            self.reports.append(ReportedValue(ven_id, resource_id, measurement, at, float(value)))

    def _on_opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opt_responses[event_id] = opt_type

    # --- control ----------------------------------------------------------------------------

    def push_event(
        self,
        ven_name: str,
        *,
        start: datetime,
        duration: timedelta,
        value: float,
        signal_name: str = "LOAD_DISPATCH",
        signal_type: str = "setpoint",
        market_context: str = "oadr://unknown.context",
        event_id: str | None = None,
        intervals: Sequence[tuple[datetime, timedelta, float]] | None = None,
    ) -> str:
        """Queue an event for a registered VEN; it is delivered at the VEN's next poll."""
        ven_id = self.registrations.get(ven_name)
        if ven_id is None:
            raise KeyError(f"VEN {ven_name!r} is not registered")
        spans = intervals or [(start, duration, value)]
        event_id = event_id or f"evt-{uuid.uuid4().hex[:12]}"
        pushed = self._server.add_event(
            ven_id=ven_id,
            signal_name=signal_name,
            signal_type=signal_type,
            intervals=[
                {"dtstart": s.astimezone(UTC), "duration": d, "signal_payload": v}
                for s, d, v in spans
            ],
            event_id=event_id,
            market_context=market_context,
            callback=self._on_opt,
            delivery_callback=partial(self._on_delivered, event_id),
        )
        return str(pushed)

    def _on_delivered(self, event_id: str) -> None:
        self.delivered.append(event_id)

    def cancel_event(self, ven_name: str, event_id: str) -> None:
        self._server.cancel_event(self.registrations[ven_name], event_id)

    async def _control_event(self, request: web.Request) -> web.Response:
        """Push one event; every field is checked before anything is queued."""
        try:
            body = await _control_body(request, _EVENT_KEYS)
            start = datetime.fromisoformat(_text(body, "start"))
            if start.tzinfo is None:
                raise ValueError("start needs a time zone")
            duration_s = _number(body, "duration_s", 1e-3, MAX_CONTROL_DURATION_S)
            start + timedelta(seconds=duration_s)  # OverflowError past the year 9999
            event_id = self.push_event(
                _text(body, "ven_name"),
                start=start,
                duration=timedelta(seconds=duration_s),
                value=_number(body, "value", -1e12, 1e12),
                signal_name=_text(body, "signal_name", "LOAD_DISPATCH"),
                signal_type=_text(body, "signal_type", "setpoint"),
                market_context=_text(body, "market_context", "oadr://unknown.context"),
                event_id=_text(body, "event_id", "") or None,
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise web.HTTPBadRequest(text=f"bad event request: {exc!r}"[:300]) from None
        return web.json_response({"event_id": event_id})

    async def _control_cancel(self, request: web.Request) -> web.Response:
        try:
            body = await _control_body(request, frozenset({"ven_name", "event_id"}))
            event_id = _text(body, "event_id")
            self.cancel_event(_text(body, "ven_name"), event_id)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise web.HTTPBadRequest(text=f"bad cancel request: {exc!r}"[:300]) from None
        return web.json_response({"cancelled": event_id})

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # openleadr prints a banner on start; keep stdout for the caller's own output.
        with contextlib.redirect_stdout(None):
            await self._server.run()

    async def stop(self) -> None:
        await self._server.stop()

    async def __aenter__(self) -> OpenAdrVtn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --- control-port parsing: bounded, strict, every field typed ------------------------------------

MAX_CONTROL_BYTES = 16 * 1024
MAX_CONTROL_DURATION_S = 31 * 86400.0
_EVENT_KEYS = frozenset(
    {
        "ven_name",
        "start",
        "duration_s",
        "value",
        "signal_name",
        "signal_type",
        "market_context",
        "event_id",
    }
)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


async def _control_body(request: web.Request, known: frozenset[str]) -> dict[str, Any]:
    raw = await request.content.read(MAX_CONTROL_BYTES + 1)
    if len(raw) > MAX_CONTROL_BYTES:
        raise ValueError(f"body over {MAX_CONTROL_BYTES} bytes")
    body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    return body


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if value is None:
        raise KeyError(key)
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError(f"{key} must be text of at most 256 characters")
    return value


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{key} must be {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _poll_arg(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected 0 < seconds ≤ 86400, got {text!r}")
    return value


async def _serve(args: argparse.Namespace) -> None:
    vtn = OpenAdrVtn(port=args.port, host=args.host, poll_s=args.poll_s)
    await vtn.start()
    print(f"OpenADR VTN on {vtn.url} (control: POST http://{args.host}:{args.port}/control/event)")
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenADR 2.0b VTN simulator on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--poll-s", type=_poll_arg, default=1.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

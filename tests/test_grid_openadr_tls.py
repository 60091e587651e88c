"""OpenADR over mutual TLS with signed messages: the VEN and the real openleadr VTN on loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drivers.grid.openadr import OpenAdrSettings, OpenAdrVen, certificate_fingerprint
from simulators.openadr_vtn import OpenAdrVtn, VtnTls
from tests.pki import make_pki
from tests.servers import free_port
from tests.test_grid_openadr import PROGRAMS, until


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path, ["vtn", "ven", "rogue"])


def _ven(port: int, pki: dict[str, Path], crt: Path, key: Path) -> OpenAdrVen:
    return OpenAdrVen(
        OpenAdrSettings.model_validate(
            {
                "vtn_url": f"https://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
                "ven_name": "site-1",
                "programs": PROGRAMS,
                "cert": str(crt),
                "key": str(key),
                "ca_file": str(pki["ca"]),
                "vtn_fingerprint": certificate_fingerprint(pki["vtn_crt"]),
                "register_retry_min_s": 0.2,
                "register_retry_max_s": 0.5,
            }
        )
    )


@pytest.mark.slow
async def test_signed_event_over_mutual_tls_and_a_foreign_certificate_refused(
    pki: dict[str, Path],
) -> None:
    port = free_port()
    tls = VtnTls(
        http_cert=str(pki["vtn_crt"]),
        http_key=str(pki["vtn_key"]),
        ca_file=str(pki["ca"]),
        ven_fingerprints={"site-1": certificate_fingerprint(pki["ven_crt"])},
    )
    async with OpenAdrVtn(port=port, poll_s=1, tls=tls) as vtn:
        assert vtn.url.startswith("https://")
        # A VEN with another certificate (same CA) is not registered.
        rogue = _ven(port, pki, pki["rogue_crt"], pki["rogue_key"])
        stop = asyncio.Event()
        task = asyncio.create_task(rogue.run(stop))
        await until(lambda: vtn.refused == ["site-1"])
        assert not rogue.registered
        stop.set()
        await asyncio.wait_for(task, 15)
        # The right VEN registers and receives a signed event.
        ven = _ven(port, pki, pki["ven_crt"], pki["ven_key"])
        stop = asyncio.Event()
        task = asyncio.create_task(ven.run(stop))
        try:
            await until(lambda: ven.registered)
            eid = vtn.push_event(
                "site-1",
                start=datetime.now(UTC) + timedelta(minutes=1),
                duration=timedelta(minutes=30),
                value=400.0,
                market_context=next(iter(PROGRAMS)),
            )
            await until(lambda: [e.event_id for e in ven.events()] == [eid])
            await until(lambda: vtn.opt_responses.get(eid) == "optIn")
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)

"""OpenADR over mutual TLS with signed messages: the VEN and the real openleadr VTN on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from drivers.grid.openadr import OpenAdrSettings, OpenAdrVen, certificate_fingerprint
from simulators.openadr_vtn import OpenAdrVtn, VtnTls
from tests.servers import free_port
from tests.test_grid_openadr import PROGRAMS, until


def _issue(
    folder: Path,
    name: str,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
) -> tuple[Path, Path, x509.Name, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, subject, key


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_crt, _ca_key, ca_name, ca_key = _issue(tmp_path, "ca", None, ca=True)
    vtn_crt, vtn_key, *_ = _issue(tmp_path, "vtn", (ca_name, ca_key))
    ven_crt, ven_key, *_ = _issue(tmp_path, "ven", (ca_name, ca_key))
    rogue_crt, rogue_key, *_ = _issue(tmp_path, "rogue", (ca_name, ca_key))
    return {
        "ca": ca_crt,
        "vtn_crt": vtn_crt,
        "vtn_key": vtn_key,
        "ven_crt": ven_crt,
        "ven_key": ven_key,
        "rogue_crt": rogue_crt,
        "rogue_key": rogue_key,
    }


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
        await asyncio.wait_for(task, 5)
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
            await asyncio.wait_for(task, 5)

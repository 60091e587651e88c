"""The shipped configs/mosquitto.conf runs a real broker, and the agent connects to it over TLS.

The file is used as shipped except for what must change on a test machine: its /etc and
/var paths point into a temporary folder and its two listeners get free ports.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control.commands import CommandResult
from agent.control.config import MqttConfig
from agent.outputs.mqtt import MqttBridge
from drivers.bus.base import BusError, BusSettings
from drivers.bus.mqtt import MqttBus
from tests.sample_state import NOW, sample_state
from tests.servers import free_port, require_binary, wait_listening

pytestmark = pytest.mark.mqtt

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
USERS = {"agent": "agent-secret", "operator": "operator-secret"}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(folder: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    require_binary("openssl", "openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=site-agent test CA", cwd=folder)  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext",
            cwd=folder)  # fmt: skip


class ShippedBroker:
    def __init__(self, tmp: Path) -> None:
        self.binary = require_binary("mosquitto", "mosquitto")
        passwd = require_binary("mosquitto_passwd", "mosquitto")
        etc = tmp / "etc"
        (etc / "certs").mkdir(parents=True)
        (tmp / "var").mkdir()
        make_certs(etc / "certs")
        pwfile = etc / "site-agent.passwd"
        pwfile.touch()
        for user, password in USERS.items():
            subprocess.run([passwd, "-b", str(pwfile), user, password], check=True)
        pwfile.chmod(0o600)
        (etc / "site-agent.acl").write_text((CONFIGS / "mosquitto.acl").read_text())
        self.plain_port, self.tls_port = free_port(), free_port()
        conf = (CONFIGS / "mosquitto.conf").read_text()
        assert "listener 1883 127.0.0.1" in conf
        assert "listener 8883\n" in conf
        conf = (
            conf.replace("/etc/mosquitto/", f"{etc}/")
            .replace("/var/lib/mosquitto/", f"{tmp / 'var'}/")
            .replace("listener 1883 127.0.0.1", f"listener {self.plain_port} 127.0.0.1")
            .replace("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n")
        )
        # As root, mosquitto would drop to user "mosquitto", who cannot read the temp folder.
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text("user root\n" + conf)
        self.log = tmp / "mosquitto.log"
        self.ca = etc / "certs" / "ca.crt"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=log
            )
        try:
            wait_listening("127.0.0.1", self.plain_port, proc=self.proc)
            wait_listening("127.0.0.1", self.tls_port, proc=self.proc)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"shipped config failed: {self.log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    broker = ShippedBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_agent_publishes_over_tls_to_the_shipped_broker(
    shipped_broker: ShippedBroker,
) -> None:
    state = sample_state()
    config = MqttConfig(
        enabled=True,
        port=shipped_broker.tls_port,
        username="agent",
        password="agent-secret",  # type: ignore[arg-type]  # the validator wraps it
        tls_ca=shipped_broker.ca,
        reconnect_initial_s=0.1,
    )

    async def handler(_: object) -> CommandResult:
        return CommandResult.ok()

    bridge = MqttBridge(
        config, state, handler, count_rejected=lambda _source, _reason: None, clock=lambda: NOW
    )
    operator = MqttBus(
        BusSettings("127.0.0.1", shipped_broker.plain_port, "op", "operator", "operator-secret")
    )
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(10):
            await bridge.connected.wait()
        bridge.publish_cycle()
        async with operator.session() as op:
            await op.subscribe("site-agent/west-1/state", qos=1)
            async with asyncio.timeout(5):
                async for m in op.messages():
                    assert json.loads(m.payload)["site_power_w"] == 18_898.0
                    break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# paho leaks the socket of a failed TLS handshake (paho/mqtt/client.py _ssl_wrap_socket never
# closes it); the garbage collector closes it and Python reports that as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_tls_listener_refuses_a_client_that_does_not_trust_it(
    shipped_broker: ShippedBroker, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    make_certs(other)  # a different CA: the broker's certificate does not verify
    bus = MqttBus(
        BusSettings(
            "127.0.0.1",
            shipped_broker.tls_port,
            "x",
            "agent",
            "agent-secret",
            tls_ca=other / "ca.crt",
        )
    )
    with pytest.raises(BusError, match=r"(?i)certificate|ssl|tls"):
        async with bus.session():
            pass

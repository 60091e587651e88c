"""The systemd units: they verify cleanly, the agent unit's sandbox rates "OK" or better, and
the Python stack runs under the MemoryDenyWriteExecute= it asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from configparser import ConfigParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
AGENT_UNIT = UNITS / "site-agent.service"
SIM_UNIT = UNITS / "site-agent-sim.service"
NODE_UNIT = UNITS / "site-agent-node.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
# systemd-analyze calls a wide band "OK" (up to about 6.4 of 10); hold the agent far tighter.
MAX_AGENT_EXPOSURE = 2.0

pytestmark = pytest.mark.systemd


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


def _unit(path: Path) -> ConfigParser:
    parser = ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _exec_binaries(unit: Path) -> list[str]:
    text = unit.read_text()
    return [m.group(1) for m in re.finditer(r"^ExecStart=(\S+)", text, flags=re.M)]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root for ``verify --root``: the system's units plus stub ExecStart binaries.

    In a container neither /opt/site-agent nor a booted systemd exists, and verify checks that
    ExecStart is executable; the units must also sit inside the root for verify to read them.
    """
    _analyze()
    if not (SYSTEM_UNITS / "sysinit.target").exists():
        pytest.skip(f"{SYSTEM_UNITS} has no systemd units to verify against")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (AGENT_UNIT, SIM_UNIT, NODE_UNIT):
        for binary in _exec_binaries(unit):
            stub = root / binary.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return root


def _verify(root: Path, *units: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    paths = []
    for name, text in units:
        path = root / "etc/systemd/system" / name
        path.write_text(text)
        paths.append(str(path))
    return subprocess.run(
        [_analyze(), "verify", "--man=no", f"--root={root}", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_both_units_verify_without_a_warning(fake_root: Path) -> None:
    done = _verify(
        fake_root,
        (AGENT_UNIT.name, AGENT_UNIT.read_text()),
        (SIM_UNIT.name, SIM_UNIT.read_text()),
        (NODE_UNIT.name, NODE_UNIT.read_text()),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_verify_catches_a_broken_unit(fake_root: Path) -> None:
    """The check above can fail: a typo'd key and a missing binary are both reported."""
    broken = AGENT_UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    broken = broken.replace("ExecStart=/opt/", "ExecStart=/nonexistent/")
    done = _verify(fake_root, ("broken.service", broken))
    assert "Unknown key 'WatchdogSecs'" in done.stderr
    assert done.returncode != 0
    assert "/nonexistent/site-agent" in done.stderr


def _exposure(unit: Path) -> tuple[float, str, str]:
    done = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    if m is None and "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no security --offline: {done.stderr.strip()}")
    assert m is not None, done.stdout + done.stderr
    return float(m.group(1)), m.group(2), done.stdout


def test_agent_unit_is_rated_ok_or_better() -> None:
    _analyze()
    score, level, report = _exposure(AGENT_UNIT)
    print(f"site-agent.service exposure {score} {level}")
    assert level in {"PERFECT", "SAFE", "OK"}, report
    assert score <= MAX_AGENT_EXPOSURE, report


def test_simulator_unit_is_rated_ok_or_better() -> None:
    _analyze()
    score, level, report = _exposure(SIM_UNIT)
    print(f"site-agent-sim.service exposure {score} {level}")
    assert level in {"PERFECT", "SAFE", "OK"}, report


def test_node_unit_is_rated_ok_or_better() -> None:
    _analyze()
    score, level, report = _exposure(NODE_UNIT)
    print(f"site-agent-node.service exposure {score} {level}")
    assert level in {"PERFECT", "SAFE", "OK"}, report


def test_node_unit_is_the_agents_sandbox_plus_gpu_devices() -> None:
    """The node unit differs from the agent's only where a GPU host and a node need it."""
    node, agent = _unit(NODE_UNIT)["Service"], _unit(AGENT_UNIT)["Service"]
    assert node["ExecStart"] == (
        "/opt/site-agent/.venv/bin/site-agent node --config /etc/site-agent/node.yaml"
    )
    assert node["PrivateDevices"] == "no"
    assert node["DevicePolicy"] == "closed"
    allowed = re.findall(r"^DeviceAllow=(.+)$", NODE_UNIT.read_text(), flags=re.M)
    assert "char-nvidiactl rw" in allowed
    assert "char-nvidia-frontend rw" in allowed
    differs = {k for k in set(node) | set(agent) if node.get(k) != agent.get(k)}
    assert differs <= {
        "ExecStart",
        "PrivateDevices",
        "DeviceAllow",
        "StateDirectory",
        "WorkingDirectory",
        "LoadCredential",
    }, differs


def test_agent_unit_has_the_required_settings() -> None:
    svc = _unit(AGENT_UNIT)["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["WatchdogSec"] == "30"
    assert svc["Restart"] == "on-failure"
    assert svc["DynamicUser"] == "yes"
    assert svc["StateDirectory"] == "site-agent"
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["MemoryDenyWriteExecute"] == "yes"
    assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert svc["ExecStart"] == (
        "/opt/site-agent/.venv/bin/site-agent run --config /etc/site-agent/site.yaml"
    )
    # Credentials come through LoadCredential=, never Environment=.
    text = AGENT_UNIT.read_text()
    assert text.count("LoadCredential=") >= 2
    assert not re.search(r"^Environment=.*(PASSWORD|TOKEN|SECRET)", text, flags=re.M | re.I)


_MDWE_PROBE = textwrap.dedent(
    """
    import asyncio, ctypes, mmap, sys, tempfile
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_MDWE (Linux 6.3+), PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute= enforces.
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        print("unsupported", ctypes.get_errno())
        sys.exit(3)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("W+X mapping was allowed: MDWE not in force")
        sys.exit(4)
    except OSError:
        pass
    import aiomqtt, openleadr, prometheus_client, pyasic, pydantic, pynvml, yaml  # noqa: F401
    import argparse
    from datetime import UTC, datetime
    from agent.cli import journal as store_cli
    from agent.control import config, policy  # noqa: F401
    from agent.runtime import sdnotify  # noqa: F401
    from agent.journal.store import Store

    async def main():
        with tempfile.TemporaryDirectory() as d:
            async with Store.open(d + "/j.db") as store:
                await store.record_command("m-1", "sleep", datetime.now(UTC))
                await store.audit(source="t", action="a", result="ok", detail={"x": 1})
                assert (await store.commanded_states())["m-1"].state == "sleep"
    asyncio.run(main())
    store_cli.register(argparse.ArgumentParser().add_subparsers())
    print("ok")
    """
)


def test_python_stack_runs_under_memory_deny_write_execute() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"kernel lacks PR_SET_MDWE: {done.stdout.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"

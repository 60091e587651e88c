"""Real servers for tests, started on loopback from their Debian packages.

Each class starts the real binary on a free port in a temporary folder, waits until it
listens, and stops it (SIGTERM, then SIGKILL). Fixtures skip with a reason when the binary is
missing; ``make test`` installs the packages when it runs as root.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(
    host: str, port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``host:port`` accepts a TCP connection, or raise (at once if ``proc`` died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or skip the test saying which Debian package provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.skip(
            f"{name} not installed (Debian package {package}; `make test` as root installs it)"
        )
    return path


class Mosquitto:
    """A real Mosquitto broker on 127.0.0.1 with password authentication.

    ``users`` maps username to password; anonymous clients are refused. ``stop()`` and
    ``start()`` can be called mid-test to simulate a broker outage on the same port.
    """

    def __init__(
        self, workdir: Path, users: dict[str, str] | None = None, acl: str | None = None
    ) -> None:
        self.binary = require_binary("mosquitto", "mosquitto")
        self.passwd = require_binary("mosquitto_passwd", "mosquitto")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users or {"agent": "agent-secret", "operator": "operator-secret"}
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        pwfile = workdir / "passwd"
        pwfile.touch()
        for user, password in self.users.items():
            subprocess.run([self.passwd, "-b", str(pwfile), user, password], check=True)
        pwfile.chmod(0o600)
        acl_line = ""
        if acl is not None:  # optional topic ACL (mosquitto acl_file syntax); none by default
            acl_file = workdir / "acl"
            acl_file.write_text(acl)
            acl_file.chmod(0o600)
            acl_line = f"acl_file {acl_file}\n"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            # As root, mosquitto would drop to user "mosquitto", who cannot read pytest's tmp dir.
            "user root\n"
            "allow_anonymous false\n"
            f"password_file {pwfile}\n"
            f"{acl_line}"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    def start(self) -> None:
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=log
            )
        try:
            wait_listening(self.host, self.port, proc=self.proc)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start: {self.log_path.read_text()[-2000:]}"
            ) from None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

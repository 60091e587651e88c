"""A real one-node Slurm for tests: munged, slurmctld and slurmd on loopback, as root.

``SlurmCluster`` writes a generated munge key and a minimal ``slurm.conf`` (no cgroups, no
accounting, ``proctrack/pgid``, ``select/cons_tres``, four GPUs declared as count-only GRES so
``--gres=gpu:N`` works without devices) into a short temporary folder (Unix socket paths are
limited to 108 bytes), starts the three daemons in the foreground as children of the test
process, and waits until the node is idle. ``env`` is what a client needs (``SLURM_CONF``).

Use the ``slurm`` fixture (import it into a test module, or from conftest): it is session-wide,
because starting the daemons takes a couple of seconds. It skips with the reason when not root
or when a binary is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, require_binary

# Existing character devices stand in for /dev/nvidia0..3: slurmd only stats them, and with
# task/none nothing binds a job to them.
_FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")
GPUS_ON_NODE = len(_FAKE_GPU_DEVICES)


class SlurmCluster:
    """munged + slurmctld + slurmd for node ``localhost``, partitions ``debug`` (default) and
    ``batch``, both allowing four jobs per CPU so tests never wait for a free slot."""

    def __init__(self) -> None:
        self.munged = require_binary("munged", "munge")
        self.slurmctld = require_binary("slurmctld", "slurm-wlm")
        self.slurmd = require_binary("slurmd", "slurm-wlm")
        for client in ("squeue", "scontrol", "sbatch", "scancel", "sinfo"):
            require_binary(client, "slurm-client")
        if os.geteuid() != 0:
            pytest.skip("a one-node Slurm needs root (slurmd runs jobs as their users)")
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.ctld_port = free_port()
        self.slurmd_port = free_port()

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "jobs"):
            (self.dir / sub).mkdir(mode=0o700)
        # munged refuses group- or world-readable keys.
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.dir / "jobs").chmod(0o755)
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            "ClusterName=sitetest\n"
            "SlurmctldHost=localhost\n"
            f"SlurmctldPort={self.ctld_port}\n"
            f"SlurmdPort={self.slurmd_port}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            "AuthType=auth/munge\nCredType=cred/munge\n"
            f"AuthInfo=socket={self.munge_socket}\n"
            f"StateSaveLocation={self.dir / 'state'}\n"
            f"SlurmdSpoolDir={self.dir / 'spool'}\n"
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={self.dir / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}\n"
            # No cgroups in a container without systemd: track jobs by process group.
            "ProctrackType=proctrack/pgid\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "SchedulerType=sched/builtin\nMpiDefault=none\nReturnToService=2\n"
            # Start batch jobs at once (the default lets the scheduler batch them for 3 s).
            "SchedulerParameters=batch_sched_delay=0\n"
            "GresTypes=gpu\n"
            # Answer fast when a test stops a daemon on purpose.
            "MessageTimeout=3\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{GPUS_ON_NODE} "
            "State=UNKNOWN\n"
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:4\n"
            "PartitionName=batch Nodes=localhost MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n"
        )
        # Count-only GPUs: no device files, so nothing is bound; enough for scheduling and TRES.
        (self.dir / "gres.conf").write_text(
            "".join(f"Name=gpu File={dev}\n" for dev in _FAKE_GPU_DEVICES)
        )

    def start(self) -> None:
        self._write_config()
        munge_dir = self.dir / "munge"
        self._spawn(
            "munged",
            [
                self.munged,
                "--foreground",
                "--force",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'seed'}",
                f"--log-file={munge_dir / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), "munged socket")
        self.start_controller()
        self._spawn("slurmd", [self.slurmd, "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(self._node_idle, "node localhost idle", timeout_s=60)

    def start_controller(self) -> None:
        self._spawn("slurmctld", [self.slurmctld, "-D", "-i", "-f", str(self.conf)])

    def stop_controller(self) -> None:
        """Stop slurmctld only (the controller outage tests)."""
        for proc in list(self.procs):
            if proc.args[0] == self.slurmctld:
                self._terminate(proc)
                self.procs.remove(proc)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.dir / "log" / f"{name}.out").open("ab")
        with log:
            self.procs.append(
                subprocess.Popen(argv, stdout=log, stderr=log, env=self.env, cwd=self.dir)
            )

    def _wait(self, ready: object, what: str, timeout_s: float = 30.0) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    logs = self.logs()
                    self.stop()
                    raise RuntimeError(f"{proc.args[0]} exited: {logs}")
            if ready():
                return
            time.sleep(0.1)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"Slurm not ready ({what}) after {timeout_s} s: {logs}")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def logs(self) -> str:
        texts = []
        for path in sorted((self.dir / "log").glob("*")):
            texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(texts)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=30, check=check
        )

    def sbatch(self, *args: str) -> str:
        """Submit a batch job; its output goes to the cluster's jobs/ folder. Returns the id."""
        out = self.run(
            "sbatch", "--parsable", f"--output={self.dir / 'jobs' / '%j.out'}", *args
        ).stdout
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.removeprefix("JobState=")
        return "GONE"

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self.cancel_all()
        # Give slurmd time to end the jobs: a job's slurmstepd outlives a killed slurmd.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.procs:
            out = self.run("squeue", "-h", check=False)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.2)
        for proc in reversed(self.procs):
            self._terminate(proc)
        self.procs.clear()
        self._kill_leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """SIGKILL any process still carrying this cluster's SLURM_CONF (orphaned job steps)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture() -> Iterator[SlurmCluster]:
    """A real one-node Slurm for the whole session (skips when not root or not installed)."""
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

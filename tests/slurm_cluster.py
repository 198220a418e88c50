"""A real, private SLURM cluster on this machine: munged, slurmctld and one or two slurmd, started as root.

Used by tests/test_slurm.py (a module fixture) and runnable by hand::

    sudo apt-get install slurmd slurmctld slurm-client munge   # once; .ci/run installs them on CI
    sudo python tests/slurm_cluster.py            # starts it, prints `export SLURM_CONF=...`, stops it on Ctrl-C

Everything lives in a fresh folder under /tmp (config, munge key and socket, state, spool, logs, PID files), ports are
picked free, and the job ids start at a random number, so two clusters (two test sessions) on one machine do not see
each other and a job's ``MASTER_PORT`` (derived from its id by launch/slurm.sbatch) rarely collides. Nothing touches
/etc, systemd or the system's munge: the daemons run in the foreground (``-D``/``-F``) as children of this process.

Each node is one ``slurmd`` (``slurmd -N <name>``) on 127.0.0.1 with its own port. SLURM node names are what
``scontrol show hostnames`` prints and what launch/slurm.sbatch uses as ``MASTER_ADDR``, so they must resolve to this
machine, as node names do on a real cluster: the first node is named after this host, the second ``localhost``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
PROGRAMS = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo"]
CPUS_PER_NODE = 2


class ClusterUnavailable(RuntimeError):
    """The daemons cannot run here (not root, not installed, a daemon refused to start); the message says why."""


def check_installed() -> None:
    """Check that SLURM's and munge's programs are installed; never installs them (CI's `.ci/run` does, as root).

    Raises:
        ClusterUnavailable: a program is missing; the message names the packages to install.
    """
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise ClusterUnavailable(
            f"{', '.join(missing)} not installed; install them with `apt-get install {' '.join(PACKAGES)}` (as root)"
        )


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (bound to port 0 together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_names(n: int) -> list[str]:
    """Up to ``n`` distinct names that resolve to this machine (see the module docstring), in node order.

    Raises:
        ClusterUnavailable: not even one.
    """
    names: list[str] = []
    for name in (socket.gethostname(), "localhost"):
        try:
            socket.gethostbyname(name)
        except OSError:
            continue
        if name not in names:
            names.append(name)
    if not names:
        raise ClusterUnavailable(f"neither this host's name {socket.gethostname()!r} nor 'localhost' resolves")
    return names[:n]


class LocalSlurm:
    """A private SLURM cluster of up to ``nodes`` slurmd on this machine; ``start()`` it, ``stop()`` it.

    Args:
        nodes: number of slurmd (SLURM nodes), each with ``CPUS_PER_NODE`` CPUs; fewer where this machine has fewer
            names that resolve to it (``self.nodes`` says how many there are).
        root: folder for everything; a fresh one under /tmp by default (short: the munge socket path is limited).
    """

    def __init__(self, nodes: int = 2, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="litune-slurm-"))
        self.nodes = node_names(nodes)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env_overrides = {"SLURM_CONF": str(self.conf)}
        """What a client command (sbatch, squeue, ...) needs in its environment to talk to this cluster."""
        self.env = dict(os.environ, **self.env_overrides)

    def start(self, timeout: float = 120.0) -> None:
        """Write the config, start munged, slurmctld and the slurmd, and wait until every node is idle.

        Raises:
            ClusterUnavailable: a daemon exited or the nodes did not become idle (its log tail is in the message).
        """
        if os.geteuid() != 0:
            uid = os.geteuid()
            raise ClusterUnavailable(f"slurmd starts jobs as their users, so it must run as root (this is uid {uid})")
        check_installed()
        self.root.chmod(0o755)  # munged wants its socket's folder searchable by everyone
        try:
            self._start_munged(timeout)
            self.conf.write_text(self._slurm_conf())
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for name in self.nodes:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munged(self, timeout: float) -> None:
        key_dir = self.root / "munge"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))  # a private key: jobs of this cluster only
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}", f"--seed-file={key_dir / 'seed'}",
                f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
            ],
        )  # fmt: skip
        self._poll(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")

    def _slurm_conf(self) -> str:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        r = self.root
        lines = [
            f"ClusterName=litune{random.randrange(10**6)}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job waits for the job credential's lifetime before it runs again: 120 s by default.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            # No cgroups here (a container; and no systemd): track job processes through /proc, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Pending jobs (a requeued one, once its credential expired) are looked at every 2 s, not every 60 s.
            "SchedulerParameters=sched_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # both slurmd share this machine's cores
            f"FirstJobId={random.randrange(1, 10**6) * 10}",
            "MailProg=/bin/true",
            "KillWait=5",  # SIGTERM to SIGKILL when a job is cancelled or requeued
            "MinJobAge=600",  # keep finished jobs visible to scontrol/squeue for the tests
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.root / f"{name}.out").open("w")
        # A session of their own: a Ctrl-C meant for pytest does not kill them before stop() cancels the jobs.
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _poll(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({proc.returncode}): {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"{what} within {timeout:.0f} s: {self.log_tail('slurmctld')}")
            time.sleep(0.5)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            return all(states.get(n) == "idle" for n in self.nodes)

        self._poll(idle, timeout, "the nodes did not become idle")

    def log_tail(self, name: str, chars: int = 2000) -> str:
        """The end of a daemon's log (``slurmctld``, ``slurmd-<node>``, ``munged``)."""
        text = ""
        for path in (self.root / f"{name}.log", self.root / f"{name}.out"):
            if path.exists():
                text += path.read_text(errors="replace")[-chars:]
        return text or "(no log)"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``Reason``, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill whatever process still runs with this cluster's config."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--quiet", f"--user={os.getuid()}", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):  # slurmd, ctld, munged
            _terminate(self.procs[name])
        # slurmstepd and job processes outlive slurmd by design; they inherited SLURM_CONF from it or from sbatch.
        for pid in _pids_with_env("SLURM_CONF", str(self.conf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pids_with_env(var: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


if __name__ == "__main__":
    cluster = LocalSlurm(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    cluster.start()
    print(f"SLURM is up (nodes {', '.join(cluster.nodes)}); in another shell:\n  export SLURM_CONF={cluster.conf}")
    print("Ctrl-C (or SIGTERM) stops it.", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()

"""Guards taken before a run writes anything: one writer per run folder, a writable runs folder, a free port.

The lock is a file ``<run>/.litune.lock`` created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+)
holding the owner's host, pid and job id. A second ``litune fit/validate/test`` into the same folder finds it and stops
with a message naming the holder. A stale lock (its process was killed: same host and no such pid, or the same
scheduler job requeued) is reported and taken over, so a resume after a kill just works. A lock from a process on
another host cannot be checked from here: the error names the file to remove once that process is known to be gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from litune.errors import ConfigError
from litune.runs import CHECKPOINTS_DIR, is_launched, job_id

LOCK_FILE = ".litune.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive claim on a run folder for the lifetime of one command.

    Args:
        run_dir: the run folder (created if missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.created_folder = False

    def acquire(self) -> RunLock:
        """Create the lock file, taking over a stale one; raise :class:`ConfigError` if a live process holds it."""
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    raise self._held_error(owner) from None
                # Provably dead (this host, no such pid) or this job's own earlier incarnation (a requeued SLURM job):
                # a resume after a kill must just work, so say what was found and take over.
                print(
                    f"litune: removing the stale lock {self.path} of process {owner.get('pid')} on "
                    f"{owner.get('host')}, which was killed before it could clean up",
                    file=sys.stderr,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise self._held_error(self._owner())

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(owner: dict) -> bool:
        job = job_id()
        if job is not None and owner.get("job") == job and owner.get("pid") != os.getpid():
            return True
        pid = owner.get("pid")
        return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def _held_error(self, owner: dict) -> ConfigError:
        run_dir = self.path.parent
        if not owner:
            return ConfigError(
                "run folder",
                f"{run_dir} has a lock file {self.path} that names no process (written by something else, or cut "
                "off by a crash)",
                f"make sure nothing else writes into {run_dir}, then `rm {self.path}` and run the command again",
            )
        return ConfigError(
            "run folder",
            f"{run_dir} is being written by another litune process (pid {owner.get('pid')} on {owner.get('host')}); "
            "two writers would corrupt its checkpoints and metrics",
            "wait for that run to finish, or start a new run (without --ckpt_path); if that process is gone "
            f"(it ran on another host and was killed), `rm {self.path}`",
        )

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)
            if self.created_folder:  # a run that failed before writing anything leaves no empty folder behind
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty: the run wrote into it
                    pass


def check_writable(folder: str | Path, field: str) -> None:
    """Raise :class:`ConfigError` unless ``folder`` exists as a writable folder or can be created as one."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"{probe} is not a folder, so {folder} cannot be created"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{probe} is not writable"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"{folder} cannot be created ({err.strerror})"
    if problem:
        raise ConfigError(field, problem, f"set {field} to a folder you can write to, e.g. --{field}=./runs")


def check_port_free(processes: int | None, num_nodes: int) -> None:
    """For a multi-process run that Lightning launches itself, fail early when ``MASTER_PORT`` is already taken.

    Without this, the ranks start, the rendezvous fails with ``EADDRINUSE`` deep inside torch.distributed and the
    user sees one traceback per rank. Launched ranks (torchrun, SLURM) are skipped: there the launcher owns the port.
    """
    port = os.environ.get("MASTER_PORT")
    if not port or (processes or 1) * max(num_nodes, 1) < 2 or is_launched():
        return
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("MASTER_PORT", f"{port!r} is not a port number", "set MASTER_PORT to a free port, e.g. 29500")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if addr not in ("127.0.0.1", "localhost", socket.gethostname()):
        return  # another host's port: only that host can tell
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by an earlier run is free for the next; a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1" if addr == "localhost" else addr, int(port)))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return
            raise ConfigError(
                "MASTER_PORT",
                f"port {port} (from the MASTER_PORT environment variable) is already in use on this machine, so the "
                "processes of this run could not meet there",
                "set MASTER_PORT to a free port, or unset it to let Lightning pick one",
            ) from None


class FolderSnapshot:
    """A run folder as it was before a command, put back byte for byte if the command is refused after all.

    Every check that can refuse a command runs before the run folder is touched (docs/CONTRIBUTING.md). A few can
    only be made inside Lightning's loop, after its setup hooks have written ``config.yaml``, ``hparams.yaml`` and the
    loggers' files (a loop setting that needs the data's length, a checkpoint a sharded strategy loads itself). This
    is the backstop for that whole class: a refusal before the first batch leaves the folder as it was found. A folder
    the command created is removed; in an existing one, new files are removed and changed files are written back with
    their times. Files under ``checkpoints/`` are recorded by size and time only (nothing writes them before the first
    step; copying gigabytes per command would be the cost).

    Args:
        folder: the run folder (it need not exist yet).
    """

    MAX_COPIED = 64 << 20
    """Files larger than this are recorded by size and time only."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.existed = self.folder.is_dir()
        self.committed = False
        self.dirs: set[Path] = set()
        self.files: dict[Path, tuple[os.stat_result, bytes | None]] = {}
        if not self.existed:
            return
        for path in self.folder.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                self.dirs.add(path)
            elif path.is_file():
                stat = path.stat()
                copy = CHECKPOINTS_DIR not in path.relative_to(self.folder).parts and stat.st_size <= self.MAX_COPIED
                self.files[path] = (stat, path.read_bytes() if copy else None)

    def restore(self) -> None:
        """Put the folder back as it was (unless :attr:`committed`: the command got past its refusals)."""
        if self.committed:
            return
        if not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_file() or path.is_symlink():
                self._restore_file(path)
            elif path.is_dir() and path not in self.dirs:
                shutil.rmtree(path, ignore_errors=True)
        for path, (stat, content) in self.files.items():
            if not path.exists() and content is not None:
                self._write_back(path, stat, content)

    def _restore_file(self, path: Path) -> None:
        if path not in self.files:
            path.unlink(missing_ok=True)
            return
        stat, content = self.files[path]
        now = path.stat()
        unchanged = (now.st_size, now.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        if content is None:
            if not unchanged:
                print(f"litune: {path} changed and is too large to be put back", file=sys.stderr)
            return
        if not unchanged or path.read_bytes() != content:  # a coarse clock can hide a rewrite from the time
            self._write_back(path, stat, content)

    @staticmethod
    def _write_back(path: Path, stat: os.stat_result, content: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

"""Preemption: SIGTERM or SIGUSR1 -> every rank saves at the next optimizer-step boundary -> exit 75 (-> requeue).

Why not Lightning's own handling: on SIGTERM Lightning 2.6 stops after the current *batch* without saving (mid
accumulation window, nothing to resume from), and its SLURM SIGUSR1 handler saves from inside the signal handler, at
whatever point the main thread was interrupted (for DeepSpeed, possibly inside a collective). Here the handler only
sets a flag; the ranks agree on it at each optimizer-step boundary (the signal reaches ranks at different moments: the
flag rides on the step's skip-decision all-reduce, :mod:`litune.callbacks.step_votes`), all save
``checkpoints/last.ckpt`` together (atomically, see :mod:`litune.strategies.atomic`), and all exit with
:data:`EXIT_PREEMPTED`. ``--ckpt_path last`` resumes exactly.

Under SLURM, global rank 0 then runs ``scontrol requeue <job id>``: the requeued job gets the same ``SLURM_JOB_ID``,
hence the same run folder (``<experiment>-job<id>``), and ``--ckpt_path last`` in the batch script continues from the
checkpoint (see launch/slurm.sbatch).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from litune.callbacks.step_votes import agreed_vote
from litune.lightning_private import (
    SubprocessScriptLauncher,
    mark_saved,
    restore_sigterm_broadcast,
    set_process_group_timeout,
    skip_sigterm_broadcast,
)
from litune.runs import last_checkpoint, slurm_requeue_id

EXIT_PREEMPTED = 75
"""Exit status of every rank after a preemption save (sysexits.h EX_TEMPFAIL: a temporary failure, try again)."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is saved; exits the process with ``EXIT_PREEMPTED``."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


class Preemption(Callback):
    """Save at the next optimizer-step boundary on SIGTERM/SIGUSR1, exit with 75, and requeue under SLURM.

    Added to every ``litune fit`` by the CLI. The handlers are installed when training starts (replacing Lightning's
    SIGTERM and SLURM SIGUSR1 handlers) and Lightning puts the previous ones back when ``fit`` ends. A signal that
    arrives earlier (set-up, sanity validation) gets Lightning's behavior.

    Training then ends as if ``max_steps`` were reached (Lightning logs the step's metrics and flushes its loggers),
    :attr:`preempted` is set, and ``litune fit`` exits with :data:`EXIT_PREEMPTED` on every rank (without the
    end-of-fit validation). In Python, check ``preemption.preempted`` after ``trainer.fit``.

    Args:
        requeue: run ``scontrol requeue`` after the save: ``None`` (default) when under SLURM (``SLURM_JOB_ID`` set).
    """

    def __init__(self, requeue: bool | None = None) -> None:
        self.requeue = requeue
        self._signal: int | None = None
        self._seen_step = -1
        self.preempted = False
        """Set once the preemption checkpoint is saved; ``fit`` then returns, and ``litune fit`` exits with 75."""

    # --- the handler: only a flag (and, on rank 0 of a Lightning-spawned run, pass it on to the other ranks) ---

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signal = None
        self._seen_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("preemption handling needs the main thread; SIGTERM/SIGUSR1 keep Lightning's handling")
            return
        launcher = trainer.strategy.launcher

        def handler(signum: int, frame: FrameType | None) -> None:
            first = self._signal is None
            self._signal = signum
            # Lightning's own DDP launcher makes rank 0 the parent of the other ranks: a `kill <pid>` reaches rank 0
            # only. torchrun and srun signal every rank themselves.
            if first and isinstance(launcher, SubprocessScriptLauncher) and trainer.global_rank == 0:
                launcher.kill(signum)

        for signum in SIGNALS:
            signal.signal(signum, handler)
        # Lightning's per-micro-batch broadcast of its own SIGTERM flag could only ever carry "no" now (its handler is
        # replaced): the ranks agree on a signal through the step's vote instead.
        skip_sigterm_broadcast(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_sigterm_broadcast(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        restore_sigterm_broadcast(trainer)

    # --- at each optimizer-step boundary: agree, save, exit ---

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._seen_step:  # inside an accumulation window: not a step boundary
            return
        self._seen_step = trainer.global_step
        if not self._any_rank_signalled(trainer):
            return
        path = self._save(trainer)
        rank_zero_info(f"preempted (signal {self._signal_name()}): saved {path}; exiting with {EXIT_PREEMPTED}")
        if trainer.is_global_zero and self._should_requeue():
            _requeue()
        # Stop through Lightning's normal end of training rather than an exception here: Lightning logs this step's
        # metrics after this hook, and they must reach metrics.csv (the resumed run starts after this step).
        self.preempted = True
        trainer.should_stop = True

    def step_vote(self, trainer: pl.Trainer) -> bool:
        """This rank's vote at a step boundary: whether it has been signalled (:mod:`litune.callbacks.step_votes`)."""
        return self._signal is not None

    def _any_rank_signalled(self, trainer: pl.Trainer) -> bool:
        # The signal reaches the ranks at slightly different moments: all must decide the same at this step. The vote
        # rides on LitLM's per-step skip all-reduce (no collective or host read of its own).
        return agreed_vote(trainer, self)

    def _save(self, trainer: pl.Trainer) -> Path:
        # The callback that keeps `last.ckpt` (litune's Checkpointing), where `--ckpt_path last` looks.
        ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "save_last", False)), None)
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath is not None:
            path = Path(ckpt.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        else:
            path = last_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # every rank: DeepSpeed writes its shards from each
        if isinstance(ckpt, ModelCheckpoint):
            ckpt.last_model_path = str(path)
            mark_saved(ckpt, trainer.global_step)  # no second save of this step at the epoch's end
        return path

    def _signal_name(self) -> str:
        return signal.Signals(self._signal).name if self._signal is not None else "from another rank"

    def _should_requeue(self) -> bool:
        return self.requeue if self.requeue is not None else slurm_requeue_id() is not None


def _requeue() -> None:
    job = slurm_requeue_id()
    if job is None:
        rank_zero_warn("requeue asked for but SLURM_JOB_ID is not set: not requeued")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"`scontrol requeue {job}` failed: {err}")
        return
    if result.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
    else:
        rank_zero_info(f"requeued SLURM job {job}")


class CollectiveTimeout(Callback):
    """Fail a collective (all-reduce, barrier, checkpoint gather) that waits more than ``seconds`` for the other ranks.

    A rank that crashes closes its connections and the others fail at once; one that hangs, or whose node vanished
    without closing them, would keep the others waiting for torch's default (30 min with gloo, 10 with NCCL). The
    timeout is set once the process group exists (``setup``), not given to Lightning's ``init_process_group``, where
    it would also bound the start-up rendezvous, during which ranks legitimately start seconds apart.

    Args:
        seconds: the timeout (``litune fit --dist_timeout``).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        set_process_group_timeout(self.seconds)

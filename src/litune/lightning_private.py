"""Every private Lightning (and torch) API litune uses, named once, each with why no public one does the job.

A Lightning or torch upgrade that renames one of these breaks here, in one file, instead of somewhere in a callback.
Hooks that litune *overrides* cannot move here; they are listed so that an upgrade checks them too:

* ``Strategy._configure_launcher`` (``strategies/ddp.py``, ``deepspeed.py``, ``fsdp2.py``): the last moment before
  processes spawn, where the machine checks run; Lightning has no public pre-launch hook on strategies.
* ``DeepSpeedStrategy._init_optimizers`` (``strategies/deepspeed.py``): where an offloaded torch Adam becomes
  DeepSpeed's CPU Adam before the engine is built.
* ``LightningCLI._parse_ckpt_path`` (``commands/fit.py``): disabled, since it silently replaces a configured model by
  the checkpoint's hyperparameters; litune compares them instead.
* ``argparse`` internals ``_subcommands_action``, ``_name_parser_map``, ``_actions`` (``commands/fit.py``): to turn off
  ``exit_on_error`` on LightningCLI's subcommand parsers and to list valid keys for "did you mean".
* ``torch.nn.Module._parameters``, ``_buffers``, ``_non_persistent_buffers_set`` (``models/sharded_load.py``,
  ``strategies/fsdp2.py``): replacing a tensor in place without re-registering it (what ``nn.Module.to_empty`` does).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.seed import _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

LIGHTNING_META_FILE = _METADATA_FILENAME
"""``meta.pt``: the file of a sharded (DCP) Lightning checkpoint that holds loop state and hyperparameters; Lightning
exports no name for it."""

SubprocessScriptLauncher = _SubprocessScriptLauncher
"""The launcher that starts ranks 1..N-1 as child processes of rank 0 (preemption forwards signals to them)."""

restore_rng_states = _set_rng_states
"""Restores torch's, numpy's and Python's random-number states together (exact resume); Lightning keeps it private."""


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether this batch is a logging step (``log_every_n_steps``); the logger connector knows, no public API says."""
    return trainer._logger_connector.should_update_logs


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers write rows at; no public counter gives it (it is advanced after
    ``on_train_start``, so only known once training runs)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def mark_saved(checkpoint: ModelCheckpoint, step: int) -> None:
    """Tell ``ModelCheckpoint`` that ``step`` is saved (after a save it did not make), so it does not save it again."""
    checkpoint._last_global_step_saved = step


def dcp_load_no_dist(state: dict[str, Any], reader: Any, keys: set[str]) -> None:
    """Fill ``state`` in place from a DCP checkpoint in one process, reading only ``keys`` (the model, not its
    optimizer).

    The public ``dcp.load`` fills a copy of an empty dict; the private loader (as in Lightning's own consolidation and
    DCP's ``dcp_to_torch_save``) fills the dict it is given, and ``_EmptyStateDictLoadPlanner(keys=...)`` skips the
    optimizer state (twice the model's size under Adam).
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)


def set_process_group_timeout(seconds: float) -> None:
    """Change the default process group's collective timeout after it was created (no public API sets it then)."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))


def flatten_params(params: Any) -> dict[str, Any]:
    """Hyperparameters as one flat ``{"a/b": value}`` dict, exactly as Lightning's own loggers flatten them (MLflow's
    logger needs the flat keys first, to skip those a resumed run logged already); Lightning exports no such helper."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    return _flatten_dict(_convert_params(params))


def all_to_all_autograd(x: Any, group: Any) -> Any:
    """Differentiable all-to-all of ``x`` (split evenly on dim 0) over ``group`` (Ulysses sequence parallelism).

    The public ``torch.distributed.nn.functional.all_to_all_single`` is deprecated in favour of this function of the
    functional collectives, which torch exports only from its private module.
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x, None, None, group)


_SIGTERM_BROADCAST = "_broadcast_sigterm_tensor"


def skip_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Drop Lightning's per-micro-batch SIGTERM broadcast (while litune's preemption handlers are installed).

    On 2+ processes Lightning 2.6's training loop broadcasts rank 0's ``trainer.received_sigterm`` before every
    micro-batch and reads it back (``.item()``: a host sync per micro-batch on a GPU). Only Lightning's own SIGTERM
    handler sets that flag. No public switch exists, hence the instance attribute over the loop's private method
    (removed again by :func:`restore_sigterm_broadcast`).
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, _SIGTERM_BROADCAST):
        setattr(loop, _SIGTERM_BROADCAST, lambda: None)


def restore_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Undo :func:`skip_sigterm_broadcast`."""
    trainer.fit_loop.epoch_loop.__dict__.pop(_SIGTERM_BROADCAST, None)


PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
)
"""The hooks Lightning calls on every callback (and the module) once or more per batch."""


def skip_noop_hooks(trainer: pl.Trainer) -> list[tuple[Any, str]]:
    """Hide the per-batch hooks that a callback or the module inherits as Lightning's no-op, so that Lightning's hook
    calls skip them; returns what was hidden, for :func:`restore_noop_hooks`. Only without a profiler.

    Lightning calls every hook on every callback, each inside its profiler's context with a label formatted for it:
    with litune's ~15 callbacks that is ~90 calls of empty methods a step, about 0.3 ms of a 40 ms tiny step (2 µs
    each warm, more after the step's kernels have evicted the interpreter's caches). Its hook callers skip an
    attribute that is not callable (``fn = getattr(callback, hook); if callable(fn)`` in ``trainer/call.py``), so an
    instance attribute ``None`` over an inherited no-op hides it; no public switch does this. A profiler, when one is
    set, still sees every call.
    """
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.profilers import PassThroughProfiler

    if type(trainer.profiler) is not PassThroughProfiler:
        return []
    # The evaluation loop inspects the module's validation batch hooks' signatures (dataloader_idx): those stay.
    module_hooks = [hook for hook in PER_BATCH_HOOKS if not hook.startswith("on_validation")]
    owners = [(cb, Callback, PER_BATCH_HOOKS) for cb in trainer.callbacks]
    owners.append((trainer.lightning_module, pl.LightningModule, module_hooks))
    hidden = []
    for owner, base, hooks in owners:
        for hook in hooks:
            if hook not in vars(owner) and getattr(type(owner), hook, None) is getattr(base, hook):
                object.__setattr__(owner, hook, None)
                hidden.append((owner, hook))
    return hidden


def restore_noop_hooks(hidden: list[tuple[Any, str]]) -> None:
    """Undo :func:`skip_noop_hooks`."""
    for owner, hook in hidden:
        if vars(owner).get(hook, 0) is None:
            delattr(owner, hook)

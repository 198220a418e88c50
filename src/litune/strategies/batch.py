"""Global batch size: the number of sequences per optimizer step, kept fixed whatever the world size.

A config states ``global_batch_size`` (what the optimizer sees, the quantity hyperparameters are tuned for) and the
data module's ``batch_size`` (the micro-batch one process runs forward/backward on at a time). Gradient accumulation
is what is left over: ``global = micro * world_size * accumulate``. The same config then trains the same optimization
on 1 CPU, 8 GPUs or 4 nodes; only the accumulation changes.
"""

from __future__ import annotations

from lightning.pytorch import Trainer

from litune.errors import ConfigError


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """The gradient-accumulation steps that make ``micro_batch_size * world_size * steps == global_batch_size``.

    Args:
        global_batch_size: sequences per optimizer step, over all processes.
        micro_batch_size: sequences per forward/backward in one process (the data module's ``batch_size``).
        world_size: number of processes (devices times nodes).

    Raises:
        ConfigError: when the sizes are not positive or do not divide.
    """
    for field, value in (("global_batch_size", global_batch_size), ("data.init_args.batch_size", micro_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(field, f"{field}={value!r} must be a positive integer", "use e.g. 8")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        lower = global_batch_size - global_batch_size % per_step
        options = ", ".join(str(v) for v in (lower, lower + per_step) if v > 0)
        raise ConfigError(
            "global_batch_size",
            f"global_batch_size={global_batch_size} is not divisible by micro-batch {micro_batch_size} x world size "
            f"{world_size} = {per_step}",
            f"set global_batch_size to a multiple of {per_step} (e.g. {options}), or change data.init_args.batch_size "
            "or the number of devices",
        )
    return global_batch_size // per_step


def apply_global_batch_size(trainer: Trainer, micro_batch_size: int, global_batch_size: int) -> int:
    """Set ``trainer.accumulate_grad_batches`` from the global batch size and the trainer's world size.

    Called once the Trainer is built and before ``fit`` (before Lightning spawns processes, which re-run it). The
    DeepSpeed strategy reads the same value into its ``gradient_accumulation_steps`` during set-up.

    Args:
        trainer: the Trainer (its ``world_size`` counts devices times nodes, or what torchrun/SLURM report).
        micro_batch_size: the data module's ``batch_size``.
        global_batch_size: sequences per optimizer step, over all processes.

    Returns:
        The accumulation steps.

    Raises:
        ConfigError: when the sizes do not divide, or an explicit ``trainer.accumulate_grad_batches`` disagrees.
    """
    # Ranks of a tensor- or sequence-parallel group read the same rows: only the data-parallel ranks add rows to a step.
    data_parallel = trainer.world_size // batch_replicas(trainer)
    steps = accumulation_steps(global_batch_size, micro_batch_size, data_parallel)
    if trainer.accumulate_grad_batches not in (1, steps):
        raise ConfigError(
            "trainer.accumulate_grad_batches",
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} is set together with global_batch_size="
            f"{global_batch_size}, which gives {steps} on {data_parallel} data-parallel process(es)",
            "remove trainer.accumulate_grad_batches (it is derived from global_batch_size) or global_batch_size",
        )
    trainer.accumulate_grad_batches = steps
    return steps


def batch_replicas(trainer: Trainer) -> int:
    """How many ranks read each batch row: the tensor- times the sequence-parallel group size (see
    ``StrategySpec.batch_replicas``)."""
    from litune.strategies.descriptor import describe

    return describe(trainer.strategy).batch_replicas


def loss_replicas(trainer: Trainer) -> int:
    """How many ranks compute each loss term: the tensor-parallel group size (see ``StrategySpec.loss_replicas``)."""
    from litune.strategies.descriptor import describe

    return describe(trainer.strategy).loss_replicas

"""``litune fit | validate | test``: Lightning's own ``LightningCLI`` with litune's run folders and early checks.

Several ``--config`` files merge (last wins), dotted overrides such as ``--trainer.max_steps=50`` work, and the resolved
config is saved in the run folder. This module imports Lightning, torch and transformers; :mod:`litune.cli` imports it
only when one of these subcommands runs, so ``litune --help`` and the light subcommands start fast.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics import Metric

from litune.callbacks.checkpointing import BestCheckpoints, Checkpointing
from litune.callbacks.preemption import CollectiveTimeout, Preempted
from litune.callbacks.run_info import log_once
from litune.commands.wiring import add_loggers, add_tracking, add_tracking_arguments, as_list
from litune.errors import (
    NETWORK_ARGS,
    ConfigError,
    as_config_error,
    check_group_divides,
    from_parse_error,
    quoted_argument,
)
from litune.host_memory import tune_cli_run
from litune.limits import check_limits
from litune.module import LitLM
from litune.resume import (
    check_network_matches,
    check_strategy_matches,
    check_tokenizer_matches,
    save_run_tokenizer,
    use_run_tokenizer,
)
from litune.run_guard import FolderSnapshot, RunLock, check_port_free, check_writable
from litune.runs import (
    CONFIG_FILE,
    DEFAULT_RUNS_DIR,
    RUN_DIR_ENV,
    checkpoints_dir,
    is_launched_rank,
    resolve_run_dir,
    run_dir_of,
    runs_root,
)
from litune.strategies import apply_global_batch_size, check_trainer_config
from litune.strategies.checks import describe_trainer, processes_per_node, resolve_accelerator
from litune.strategies.descriptor import describe
from litune.strategies.fsdp2 import check_adapters
from litune.strategies.safe_load import allow_litune_classes, checkpoint_hparams, load_checkpoint_file


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run folder (not in a logger's sub-folder), and the
    tokenizer's files as ``tokenizer/`` (its files, not its recipe: generate/export/resume on another machine load
    exactly these). Lightning calls it at setup, after ``prepare_data``: a run that fails on its data writes neither.
    """

    def __init__(self, *args: Any, subcommand: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.subcommand = subcommand

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            # The run folder is not saved as trainer.default_root_dir: to a run started from this config that would
            # mean "the runs folder" (runs_root), and its folder would be nested inside this one.
            config = self.config.clone()
            if "default_root_dir" in config.get("trainer", {}):
                config.trainer.default_root_dir = None
            # `validate`/`test` of a run's checkpoint keep the training config.yaml: theirs goes beside it.
            # By the CLI's subcommand, not the trainer's stage: `fit --validate_before_fit` validates first.
            command = self.subcommand or "fit"
            filename = self.config_filename if command == "fit" else f"config-{command}.yaml"
            # Secrets removed, and the config logged to every logger too (litune.callbacks.run_info).
            log_once(trainer, filename, yaml.safe_load(self.parser.dump(config, skip_none=False)))
            if getattr(pl_module, "tokenizer", None) is not None:
                carry_chat_template(pl_module.tokenizer, getattr(trainer, "datamodule", None))
                save_run_tokenizer(pl_module.tokenizer, run_dir, self.config.model.get("tokenizer"))


def carry_chat_template(tokenizer: Any, datamodule: Any) -> None:
    """A chat run's tokenizer keeps the chat template its data was rendered with (a per-turn ``data.template`` or
    litune's default one, as Jinja), so the run folder, ``litune generate --chat`` and the export all render prompts
    as the fine-tune saw them."""
    spec = getattr(datamodule, "spec", None)
    if getattr(spec, "format", None) == "chat":
        from litune.data.formats import chat_template_of

        tokenizer.chat_template = chat_template_of(tokenizer, spec.template)


class LituneCLI(LightningCLI):
    """LightningCLI with litune's run folders, checkpointing defaults and early config checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "config_filename": CONFIG_FILE})
        inherited_run_dir = os.environ.get(RUN_DIR_ENV)
        self.lock: RunLock | None = None
        self.snapshot: FolderSnapshot | None = None
        try:
            super().__init__(LitLM, LightningDataModule, *args, subclass_mode_data=True, **kwargs)
        except BaseException as err:
            if self.snapshot is not None and as_config_error(err) is not None:
                # A refusal from inside Lightning's loop, after its setup hooks wrote into the run folder: put it back.
                if self.lock is not None:
                    self.lock.release()
                self.snapshot.restore()
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
            # The run folder is shared with this run's ranks only: a next run in the same Python process (a
            # notebook, a test) must get a folder of its own.
            if inherited_run_dir is None:
                os.environ.pop(RUN_DIR_ENV, None)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, but report a bad key or value as one :class:`ConfigError` paragraph.

        jsonargparse would print the whole usage (hundreds of lines) and a nested error tree; the field and the
        closest valid key are what a user needs.
        """
        # run=False (prepare, estimate, tune) builds a parser without subcommands: then it is the only parser.
        subparsers = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {})
        for each in [parser, *subparsers.values()]:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommand = next((a for a in (args or sys.argv[1:]) if a in ("fit", "validate", "test")), None)
            known = _option_names(subparsers.get(subcommand, parser))
            raise from_parse_error(str(err), known) from None
        # Numeric settings Lightning checks late or never (accumulate_grad_batches=0, ...); here, before LightningCLI
        # seeds the run with seed_everything.
        subcommand = self.config.get("subcommand")
        check_limits(self.config[subcommand] if subcommand else self.config)

    def _parse_ckpt_path(self) -> None:
        """Deliberately not LightningCLI's: it replaces the configured model by the checkpoint's hyperparameters,
        which silently drops a user's override. litune compares them instead (:meth:`_check_resume`) and refuses a
        change of architecture or tokenizer."""

    def _check_resume(self, cfg: Namespace, ckpt_path: str, run_dir: Path) -> None:
        """Fail before anything is built or written when the config's network or tokenizer is not the checkpoint's;
        then point the tokenizer at the run folder's saved files."""
        check_strategy_matches(ckpt_path, describe_trainer(cfg.trainer))
        hparams = checkpoint_hparams(ckpt_path)
        check_network_matches(hparams.get("network"), cfg.model.get("network"), ckpt_path)
        ckpt_run = run_dir_of(ckpt_path) or run_dir
        check_tokenizer_matches(hparams.get("tokenizer"), cfg.model.get("tokenizer"), ckpt_run, ckpt_path)
        use_run_tokenizer(cfg, ckpt_run)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="litune", help="Experiment name, part of the run folder.")
        parser.add_argument(
            "--runs_dir",
            type=str,
            default=DEFAULT_RUNS_DIR,
            help="Where run folders are created (trainer.default_root_dir, if given, means the same).",
        )
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False, help="Run validation at step 0 before training."
        )
        parser.add_argument(
            "--dry_run",
            type=bool,
            default=False,
            help="Check everything that can refuse the command before it starts (every config field, the model and "
            "trainer built, a resumed checkpoint against them), then exit without training or writing into a run "
            "folder. The data's rows are checked by `litune prepare`.",
        )
        parser.add_argument(
            "--dist_timeout",
            type=float | None,
            default=None,
            help="Seconds a process waits in a collective (all-reduce, barrier, checkpoint gather) for the other "
            "processes before it fails: a rank that hung or whose node vanished ends the run with an error after this "
            "long instead of hanging it (a rank that crashes is noticed at once). Default: torch's (30 min with gloo, "
            "10 min with NCCL). Set it above the slowest save or evaluation.",
        )
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="Sequences per optimizer step over all processes; trainer.accumulate_grad_batches is derived from it, "
            "data.init_args.batch_size and the world size (devices x nodes).",
        )
        # The tokenizer is configured once, on the model (a checkpoint must know how to decode); the data gets a copy.
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="parse")
        add_tracking_arguments(parser)  # --loggers=[csv,tensorboard,wandb]
        # Cadence and retention (litune.callbacks.checkpointing): defaults for a long cluster run.
        parser.add_lightning_class_args(Checkpointing, "checkpoint")
        parser.add_lightning_class_args(BestCheckpoints, "best_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.every_n_minutes": 30.0,
                "checkpoint.keep_last": 3,
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                "best_checkpoint.filename": "best-step{step:06d}",
                "best_checkpoint.auto_insert_metric_name": False,
            }
        )

    def _section(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        check_config(cfg)
        # Before the model's tensors exist: CPU steps reuse freed buffers instead of faulting in fresh pages. Only in
        # litune's own command on CPU (litune.host_memory); `tune lr` passes here too (run=False, no subcommand).
        tune_cli_run(resolve_accelerator(cfg.trainer.get("accelerator", "auto")))
        if self.subcommand is None:
            return
        self.save_config_kwargs = {**self.save_config_kwargs, "subcommand": self.subcommand}
        cfg.runs_dir = runs_root(cfg.runs_dir, cfg.trainer.get("default_root_dir"))
        run_dir, ckpt_path = resolve_run_dir(cfg.runs_dir, cfg.experiment, cfg.get("ckpt_path"))
        if "ckpt_path" in cfg:
            cfg.ckpt_path = ckpt_path
        if ckpt_path:
            self._check_resume(cfg, ckpt_path, run_dir)
        if cfg.get("weights_only") is None:
            cfg.weights_only = True  # Lightning's own torch.load of ckpt_path: tensors and allow-listed classes only
        allow_litune_classes()
        check_writable(run_dir.parent, "runs_dir")
        accelerator = resolve_accelerator(cfg.trainer.get("accelerator", "auto"))
        check_port_free(processes_per_node(cfg.trainer.get("devices", "auto"), accelerator), cfg.trainer.num_nodes or 1)
        if not is_launched_rank():  # ranks of one run share the launching process's claim on the folder
            self.snapshot = FolderSnapshot(run_dir)
            self.lock = RunLock(run_dir).acquire()
        os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the ranks that Lightning's launcher starts
        self.run_dir = run_dir
        cfg.trainer.default_root_dir = str(run_dir)
        for section in (cfg.checkpoint, cfg.best_checkpoint):
            if section.dirpath is None:
                section.dirpath = str(checkpoints_dir(run_dir))
        add_tracking(cfg)  # loggers by name, wandb id of the resumed run, throughput/MFU/memory/... callbacks
        cfg.trainer.logger = _loggers_in(run_dir, cfg.trainer.logger)

    def after_instantiate_classes(self) -> None:
        _set_dist_timeout(self.trainer, self._section().get("dist_timeout"))
        global_batch_size = self._section().get("global_batch_size")
        if global_batch_size is not None and self.trainer is not None:
            micro_batch_size = getattr(self.datamodule, "batch_size", None)
            if micro_batch_size is None:
                raise ConfigError("global_batch_size", "the data module has no batch_size", "remove global_batch_size")
            apply_global_batch_size(self.trainer, micro_batch_size, global_batch_size)
        if self.subcommand is None:
            return
        if self.snapshot is not None and self.trainer is not None:
            self.trainer.callbacks.append(EndOfRefusals(self.snapshot))
        network = self.model.network
        block_size = getattr(self.datamodule, "block_size", None)
        max_len = getattr(network, "max_seq_len", None)
        if block_size is not None and max_len is not None and block_size > max_len:
            raise ConfigError(
                "data.init_args.block_size",
                f"block_size={block_size} is longer than the model's context of {max_len} tokens",
                f"set data.init_args.block_size to at most {max_len}",
            )
        rl = getattr(self.model, "rl", None)  # GRPO: a prompt and its completion must fit the context
        completion = rl.config.max_completion_length if rl is not None else 0
        if rl is not None and block_size is not None and max_len is not None and block_size + completion > max_len:
            raise ConfigError(
                "model.rl.max_completion_length",
                f"max_prompt_length={block_size} plus max_completion_length={completion} tokens is longer than the "
                f"model's context of {max_len} tokens",
                f"set model.rl.max_completion_length to at most {max_len - block_size}, or lower "
                "data.init_args.max_prompt_length",
            )

    def _run_subcommand(self, subcommand: str) -> None:
        self.preflight()
        if self._section().get("dry_run"):
            print(f"litune {subcommand}: dry run: the configuration is valid; nothing was trained or written")
            return
        try:
            super()._run_subcommand(subcommand)
        except ValueError as err:
            if (translated := loop_error(err)) is None:
                raise
            raise translated from None

    def preflight(self) -> None:
        """The checks that need the built system and trainer, made before ``Trainer.fit/validate/test`` writes
        anything: the resumed checkpoint against this config's adapters and world size (memory-mapped, no weight
        read). The checks of the raw config ran before anything was built (:meth:`before_instantiate_classes`)."""
        ckpt_path = self._section().get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file() or self.trainer is None:
            return  # sharded checkpoints: their strategy and world size were checked by _check_resume
        checkpoint = load_checkpoint_file(ckpt_path, "ckpt_path", mmap=True)
        reshards = describe(self.trainer.strategy).reshards_checkpoints
        self.model.check_checkpoint(checkpoint, None if reshards else self.trainer.world_size)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer; its constructor's complaints (unknown strategy, accelerator, plugin...) become one
        :class:`ConfigError` here, the boundary where every trainer setting is checked."""
        try:
            return super().instantiate_trainer(**kwargs)
        except ConfigError:
            raise
        except (MisconfigurationException, ValueError, TypeError, KeyError) as err:
            message = _first_lines(err)
            raise ConfigError(
                _trainer_field(message), message, "fix the trainer setting it names (`litune fit --help` lists them)"
            ) from None

    def before_fit(self) -> None:
        self.start_metrics: dict[str, float] = {}
        if self._section().validate_before_fit and not self._section().get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.start_metrics = _scalars(self.trainer.callback_metrics)
            self.trainer.num_sanity_val_steps = 0  # just validated in full
            # validate() ran in inference mode, so the metrics' states are inference tensors that fit's own
            # validation could not update in place: recreate them out here.
            for metric in self.model.modules():
                if isinstance(metric, Metric):
                    metric.reset()

    def after_fit(self) -> None:
        trainer = self.trainer
        if any(getattr(cb, "preempted", False) for cb in trainer.callbacks):
            raise Preempted()  # exit 75 on every rank; checkpoints/last.ckpt holds the step it stopped at
        # validate_before_fit also asks for a validation at the end; a resumed run (no step-0 validation) does it too,
        # so an interrupted run logs the same validations as an uninterrupted one.
        wants_end_validation = self.start_metrics or self._section().validate_before_fit
        if wants_end_validation and getattr(self.model, "_last_val_step", None) != trainer.global_step:
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        end_metrics = _scalars(trainer.callback_metrics)
        if not trainer.is_global_zero:
            return
        lines = [f"run folder: {trainer.default_root_dir}"]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.last_model_path:
            lines.append(f"checkpoint: {ckpt.last_model_path}")
        for key in ("val/loss", "val/ppl"):
            if key in self.start_metrics:
                lines.append(f"{key} at step 0: {self.start_metrics[key]:.3f}")
            if key in end_metrics:
                lines.append(f"{key} at step {trainer.global_step}: {end_metrics[key]:.3f}")
        print("\n".join(["", "litune fit finished", *lines]), flush=True)


class EndOfRefusals(Callback):
    """Marks the end of the window in which a command can still be refused: its first training (or evaluation)
    batch. A refusal before it puts the run folder back (:class:`~litune.run_guard.FolderSnapshot`); after it, what
    the run wrote is its own (metrics, checkpoints)."""

    def __init__(self, snapshot: FolderSnapshot) -> None:
        self.snapshot = snapshot

    def on_train_batch_start(self, *args: Any) -> None:
        self.snapshot.committed = True

    def on_validation_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.fn == "validate":  # not fit's sanity check or validate_before_fit: fit can still refuse
            self.snapshot.committed = True

    def on_test_batch_start(self, *args: Any) -> None:
        self.snapshot.committed = True


_VAL_CHECK = re.compile(r"`val_check_interval` \((\d+)\) must be less than or equal to the number of the training "
                        r"batches \((\d+)\)")  # fmt: skip


def loop_error(err: BaseException) -> ConfigError | None:
    """Lightning's own refusals of loop settings that need the data's length (known only once its loop set the
    data up), as a :class:`ConfigError` naming the field; None for anything else."""
    if match := _VAL_CHECK.search(str(err)):
        interval, batches = match.groups()
        return ConfigError(
            "trainer.val_check_interval",
            f"val_check_interval={interval} batches is more than the {batches} training batches of an epoch",
            f"set it to at most {batches}, to a fraction of the epoch (e.g. 0.5), or set "
            "trainer.check_val_every_n_epoch: null to count batches across epochs",
        )
    return None


def _set_dist_timeout(trainer: Trainer | None, seconds: float | None) -> None:
    """Add the callback that bounds how long a collective waits for a dead or hung rank (``--dist_timeout``)."""
    if seconds is None or trainer is None:
        return
    if not seconds > 0:
        raise ConfigError("dist_timeout", f"{seconds} is not a positive number of seconds", "use e.g. 600, or null")
    trainer.callbacks.append(CollectiveTimeout(seconds))


def _first_lines(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _trainer_field(message: str) -> str:
    """``trainer.X`` for the first Trainer argument a constructor error quotes as ``X=`` (Lightning's
    ``strategy='foo'``), else ``trainer``."""
    named = quoted_argument(message, inspect.signature(Trainer).parameters)
    return f"trainer.{named}" if named else "trainer"


def _option_names(parser: Any) -> list[str]:
    """Every dotted key a parser accepts (``trainer.max_steps``, ...), for "did you mean" suggestions."""
    names = []
    for action in getattr(parser, "_actions", []):
        names += [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
    return names


def check_config(cfg: Namespace) -> None:
    """The checks of a parsed config that need no run folder: fail before any process is spawned."""
    check_limits(cfg)  # numeric settings Lightning checks late or never (accumulate_grad_batches=0, ...)
    check_lr_schedule(cfg)
    check_trainer_config(cfg.trainer)  # fp16 on CPU, devices > cores, ...
    check_compile(cfg)
    check_adapters_strategy(cfg)
    check_preference_reference_strategy(cfg)
    check_rl_config(cfg)
    check_sequence_parallel(cfg)  # first: it refuses composing with tensor parallelism
    check_parallel_layout(cfg)


def check_lr_schedule(cfg: Namespace) -> None:
    """Refuse a warmup at least as long as ``trainer.max_steps`` before any process is spawned (``configure_optimizers``
    would, after the ranks started and the run folder was written); a run bounded by epochs is checked there."""
    from litune.optim import LRSchedule

    schedule = cfg.get("model") and cfg.model.get("lr_schedule")
    max_steps = cfg.trainer.get("max_steps") or -1
    if isinstance(schedule, Namespace) and max_steps > 0:
        LRSchedule(**schedule.as_dict()).check_run_length(max_steps)


def configured_network(cfg: Namespace) -> tuple[str, dict[str, Any]]:
    """The parsed config's network entry: its ``class_path`` and its ``init_args`` as a dict (``("", {})`` when it has
    none, e.g. a network given as an object). The pre-launch checks read the network through it."""
    network = cfg.model.get("network") if cfg.get("model") else None
    network = network.as_dict() if hasattr(network, "as_dict") else network
    if not isinstance(network, dict):
        return "", {}
    return str(network.get("class_path") or ""), dict(network.get("init_args") or {})


def class_name(class_path: str) -> str:
    """``litune.models.HFCausalLM`` -> ``HFCausalLM``."""
    return class_path.rpartition(".")[2]


def check_adapters_strategy(cfg: Namespace) -> None:
    """Refuse adapters that FSDP2 does not shard (tensor parallelism, a 4-bit base) before any process is spawned
    (the strategy would refuse them only in setup)."""
    if not cfg.get("model") or cfg.model.get("adapters") is None:
        return
    spec = describe_trainer(cfg.trainer)
    if spec.fsdp2:
        check_adapters(spec.tensor_parallel_size, configured_network(cfg)[1].get("quantize") is not None)


def check_preference_reference_strategy(cfg: Namespace) -> None:
    """Refuse, before any process is spawned, the reference modes DeepSpeed ZeRO-3 and FSDP2 cannot serve.

    A frozen copy (``reference: copy``, or ``auto`` without adapters) is sharded like the policy
    (:func:`litune.preference.reference.shard_reference`), and ``precomputed`` runs the copy whole in its one pass
    before the policy is partitioned, then drops it; both take the copy from the policy as built, so a network that
    loads its weights straight into shards (``DeferredHFCausalLM``) is refused: no rank has a whole copy to take.
    Reference-free losses and adapters (the base with adapters disabled) keep no copy and are not refused."""
    preference = cfg.model.get("preference") if cfg.get("model") else None
    if preference is None:
        return
    spec = describe_trainer(cfg.trainer)
    if not (spec.fsdp2 or (spec.deepspeed and spec.stage == 3)):
        return
    from litune.preference.losses import REFERENCE_FREE

    loss, reference = getattr(preference, "loss", "sigmoid"), getattr(preference, "reference", "auto")
    if loss in REFERENCE_FREE:
        return
    mode = ("adapters" if cfg.model.get("adapters") is not None else "copy") if reference == "auto" else reference
    strategy = "FSDP2" if spec.fsdp2 else "DeepSpeed ZeRO-3"
    deferred = class_name(configured_network(cfg)[0]) == "DeferredHFCausalLM"
    if mode in ("copy", "precomputed") and deferred:
        raise ConfigError(
            "model.preference.reference",
            f"reference={reference} ({mode}) copies the policy, but under {strategy} DeferredHFCausalLM loads its "
            "weights straight into shards: no rank holds a whole copy to take",
            "use litune.models.HFCausalLM (built whole, then sharded with its reference), train adapters "
            "(reference: adapters), or use a reference-free loss (simpo, orpo)",
        )


def check_rl_config(cfg: Namespace) -> None:
    """Refuse online RL (``model.rl``) without a prompt data module, or under a strategy that shards the weights,
    before any process is spawned. Generation runs the network's plain forward with its key/value cache, which
    needs whole weights on every rank: ZeRO-3 and FSDP2 would need their parameters gathered around every decoding
    step (not done yet), and a tensor-parallel group would sample different completions for the same rows."""
    rl = cfg.model.get("rl") if cfg.get("model") else None
    if rl is None:
        return
    if cfg.model.get("preference") is not None:
        raise ConfigError("model.rl", "model.rl and model.preference are both set", "set one objective")
    data = cfg.get("data")
    class_path = data.get("class_path") if isinstance(data, Namespace) else None
    if class_path is not None and class_name(class_path) != "PromptDataModule":
        raise ConfigError(
            "data.class_path",
            f"model.rl needs prompt batches, but the data module is {class_path}",
            "use data.class_path: litune.rl.data.PromptDataModule (see configs/grpo.yaml)",
        )
    spec = describe_trainer(cfg.trainer)
    if spec.fsdp2 or (spec.deepspeed and spec.stage == 3):
        strategy = "FSDP2" if spec.fsdp2 else "DeepSpeed ZeRO-3"
        raise ConfigError(
            "model.rl",
            f"GRPO generates its rollouts with the whole weights on every rank, but {strategy} shards them: each "
            "forward would gather the weights collectively, so every rank would have to take the same number of "
            "generation steps, while litune's generation stops each rank's rows at their own EOS (not implemented)",
            "use DDP or DeepSpeed ZeRO-1/2 (configs/strategy/deepspeed_zero2.yaml) for model.rl",
        )
    if spec.tensor_parallel_size > 1:
        raise ConfigError(
            "trainer.strategy.init_args.tensor_parallel_size",
            "GRPO samples each rank's completions on its own, which a tensor-parallel group cannot share",
            "use tensor_parallel_size: 1 for model.rl",
        )


def check_parallel_layout(cfg: Namespace) -> None:
    """Refuse a tensor-parallel layout the processes or the network cannot split, before any process is spawned."""
    spec = describe_trainer(cfg.trainer)
    tp, world = spec.tensor_parallel_size, spec.world_size
    if not spec.fsdp2 or tp == 1:
        return
    from litune.models.tensor_parallel import check_divisible
    from litune.models.transformer import TransformerConfig
    from litune.strategies.fsdp2 import check_tensor_parallel_size

    field = "trainer.strategy.init_args.tensor_parallel_size"
    check_tensor_parallel_size(tp, "hybrid" if spec.kind.value == "hybrid" else "full")
    if world is not None:
        check_group_divides("tensor_parallel_size", tp, world)
    if cfg.get("model") and cfg.model.get("preference") is not None:
        raise ConfigError(
            field,
            "preference tuning counts its sequences over all ranks, which a tensor-parallel group would count twice",
            "use tensor_parallel_size: 1 (FSDP2 alone or DDP) for model.preference",
        )
    class_path, init_args = configured_network(cfg)
    # The network families that declare a tensor_parallel_plan(): litune's decoder, and Hugging Face GPT-2 (litune's
    # plan) and families whose transformers config has a column/row-wise plan (built whole: a DeferredHFCausalLM's meta
    # weights are not split).
    if class_path.endswith("DecoderLM"):
        check_divisible(TransformerConfig(**init_args).tensor_parallel_sizes(), tp)
    elif class_name(class_path) == "HFCausalLM":
        from litune.models.hf import build_hf_config, tensor_parallel_layout, tensor_parallel_sizes_of

        hf_config = build_hf_config(
            init_args.get("pretrained"),
            init_args.get("config"),
            init_args.get("revision"),
            bool(init_args.get("trust_remote_code", False)),
        )
        tensor_parallel_layout(hf_config)
        check_divisible(tensor_parallel_sizes_of(hf_config), tp)
    elif class_name(class_path) == "DeferredHFCausalLM":
        raise ConfigError(
            "model.network.class_path",
            "a DeferredHFCausalLM creates its weights on the meta device, which tensor parallelism does not load yet",
            "use litune.models.HFCausalLM (built whole, then split), or tensor_parallel_size: 1 (FSDP2 alone)",
        )
    else:
        raise ConfigError(
            "model.network",
            f"{class_path or 'this network'} declares no tensor-parallel plan (litune's DecoderLM and HFCausalLM of "
            "GPT-2 and Llama-style families do)",
            "use litune.models.transformer.DecoderLM or litune.models.HFCausalLM, or tensor_parallel_size: 1",
        )


def check_sequence_parallel(cfg: Namespace) -> None:
    """Refuse, before any process is spawned, a Ulysses layout the processes, the data or the network cannot split,
    and the combinations it is not built or tested for."""
    from litune.strategies.fsdp2 import check_sequence_parallel_layout

    spec = describe_trainer(cfg.trainer)
    sp, world = spec.sequence_parallel_size, spec.world_size
    if not spec.fsdp2 or sp == 1:
        return
    check_sequence_parallel_layout(sp, spec.tensor_parallel_size, "hybrid" if spec.kind.value == "hybrid" else "full")
    if world is not None:
        check_group_divides("sequence_parallel_size", sp, world)
    model = cfg.get("model") or {}
    for field, why in (
        ("preference", "preference losses sum each sequence's log-probs, which a split sequence spreads over ranks"),
        ("rl", "GRPO generates whole sequences on each rank"),
        ("compile", "torch.compile of the all-to-all attention is not tested yet"),
    ):
        if model.get(field):
            raise ConfigError(f"model.{field}", f"{why}: not supported with sequence_parallel_size={sp}",
                              f"drop model.{field}, or use sequence_parallel_size: 1")  # fmt: skip
    block_size = (cfg.get("data") or {}).get("init_args", {}).get("block_size")
    if isinstance(block_size, int) and (block_size < sp or block_size % sp):
        raise ConfigError(
            "data.init_args.block_size",
            f"block_size={block_size} does not split into sequence_parallel_size={sp} equal slices",
            f"use a block_size that is a multiple of {sp} (e.g. {max(sp, block_size - block_size % sp)})",
        )
    check_sequence_parallel_network(cfg, sp)


def check_sequence_parallel_network(cfg: Namespace, sp: int) -> None:
    """Refuse a network Ulysses cannot split: one without ``split_sequences()`` (only litune's decoder and the
    Hugging Face causal LMs have it), attention other than SDPA, or heads that do not divide by ``sp``."""
    from litune.models.sequence_parallel import check_divisible
    from litune.models.transformer import TransformerConfig

    class_path, init_args = configured_network(cfg)
    if class_path.endswith("DecoderLM"):
        check_divisible({"nhead": TransformerConfig(**init_args).nhead}, sp)
        return
    if class_name(class_path) not in ("HFCausalLM", "DeferredHFCausalLM"):
        raise ConfigError(
            "model.network",
            f"{class_path or 'this network'} cannot split its sequences (litune's DecoderLM and HFCausalLM can)",
            "use litune.models.transformer.DecoderLM or litune.models.HFCausalLM, or sequence_parallel_size: 1",
        )
    from litune.models.hf import build_hf_config, sequence_parallel_sizes_of

    attention = init_args.get("attn_implementation", "sdpa")
    if attention != "sdpa":
        raise ConfigError(
            f"{NETWORK_ARGS}.attn_implementation",
            f"attn_implementation={attention!r} cannot be split: sequence parallelism wraps transformers' SDPA",
            "use attn_implementation: sdpa, or sequence_parallel_size: 1",
        )
    hf_config = build_hf_config(
        init_args.get("pretrained"),
        init_args.get("config"),
        init_args.get("revision"),
        bool(init_args.get("trust_remote_code", False)),
    )
    check_divisible(sequence_parallel_sizes_of(hf_config), sp)


def check_compile(cfg: Namespace) -> None:
    """Refuse ``model.compile`` where ``torch.compile`` cannot work, before any process is spawned."""
    if not cfg.get("model") or not cfg.model.get("compile"):
        return
    if describe_trainer(cfg.trainer).gathers_parameters_per_call:
        # ZeRO-3 gathers each parameter in hooks around every module call and frees it after: compiled graphs would
        # capture the empty shards. DeepSpeed's own engine.compile() is not reachable through Lightning's strategy.
        raise ConfigError(
            "model.compile",
            "torch.compile cannot trace a network whose parameters DeepSpeed ZeRO-3 partitions and gathers per call",
            "use DDP or ZeRO-1/2 with model.compile, or set model.compile: false for ZeRO-3",
        )


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _loggers_in(run_dir: Path, logger: Any) -> Any:
    """Point the configured loggers at the run folder; the default (``True``) is CSV plus TensorBoard there."""
    if logger is True or logger is None:
        logger = [
            Namespace(class_path="litune.loggers.CSVLogger", init_args=Namespace()),
            Namespace(class_path="litune.loggers.TensorBoardLogger", init_args=Namespace()),
        ]
    if logger is False:
        return logger
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and isinstance(entry.get("init_args"), Namespace):
            args = entry.init_args
            if args.get("save_dir") in (None, ".", ""):
                args.save_dir = str(run_dir)
            if "CSVLogger" in entry.class_path or "TensorBoardLogger" in entry.class_path:
                # name="" and version="" put the files straight into the run folder, not lightning_logs/version_N
                args.name = args.get("name") if args.get("name") not in (None, "lightning_logs") else ""
                args.version = args.get("version") if args.get("version") is not None else ""
    return logger


def run_loggers(run_dir: Path, ckpt_path: str | Path | None = None) -> list[Logger]:
    """The loggers a run folder's training logged to, built again from its ``config.yaml`` the way ``litune fit``
    builds them (:func:`add_loggers`, :func:`_loggers_in`, jsonargparse), so that what is logged later (``litune
    eval``) joins the training's curves: the same ``metrics.csv``, TensorBoard folder, MLflow run (its
    ``mlflow_run_id``) and wandb run (the id stored in ``ckpt_path``), as a resumed training would.

    A ``save_dir`` that is not a folder (any more) is the run folder now: the folder moved since the training, or its
    saved name has ``<redacted>`` for a secret in the experiment name. Fields saved as ``<redacted>`` are left to their
    defaults (the environment supplies keys).

    Only the logger part of ``config.yaml`` (``trainer.logger``, ``loggers``) is read: the rest (a callback or a data
    module whose code is not importable here) cannot stop the metrics from being logged.

    Raises:
        ConfigError: the run's saved logger entries do not parse.
    """
    from jsonargparse import ArgumentParser

    from litune.tracking.secrets import REDACTED

    saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--logger", type=list[Logger] | bool | None, default=True)  # trainer.logger's types
    parser.add_argument("--loggers", type=list[str] | None, default=None)
    saved_logger = (saved.get("trainer") or {}).get("logger", True)
    try:
        parsed = parser.parse_object({"logger": saved_logger, "loggers": saved.get("loggers")})
    except ArgumentError as err:
        lines = [line.strip(" -") for line in str(err).splitlines()]
        noise = ("Does not validate", "Subtypes", "Errors:", "Expected a", "Given value")  # the Union's other members
        reason = " ".join(line for line in lines[1:] if line and not line.startswith(noise)) or lines[0]
        raise ConfigError(
            "trainer.logger", f"{run_dir / CONFIG_FILE}: {reason}", "correct or remove that logger entry there"
        ) from None
    ckpt = str(ckpt_path) if ckpt_path is not None else None
    cfg = Namespace(trainer=Namespace(logger=parsed.logger), loggers=parsed.loggers, ckpt_path=ckpt)
    add_loggers(cfg)
    for entry in as_list(cfg.trainer.logger):
        args = entry.get("init_args") if isinstance(entry, Namespace) else None
        if not isinstance(args, Namespace):
            continue
        for key, value in list(args.as_dict().items()):
            if value == REDACTED:
                del args[key]
        if args.get("save_dir") and not Path(args.save_dir).is_dir():
            args.save_dir = None  # _loggers_in points it at the run folder as it is now
    entries = _loggers_in(run_dir, cfg.trainer.logger)
    if entries is False:
        return []
    built = parser.instantiate_classes(Namespace(logger=as_list(entries), loggers=None))
    return list(built.logger)


def parse_config(argv: list[str]) -> Namespace:
    """Parse ``--config`` files and dotted overrides exactly as ``litune fit`` does (same parser, same links), and
    nothing more: no check, no run folder, no class built. Every subcommand that reads a training config uses it.
    """
    with warnings.catch_warnings():
        # sys.argv holds `litune prepare ...` too; LightningCLI warns about that, but argv is the intended input.
        warnings.filterwarnings("ignore", message=".*args parameter")
        return _ConfigOnly(args=argv, run=False).config


class _ConfigOnly(LituneCLI):
    """LituneCLI stopped after parsing (LightningCLI parses in its constructor; these hooks would build and check)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        self.model = self.datamodule = self.trainer = None

    def after_instantiate_classes(self) -> None:
        pass


def load_datamodule(argv: list[str]) -> LightningDataModule:
    """Parse ``--config`` files and overrides as ``litune fit`` does, check them, and build only the data module.

    Used by ``litune prepare``: no model weights are loaded and no trainer is built.
    """
    from jsonargparse import ArgumentParser

    cfg = parse_config(argv)
    check_config(cfg)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser.instantiate_classes(parser.parse_object({"data": cfg.data.as_dict()})).data


def main(argv: list[str] | None) -> int:
    """Run ``litune fit | validate | test``; ``argv=None`` lets LightningCLI read ``sys.argv`` itself."""
    LituneCLI(args=argv)
    return 0

"""The LightningModule ("system"): composes an injected network, its optimizer and schedule, loss and metrics.

The network computes logits and its summed token loss (see :mod:`litune.models.output`); this module turns those into
the step objective of :mod:`litune.objective` (every target token of an optimizer step weighs the same, on any number
of processes and accumulation steps) and wires it into Lightning: logging, perplexity, optimizer and scheduler. It
has no ``if model_type == ...`` branches: every network has the same interface.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from torch import nn
from torchmetrics.text import Perplexity

from litune.callbacks.step_votes import agree
from litune.data.tokenizer import TokenizerSource, load_tokenizer
from litune.errors import NETWORK_ARGS, ConfigError, TrainingStopped
from litune.lightning_private import restore_noop_hooks, should_update_logs, skip_noop_hooks
from litune.models.adapters import (
    Adapters,
    add_adapters,
    base_is_reloadable,
    count_parameters,
    is_quantized,
    peft_model_of,
    save_adapters,
    trainable_adapter_state,
)
from litune.models.hf import builds_later
from litune.models.output import IGNORE_INDEX, LMOutput
from litune.objective import (
    BATCH_TAG,
    check_window_has_targets,
    gradient_divisor,
    install_look_ahead,
    is_deepspeed,
    step_objective,
    steps_left_in_window,
    targets_counter,
    train_look_ahead,
    uninstall_look_ahead,
)
from litune.optim import LRSchedule, default_optimizer, param_groups, use_fast_kernels
from litune.preference.objective import Preference, PreferenceObjective, units_counter
from litune.rl.objective import RL, GRPOObjective
from litune.strategies.batch import batch_replicas, loss_replicas
from litune.strategies.checkpoint import world_size_changed
from litune.strategies.collectives import distributed, host_to_device, sum_over_ranks
from litune.strategies.descriptor import describe

# LitLM overrides these batch hooks on purpose, for every data module: Lightning's note that it does is noise.
warnings.filterwarnings(
    "ignore", message="You have overridden `(on_before_batch_transfer|transfer_batch_to_device)` in `LightningModule`"
)


def _drop_frozen_base(module: LitLM, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: remove the frozen base weights when checkpoints hold only the adapters."""
    if module._adapters_only():
        for key in module._frozen_keys():
            state_dict.pop(prefix + key, None)


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full ZeRO-3-partitioned parameters for the duration of the context (a no-op for parameters not partitioned)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _full_adapter_state(network: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter weights gathered whole when FSDP2 shards them (a collective: call on every rank), else None (peft
    reads them from the model itself)."""
    from torch.distributed.tensor import DTensor

    state = trainable_adapter_state(network)
    if not any(isinstance(v, DTensor) for v in state.values()):
        return None
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def _stays_on(value: Any, device: torch.device) -> bool:
    """Whether moving ``value`` to ``device`` leaves it as it is: a tensor already there, or plain numbers."""
    if isinstance(value, torch.Tensor):
        return value.device == device
    if isinstance(value, tuple):
        return all(isinstance(item, (int, float)) for item in value)
    return isinstance(value, (int, float))


class LitLM(L.LightningModule):
    """Trains any litune network as a language model.

    Args:
        network: an ``nn.Module`` with litune's interface: ``forward(input_ids, attention_mask=None, labels=None)``
            returning :class:`~litune.models.output.LMOutput`.
        tokenizer: where the tokenizer comes from (hub id, local folder, or a trained BPE). The CLI links it to the
            data module; it is kept here so a checkpoint knows how to decode its own outputs.
        optimizer: a callable that builds the optimizer from parameter groups, e.g. ``torch.optim.AdamW`` with its
            ``init_args`` (``lr``, ``weight_decay``, ``betas``) in the config. Adam and AdamW run with torch's fused
            kernel where the device has one (CPU, CUDA), else ``foreach``, unless ``fused`` or ``foreach`` is set
            (:func:`litune.optim.use_fast_kernels`).
        lr_schedule: warmup and decay, stepped per optimizer step.
        nonfinite: what an optimizer step whose loss or gradient norm is NaN/Inf on any rank does (all ranks
            agree): ``skip`` leaves weights and optimizer state untouched for that step, counts it in
            ``train/skipped_steps`` and warns; ``stop`` ends training with a message naming the step and the last
            good checkpoint (``litune fit`` exits with status 1). Under DeepSpeed the engine's own overflow check
            decides (gradients; in bf16 only with its ``check_grad_overflow``).
        adapters: train LoRA/DoRA adapters instead of the whole network (``configs/peft/``): the base is frozen and,
            when it is loaded from ``pretrained`` weights, checkpoints hold only the adapters (and optimizer state);
            every checkpoint also writes the run's adapter folder ``<run>/adapter``. See :mod:`litune.models.adapters`.
        compile: compile the network with ``torch.compile`` (in place, :meth:`torch.nn.Module.compile`, so parameter
            names and checkpoints are unchanged) once the strategy has placed it. Works for every network family, with
            gradient checkpointing, DDP and DeepSpeed ZeRO-1/2; ZeRO-3 (parameters gathered by hooks at each call) is
            refused at start-up. The first steps are slower while the graphs compile.
        preference: train on preference pairs (DPO, IPO, hinge, SimPO, ORPO) or KTO examples with this loss instead
            of the SFT loss, with a reference model (``configs/dpo.yaml``; :mod:`litune.preference.objective`). The
            data module must give preference batches (:class:`litune.preference.data.PreferenceDataModule`).
        rl: train with online RL (GRPO) instead: sample completions of the data's prompts inside the training loop,
            score them with reward functions and push the policy toward the better ones (``configs/grpo.yaml``;
            :mod:`litune.rl.objective`). The data module must give prompt batches
            (:class:`litune.rl.data.PromptDataModule`).
    """

    def __init__(
        self,
        network: nn.Module,
        tokenizer: TokenizerSource | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_schedule: LRSchedule | None = None,
        nonfinite: Literal["skip", "stop"] = "skip",
        adapters: Adapters | None = None,
        compile: bool = False,
        preference: Preference | None = None,
        rl: RL | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in ("skip", "stop"):
            raise ConfigError("model.nonfinite", f"{nonfinite!r} is not one of skip, stop", "use skip or stop")
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient; kept in checkpoints
        with warnings.catch_warnings():
            # Outside the CLI (load_from_checkpoint, Python use) the network arrives built; it is dropped just below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("network"), nn.Module):
            # Built in Python rather than by the CLI: the module itself is saved in the state dict, not in hparams;
            # pass `network=` to load_from_checkpoint.
            self._hparams.pop("network")
            self._hparams_initial.pop("network", None)
        self.network = network
        self.adapters = adapters
        if is_quantized(network) and adapters is None:
            raise ConfigError(
                "model.adapters",
                "the network's weights are quantized (4-bit) and cannot be trained directly",
                "add adapters, e.g. --config configs/peft/qlora.yaml (or set model.adapters)",
            )
        if adapters is not None:
            if not builds_later(network):  # a DeferredHFCausalLM gets them in configure_model
                add_adapters(network, adapters)
            # Checkpoints without the frozen base do not hold every key; on_load_checkpoint checks the ones they must.
            self.strict_loading = False
            # Leave the frozen base out of this module's state dict, for every writer: Lightning's checkpoint and
            # DeepSpeed's own module states alike (DeepSpeed's exclude_frozen_parameters misses the second name of a
            # tied weight, e.g. GPT-2's lm_head). The private hook API exists in every torch release litune supports.
            self._register_state_dict_hook(_drop_frozen_base)
        # The preference objective (None: the SFT loss); its frozen reference copy is no registered child of this
        # module, so it is never trained, checkpointed or exported.
        self.preference = PreferenceObjective(preference, network, adapters is not None) if preference else None
        if rl is not None and preference is not None:
            raise ConfigError("model.rl", "model.rl and model.preference are both set", "set one objective")
        self.rl = GRPOObjective(rl, network, adapters is not None) if rl is not None else None
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or LRSchedule()
        self.compile_network = compile
        self._check_optimizer()
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        if self.tokenizer is not None and hasattr(network, "vocab_size") and len(self.tokenizer) > network.vocab_size:
            raise ConfigError(
                f"{NETWORK_ARGS}.vocab_size",
                f"the tokenizer has {len(self.tokenizer)} tokens but the network's vocabulary has {network.vocab_size}",
                f"set the network's vocab_size to at least {len(self.tokenizer)} or use the matching tokenizer",
            )
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.tokens_seen = 0  # target tokens of all optimizer steps so far, all ranks; kept in checkpoints
        self._window: tuple[int, int, int] | None = None  # (epoch, first batch_idx, end batch_idx) of this step
        self._step_targets: torch.Tensor | int = torch.zeros((), dtype=torch.long)
        self._window_loss: torch.Tensor | float = 0.0
        self._window_targets: torch.Tensor | int = 0
        self._window_checked = False  # whether this fit's token count was checked against the network's
        self._unpadded_mask_shape: tuple[int, ...] | None = None  # see on_before_batch_transfer
        self._estimated_warned = False
        self.step_gradient_norm: torch.Tensor | None = None  # this step's gradient norm (see _step_is_finite)
        self._step_norm_params: list[torch.nn.Parameter] = []  # the parameters step_gradient_norm is over
        self._hidden_hooks: list[tuple[Any, str]] = []  # no-op hooks hidden from Lightning while training

    @property
    def tokens_seen(self) -> int:
        """Target tokens of all optimizer steps so far, over all ranks (reading it waits for the device)."""
        if self._tokens_pending is not None:
            # Step counts pile up on the device between reads: reading one every step would stall a GPU's queue.
            self._tokens_seen += int(self._tokens_pending)
            self._tokens_pending = None
        return self._tokens_seen

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self._tokens_seen, self._tokens_pending = int(value), None

    def _check_optimizer(self) -> None:
        """Build the optimizer once on a probe parameter, so a bad learning rate fails now, not after spawning."""
        try:
            probe = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as err:
            raise ConfigError(_optimizer_field(str(err)), str(err), "fix the optimizer's init_args") from None
        lr = probe.param_groups[0]["lr"]
        if not lr > 0:
            raise ConfigError(
                "model.optimizer.init_args.lr",
                f"invalid learning rate {lr}: it must be positive",
                "use a positive lr such as 3e-4",
            )

    def forward(self, **batch: torch.Tensor) -> LMOutput:
        return self.network(**batch)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # Count each step's target tokens ahead of its first backward (see litune.objective).
            count = targets_counter(self.network)
            if self.preference is not None:  # pairs, chosen tokens and all response tokens
                count = units_counter(self.network, self.preference.loss.unpaired)
            if self.rl is not None:  # counted once the step's rollouts exist (litune.rl.objective)
                count = lambda batch: 0  # noqa: E731
            install_look_ahead(self.trainer, count)
        if self.rl is not None:
            self.rl.setup(self)
        if self.preference is not None:
            self._check_preference_layout()
        if self.preference is not None and self.preference.mode == "precomputed":
            self._precompute_reference()
        if self._adapters_only() and describe(self.trainer.strategy).excludes_frozen_parameters:
            self.trainer.strategy.exclude_frozen_parameters = True  # DeepSpeed writes its module states: no base

    def _check_preference_layout(self) -> None:
        """Refuse preference batches laid out for the other kind of network: an encoder-decoder fed prompt+response
        as one source would train on the wrong log-probs (and a decoder fed seq2seq batches would see no prompt)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batches = getattr(datamodule, "encoder_decoder", None)
        network = getattr(self.network, "targets_from_labels", None) is not None  # Seq2SeqLM: unshifted targets
        if batches is not None and bool(batches) != network:
            kind = "an encoder-decoder" if network else "a decoder-only"
            raise ConfigError(
                "data.init_args.encoder_decoder",
                f"encoder_decoder={bool(batches)}, but the model is {kind} network",
                f"set data.init_args.encoder_decoder: {str(network).lower()}",
            )

    def _precompute_reference(self) -> None:
        """``reference: precomputed``: one pass of the frozen reference over the data, cached beside it; the copy is
        dropped afterwards (its log-probs are all it is needed for)."""
        assert self.preference is not None
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "attach_reference_logps"):
            raise ConfigError(
                "model.preference.reference",
                "reference=precomputed needs a data module that stores reference log-probs",
                "use litune.preference.data.PreferenceDataModule, or reference: copy",
            )
        if self.preference.reference is None:  # already attached in an earlier stage of this process
            return
        compute = self.preference.precompute_fn(self.network, self.trainer.strategy.root_device)
        datamodule.attach_reference_logps(compute, self.preference.fingerprint())
        self.preference.reference = None

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            uninstall_look_ahead(self.trainer)
            restore_noop_hooks(self._hidden_hooks)
            self._hidden_hooks = []

    def on_train_start(self) -> None:
        self._window = None
        self._window_checked = False
        # Lightning would call ~90 empty hook methods a step on litune's callbacks and this module (~0.3 ms of a tiny
        # step): hidden from its hook calls while training (lightning_private.skip_noop_hooks).
        restore_noop_hooks(self._hidden_hooks)
        self._hidden_hooks = skip_noop_hooks(self.trainer)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note whether the batch has padding while it is still on the host, where reading its mask is free.

        The batch is left as it is (callbacks may read its ``attention_mask``); the step that follows gives the network
        no mask when there is no padding (:meth:`_network_inputs`), so attention takes SDPA's ``is_causal`` path with
        no data-dependent check on the device (a host sync on a GPU, a graph break under torch.compile).
        """
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        unpadded = isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all())
        self._unpadded_mask_shape = tuple(mask.shape) if unpadded else None
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch as it is when it is a dict of tensors already on ``device`` (every CPU run; plain numbers such as
        the look-ahead's tag beside them): Lightning's generic walk over the collection, which moves nothing then, costs
        ~50 µs a batch. Lightning's transfer otherwise."""
        if isinstance(batch, dict) and all(_stays_on(value, device) for value in batch.values()):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _network_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch for the network: without its ``attention_mask`` when the host found no padding in it (the note
        of :meth:`on_before_batch_transfer`, used once, by the step that follows it)."""
        shape, self._unpadded_mask_shape = self._unpadded_mask_shape, None
        mask = batch.get("attention_mask")
        if shape is not None and isinstance(mask, torch.Tensor) and tuple(mask.shape) == shape:
            return {key: value for key, value in batch.items() if key != "attention_mask"}
        return batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch's share of the step objective ``sum of token losses / N`` (see :mod:`litune.objective`)."""
        if self.preference is not None:
            return self.preference.training_step(self, batch, batch_idx)
        if self.rl is not None:
            return self.rl.training_step(self, batch, batch_idx)
        batch = dict(batch)
        tag = batch.pop(BATCH_TAG, None)
        epoch = self.trainer.current_epoch
        if self._window is None or self._window[0] != epoch or not self._window[1] <= batch_idx < self._window[2]:
            self._start_window(batch, tag, batch_idx)
        out = self.network(**self._network_inputs(batch))
        if out.loss_sum is None or out.num_targets is None:
            raise ConfigError("data", "a training batch reached the network without 'labels'", "give batches labels")
        self._window_loss = self._window_loss + out.loss_sum.detach().double()
        self._window_targets = self._window_targets + out.num_targets
        if batch_idx + 1 == self._window[2]:  # type: ignore[index]
            self._end_window()
        return step_objective(out.loss_sum, self._step_targets, gradient_divisor(self.trainer))

    def _start_window(self, batch: dict[str, torch.Tensor], tag: tuple[int, int] | None, batch_idx: int) -> None:
        """Count the target tokens of the optimizer step that starts at this micro-batch, over all ranks."""
        trainer = self.trainer
        length = steps_left_in_window(trainer, batch_idx)
        look_ahead = train_look_ahead(trainer)
        if tag is not None and look_ahead is not None:
            local = look_ahead.targets_ahead(tag, length)
            check_window_has_targets(local, batch_idx, length)
        else:
            # Not fed by the look-ahead wrapper (training_step called by hand, a non-dict batch): exact without
            # accumulation, an estimate from this micro-batch with it.
            local = targets_counter(self.network)(batch) * length
            if length > 1 and not self._estimated_warned:
                self._estimated_warned = True
                warnings.warn(
                    "the step's target tokens are estimated: batches do not come from LitLM's look-ahead", stacklevel=2
                )
        if isinstance(local, int) and not distributed(trainer):
            # One process: the count is the host number already; kept so, the step's loss is scaled on the host
            # (step_objective) without the handful of 0-d tensor operations (~0.1 ms of a tiny step).
            self._step_targets = local
        else:
            # Each row counted once: the ranks of a tensor- or sequence-parallel group hold the same rows
            # (batch_replicas). The sum over ranks stays on the device (no barrier, no read: sum_over_ranks).
            total = sum_over_ranks(trainer, host_to_device(local, self.device))
            self._step_targets = total // batch_replicas(trainer)
        self._window = (trainer.current_epoch, batch_idx, batch_idx + length)
        self._window_loss, self._window_targets = 0.0, 0

    def _end_window(self) -> None:
        """Count the step's tokens; on logging steps, log its token-weighted loss over all micro-batches and ranks.

        Nothing here waits for the device on other steps: the token count stays a device tensor until read, and the
        loss is checked for NaN/Inf together with the gradients, in the one host sync of :meth:`_step_is_finite`.
        """
        pending = self._tokens_pending
        self._tokens_pending = self._step_targets if pending is None else pending + self._step_targets
        if self._window_checked and not should_update_logs(self.trainer):
            # Each self.log costs about a millisecond of Lightning bookkeeping (a tiny model's step is ~10 ms) and
            # loggers and the progress bar only read the values every log_every_n_steps: log on those steps only, as
            # Lightning's own LearningRateMonitor does.
            return
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                             for v in (self._window_loss, self._window_targets)])  # fmt: skip
        # A tensor-parallel group's ranks compute the same loss; a sequence group's ranks each their slice's share.
        local = local / loss_replicas(self.trainer)
        loss_sum, targets = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        if int(targets) != int(self._step_targets):  # checked at the first step of a fit and at every logging step
            raise RuntimeError(
                f"the network trained on {int(targets)} target tokens in this step but {int(self._step_targets)} were "
                "counted ahead: its targets_from_labels does not match how its forward turns labels into targets"
            )
        self._window_checked = True
        if not should_update_logs(self.trainer):
            return
        loss = loss_sum / max(targets, 1)
        # Shown by litune's progress bar, which reads it once per log (Lightning's prog_bar=True reads every batch).
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/ppl", math.exp(min(loss, 80.0)), on_step=True, on_epoch=False)
        # float64: self.log would make a Python float float32, which cannot count tokens exactly past 2**24.
        tokens_seen = torch.tensor(float(self.tokens_seen), dtype=torch.float64, device=self.device)
        self.log("train/tokens_seen", tokens_seen, on_step=True, on_epoch=False)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step the optimizer unless the step's loss or gradient norm is not finite on some rank (``nonfinite``).

        The closure (the step's last forward and backward) runs first, here, so the gradients can be checked before
        ``optimizer.step``; the precision plugin then calls ``on_before_optimizer_step`` and clips as usual.
        """
        assert optimizer_closure is not None
        trainer = self.trainer
        if is_deepspeed(trainer):
            # The engine checks the gradients at its accumulation boundary (all ranks agree) and skips the step.
            engine = trainer.model
            skipped = engine.skipped_steps
            optimizer.step(closure=optimizer_closure)
            if engine.skipped_steps != skipped and not engine.fp16_enabled():  # fp16 loss scaling skips on purpose
                self._nonfinite_step()
        else:
            loss = optimizer_closure()
            if self._step_is_finite(optimizer):
                optimizer.step(closure=lambda: loss)
            else:
                self._nonfinite_step()
            self.step_gradient_norm, self._step_norm_params = None, []  # this step's: never reused by a later one
        if should_update_logs(trainer):  # as train/loss: only when loggers read it (a ms each)
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients, as Lightning's default ``optimizer.zero_grad()`` (``set_to_none=True``) does.

        For torch's own optimizers without a Lightning profiler, the loop that method runs is run here: its profiler
        record and dynamo guard cost ~0.1 ms a step, a share of a tiny model's step. Other optimizers (DeepSpeed's
        among them) and profiled runs go through ``zero_grad``.
        """
        plain = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad and not is_deepspeed(self.trainer)
        if not plain or type(self.trainer.profiler) is not PassThroughProfiler:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def _step_is_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the step's loss and gradient norm are finite on every rank.

        The one host sync of a training step: whether to call ``optimizer.step`` is decided on the host, from one
        all-reduce that also carries the callbacks' step votes on several processes (:func:`step_votes.agree`). The
        gradient norm is kept as :attr:`step_gradient_norm`, and the parameters it was taken over, for clipping
        (:meth:`configure_gradient_clipping`) and the ``train/grad_norm`` log, which then make no second pass over the
        gradients.
        """
        # The window's loss is the step's until the next step's first micro-batch starts a new window.
        checked = torch.as_tensor(self._window_loss, device=self.device)
        # The optimizer's parameters, in its order (as Lightning's clip_grad_norm_ sums them: the same norm to the last
        # bit); walking self.parameters() costs a Hugging Face model's whole module tree, about 0.2 ms a step.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.step_gradient_norm, self._step_norm_params = None, []
        # Under fp16 AMP, inf gradients are the GradScaler's business (it skips those steps and lowers the scale).
        if params and str(self.trainer.precision) not in ("16-mixed", "16"):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
            if hasattr(norm, "full_tensor"):  # FSDP2: sharded gradients give a DTensor norm
                norm = norm.full_tensor()
            else:  # the norm clip_grad_norm_ would compute (the same call with the same defaults)
                self.step_gradient_norm, self._step_norm_params = norm, params
            # Finite exactly when both are: float64 holds the sum of two finite float32 values, and NaN or Inf in
            # either makes it NaN or Inf (one tensor operation a step instead of a flag per check, ~20 µs each).
            checked = checked.double() + norm
        # One all-reduce with the callbacks' step votes (preemption, time-based checkpoint): litune.callbacks.step_votes
        return agree(self.trainer, checked)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        """Clip by norm with the gradient norm the non-finite check just computed instead of a second pass over every
        gradient (``clip_grad_norm_`` is that norm followed by ``clip_grads_with_norm_``); Lightning's own clipping
        otherwise: by value, DeepSpeed, sharded (DTensor) gradients, fp16 AMP (the scaler unscales first), or a
        precision plugin with its own clipping. A callback that changes the gradients in ``on_before_optimizer_step``
        (between the check and clipping) should also set ``step_gradient_norm = None``."""
        if not gradient_clip_val:  # what Lightning's clip_gradients does with no clipping value, without its checks
            return
        norm = self.step_gradient_norm
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm").lower()
        own_clipping = type(self.trainer.precision_plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm
        if norm is None or algorithm != "norm" or own_clipping:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        torch.nn.utils.clip_grads_with_norm_(self._step_norm_params, gradient_clip_val, norm)

    def _nonfinite_step(self) -> None:
        step = self.trainer.global_step + 1  # the optimizer step being taken (checkpoints count finished steps)
        problem = f"optimizer step {step}: the loss or the gradient norm is NaN or Inf on at least one rank"
        if self.nonfinite == "stop":
            raise TrainingStopped(
                f"{problem}, and model.nonfinite=stop. The weights were not updated by this step. Last good "
                f"checkpoint: {self._last_checkpoint()}. Lower the learning rate or check the data near this step, "
                "then resume with --ckpt_path; or set model.nonfinite=skip to skip such steps."
            )
        self.skipped_steps += 1
        if self.trainer.is_global_zero:
            warnings.warn(
                f"{problem}: step skipped, weights and optimizer state unchanged "
                f"({self.skipped_steps} skipped so far, see train/skipped_steps)",
                stacklevel=2,
            )

    def _last_checkpoint(self) -> str:
        callback = self.trainer.checkpoint_callback
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path:
                return str(path)
        return "none saved yet (the run starts over)"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["litune_objective"] = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}
        checkpoint["litune_world_size"] = self.trainer.world_size
        if self.rl is not None:
            checkpoint["litune_rl"] = self.rl.state_dict(self)
        if self.adapters is not None:
            self._save_adapters(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint, self.trainer.world_size if self._trainer is not None else None)
        state = checkpoint.get("litune_objective", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.rl is not None and self._trainer is not None:
            self.rl.load_state_dict(checkpoint.get("litune_rl", {}), self)

    def check_checkpoint(self, checkpoint: dict[str, Any], world_size: int | None) -> None:
        """Every refusal of loading ``checkpoint`` into this system, in one place.

        The CLI calls it before ``Trainer.fit/validate/test`` (on the memory-mapped file: no weight is read), so a
        refused resume has written nothing; :meth:`on_load_checkpoint` calls it again for checkpoints loaded any other
        way (sharded ones, the Python API).

        Args:
            checkpoint: the loaded checkpoint dict (``state_dict`` may hold memory-mapped tensors).
            world_size: the processes of this run, or None when not known.
        """
        if world_size is not None:
            self._check_resume_world_size(checkpoint, world_size)
        # A network that adds its adapters in configure_model (deferred weights) is checked when Lightning loads.
        built = peft_model_of(self.network) is not None
        if self.adapters is not None and built and checkpoint.get("state_dict") is not None:
            self._check_adapter_checkpoint(checkpoint)

    def _check_resume_world_size(self, checkpoint: dict[str, Any], now: int) -> None:
        """Refuse to resume training on another number of processes, except under FSDP2, whose checkpoints reshard.

        Lightning's loop counts micro-batches per process, so with the global batch fixed the accumulation changes
        with the world size and the first resumed step would end its accumulation window at the wrong micro-batch.
        FSDP2 restates that count (``litune.strategies.fsdp2.rescale_batch_progress``); ZeRO refuses earlier, in
        its strategy.
        """
        saved = checkpoint.get("litune_world_size")
        reshards = self._trainer is not None and describe(self._trainer.strategy).reshards_checkpoints
        if saved is None or saved == now or reshards:
            return
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        raise world_size_changed(ckpt_path or "being resumed", saved, now)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> LMOutput | None:
        return self._evaluate(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> LMOutput | None:
        return self._evaluate(batch, "test", self.test_ppl)

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, ppl: Perplexity) -> LMOutput | None:
        """One evaluation batch: the preference or GRPO objective's own, else the token loss of ``stage``."""
        if self.preference is not None:
            return self.preference.eval_step(self, batch)
        if self.rl is not None:
            return self.rl.eval_step(self, batch)
        return self._eval_step(batch, stage, ppl)

    def _shard_preference_reference(self) -> None:
        # After the strategy's setup (the policy is partitioned by then): the reference copy is sharded like it.
        if self.preference is not None:
            self.preference.shard_reference(self.trainer.strategy)

    def _objectives(self) -> list[PreferenceObjective | GRPOObjective]:
        """The objective that replaces the SFT loss (preference or GRPO; at most one is set), or none."""
        return [objective for objective in (self.preference, self.rl) if objective is not None]

    def _start_eval_epoch(self) -> None:
        self._shard_preference_reference()
        for objective in self._objectives():
            objective.on_eval_epoch_start()

    def on_validation_epoch_start(self) -> None:
        self._start_eval_epoch()

    def on_test_epoch_start(self) -> None:
        self._start_eval_epoch()

    def on_test_epoch_end(self) -> None:
        for objective in self._objectives():
            objective.on_eval_epoch_end(self, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, ppl: Perplexity) -> LMOutput:
        out = self.network(**self._network_inputs(batch))
        n_tokens = (out.targets != IGNORE_INDEX).sum()
        # Token-weighted mean over the epoch, matching what perplexity aggregates.
        self.log(f"{stage}/loss", out.loss, batch_size=int(n_tokens), sync_dist=True)
        ppl.update(out.logits.float(), out.targets)
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")
        # Returned so that metric callbacks (e.g. callbacks.token_accuracy) reuse the logits instead of re-running.
        return out

    def on_validation_epoch_end(self) -> None:
        for objective in self._objectives():
            objective.on_eval_epoch_end(self, "val")
        self._last_val_step = self.global_step  # lets the CLI skip a redundant final validation

    def configure_model(self) -> None:
        # Networks that defer creating their weights (litune.models.DeferredHFCausalLM) create them here:
        # Lightning runs this inside the strategy's sharded context (deepspeed.zero.Init under ZeRO-3).
        build = getattr(self.network, "configure_model", None)
        if callable(build):
            # A sharding strategy (FSDP2) lends its sharding so that a pretrained model is loaded into shards.
            strategy = self._trainer.strategy if self._trainer is not None else None
            # With adapters the network is built whole and sharded by the strategy after peft has added its layers:
            # a layer added to a block that is already sharded would be left out of the block's sharded group.
            if strategy is not None and describe(strategy).shards_network and self.adapters is None:
                build(shard=strategy.shard_network)
            else:
                build()
            if self.adapters is not None and peft_model_of(self.network) is None:
                add_adapters(self.network, self.adapters)
            for objective in self._objectives():
                objective.prepare_reference(self.network)
        if self.compile_network and getattr(self.network, "_compiled_call_impl", None) is None:
            # In place: the module (and its state_dict keys) stays the same object; only its __call__ is compiled.
            self.network.compile()

    def on_fit_start(self) -> None:
        self._shard_preference_reference()
        if self.adapters is not None:
            trainable, total = count_parameters(self.network)
            for logger in self.loggers:
                logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=self.global_step)

    def _adapters_only(self) -> bool:
        """Whether checkpoints hold only the adapters: the frozen base can be reloaded from its pretrained source."""
        return self.adapters is not None and base_is_reloadable(self.network)

    def _frozen_keys(self) -> set[str]:
        # remove_duplicate=False: a tied weight (GPT-2's lm_head = wte) is frozen under both of its names.
        named = self.network.named_parameters(remove_duplicate=False)
        return {f"network.{name}" for name, p in named if not p.requires_grad}

    def _save_adapters(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["adapters_only"] = self._adapters_only()
        # The run's adapter folder, refreshed at every checkpoint: what `peft.PeftModel.from_pretrained` loads. Under
        # ZeRO-3 and FSDP2 every rank holds a shard of each adapter weight: all ranks gather them, rank 0 writes.
        with _gathered([p for p in self.network.parameters() if p.requires_grad]):
            state = _full_adapter_state(self.network)
            if self.trainer.is_global_zero:
                save_adapters(self.network, Path(self.trainer.default_root_dir) / "adapter", state)

    def _check_adapter_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The adapter weights of this config are all in the checkpoint, and (adapters-only) nothing else is."""
        state = checkpoint["state_dict"]
        trainable = {f"network.{n}" for n, p in self.network.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        if missing:
            raise ConfigError(
                "model.adapters",
                f"the checkpoint lacks {len(missing)} adapter weights of this config, e.g. {missing[0]}",
                "load it with the adapters settings it was trained with (its run folder's config.yaml)",
            )
        if not checkpoint.get("adapters_only", False):
            return
        expected = set(self.state_dict()) - self._frozen_keys()
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ConfigError(
                "model.adapters",
                f"the checkpoint has {len(unexpected)} weights this config does not train, e.g. {unexpected[0]}",
                "load it with the adapters settings it was trained with (its run folder's config.yaml)",
            )

    def configure_optimizers(self) -> dict[str, Any]:
        # Adam/AdamW run fused (one kernel per tensor group) unless the config chose fused/foreach itself.
        optimizer = use_fast_kernels(self.optimizer_factory(param_groups(self.network)))
        scheduler = self.lr_schedule.build(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


_TORCH_OPTIMIZER_ARGS = {"learning rate": "lr", "epsilon": "eps", "beta parameter": "betas"}


def _optimizer_field(message: str) -> str:
    """The optimizer argument a ``torch.optim`` error names ("Invalid weight_decay value: -1.0" -> its field)."""
    match = re.match(r"Invalid ([\w ]+?)(?: value| at index \d+)?:", message)
    if match is None:
        return "model.optimizer.init_args"
    name = _TORCH_OPTIMIZER_ARGS.get(match.group(1), match.group(1))
    return f"model.optimizer.init_args.{name}"

"""Online RL (GRPO) as the training objective of :class:`litune.module.LitLM`: rollouts inside the training loop.

Set ``model.rl`` (``configs/grpo.yaml``) with a :class:`litune.rl.data.PromptDataModule`, and every optimizer step:

1. **Rollouts.** At the step's first micro-batch, every rank samples ``num_generations`` (``G``) completions for each
   prompt of each of its micro-batches of the step, with the current weights (litune's generation with its key/value
   cache, batched, at most ``max_completion_length`` tokens, stopping at EOS). Each prompt's group is sampled with its
   own generator, seeded by ``(seed, global step, the prompt's row id)``: a group's completions do not depend on the
   rank, the micro-batch or the batch it shares, so runs reproduce, resume, and equal each other on 1 or 2 processes.
2. **Rewards** (:mod:`litune.rl.rewards`) score the decoded completions; advantages are group-relative
   (:func:`litune.rl.losses.group_advantages`; a group never straddles micro-batches).
3. **Loss.** Each micro-batch backpropagates its :func:`~litune.rl.losses.policy_loss_terms` numerator divided by the
   step's total weight (completions, completion tokens or completions x ``max_completion_length``, per
   ``normalization``), counted once the step's rollouts exist (before its first backward) and all-reduced: the update
   is exact across accumulation and ranks, like SFT's (:mod:`litune.objective`).

``num_iterations = k > 1``: the data module yields each step's micro-batches ``k`` times
(:class:`litune.rl.data.RepeatedWindows`) and the objective reuses the step's rollouts for ``k`` optimizer steps; the
log-probs of the sampling policy (computed once, at generation) make the importance ratio of the later steps. With
``k = 1`` the ratio is exactly 1 and the gradient is REINFORCE's with group baselines. A checkpoint taken between two
of those ``k`` steps holds every rank's current rollouts (:meth:`GRPOObjective.state_dict`), so a resumed run
continues with them exactly.

The KL penalty (``beta > 0``) is against a frozen copy of the initial policy, or the base with adapters disabled when
the model trains adapters (:mod:`litune.preference.reference`); with ``beta = 0`` (the default) there is no reference.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from litune.errors import ConfigError
from litune.lightning_private import should_update_logs
from litune.models.generation import SamplingSettings, eval_mode
from litune.models.hf import builds_later
from litune.models.output import IGNORE_INDEX
from litune.objective import BATCH_TAG, gradient_divisor, steps_left_in_window, train_look_ahead
from litune.preference.logps import token_logps
from litune.preference.reference import adapters_disabled, disable_dropout, frozen_copy
from litune.rl.losses import FIELD, GRPOLoss, group_advantages, grpo_token_losses, policy_loss_terms
from litune.rl.rewards import Reward, RewardSpec, resolve, score, total

if TYPE_CHECKING:
    from litune.module import LitLM

_EVAL_STEP = -1  # the "step" of evaluation seeds: held-out completions do not change with the training step


@dataclass(frozen=True)
class RL(GRPOLoss):
    """``model.rl``: train with GRPO on prompts and reward functions (``configs/grpo.yaml``).

    The loss fields (``epsilon_low``, ``epsilon_high``, ``beta``, ``scale_rewards``, ``normalization``) and their
    checks are :class:`litune.rl.losses.GRPOLoss`'s.

    Args:
        rewards: the reward functions (:class:`litune.rl.rewards.RewardSpec`: ``function`` as
            ``module:function``, ``weight``, ``kwargs``); the total reward is their weighted sum.
        num_generations: completions sampled per prompt (the group size ``G``, at least 2).
        max_completion_length: a completion stops after this many tokens (or at EOS).
        temperature, top_k, top_p: how completions are sampled.
        num_iterations: optimizer steps per batch of rollouts (the importance ratio corrects the later ones).
        seed: seed of the completions' generators (with the global step and each prompt's row id).
        reference: with ``beta > 0``: ``auto`` (``adapters`` when the model trains adapters, else ``copy``),
            ``copy`` (a frozen copy of the initial policy) or ``adapters`` (the base with adapters disabled).
        logps_chunk_size: rows of logits computed at once for the log-probs; ``null`` for the plain path.
        disable_dropout: set the policy's dropout to 0, so sampling and training see the same policy.
        log_completions_every_n_steps: every this many optimizer steps, log a table of sample completions (prompt,
            completion, reward per function) to the run's loggers that take tables or text (Weights & Biases,
            TensorBoard); 0: never.
    """

    rewards: list[RewardSpec] = field(default_factory=list)
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_iterations: int = 1
    seed: int = 0
    reference: Literal["auto", "copy", "adapters"] = "auto"
    logps_chunk_size: int | None = 1024
    disable_dropout: bool = True
    log_completions_every_n_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()  # the loss settings
        specs = [RewardSpec(**s) if isinstance(s, dict) else s for s in self.rewards]
        object.__setattr__(self, "rewards", specs)
        positive = {
            "num_generations": (self.num_generations, 2, "use e.g. 8: a group of one has no baseline"),
            "max_completion_length": (self.max_completion_length, 1, "use e.g. 64"),
            "num_iterations": (self.num_iterations, 1, "use 1 (one optimizer step per batch of rollouts)"),
            "log_completions_every_n_steps": (self.log_completions_every_n_steps, 0, "use 0 (never) or e.g. 50"),
        }
        for name, (value, least, fix) in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{FIELD}.{name}", f"{name}={value!r} must be an integer >= {least}", fix)
        if self.reference not in ("auto", "copy", "adapters"):
            raise ConfigError(f"{FIELD}.reference", f"{self.reference!r} is not a reference", "use auto or copy")
        chunk = self.logps_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"{FIELD}.logps_chunk_size", f"{chunk!r} is not a positive int", "use e.g. 1024, or null")
        try:
            self.sampling(1, 0)
        except ConfigError as error:  # SamplingSettings names its own fields (generate.X): name ours
            name = error.field.rsplit(".", 1)[-1]
            raise ConfigError(f"{FIELD}.{name}", error.problem, error.fix) from None
        resolve(self.rewards)  # a reward import path that does not exist fails now, before anything starts

    def sampling(self, prompt_width: int, eos: int | None, pad: int | None = None) -> SamplingSettings:
        """How completions of prompts ``prompt_width`` tokens wide (left-padded) are sampled."""
        return SamplingSettings(
            max_length=prompt_width + self.max_completion_length, do_sample=True, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, num_return_sequences=self.num_generations, eos_token_id=eos,
            pad_token_id=pad,
        )  # fmt: skip


def generation_seed(seed: int, step: int, row: int) -> int:
    """The seed of one prompt's group of completions (Python's hash of a tuple of ints is the same in every process)."""
    return hash((seed, step, row)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Rollouts:
    """One micro-batch's rollouts: ``N = P * G`` rows, prompt then completion, right-padded.

    Attributes:
        inputs: ``input_ids``/``attention_mask``/``labels`` ``[N, T]`` (labels: the completion tokens, EOS included).
        advantages: ``[N]`` float32.
        rewards: ``[N, F]`` float64 per-function rewards (host).
        lengths: ``[N]`` completion tokens.
        old_logps: ``[N, T - 1]`` log-probs under the sampling policy (``num_iterations > 1`` only).
        ref_logps: ``[N, T - 1]`` log-probs under the reference (``beta > 0`` only).
        weight: this micro-batch's share of the step's divisor (see ``normalization``).
        rows: ``[P]`` the prompts' row ids; texts: ``(prompt, completion)`` of every row, for the sample table.
    """

    inputs: dict[str, torch.Tensor]
    advantages: torch.Tensor
    rewards: torch.Tensor
    lengths: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    weight: float
    rows: list[int]
    texts: list[tuple[str, str]]


class GRPOObjective:
    """The GRPO training and evaluation steps of a :class:`~litune.module.LitLM` (see the module docstring).

    Args:
        config: ``model.rl``.
        network: the policy (its initial weights become the ``copy`` reference when ``beta > 0``).
        has_adapters: whether the policy trains adapters.
    """

    def __init__(self, config: RL, network: nn.Module, has_adapters: bool) -> None:
        self.config = config
        self.rewards: list[Reward] = resolve(config.rewards)
        self.names = _metric_names(self.rewards)
        self.mode = "none"
        if config.beta > 0:
            self.mode = ("adapters" if has_adapters else "copy") if config.reference == "auto" else config.reference
            if self.mode == "adapters" and not has_adapters:
                raise ConfigError(
                    f"{FIELD}.reference", "reference=adapters needs a model that trains adapters, but model.adapters "
                    "is not set", "add adapters (configs/peft/lora.yaml) or use reference: copy",
                )  # fmt: skip
        self.reference: nn.Module | None = None
        self.tokenizer: Any = None
        self._rollouts: list[Rollouts] = []
        self._uses = 0  # optimizer steps taken on the current rollouts
        self._step_weight = torch.ones((), dtype=torch.float64)
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._window_stats: torch.Tensor | None = None
        self._eval_stats: torch.Tensor | None = None
        self._generation_s = 0.0
        if not builds_later(network):  # a DeferredHFCausalLM's reference is made in configure_model
            self.prepare_reference(network)

    def prepare_reference(self, network: nn.Module) -> None:
        """Once the network is built: disable its dropout and (``copy``) make the frozen reference of it as it is."""
        if self.config.disable_dropout:
            disable_dropout(network)
        if self.mode == "copy" and self.reference is None:
            self.reference = frozen_copy(network)

    def setup(self, module: LitLM) -> None:
        """Check the data module and the tokenizer; tell the data module how often to repeat a step's batches."""
        trainer = module.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "rollout_reuse"):
            raise ConfigError(
                "data.class_path",
                f"model.rl needs prompt batches, but the data module is {type(datamodule).__name__}",
                "use data.class_path: litune.rl.data.PromptDataModule (see configs/grpo.yaml)",
            )
        if getattr(module.network, "targets_from_labels", None) is not None:
            raise ConfigError(
                "model.network", "model.rl trains decoder-only networks; this one is an encoder-decoder",
                "use a decoder-only network (litune.models.DecoderLM, litune.models.HFCausalLM)",
            )  # fmt: skip
        self.tokenizer = module.tokenizer if module.tokenizer is not None else datamodule.tokenizer
        datamodule.rollout_reuse = (trainer.accumulate_grad_batches, self.config.num_iterations)
        look_ahead_keeps_batches(trainer)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, module: LitLM) -> dict[str, Any]:
        """The current rollouts of every rank and how many optimizer steps used them: with ``num_iterations > 1`` a
        checkpoint taken between two of their steps resumes with the same rollouts (the sampling policy that made
        them is gone). Every rank's go into the checkpoint (one object all-gather)."""
        if self.config.num_iterations == 1 or self._uses % self.config.num_iterations == 0:
            return {}
        # Plain dicts of tensors and strings: litune loads checkpoints with torch.load(weights_only=True).
        mine = [{f.name: getattr(_to_cpu(r), f.name) for f in fields(Rollouts)} for r in self._rollouts]
        world = module.trainer.world_size
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        return {"uses": self._uses, "rollouts": gathered}

    def load_state_dict(self, state: dict[str, Any], module: LitLM) -> None:
        if not state:
            return
        device = module.device
        self._rollouts = [_to_device(Rollouts(**r), device) for r in state["rollouts"][module.trainer.global_rank]]
        self._uses = int(state["uses"])

    # ------------------------------------------------------------------ rollouts
    def _eos_pad(self) -> tuple[int | None, int]:
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        return eos, pad

    def generate(self, network: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        """``[P * G, C]`` completion tokens of the batch's prompts (EOS, then padding), sampled with per-prompt seeds.

        Networks whose ``generate`` takes a ``generator`` (litune's) generate the whole batch at once, one generator
        per prompt; others (Hugging Face's loop) generate prompt by prompt under a seeded ``fork_rng``.
        """
        device = next(network.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        eos, pad = self._eos_pad()
        sampling = self.config.sampling(ids.size(1), eos, pad)
        seeds = [generation_seed(self.config.seed, step, row) for row in batch["row"].tolist()]
        if "generator" in inspect.signature(network.generate).parameters:
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            with torch.no_grad():
                out = network.generate(ids, mask, sampling, generator=generators)
            return out[:, ids.size(1) :]
        parts = []
        for i, s in enumerate(seeds):  # one prompt (its G completions) at a time, unpadded, under its own seed
            prompt = ids[i : i + 1, mask[i].bool()]
            rows = SamplingSettings(**{**sampling.__dict__, "max_length": prompt.size(1) + sampling.max_length
                                       - ids.size(1)})  # fmt: skip
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(network):
                torch.manual_seed(s)
                parts.append(network.generate(prompt, None, rows)[:, prompt.size(1) :])
        width = max(p.size(1) for p in parts)
        return torch.cat([nn.functional.pad(p, (0, width - p.size(1)), value=pad) for p in parts])

    def rollouts(self, network: nn.Module, batch: dict[str, Any], step: int, evaluation: bool = False) -> Rollouts:
        """Sample, score and lay out one micro-batch's completions (no gradient; ``evaluation``: only the rewards)."""
        cfg, g = self.config, self.config.num_generations
        device = next(network.parameters()).device
        completions = self.generate(network, batch, step)
        eos, pad = self._eos_pad()
        is_eos = completions == eos if eos is not None else torch.zeros_like(completions, dtype=torch.bool)
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, completions.size(1))
        mask = batch["attention_mask"].bool()
        prompts = [batch["input_ids"][i][mask[i]].to(device) for i in range(mask.size(0))]
        seqs = [(prompts[r // g], completions[r, : int(lengths[r])]) for r in range(completions.size(0))]
        width = max(len(p) + len(c) for p, c in seqs)
        inputs = {
            "input_ids": torch.full((len(seqs), width), pad, dtype=torch.long, device=device),
            "attention_mask": torch.zeros((len(seqs), width), dtype=torch.long, device=device),
            "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long, device=device),
        }
        for r, (p, c) in enumerate(seqs):
            inputs["input_ids"][r, : len(p) + len(c)] = torch.cat([p, c])
            inputs["attention_mask"][r, : len(p) + len(c)] = 1
            inputs["labels"][r, len(p) : len(p) + len(c)] = c
        decode = self.tokenizer.decode
        texts = [decode(c[c != eos] if eos is not None else c, skip_special_tokens=True) for _, c in seqs]
        prompt_texts = [t for t in batch["prompts"] for _ in range(g)]
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch["columns"].items()}
        per_function = score(self.rewards, prompt_texts, texts, columns)
        advantages = group_advantages(total(per_function, self.rewards), g, cfg.scale_rewards)
        old = ref = None
        with torch.no_grad():
            if cfg.num_iterations > 1 and not evaluation:
                old = token_logps(network, inputs, cfg.logps_chunk_size)[0]
            if self.mode != "none" and not evaluation:
                ref = self._reference_logps(network, inputs)
        tokens = lengths.sum().item()
        weight = {"sequence": len(seqs), "token": tokens, "constant": len(seqs) * cfg.max_completion_length}
        pairs = list(zip(prompt_texts, texts, strict=True))
        return Rollouts(inputs, advantages.float().to(device), per_function, lengths.cpu(), old, ref,
                        float(weight[cfg.normalization]), batch["row"].tolist(), pairs)  # fmt: skip

    def _reference_logps(self, network: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode == "adapters":
            with adapters_disabled(network):
                return token_logps(network, inputs, self.config.logps_chunk_size)[0]
        assert self.reference is not None
        param = next(network.parameters())
        self.reference.to(device=param.device, dtype=param.dtype)
        return token_logps(self.reference, inputs, self.config.logps_chunk_size)[0]

    # ------------------------------------------------------------------ training
    def training_step(self, module: LitLM, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One micro-batch's share of the step objective (see the module docstring)."""
        batch = dict(batch)
        tag = batch.pop(BATCH_TAG, None)
        window = module._window
        if window is None or window[0] != module.trainer.current_epoch or not window[1] <= batch_idx < window[2]:
            self._start_window(module, batch, tag, batch_idx)
        rollouts = self._rollouts[batch_idx - module._window[1]]  # type: ignore[index]
        if rollouts.rows != batch["row"].tolist():
            raise RuntimeError("the micro-batch's prompts are not the ones its rollouts were generated for")
        cfg = self.config
        logps, mask = token_logps(module.network, rollouts.inputs, cfg.logps_chunk_size)
        old = rollouts.old_logps if rollouts.old_logps is not None else logps.detach()
        losses, clipped = grpo_token_losses(logps, old, rollouts.advantages, cfg, rollouts.ref_logps)
        numerator, _ = policy_loss_terms(losses, mask, cfg.normalization, cfg.max_completion_length)
        self._add_stats(module, numerator, logps, mask, clipped, rollouts)
        if batch_idx + 1 == module._window[2]:  # type: ignore[index]
            self._end_window(module)
        divisor = gradient_divisor(module.trainer) / self._step_weight.clamp(min=1e-12).to(numerator.dtype)
        return numerator * divisor

    def _start_window(self, module: LitLM, batch: dict[str, Any], tag: tuple[int, int] | None, batch_idx: int) -> None:
        """Generate the step's rollouts (every ``num_iterations`` steps) and count its divisor over all ranks."""
        trainer = module.trainer
        length = steps_left_in_window(trainer, batch_idx)
        look_ahead = train_look_ahead(trainer)
        # New rollouts every num_iterations steps, or when the step's prompts are not the held rollouts' (a resume
        # from a checkpoint without them, an epoch's shorter last step).
        stale = len(self._rollouts) != length or self._rollouts[0].rows != batch["row"].tolist()
        if self._uses % self.config.num_iterations == 0 or stale:
            batches = [batch]
            if tag is not None and look_ahead is not None and length > 1:
                batches = look_ahead.batches_ahead(tag, length)
            started = time.perf_counter()
            step = trainer.global_step
            self._rollouts = [self.rollouts(module.network, b, step) for b in batches]
            self._generation_s = time.perf_counter() - started
            self._uses = 0
        self._uses += 1
        # The step's divisor and completion tokens over all ranks: one all-reduce per optimizer step.
        local = [sum(r.weight for r in self._rollouts), float(sum(int(r.lengths.sum()) for r in self._rollouts))]
        local_counts = torch.tensor(local, dtype=torch.float64, device=module.device)
        counts = trainer.strategy.reduce(local_counts, reduce_op="sum")
        self._step_weight, self._step_tokens = counts[0], counts[1].long()
        module._window = (trainer.current_epoch, batch_idx, batch_idx + length)
        self._window_stats = None

    def _add_stats(self, module, numerator, logps, mask, clipped, rollouts: Rollouts) -> None:
        m = mask.to(logps.dtype)
        kl = torch.zeros((), device=logps.device)
        if rollouts.ref_logps is not None:
            delta = (rollouts.ref_logps - logps.detach()) * m
            kl = ((torch.exp(delta) - delta - 1) * m).sum()
        r = rollouts.rewards.to(module.device)
        totals = total(rollouts.rewards, self.rewards).to(module.device)
        stats = torch.cat([
            torch.stack([numerator.detach().double(), m.sum().double(), (clipped & mask).sum().double(), kl.double(),
                         -(logps.detach() * m).sum().double(), torch.tensor(float(len(r)), device=module.device,
                         dtype=torch.float64), totals.sum(), (totals**2).sum()]),
            r.sum(0), (r**2).sum(0),
        ])  # fmt: skip
        self._window_stats = stats if self._window_stats is None else self._window_stats + stats
        module._window_loss = self._window_stats[0]  # read by the non-finite check

    def _end_window(self, module: LitLM) -> None:
        pending = module._tokens_pending
        module._tokens_pending = self._step_tokens if pending is None else pending + self._step_tokens
        module._window_checked = True
        every = self.config.log_completions_every_n_steps
        if every and (module.trainer.global_step + 1) % every == 0 and module.trainer.is_global_zero:
            log_completions(module, self._rollouts, self.names)
        if not should_update_logs(module.trainer):
            return
        assert self._window_stats is not None
        stats = module.trainer.strategy.reduce(self._window_stats, reduce_op="sum").tolist()
        for name, value in self.metrics(stats, float(self._step_weight)).items():
            module.log(f"train/{name}", value, on_step=True, on_epoch=False)
        module.log("train/generation_s", self._generation_s if self._uses == 1 else 0.0, on_step=True, on_epoch=False)
        tokens_seen = torch.tensor(float(module.tokens_seen), dtype=torch.float64, device=module.device)
        module.log("train/tokens_seen", tokens_seen, on_step=True, on_epoch=False)

    def metrics(self, stats: list[float], weight: float | None = None) -> dict[str, float]:
        """Logged metrics from the summed statistics of a step (or an evaluation epoch: no loss)."""
        loss, tokens, clipped, kl, neg_logp, n, reward, reward_sq = stats[:8]
        f = len(self.rewards)
        per_sum, per_sq = stats[8 : 8 + f], stats[8 + f :]
        n1, t1 = max(n, 1.0), max(tokens, 1.0)
        out = {"reward": reward / n1, "reward_std": _std(reward, reward_sq, n1), "completion_length": tokens / n1}
        for name, s, sq in zip(self.names, per_sum, per_sq, strict=True):
            out[f"rewards/{name}/mean"] = s / n1
            out[f"rewards/{name}/std"] = _std(s, sq, n1)
        if weight is not None:
            out.update(loss=loss / max(weight, 1e-12), clip_ratio=clipped / t1, entropy=neg_logp / t1)
            if self.config.beta > 0:
                out["kl"] = kl / t1
        return out

    # ------------------------------------------------------------------ evaluation
    def on_eval_epoch_start(self) -> None:
        self._eval_stats = None

    def eval_step(self, module: LitLM, batch: dict[str, Any]) -> None:
        """Held-out reward: ``num_generations`` sampled completions per prompt, seeded by the prompt alone (the same
        samples' noise at every evaluation, so a change is the policy's)."""
        rollouts = self.rollouts(module.network, batch, _EVAL_STEP, evaluation=True)
        r = rollouts.rewards.to(module.device)
        totals = total(rollouts.rewards, self.rewards).to(module.device)
        zero = torch.zeros((), dtype=torch.float64, device=module.device)
        stats = torch.cat([
            torch.stack([zero, rollouts.lengths.sum().to(module.device, torch.float64), zero, zero, zero,
                         torch.tensor(float(len(r)), dtype=torch.float64, device=module.device), totals.sum(),
                         (totals**2).sum()]),
            r.sum(0), (r**2).sum(0),
        ])  # fmt: skip
        self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats

    def on_eval_epoch_end(self, module: LitLM, stage: str) -> None:
        if module.trainer.sanity_checking:
            return
        size = 8 + 2 * len(self.rewards)
        local = self._eval_stats if self._eval_stats is not None else torch.zeros(size, dtype=torch.float64)
        stats = module.trainer.strategy.reduce(local.to(module.device), reduce_op="sum").tolist()
        for name, value in self.metrics(stats).items():
            module.log(f"{stage}/{name}", value, prog_bar=stage == "val" and name == "reward")
        self._eval_stats = None


def _to_device(r: Rollouts, device: torch.device | str) -> Rollouts:
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return Rollouts({k: move(v) for k, v in r.inputs.items()}, move(r.advantages), r.rewards, r.lengths,
                    move(r.old_logps), move(r.ref_logps), r.weight, r.rows, r.texts)  # fmt: skip


def _to_cpu(r: Rollouts) -> Rollouts:
    return _to_device(r, "cpu")


def _std(s: float, sq: float, n: float) -> float:
    return math.sqrt(max(sq / n - (s / n) ** 2, 0.0))


def _metric_names(rewards: list[Reward]) -> list[str]:
    """A short metric name per reward function (its name after ``:``; numbered when two share one)."""
    short = [r.name.rpartition(":")[2] or r.name for r in rewards]
    return [f"{s}_{i}" if short.count(s) > 1 else s for i, s in enumerate(short)]


def look_ahead_keeps_batches(trainer: Any) -> None:
    """Make the training look-ahead hold each step's batches (the rollouts of a step are generated at its start)."""
    strategy = trainer.strategy
    original = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = original(dataloader)
        if hasattr(dataloader, "keep_batches"):
            dataloader.keep_batches = True
        return dataloader

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]


def log_completions(module: LitLM, rollouts: list[Rollouts], names: list[str], limit: int = 8) -> None:
    """A table of sample completions (prompt, completion, reward per function) to the loggers that take tables."""
    rows = []
    for r in rollouts:
        for (prompt, completion), rewards in zip(r.texts, r.rewards.tolist(), strict=True):
            rows.append([module.trainer.global_step, prompt, completion, *rewards])
    rows = rows[:limit]
    columns = ["step", "prompt", "completion", *names]
    for logger in module.loggers:
        log_table = getattr(logger, "log_table", None)
        if callable(log_table):  # WandbLogger
            log_table(key="train/completions", columns=columns, data=rows)
        elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
            text = "\n".join("| " + " | ".join(str(c).replace("\n", "\\n") for c in row) + " |" for row in rows)
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            logger.experiment.add_text("train/completions", header + text, module.trainer.global_step)

"""Throughput and model FLOPs utilization (MFU): tokens/s, samples/s, step time, elapsed time.

MFU follows PaLM (Chowdhery et al. 2022, appendix B)::

    MFU = flops_per_token(T) * tokens_per_sec / (peak_flops_per_device * n_devices)

where ``flops_per_token(T)`` is the network's training cost per token at sequence length ``T`` (forward + backward,
``6N + 12*L*d*T`` for a decoder with ``N`` matmul weights, ``L`` layers, width ``d``), asked from
``network.flops_per_token(T)``; a network without that method falls back to ``6N``.

Why not Lightning's ``ThroughputMonitor``: it needs a ``flops_per_batch`` attribute on the module, counts samples on
rank 0 only (assuming equal batches everywhere), reports nothing until its rolling window is full, and its peak table
gives sparse figures for some GPUs (see :mod:`litune.tracking.peaks`). Here each rank counts its own real tokens and
the counts are summed across ranks at logging steps only, so the numbers are exact under DDP and DeepSpeed.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from litune.errors import ConfigError
from litune.models.flops import matmul_weights
from litune.strategies.batch import batch_replicas
from litune.tracking.peaks import device_peak_flops


def model_flops_per_token(network: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``network`` at sequence length ``seq_len``.

    Args:
        network: a litune network; its ``flops_per_token(seq_len)`` is used when it has one.
        seq_len: tokens per sequence ``T``.

    Returns:
        ``network.flops_per_token(seq_len)``, or ``6 * N`` with ``N`` the weights of its matmuls (the attention term
        ``12*L*d*T`` needs the architecture, which only the network knows).
    """
    if hasattr(network, "flops_per_token"):
        return float(network.flops_per_token(seq_len))
    return 6.0 * matmul_weights(network)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float, devices: int) -> float:
    """Model FLOPs utilization, the fraction of the devices' dense peak spent on the model's FLOPs.

    Args:
        flops_per_token: training FLOPs per token (forward + backward).
        tokens_per_sec: tokens trained per second over all devices.
        peak_flops: dense peak FLOP/s of one device.
        devices: number of devices (world size).
    """
    return flops_per_token * tokens_per_sec / (peak_flops * devices)


def batch_tokens(batch: Any) -> tuple[int, torch.Tensor | float, int]:
    """Count a batch: ``(samples, real tokens, sequence length)``.

    Real tokens are the positions where ``attention_mask`` is 1 (all positions if there is no mask): padding costs
    compute but trains nothing, so it does not count as throughput or as model FLOPs.

    Args:
        batch: a litune batch, a dict with ``input_ids [B, T]`` and optionally ``attention_mask [B, T]``.

    Returns:
        With a mask, the token count stays a 0-d tensor on the batch's device: reading it (``int()``) would make the
        host wait for the GPU on every step. Without one it is the batch's size, a host number: summed on the host,
        it costs no tensor operation a step.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    tokens = mask.sum(dtype=torch.float64) if mask is not None else float(input_ids.numel())
    return input_ids.shape[0], tokens, input_ids.shape[-1]


class ThroughputMonitor(Callback):
    """Logs ``perf/tokens_per_sec``, ``perf/samples_per_sec``, ``perf/step_time_s``, ``perf/mfu`` and
    ``perf/elapsed_s`` every ``trainer.log_every_n_steps`` optimizer steps.

    ``train/tokens_seen`` (the target tokens trained on) is the LightningModule's (:class:`litune.module.LitLM`), which
    counts every optimizer step exactly; the real tokens counted here (padding excluded, prompts included) measure
    speed.

    Rates are averaged over the steps since the previous log; time spent in validation is excluded from them.
    ``perf/mfu`` is left out (not logged as zero) when the device's peak is unknown, e.g. on CPU, unless
    ``peak_flops`` is given. Elapsed time is kept in checkpoints, so it continues on resume.

    Args:
        peak_flops: dense peak FLOP/s of one device, overriding the table in :mod:`litune.tracking.peaks`
            (for accelerators it does not list).
        prog_bar: show tokens/s in litune's progress bar (:class:`~litune.callbacks.LituneProgressBar`).
    """

    def __init__(self, peak_flops: float | None = None, prog_bar: bool = True) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ConfigError(
                "trainer.callbacks[ThroughputMonitor].init_args.peak_flops",
                f"{peak_flops} is not positive",
                "give the device's dense peak FLOP/s or null",
            )
        self.peak_flops = peak_flops
        self.prog_bar = prog_bar
        self.tokens_seen = 0
        self.samples_seen = 0
        self.elapsed_s = 0.0  # train + validation wall time of previous runs (before a resume)
        self._fpt_cache: dict[int, float] = {}
        self._reset_window()

    def _reset_window(self) -> None:
        # Since the last log: samples (host), real tokens and model FLOPs (device tensors, summed without syncing).
        self._samples = 0
        self._tokens: torch.Tensor | float = 0.0
        self._flops: torch.Tensor | float = 0.0
        self._window_steps = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._peak = self.peak_flops or device_peak_flops(trainer.strategy.root_device, str(trainer.precision))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._last_step = trainer.global_step
        self._reset_window()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(self, "_last"):  # validation inside fit: keep it out of the training rates
            self._last += time.perf_counter() - self._val_start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples, tokens, seq_len = batch_tokens(batch)
        if seq_len not in self._fpt_cache:
            self._fpt_cache[seq_len] = model_flops_per_token(_network(pl_module), seq_len)
        self._samples += samples
        self._tokens = self._tokens + tokens
        self._flops = self._flops + tokens * self._fpt_cache[seq_len]
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: the optimizer step is not done yet
        self._window_steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        if trainer.global_step % trainer.log_every_n_steps == 0:
            log_exact(pl_module, self._compute(trainer))

    def _compute(self, trainer: pl.Trainer) -> dict[str, float]:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # kernels are asynchronous: wait for them before reading the clock
        now = time.perf_counter()
        seconds = now - self._last
        # One small collective per logging step (not per batch) makes the counts exact across ranks.
        device = trainer.strategy.root_device
        counts = (self._samples, self._tokens, self._flops)
        window = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in counts])
        # The ranks of a tensor- or sequence-parallel group all count the rows they share: count each row once.
        window = window / batch_replicas(trainer)
        samples, tokens, flops = trainer.strategy.reduce(window, reduce_op="sum").tolist()
        self.tokens_seen += int(tokens)
        self.samples_seen += int(samples)
        metrics = {
            "perf/tokens_per_sec": tokens / seconds,
            "perf/samples_per_sec": samples / seconds,
            "perf/step_time_s": seconds / self._window_steps,
            "perf/elapsed_s": self.elapsed_s + now - self._start,
        }
        if self._peak:
            metrics["perf/mfu"] = flops / seconds / (self._peak * trainer.world_size)
        self._last = now
        self._reset_window()
        return metrics

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed_s += time.perf_counter() - self._start
        del self._start

    def state_dict(self) -> dict[str, Any]:
        elapsed = self.elapsed_s + (time.perf_counter() - self._start if hasattr(self, "_start") else 0.0)
        return {"tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen, "elapsed_s": elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        self.elapsed_s = float(state_dict["elapsed_s"])


def log_exact(pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
    """Log step metrics as float64: ``self.log`` would store Python floats as float32, which cannot count tokens
    exactly past 2**24 (16.7M). Not in Lightning's progress bar (see :mod:`litune.callbacks.progress`)."""
    for key, value in metrics.items():
        tensor = torch.tensor(value, dtype=torch.float64, device=pl_module.device)
        pl_module.log(key, tensor, on_step=True, on_epoch=False)


def _network(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The plain network inside the system (``LitLM.network``), or the module itself for other LightningModules."""
    return getattr(pl_module, "network", pl_module)

"""Cost of litune's tracking callbacks on the training step time, against no tracking in the same run.

    python bench/bench_tracking.py [--steps 60] [--repeats 3] [--n-embd 128] [--n-layer 4] [--device cpu]

Trains a GPT-2-architecture model (Hugging Face, random init) on random tokens with Lightning, once per setting, the
settings interleaved and repeated so that machine noise hits all of them alike:

- ``none``: no logger, no callbacks (the baseline);
- ``csv``: a CSV logger only, logging every step (what Lightning costs without litune's callbacks);
- ``tracking/50``: CSV + throughput/MFU, memory, gradient norm, learning rate, environment, plain progress lines, with
  ``log_every_n_steps=50`` (the usual setting);
- ``tracking/1``: the same, logging every step (worst case: a cross-rank reduction and a gradient norm every step).

Prints the median step time of each setting (steps after the first 10 only) and its ratio to ``none``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from transformers import GPT2Config, GPT2LMHeadModel

from litune.callbacks import EnvironmentLogger, GradNormMonitor, LituneProgressBar, MemoryMonitor, ThroughputMonitor

WARMUP = 10


class Network(torch.nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel(config)

    def flops_per_token(self, seq_len: int) -> float:
        cfg = self.model.config
        return 6 * self.model.num_parameters(exclude_embeddings=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss


class System(pl.LightningModule):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.network = Network(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.network(**batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)}


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run(setting: str, args: argparse.Namespace, data: list[dict[str, torch.Tensor]]) -> float:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_positions=args.seq, vocab_size=4096)
    timer = StepTimes()
    callbacks: list[pl.Callback] = [timer]
    every = 50
    if setting.startswith("tracking"):
        every = int(setting.split("/")[1])
        callbacks += [
            ThroughputMonitor(),
            MemoryMonitor(),
            GradNormMonitor(),
            EnvironmentLogger(),
            LearningRateMonitor(logging_interval="step"),
            LituneProgressBar(plain=True, every_n_steps=every),
        ]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            max_steps=args.steps,
            log_every_n_steps=1 if setting == "csv" else every,
            logger=CSVLogger(tmp, name="", version="") if setting != "none" else False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=setting.startswith("tracking"),
            default_root_dir=tmp,
        )
        trainer.fit(System(config), torch.utils.data.DataLoader(data, batch_size=None))
    steps = [b - a for a, b in zip(timer.times[WARMUP:], timer.times[WARMUP + 1 :], strict=False)]
    return statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 4096, (args.batch, args.seq), generator=gen),
         "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
        for _ in range(args.steps)
    ]  # fmt: skip
    settings = ["none", "csv", "tracking/50", "tracking/1"]
    times: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for setting in settings:
            times[setting].append(run(setting, args, data))
    base = statistics.median(times["none"])
    print(f"median step time over {args.repeats} runs x {args.steps - WARMUP - 1} steps, {args.device}:")
    for setting in settings:
        t = statistics.median(times[setting])
        print(f"  {setting:<12} {1000 * t:8.2f} ms   x{t / base:.3f} vs none")


if __name__ == "__main__":
    main()

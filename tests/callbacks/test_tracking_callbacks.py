"""Tracking callbacks on a real (tiny) Lightning training: throughput, MFU, memory, gradient norm, progress lines,
plus the peak-FLOPs table, the MFU formula against a hand computation, and secret scrubbing."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from litune.callbacks import GradNormMonitor, LituneProgressBar, MemoryMonitor, ThroughputMonitor
from litune.callbacks.throughput import mfu, model_flops_per_token
from litune.errors import ConfigError
from litune.tracking.peaks import chip_of, compute_dtype, peak_flops
from litune.tracking.secrets import REDACTED, is_secret_name, scrub

VOCAB, SEQ, BATCH = 50, 16, 4


class TinyNet(nn.Module):
    """Embedding + linear head; ``flops_per_token`` follows the PaLM formula with L=1, d=8."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def flops_per_token(self, seq_len: int) -> float:
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * 1 * 8 * seq_len

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.emb(input_ids))


class TinySystem(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = TinyNet()
        self.grad_norms: dict[int, float] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.network(**batch)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["input_ids"].reshape(-1))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # An independent reference for GradNormMonitor: the norm that clip_grad_norm_ would see.
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.grad_norms[self.global_step + 1] = float(torch.stack(norms).norm())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Seeded batches whose real-token counts differ (right padding of varying length)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[:, SEQ - (i % 5) :] = 0
        out.append({"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), "attention_mask": mask})
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{optimizer steps done: value}``: Lightning writes the row of the k-th step with ``step = k - 1``."""
    return {int(r["step"]) + 1: float(r[key]) for r in rows if r.get(key)}


def train(tmp_path: Path, callbacks: list[pl.Callback], steps: int = 6, accumulate: int = 1, **trainer_kwargs) -> Path:
    torch.manual_seed(0)
    data = batches(steps * accumulate)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=2,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    system = TinySystem()
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return tmp_path / "metrics.csv"


def test_throughput_tokens_mfu_and_memory_are_logged_and_consistent(tmp_path) -> None:
    peak = 1.0e9  # a made-up device peak: CPUs have none in the table, so MFU is only computed when one is given
    metrics = train(tmp_path, [ThroughputMonitor(peak_flops=peak), MemoryMonitor()], enable_progress_bar=False)
    rows = read_csv(metrics)
    real_tokens = [int(b["attention_mask"].sum()) for b in batches(6)]
    tps, mfus, sps = column(rows, "perf/tokens_per_sec"), column(rows, "perf/mfu"), column(rows, "perf/samples_per_sec")
    assert set(tps) == set(mfus) == {2, 4, 6}
    fpt = TinyNet().flops_per_token(SEQ)
    for step in tps:
        assert tps[step] > 0
        assert mfus[step] == pytest.approx(fpt * tps[step] / peak, rel=1e-9)
        # both rates come from the same interval: tokens/samples ratio is the batches' real tokens per sequence
        window = real_tokens[step - 2 : step]
        assert tps[step] / sps[step] == pytest.approx(sum(window) / (2 * BATCH), rel=1e-9)
    step_time = column(rows, "perf/step_time_s")
    elapsed = column(rows, "perf/elapsed_s")
    assert all(v > 0 for v in step_time.values()) and elapsed[6] > elapsed[4] > elapsed[2] > 0
    peak_gib = column(rows, "memory/peak_gib")
    rss_gib = psutil.Process().memory_info().rss / 1024**3
    assert 0.05 < peak_gib[6] <= rss_gib * 1.5 and peak_gib[6] >= peak_gib[2]


def test_mfu_is_omitted_not_zero_when_the_peak_is_unknown(tmp_path) -> None:
    rows = read_csv(train(tmp_path, [ThroughputMonitor()], steps=2, enable_progress_bar=False))
    assert "perf/mfu" not in rows[0] and column(rows, "perf/tokens_per_sec")[2] > 0


def test_gradient_accumulation_counts_optimizer_steps_and_all_micro_batches(tmp_path) -> None:
    rows = read_csv(train(tmp_path, [ThroughputMonitor()], steps=4, accumulate=2, enable_progress_bar=False))
    real = [int(b["attention_mask"].sum()) for b in batches(8)]
    tps, sps = column(rows, "perf/tokens_per_sec"), column(rows, "perf/samples_per_sec")
    assert set(tps) == {2, 4}  # optimizer steps, not micro-batches
    for step in tps:  # the rates cover all 4 micro-batches of the 2 optimizer steps since the previous log
        window = real[2 * (step - 2) : 2 * step]
        assert tps[step] / sps[step] == pytest.approx(sum(window) / (4 * BATCH), rel=1e-9)


def test_grad_norm_matches_the_norm_of_the_gradients(tmp_path) -> None:
    monitor = GradNormMonitor()
    system_norms: dict[int, float] = {}

    class Spy(pl.Callback):
        def on_fit_end(self, trainer, pl_module) -> None:
            system_norms.update(pl_module.grad_norms)

    rows = read_csv(train(tmp_path, [monitor, Spy()], enable_progress_bar=False))
    logged = column(rows, "train/grad_norm")
    assert set(logged) == {2, 4, 6}
    for step, value in logged.items():
        assert value == pytest.approx(system_norms[step], rel=1e-5)


def test_plain_progress_lines_when_stdout_is_not_a_terminal(tmp_path, capsys) -> None:
    train(tmp_path, [ThroughputMonitor(), LituneProgressBar(every_n_steps=3)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 3/6", "step 6/6"]
    pattern = r"train/loss \S+ \| perf/tokens_per_sec \S+ \| elapsed .* \| eta \d+:\d\d:\d\d$"
    assert all(re.search(pattern, line) for line in lines)
    assert "\r" not in capsys.readouterr().out


def test_mfu_formula_matches_a_hand_computation() -> None:
    # GPT-2 small (85M non-embedding parameters, L=12, d=768) at T=1024 on 8 A100s in bf16 at 100k tokens/s:
    # flops/token = 6*85e6 + 12*12*768*1024 = 510,000,000 + 113,246,208 = 623,246,208
    # MFU = 623,246,208 * 1e5 / (312e12 * 8) = 6.23246208e13 / 2.496e15 = 0.024969800
    fpt = 6 * 85e6 + 12 * 12 * 768 * 1024
    assert fpt == 623_246_208
    a100 = peak_flops("NVIDIA A100-SXM4-80GB", compute_dtype("bf16-mixed", tf32_matmuls=False))
    assert mfu(fpt, 1e5, a100, 8) == pytest.approx(0.0249698, abs=1e-7)


def test_flops_per_token_falls_back_to_6n() -> None:
    net = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 5))  # matmul weights 200 + 100
    assert model_flops_per_token(net, seq_len=128) == 6 * 300  # biases and the norm are no matmul
    assert model_flops_per_token(TinyNet(), seq_len=4) == TinyNet().flops_per_token(4)


@pytest.mark.parametrize(
    ("name", "chip"),
    [
        ("NVIDIA H100 80GB HBM3", "h100 sxm"),
        ("NVIDIA H100 PCIe", "h100 pcie"),
        ("NVIDIA H100 NVL", "h100 nvl"),
        ("NVIDIA H200", "h200 sxm"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("Tesla V100-SXM2-16GB", "v100 sxm"),
        ("Tesla V100-PCIE-32GB", "v100 pcie"),
        ("NVIDIA GeForce RTX 4090", "rtx 4090"),
        ("Tesla T4", "t4"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_device_names_map_to_table_entries(name, chip) -> None:
    assert chip_of(name) == chip


def test_peak_table_uses_dense_figures_and_knows_missing_dtypes() -> None:
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12  # dense; 1979 TFLOPS is the 2:4-sparse figure
    assert peak_flops("NVIDIA H100 80GB HBM3", compute_dtype("32-true", tf32_matmuls=True)) == 494.7e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", compute_dtype("32-true", tf32_matmuls=False)) == 19.5e12
    assert peak_flops("Tesla T4", "bf16") is None  # Turing has no bf16
    assert peak_flops("NVIDIA L4", compute_dtype("16-mixed", False)) == 121e12
    assert compute_dtype("64-true", False) is None


def test_bad_peak_flops_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="peak_flops"):
        ThroughputMonitor(peak_flops=0)


def test_secret_names_and_values_are_scrubbed(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "fake-wandb-key-0123456789")
    monkeypatch.setenv("HF_TOKEN", "hf_fakefakefake")
    config = {
        "logger": {"api_key": "sk-live-abcdef", "project": "p"},
        "model": {"tokenizer": "gpt2", "pad_token_id": 0, "eos_token": "<|endoftext|>", "hubToken": "t-123456"},
        "db_password": "hunter22",
        "notes": ["url https://x/?key=fake-wandb-key-0123456789", "hf_fakefakefake"],
        "max_tokens": 512,
    }
    clean = scrub(config)
    assert clean["logger"] == {"api_key": REDACTED, "project": "p"}
    kept = {"tokenizer": "gpt2", "pad_token_id": 0, "eos_token": "<|endoftext|>"}
    assert clean["model"] == {**kept, "hubToken": REDACTED}
    assert clean["db_password"] == REDACTED and clean["max_tokens"] == 512
    assert clean["notes"] == [f"url https://x/?key={REDACTED}", REDACTED]
    argv = ["fit", "--trainer.logger.init_args.api_key=sk-123", "--hf_token", "hf_abc", "--lr", "0.1", "--x=1"]
    assert scrub(argv) == ["fit", f"--trainer.logger.init_args.api_key={REDACTED}", "--hf_token", REDACTED, "--lr",
                           "0.1", "--x=1"]  # fmt: skip
    assert scrub("https://h/?api_key=abc&page=2") == f"https://h/?api_key={REDACTED}&page=2"
    assert not is_secret_name("tokenizer") and is_secret_name("WANDB_API_KEY") and is_secret_name("client_secret")
    assert math.isclose(scrub({"lr": 0.1})["lr"], 0.1)


def test_resident_set_reads_what_psutil_reads_and_follows_an_allocation() -> None:
    from litune.callbacks.memory import ResidentSet

    rss = ResidentSet()
    before = rss.bytes()
    assert abs(before - psutil.Process().memory_info().rss) < 8 * 2**20
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert rss.bytes() - before > 60 * 2**20
    del block
    rss.close()
    assert abs(rss.bytes() - psutil.Process().memory_info().rss) < 8 * 2**20  # reopens after close


def test_a_copied_resident_set_reads_through_its_own_file() -> None:
    import copy

    from litune.callbacks.memory import ResidentSet

    rss = ResidentSet()
    rss.bytes()
    twin = copy.deepcopy(rss)
    rss.close()  # the original's file: the copy must not have shared it
    assert abs(twin.bytes() - psutil.Process().memory_info().rss) < 8 * 2**20
    twin.close()

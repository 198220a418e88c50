"""Slow GRPO runs: 2 real processes (DDP) train what 1 process trains; SIGKILL and resume continue the same rollouts.

``litune fit --config configs/grpo.yaml`` with a tiny dropout-free ``DecoderLM`` on 16 prompts, ``token``
normalization (the step's divisor is only known once all of its completions exist, on every rank), SGD + momentum.
Each prompt's completions are sampled with a generator seeded by ``(seed, step, row)``, so 2 processes at
micro-batch 1 x accumulation 2 generate the same rollouts as 1 process at micro-batch 4 and, the divisor being
all-reduced, take the same step. ``tests/rl/test_rl_objective.py`` shows the same for accumulation on one process and
that the update is the hand-written REINFORCE one.

The resume test trains with ``num_iterations=2`` (each batch of rollouts makes 2 optimizer steps), kills the run with
SIGKILL at the end of step 5, resumes it with ``--ckpt_path last`` from the step-3 checkpoint (taken between the 2
steps of one batch of rollouts: the checkpoint holds them) and compares every micro-batch's loss (the same rollouts
give the same losses) and the final weights with an uninterrupted run; steps 5-6 are generated after the resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from litune.cli import main
from litune_testing import REPO, run_litune
from resume_testing import killed_run_resumes_like_the_whole_run

TOLERANCE = 1e-5
WORDS = ["def", "class", "return", "import", "for", "while", "with", "yield", "lambda", "try"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 5))} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_args(root: Path, prompts: Path, tokenizer_dir: Path, micro: int, *extra: str, callbacks=(), steps=3) -> list:
    callbacks = [{"class_path": "litune_testing.StepRecorder", "init_args": {"directory": str(root / "record")}},
                 *callbacks]  # fmt: skip
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}}
    network = {"vocab_size": 512, "max_seq_len": 64, "d_model": 16, "nhead": 2, "num_decoder_layers": 1, "dropout": 0.0}
    return [
        "--config", str(REPO / "configs" / "grpo.yaml"),
        f"--model.tokenizer={tokenizer_dir}",
        f"--model.network.init_args={json.dumps(network)}",
        f"--model.optimizer={json.dumps(optimizer)}",
        "--model.rl.normalization=token", "--model.rl.num_generations=4", "--model.rl.max_completion_length=6",
        "--model.rl.rewards=[{function: 'litune.rl.rewards:char_fraction', kwargs: {chars: aeiou}}]",
        "--model.lr_schedule.warmup_steps=0",
        f"--data.init_args.path={prompts}", "--data.init_args.val_fraction=0",
        f"--data.init_args.cache_dir={root / 'cache'}",
        f"--data.init_args.batch_size={micro}", "--global_batch_size=4",
        f"--runs_dir={root / 'runs'}", "--validate_before_fit=false",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        "--trainer.gradient_clip_val=null",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prompts, tokenizer_dir) -> dict:
    root = tmp_path_factory.mktemp("one-process")
    try:
        assert main(["fit", *grpo_args(root, prompts, tokenizer_dir, 4)]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)
    return torch.load(root / "record" / "record.pt")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_processes_train_what_one_process_trains(strategy, tmp_path, prompts, tokenizer_dir, one_process) -> None:
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    run_litune("fit", *grpo_args(tmp_path, prompts, tokenizer_dir, 1, "--config", fragment, "--trainer.devices=2"),
               timeout=900)  # fmt: skip
    got = torch.load(tmp_path / "record" / "record.pt")
    assert got["world_size"] == 2
    moved = max((one_process["params"][k]).abs().max().item() for k in one_process["params"])
    diff = max((got["params"][k] - one_process["params"][k]).abs().max().item() for k in one_process["params"])
    print(f"\n{strategy}: 2 processes x micro 1 x accumulation 2 vs 1 process micro 4: max parameter diff {diff:.3g}")
    assert moved > 0 and diff < TOLERANCE
    for step, metrics in one_process["steps"].items():
        # At ratio 1 the loss is the mean advantage: 0 up to float noise, so compared absolutely.
        assert got["steps"][step]["train/loss"] == pytest.approx(metrics["train/loss"], abs=1e-6)
        assert got["steps"][step]["train/tokens_seen"] == metrics["train/tokens_seen"]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_rollouts(tmp_path, prompts, tokenizer_dir) -> None:
    """6 steps, micro-batch 2 x accumulation 2, 2 iterations, a checkpoint every 3 steps; SIGKILL at the end of
    step 5."""

    def args(root: Path, callbacks: list[dict]) -> list[str]:
        return grpo_args(root, prompts, tokenizer_dir, 2, "--checkpoint.every_n_train_steps=3",
                         "--model.rl.num_iterations=2", callbacks=callbacks, steps=6)  # fmt: skip

    want = killed_run_resumes_like_the_whole_run(tmp_path, args, kill_step=5)
    assert len(want) == 12
    assert len({round(v, 9) for v in want.values()}) > 1, "the micro-batch losses differ (real rollouts)"

"""Slow preference runs: 2 real processes (DDP, ZeRO-2, ZeRO-3, FSDP2) train what 1 process trains; SIGKILL, resume.

``litune fit --config configs/dpo.yaml`` with the tiny dropout-free GPT-2 and RPO (DPO plus the token-weighted NLL
term, so both of the step's counts matter) on standard-library pairs of uneven lengths: 3 optimizer steps of 4 pairs,
SGD + momentum. One process at micro-batch 4 against 2 processes at micro-batch 1 x accumulation 2: parameters within
1e-5 and the same logged losses. Under ZeRO-3 and FSDP2 the frozen reference copy is sharded like the policy; a run
whose reference is the live policy fails the comparison. ``tests/preference/test_preference.py`` shows the same for
accumulation on one process and that the mean of means would fail it.

The resume test kills a real run with SIGKILL at the end of step 5 (after the step-4 checkpoint), resumes it with
``--ckpt_path last`` and compares every micro-batch's loss and the final weights with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from litune.cli import main
from litune_testing import NETWORK, REPO, run_litune
from resume_testing import killed_run_resumes_like_the_whole_run

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from litune.preference.stdlib_pairs import stdlib_pairs

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stdlib_pairs(16)))
    return path


def dpo_args(root: Path, pairs: Path, tokenizer_dir: Path, micro: int, *extra: str, callbacks=(), steps=3) -> list:
    callbacks = [{"class_path": "litune_testing.StepRecorder", "init_args": {"directory": str(root / "record")}},
                 *callbacks]  # fmt: skip
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.2, "momentum": 0.9}}
    return [
        "--config", str(REPO / "configs" / "dpo.yaml"),
        f"--model.tokenizer={tokenizer_dir}",
        f"--model.network.init_args.config={json.dumps({**NETWORK, 'n_positions': 128})}",
        f"--model.optimizer={json.dumps(optimizer)}",
        "--model.preference.beta=0.5", "--model.preference.nll_weight=1.0", "--model.preference.logps_chunk_size=64",
        "--model.lr_schedule.warmup_steps=0",
        f"--data.init_args.path={pairs}", "--data.init_args.val_fraction=0", "--data.init_args.max_length=96",
        "--data.init_args.max_prompt_length=48", f"--data.init_args.batch_size={micro}", "--global_batch_size=4",
        f"--runs_dir={root / 'runs'}", "--validate_before_fit=false",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pairs, tokenizer_dir) -> dict:
    root = tmp_path_factory.mktemp("one-process")
    try:
        assert main(["fit", *dpo_args(root, pairs, tokenizer_dir, 4)]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)
    return torch.load(root / "record" / "record.pt")


def assert_checkpoint_holds_the_policy_only(last: Path, strategy: str) -> None:
    """The sharded reference is in no checkpoint: ZeRO-3's folder holds the policy engine's files only (no second
    engine's), and every saved module key (DeepSpeed's module states, FSDP2's DCP entries) is the policy's."""
    if strategy == "deepspeed_zero3":
        files = sorted(p.name for p in (last / "checkpoint").iterdir())
        assert files == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
        keys = torch.load(last / "checkpoint" / files[0], weights_only=False, map_location="cpu")["module"].keys()
    else:
        from torch.distributed.checkpoint import FileSystemReader

        keys = [
            k for k in FileSystemReader(str(last)).read_metadata().state_dict_metadata if k.startswith("state_dict.")
        ]
        keys = [k.removeprefix("state_dict.") for k in keys]
    assert keys and all(k.startswith("network.") for k in keys), sorted(keys)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_two_processes_train_what_one_process_trains(strategy, tmp_path, pairs, tokenizer_dir, one_process) -> None:
    """Under ZeRO-3 and FSDP2 the frozen reference copy is sharded like the policy (litune.preference.reference
    .shard_reference); ``test_a_live_reference_fails_the_comparison`` shows a wrong reference fails this check."""
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    shards = [{"class_path": "litune_testing.ReferenceShards", "init_args": {"directory": str(tmp_path / "ref")}}]
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default (all of this tiny model's): none here.
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True}  # fmt: skip
    whole = [f"--trainer.strategy.init_args.config={json.dumps(zero3)}"] if strategy == "deepspeed_zero3" else []
    args = dpo_args(tmp_path, pairs, tokenizer_dir, 1, "--config", fragment, "--trainer.devices=2", *whole,
                    callbacks=shards)  # fmt: skip
    run_litune("fit", *args, timeout=900)
    reports = [json.loads((tmp_path / "ref" / f"reference-rank{r}.json").read_text()) for r in (0, 1)]
    sharded = strategy in ("deepspeed_zero3", "fsdp2")  # each rank holds about half of the frozen copy
    assert all(r["held"] < 0.6 * r["total"] if sharded else r["held"] == r["total"] for r in reports), reports
    assert not any(r["grads"] for r in reports)
    if sharded:
        assert_checkpoint_holds_the_policy_only(next((tmp_path / "runs").glob("*/checkpoints/last.ckpt")), strategy)
    got = torch.load(tmp_path / "record" / "record.pt")
    assert got["world_size"] == 2
    diff = max((got["params"][k] - one_process["params"][k]).abs().max().item() for k in one_process["params"])
    print(f"\n{strategy}: 2 processes x micro 1 x accumulation 2 vs 1 process micro 4: max parameter diff {diff:.3g}")
    assert diff < TOLERANCE
    for step, metrics in one_process["steps"].items():
        assert got["steps"][step]["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-5)
        assert got["steps"][step]["train/tokens_seen"] == metrics["train/tokens_seen"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("strategy", "fragment"),
    [
        ("fsdp2", "preference/simpo.yaml"),
        ("deepspeed_zero3", "peft/lora.yaml"),
        ("fsdp2", "preference/precomputed.yaml"),
    ],
)
def test_sharded_runs_without_a_copy_train_what_one_process_trains(
    strategy, fragment, tmp_path, pairs, tokenizer_dir, one_process
) -> None:
    """No frozen copy during training: SimPO (reference-free) under FSDP2, whose policy log-probs run inside FSDP2's
    root hooks; DPO with adapters as the reference (the partitioned base with its adapters disabled) under ZeRO-3;
    DPO with precomputed reference log-probs under FSDP2 (the whole copy's one pass before the policy is sharded)."""
    config = ("--config", str(REPO / "configs" / fragment))
    strategy_config = ("--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml"), "--trainer.devices=2")
    run_litune("fit", *dpo_args(tmp_path / "two", pairs, tokenizer_dir, 1, *config, *strategy_config), timeout=900)
    got = torch.load(tmp_path / "two" / "record" / "record.pt")
    if fragment == "preference/precomputed.yaml":  # equals the live copy: the 1-process copy run (no cached logps)
        want = one_process
    else:
        try:
            assert main(["fit", *dpo_args(tmp_path / "one", pairs, tokenizer_dir, 4, *config)]) == 0
        finally:
            os.environ.pop("LITUNE_RUN_DIR", None)
        want = torch.load(tmp_path / "one" / "record" / "record.pt")
    diff = max((got["params"][k] - want["params"][k]).abs().max().item() for k in want["params"])
    print(f"\n{fragment} under {strategy}: 2 processes vs 1 process: max parameter diff {diff:.3g}")
    assert got["world_size"] == 2 and diff < TOLERANCE
    lora_b = [v for k, v in got["params"].items() if "lora_B" in k]  # zero at the start: the adapters did train
    assert strategy != "deepspeed_zero3" or (lora_b and max(v.abs().max().item() for v in lora_b) > 1e-3)


@pytest.mark.slow
def test_a_live_reference_fails_the_comparison(tmp_path, pairs, tokenizer_dir, one_process) -> None:
    """Teeth of the equivalences above (ZeRO-3 and FSDP2 above all, whose reference is a sharded module): the same
    1-process run with the live policy as its reference instead of the frozen copy ends far outside the tolerance."""
    live = {"class_path": "litune_testing.LiveReference"}
    try:
        assert main(["fit", *dpo_args(tmp_path, pairs, tokenizer_dir, 4, callbacks=[live])]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)
    got = torch.load(tmp_path / "record" / "record.pt")
    diff = max((got["params"][k] - one_process["params"][k]).abs().max().item() for k in one_process["params"])
    print(f"\nlive policy as reference vs frozen copy: max parameter diff {diff:.3g}")
    assert diff > 10 * TOLERANCE


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(tmp_path, pairs, tokenizer_dir) -> None:
    """6 steps, micro-batch 2 x accumulation 2, a checkpoint every 2 steps; killed (SIGKILL) at the end of step 5."""

    def args(root: Path, callbacks: list[dict]) -> list[str]:
        return dpo_args(root, pairs, tokenizer_dir, 2, "--checkpoint.every_n_train_steps=2", callbacks=callbacks,
                        steps=6)  # fmt: skip

    assert len(killed_run_resumes_like_the_whole_run(tmp_path, args, kill_step=5)) == 12

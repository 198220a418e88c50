"""Every strategy for real on CPU: 2-process DDP and DeepSpeed ZeRO-1/2/3 (+ offload) through ``litune fit``.

Each 2-process run trains the tiny GPT-2 with the same global batch as the 1-process reference run (micro-batch 4 x 2
processes vs. micro-batch 4 x 2 accumulation steps, the same rows per step: the sampler shards one epoch order). In
fp32 without dropout both are the same optimization, so after N steps the models must compute the same logits. The
runs then resume from ``last`` (compared with the reference resumed the same way), and export to a Hugging Face folder
whose logits must match the live model's. Each rank also reports the model-state bytes it holds, checked against
``litune estimate``'s accounting. The 2-process runs recompute activations (gradient checkpointing), the reference
does not. Each strategy's first leg runs once and is shared by the tests below.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from litune.errors import ConfigError
from litune.memory_model import ModelShape, RunShape, estimate
from litune.strategies import accumulation_steps, checks
from litune.strategies.checks import cpu_cores
from litune.strategies.descriptor import Kind, StrategySpec, describe
from litune_testing import (
    FIRST,
    LITUNE,
    REPO,
    SECOND,
    TINY,
    assert_matches,
    assert_mfu,
    fit_args,
    litune_env,
    probe,
    probe_input_ids,
    run_litune,
    the_run,
)


def fragment_specs() -> dict[str, StrategySpec]:
    """What each ``configs/strategy/*.yaml`` fragment sets ``trainer.strategy`` to, by the one descriptor."""
    fragments = sorted((REPO / "configs" / "strategy").glob("*.yaml"))
    return {f.stem: describe(yaml.safe_load(f.read_text())["trainer"]["strategy"]) for f in fragments}


SPECS = fragment_specs()
# This file runs DDP and DeepSpeed (FSDP2 has tests/strategies/test_fsdp2.py); offloading ones train only briefly.
RUN_HERE = {name: spec for name, spec in SPECS.items() if spec.kind in (Kind.DDP, Kind.ZERO)}
STRATEGIES = [name for name, spec in RUN_HERE.items() if not spec.offload_optimizer]
OFFLOAD = [name for name, spec in RUN_HERE.items() if spec.offload_optimizer]
SHAPES = {name: spec.memory_shape() for name, spec in RUN_HERE.items()}


def strategy_args(strategy: str) -> tuple[str, ...]:
    # Gradient checkpointing on in every 2-process run, off in the reference: recomputation must not change the math.
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    return ("--config", fragment, "--trainer.devices=2", "--model.network.init_args.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def first_leg(tmp_path_factory, corpus_dir, tokenizer_dir):
    """``first_leg(strategy)``: the 2-process run of ``FIRST`` steps with that strategy fragment, run once."""
    done: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in done:
            root = tmp_path_factory.mktemp(strategy)
            run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *strategy_args(strategy)))
            done[strategy] = root
        return done[strategy]

    return run


def check_model_state(root: Path, strategy: str) -> None:
    """Each rank's measured parameter / master / optimizer bytes against the estimator's accounting for 32-true."""
    reports = [json.loads(p.read_text()) for p in sorted((the_run(root) / "model_state").glob("rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    psi = reports[0]["num_params"]
    model = ModelShape(num_params=psi, n_layer=2, hidden=32, n_head=2, vocab_size=512)
    predicted = estimate(model, RunShape(seq_len=32, micro_batch=4, precision="32-true", devices=2), SHAPES[strategy])
    shape = SHAPES[strategy]
    # Offloaded state is the same tensors in host memory: compare the measurement with device + host.
    want_params = predicted.params + (psi * 4 / 2 if shape.offload_params else 0)
    want_optimizer = predicted.optimizer + (12 * psi / 2 if shape.offload_optimizer else 0)
    for r in reports:
        assert r["stage"] == shape.stage
        # DeepSpeed pads each partition to an alignment boundary: a few hundred bytes on ~44k parameters.
        assert r["params"] == pytest.approx(want_params, rel=0.01)
        assert r["master"] + r["optimizer"] == pytest.approx(want_optimizer, rel=0.01)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one_process_and_the_memory_accounting(strategy, first_leg, reference) -> None:
    root = first_leg(strategy)
    assert_matches(root, reference, FIRST)
    assert probe(root, FIRST)["gradient_checkpointing"] and not probe(reference, FIRST)["gradient_checkpointing"]
    check_model_state(root, strategy)
    # MFU counts the whole model on every strategy (ZeRO-3's partitioned parameters report numel() == 0).
    assert_mfu(root)
    # The comparison has teeth: two optimizer steps move the logits far beyond its tolerance.
    assert (probe(reference, FIRST)["logits"] - probe(reference, 1)["logits"]).abs().max() > 1e-2


@pytest.mark.distributed
def test_the_same_zero_config_on_one_process_matches(tmp_path, reference, corpus_dir, tokenizer_dir) -> None:
    """ZeRO-2 on a single CPU process: DeepSpeed accumulates 2 micro-batches itself (global batch 8 = 4 x 1 x 2)."""
    fragment = str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, "--config", fragment, "--trainer.devices=1"))
    assert_matches(tmp_path, reference, FIRST, world_size=1)


def resume_then_export(root: Path, strategy: str, corpus_dir: Path, tokenizer_dir: Path, reference: Path) -> None:
    """Continue ``root``'s run from ``last`` to ``SECOND`` steps, match the reference, export, match the HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from litune.commands.export import export

    run_litune(
        "fit", *fit_args(root, corpus_dir, tokenizer_dir, *strategy_args(strategy), "--ckpt_path=last", steps=SECOND)
    )
    run = the_run(root)  # the resumed run continued in the same run folder
    # Weights, optimizer state and data position restored like the 1-process run's own resume.
    assert_matches(root, reference, SECOND)

    folder = export(run, root / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    with torch.no_grad():
        logits = model(probe_input_ids(model.config.vocab_size)).logits
    torch.testing.assert_close(logits, probe(root, SECOND)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=() if s == "deepspeed_zero3" else pytest.mark.slow) for s in STRATEGIES]
)
def test_resume_and_export_match_the_trained_model(
    strategy, first_leg, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    resume_then_export(first_leg(strategy), strategy, corpus_dir, tokenizer_dir, resumed_reference)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", OFFLOAD)
def test_offload_trains_resumes_and_exports(strategy, first_leg, resumed_reference, corpus_dir, tokenizer_dir) -> None:
    """ZeRO-Offload on CPU: the optimizer step runs in DeepSpeed's CPU Adam (compiled by DeepSpeed's op builder)."""
    root = first_leg(strategy)
    assert_matches(root, resumed_reference, FIRST)
    assert probe(root, FIRST)["optimizer"] == "DeepSpeedCPUAdam"  # offloaded: the fused torch AdamW is replaced
    check_model_state(root, strategy)
    resume_then_export(root, strategy, corpus_dir, tokenizer_dir, resumed_reference)


@pytest.mark.distributed
def test_resuming_zero_shards_on_another_world_size_says_how(first_leg, corpus_dir, tokenizer_dir) -> None:
    """A ZeRO-3 checkpoint of 2 ranks resumed on 1: a clear error (exit 2) instead of DeepSpeed's deep failure."""
    root = first_leg("deepspeed_zero3")
    fragment = str(REPO / "configs" / "strategy" / "deepspeed_zero3.yaml")
    args = fit_args(root, corpus_dir, tokenizer_dir, "--config", fragment, "--trainer.devices=1", "--ckpt_path=last")
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saved by 2 processes but this run has 1" in proc.stderr and "litune export" in proc.stderr


@pytest.mark.distributed
def test_resuming_ddp_on_another_world_size_says_how(first_leg, corpus_dir, tokenizer_dir) -> None:
    """A DDP checkpoint of 2 ranks resumed on 1: refused with the fix (exit 2). Lightning counts micro-batches per
    process, so the first resumed step would end its accumulation window early; only FSDP2 restates the count."""
    root = first_leg("ddp")
    extra = (*strategy_args("ddp")[:2], "--trainer.devices=1", "--ckpt_path=last")
    args = fit_args(root, corpus_dir, tokenizer_dir, *extra)
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saved by 2 processes but this run has 1" in proc.stderr and "fsdp2" in proc.stderr


@pytest.fixture
def build_trainer(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path):
    """Build model, data module and Trainer as `litune fit` does, without fitting (nothing is spawned)."""
    from litune.commands.fit import LituneCLI

    def build(*extra: str):
        args = ["--config", str(TINY), f"--model.tokenizer={tokenizer_dir}", f"--runs_dir={tmp_path}"]
        args += [f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", *extra]
        return LituneCLI(args=args, run=False).trainer

    return build


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_fp16_on_cpu_fails_before_spawning(strategy, build_trainer) -> None:
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    precision = str(REPO / "configs" / "precision" / "16-mixed.yaml")
    with pytest.raises(ConfigError, match="trainer.precision.*bf16-mixed"):
        build_trainer("--config", fragment, "--config", precision, "--trainer.devices=2")


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3"])
def test_more_cpu_processes_than_cores_fails_before_spawning(strategy, build_trainer) -> None:
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    too_many = cpu_cores() + 2
    with pytest.raises(ConfigError, match=f"trainer.devices: devices={too_many} CPU processes"):
        build_trainer("--config", fragment, f"--trainer.devices={too_many}")


def test_deepspeed_missing_names_the_fix(build_trainer, monkeypatch) -> None:
    """DeepSpeed is installed here, so its absence is simulated: the package lookup litune does answers 'not found'."""
    real_find_spec = checks.importlib.util.find_spec
    monkeypatch.setattr(
        checks.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    fragment = str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        build_trainer("--config", fragment)


def test_global_batch_size_sets_accumulation_from_the_world_size(build_trainer) -> None:
    fragment = str(REPO / "configs" / "strategy" / "ddp.yaml")
    trainer = build_trainer("--config", fragment, "--trainer.devices=2", "--global_batch_size=16")
    assert trainer.accumulate_grad_batches == 2  # 16 = micro-batch 4 x 2 processes x 2
    assert accumulation_steps(64, 4, 16) == 1
    with pytest.raises(ConfigError, match="multiple of 8 .e.g. 8, 16"):
        build_trainer("--config", fragment, "--trainer.devices=2", "--global_batch_size=12")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_loads_a_pretrained_model_into_shards(tmp_path, corpus_dir, tiny_gpt2_dir) -> None:
    """`litune fit` with DeferredHFCausalLM under ZeRO-3 on 2 ranks: the weights are born partitioned (no rank holds
    the whole model) and are the checkpoint's (same loss on the probe batch before any step as the HF model); the run
    then exports back to a Hugging Face folder.

    Without litune's ZeRO-3 context for transformers, from_pretrained inside deepspeed.zero.Init fails with a size
    mismatch (it copies full tensors into empty shards).
    """
    from transformers import AutoModelForCausalLM

    from litune.commands.export import export

    fragment = str(REPO / "configs" / "strategy" / "deepspeed_zero3.yaml")
    args = fit_args(tmp_path, corpus_dir, tiny_gpt2_dir, "--config", fragment, "--trainer.devices=2", steps=1)
    args += [
        "--model.network.class_path=litune_testing.ProbedDeferredHFCausalLM",
        f"--model.network.init_args.pretrained={tiny_gpt2_dir}",
        "--model.network.init_args.config=null",
    ]
    callbacks = [
        {
            "class_path": "litune_testing.FinalLogits",
            "init_args": {"directory": str(tmp_path / "probe"), "steps": [0, 1]},
        }
    ]
    run_litune("fit", *args, f"--trainer.callbacks={json.dumps(callbacks)}")
    at_start = probe(tmp_path, 0)
    assert at_start["built_partitioned"] is True
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        logits = pretrained(probe_input_ids(pretrained.config.vocab_size)).logits
    torch.testing.assert_close(at_start["logits"], logits, atol=1e-5, rtol=1e-5)
    folder = export(the_run(tmp_path), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = exported(probe_input_ids(exported.config.vocab_size)).logits
    torch.testing.assert_close(logits, probe(tmp_path, 1)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_fp16_mixed_trains_on_a_gpu(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """GPU only (skipped without CUDA, never faked): 16-mixed with loss scaling under DDP on one GPU."""
    precision = str(REPO / "configs" / "precision" / "16-mixed.yaml")
    extra = ("--config", precision, "--trainer.accelerator=gpu", "--trainer.devices=1")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *extra))
    assert torch.isfinite(torch.tensor(probe(tmp_path, FIRST)["loss"]))
    assert (the_run(tmp_path) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_ddp_over_nccl_matches_one_process(tmp_path, corpus_dir, tokenizer_dir, reference) -> None:
    extra = ("--config", str(REPO / "configs/strategy/ddp.yaml"), "--trainer.accelerator=gpu", "--trainer.devices=2")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *extra))
    assert_matches(tmp_path, reference, FIRST)

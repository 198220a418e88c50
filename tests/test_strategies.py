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
from pathlib import Path

import pytest
import torch

from litune.strategies.memory_model import ModelShape, RunShape, StrategyShape, estimate
from litune_testing import (
    FIRST,
    REPO,
    SECOND,
    assert_matches,
    fit_args,
    probe,
    probe_input_ids,
    reference_run,
    run_litune,
    the_run,
)

STRATEGIES = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]
OFFLOAD = ["deepspeed_zero2_offload", "deepspeed_zero3_offload"]
SHAPES = {
    "ddp": StrategyShape(),
    "deepspeed_zero1": StrategyShape(stage=1, deepspeed=True),
    "deepspeed_zero2": StrategyShape(stage=2, deepspeed=True),
    "deepspeed_zero3": StrategyShape(stage=3, deepspeed=True),
    "deepspeed_zero2_offload": StrategyShape(stage=2, deepspeed=True, offload_optimizer=True),
    "deepspeed_zero3_offload": StrategyShape(stage=3, deepspeed=True, offload_optimizer=True, offload_params=True),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    return reference_run(tmp_path_factory.getbasetemp(), corpus_dir, tokenizer_dir)


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
    # The comparison has teeth: two more steps move the logits far beyond its tolerance.
    assert (probe(reference, SECOND)["logits"] - probe(reference, FIRST)["logits"]).abs().max() > 1e-2


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
def test_resume_and_export_match_the_trained_model(strategy, first_leg, reference, corpus_dir, tokenizer_dir) -> None:
    resume_then_export(first_leg(strategy), strategy, corpus_dir, tokenizer_dir, reference)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", OFFLOAD)
def test_offload_trains_resumes_and_exports(strategy, first_leg, reference, corpus_dir, tokenizer_dir) -> None:
    """ZeRO-Offload on CPU: the optimizer step runs in DeepSpeed's CPU Adam (compiled by DeepSpeed's op builder)."""
    root = first_leg(strategy)
    assert_matches(root, reference, FIRST)
    check_model_state(root, strategy)
    resume_then_export(root, strategy, corpus_dir, tokenizer_dir, reference)

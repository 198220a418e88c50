"""The strategy descriptor: every form of ``trainer.strategy`` gives the one description the rest of litune reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from litune.strategies import DDPStrategy, FSDP2Strategy
from litune.strategies.descriptor import Kind, describe

REPO = Path(__file__).resolve().parents[2]
FRAGMENTS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_each_strategy_fragment_is_described_as_its_name_says(fragment: Path) -> None:
    """``litune estimate`` names strategies as the fragments are named: the descriptor must tell them all apart."""
    setting = yaml.safe_load(fragment.read_text())["trainer"]["strategy"]
    assert describe(setting).memory_shape().name == fragment.stem


@pytest.mark.parametrize(
    ("setting", "kind", "stage", "offload"),
    [
        ("auto", Kind.SINGLE, 0, False),
        ("ddp", Kind.DDP, 0, False),
        ("deepspeed_stage_2_offload", Kind.ZERO, 2, True),
        ("deepspeed_stage_3", Kind.ZERO, 3, False),
        ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"}, Kind.ZERO, 2, False),  # Lightning's default
    ],
)
def test_registry_names_and_class_paths(setting, kind, stage, offload) -> None:
    spec = describe(setting)
    assert (spec.kind, spec.stage, spec.offload_optimizer) == (kind, stage, offload)


def test_built_strategies_and_capabilities() -> None:
    hybrid = describe(FSDP2Strategy(sharding="hybrid", shard_size=1))
    assert hybrid.kind is Kind.HYBRID and hybrid.shard_size == 1
    assert hybrid.reshards_checkpoints and hybrid.shards_network and not hybrid.deepspeed
    ddp = describe(DDPStrategy())
    assert ddp.kind is Kind.DDP and not ddp.reshards_checkpoints and ddp.checkpoint_kind == "file"
    zero3 = describe("deepspeed_stage_3", world_size=4)
    assert zero3.gathers_parameters_per_call and zero3.excludes_frozen_parameters and zero3.world_size == 4
    assert zero3.loads("deepspeed") and not zero3.loads("file") and hybrid.loads("file") and not ddp.loads("fsdp2")

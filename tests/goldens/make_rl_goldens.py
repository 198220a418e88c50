"""Write ``rl_losses.json``: float64 GRPO advantages, losses and gradients computed by TRL's own code.

TRL's GRPO loss is the method ``GRPOTrainer._compute_loss`` and its advantages are computed inline in
``_generate_and_score_completions``; neither can be called without a whole Trainer. So this script reads
``_compute_loss``'s source from the installed TRL verbatim (``ast``; nothing of TRL is imported, its GRPO module imports
vLLM/MLflow helpers) and runs it with a stand-in ``self`` that holds the settings and returns the given per-token
log-probabilities. The advantages are TRL's formula from the same file (``rewards - mean``, divided by
``nanstd + 1e-4``), checked against the source text below so that a change in TRL is noticed when the goldens are
regenerated:

    pip install --no-deps --target /tmp/trl trl==1.16.0
    python tests/goldens/make_rl_goldens.py /tmp/trl/trl > tests/goldens/rl_losses.json
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

GROUP = 3
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25, 0.0, 0.0, 1.0]  # 4 groups of 3, one with equal rewards
MAX_COMPLETION_LENGTH = 6
EPSILON_LOW, EPSILON_HIGH, BETA = 0.2, 0.28, 0.04
LENGTHS = [6, 2, 4, 1, 5, 3, 6, 6, 2, 3, 1, 4]  # completion tokens per row (the rest is padding)
ADVANTAGES_SOURCE = "advantages = advantages / (std_rewards + 1e-4)"


def trl_compute_loss(trl_root: Path):
    """``GRPOTrainer._compute_loss`` compiled from TRL's own source text, and the hash of that text."""
    source = (trl_root / "trainer" / "grpo_trainer.py").read_text()
    if ADVANTAGES_SOURCE not in source:
        raise SystemExit("TRL's advantage formula changed: update litune.rl.losses.group_advantages and this script")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "GRPOTrainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "_compute_loss":
                    code = textwrap.dedent(ast.get_source_segment(source, item))
                    namespace = {"torch": torch, "nanmin": torch.min, "nanmax": torch.max}
                    exec(compile(code, "trl/trainer/grpo_trainer.py", "exec"), namespace)
                    return namespace["_compute_loss"], hashlib.sha256(code.encode()).hexdigest()[:16]
    raise LookupError("GRPOTrainer._compute_loss not found")


def stand_in(logps: torch.Tensor, loss_type: str, beta: float) -> SimpleNamespace:
    """A ``self`` for ``_compute_loss``: one process, no accumulation, token-level ratios, no extras."""
    identity = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x, num_processes=1
    )
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=EPSILON_LOW,
        epsilon_high=EPSILON_HIGH,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        _entropy_bonus_enabled=False,
        accelerator=identity,
        _metrics={"train": defaultdict(list)},
    )


def advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """TRL's group-relative advantages (``scale_rewards="group"`` or ``"none"``)."""
    grouped = rewards.view(-1, GROUP)
    mean = grouped.mean(dim=1).repeat_interleave(GROUP)
    std = grouped.std(dim=1).repeat_interleave(GROUP)  # TRL's nanstd: unbiased, as torch.std
    out = rewards - mean
    return out / (std + 1e-4) if scale else out


def main(trl_root: Path) -> dict:
    compute_loss, source_hash = trl_compute_loss(trl_root)
    generator = torch.Generator().manual_seed(0)
    rows, width = len(LENGTHS), MAX_COMPLETION_LENGTH
    mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    logps = -torch.rand(rows, width, generator=generator, dtype=torch.float64) * 4
    old_logps = logps + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 0.3  # some ratios clip
    ref_logps = logps + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 0.5
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    cases = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        for beta in (0.0, BETA):
            for scale in (True, False):
                adv = advantages(rewards, scale)
                leaf = logps.clone().requires_grad_(True)
                inputs = {
                    "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
                    "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
                    "completion_ids": torch.zeros(rows, width, dtype=torch.long),
                    "completion_mask": mask,
                    "advantages": adv,
                    "old_per_token_logps": old_logps,
                    "ref_per_token_logps": ref_logps,
                    "num_items_in_batch": mask.sum().to(torch.float64),
                }
                loss = compute_loss(stand_in(leaf, loss_type, beta), None, inputs)
                loss.backward()
                cases[f"{loss_type}-beta{beta}-scale{scale}"] = {
                    "loss_type": loss_type, "beta": beta, "scale_rewards": scale, "advantages": adv.tolist(),
                    "loss": loss.item(), "grad": leaf.grad.tolist(),
                }  # fmt: skip
    import importlib.metadata as md

    try:
        version = md.version("trl")
    except md.PackageNotFoundError:
        version = "unknown (TRL source given by path)"
    return {
        "provenance": {
            "library": "trl", "version": version, "function": "GRPOTrainer._compute_loss",
            "source_sha256_16": source_hash, "torch": torch.__version__, "dtype": "float64",
        },
        "settings": {
            "group_size": GROUP, "epsilon_low": EPSILON_LOW, "epsilon_high": EPSILON_HIGH,
            "max_completion_length": MAX_COMPLETION_LENGTH, "lengths": LENGTHS, "rewards": REWARDS,
        },
        "inputs": {"logps": logps.tolist(), "old_logps": old_logps.tolist(), "ref_logps": ref_logps.tolist()},
        "cases": cases,
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))

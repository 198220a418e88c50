"""Optimizer construction: Adam and AdamW run torch's fused kernel by default and train like the for-loop."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from litune.models.hf import HFCausalLM
from litune.module import LitLM
from litune.optim import LRSchedule, use_fast_kernels

VOCAB, STEPS = 300, 4
TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}  # a few float32 ulps of weights of size 0.1-1 (measured: at most 6e-8)
# eps 1e-6 rather than 1e-8: GPT-2's key bias gets gradients that are zero up to rounding (softmax ignores a shift of
# every key), and Adam divides those by their own size, turning 1e-12 of rounding noise into a step of ~lr/10.
SETTINGS = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-6}


class LightningClipping(LitLM):
    """LitLM with Lightning's own clipping (``clip_grad_norm_``: the norm computed a second time)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):  # noqa: ANN001
        L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def trained(
    optimizer: partial, clip: float = 1.0, precision: str = "32-true", system_class: type[LitLM] = LitLM
) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """A 1-layer GPT-2 after ``STEPS`` optimizer steps of the real Trainer (accumulation 2, clipping by ``clip``)."""
    torch.manual_seed(0)
    network = HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": VOCAB})
    ids = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    system = system_class(network, optimizer=optimizer, lr_schedule=LRSchedule(name="constant"))
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", accumulate_grad_batches=2, gradient_clip_val=clip, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(system, DataLoader(rows, batch_size=4))
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, trainer.optimizers[0]


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_fused_by_default_and_the_same_parameters_as_the_for_loop(name: str) -> None:
    cls = getattr(torch.optim, name)
    settings = SETTINGS
    fused, fused_opt = trained(partial(cls, **settings))
    loop, loop_opt = trained(partial(cls, **settings, fused=False, foreach=False))  # the config chose: kept
    assert fused_opt.defaults["fused"] is True and all(g["fused"] for g in fused_opt.param_groups)
    assert loop_opt.defaults["fused"] is False and loop_opt.defaults["foreach"] is False
    moved = [k for k in fused if not torch.equal(fused[k], loop[k])]
    assert moved, "the two runs should differ at least by rounding: were both fused?"
    for key in fused:
        torch.testing.assert_close(fused[key], loop[key], **TOLERANCE, msg=key)
    if name != "AdamW":
        return
    # Teeth: the tolerance is tight enough to see a 1% different learning rate after the same steps.
    other, _ = trained(partial(cls, **{**settings, "lr": 1.01e-2}, fused=False, foreach=False))
    with pytest.raises(AssertionError):
        for key in fused:
            torch.testing.assert_close(other[key], loop[key], **TOLERANCE, msg=key)


def test_fused_only_where_torch_has_the_kernel_and_other_optimizers_untouched() -> None:
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))  # a device without fused kernels: foreach
    adamw = use_fast_kernels(torch.optim.AdamW([on_meta]))
    assert adamw.defaults["fused"] is None and adamw.param_groups[0]["foreach"] is True
    sgd = use_fast_kernels(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1))
    assert sgd.defaults["foreach"] is None and sgd.defaults["fused"] is None
    fused = use_fast_kernels(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]))
    assert fused.defaults["fused"] is True
    # A GradScaler (fp16) unscales before the step, so Lightning's gradient clipping still accepts the optimizer.
    assert not getattr(fused, "_step_supports_amp_scaling", False)
    chosen = use_fast_kernels(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], foreach=True))
    assert chosen.defaults["foreach"] is True and chosen.defaults["fused"] is None


def test_clipping_reuses_the_checks_gradient_norm_and_clips_as_lightning_does() -> None:
    """Clipping by norm with the norm the non-finite check computed gives Lightning's clipping to the last bit."""
    adamw = partial(torch.optim.AdamW, **SETTINGS)
    reused, _ = trained(adamw, clip=0.05)
    lightning, _ = trained(adamw, clip=0.05, system_class=LightningClipping)
    assert all(torch.equal(reused[k], lightning[k]) for k in reused)
    unclipped, _ = trained(adamw, clip=0.0)  # teeth: 0.05 clips these steps
    assert not all(torch.equal(reused[k], unclipped[k]) for k in reused)


def test_fused_trains_under_bf16_mixed_with_clipping() -> None:
    """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside its kernel: the fused
    default must not claim to (``_step_supports_amp_scaling``), and clipping under bf16 trains."""
    params, optimizer = trained(partial(torch.optim.AdamW, **SETTINGS), clip=0.5, precision="bf16-mixed")
    assert optimizer.defaults["fused"] is True and all(torch.isfinite(p).all() for p in params.values())

"""The LightningModule: optimizers, schedules, loss masking, perplexity, and early errors."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from litune.errors import ConfigError
from litune.models.hf import HFCausalLM
from litune.models.output import IGNORE_INDEX, causal_lm_output
from litune.module import LitLM
from litune.optim import LRSchedule, param_groups
from litune_testing import fit_in_process, random_batches

VOCAB = 300


def tiny_network(seed: int = 0) -> HFCausalLM:
    torch.manual_seed(seed)
    return HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": VOCAB})


def batches() -> DataLoader:
    return random_batches(VOCAB)


def fit(system: LitLM, steps: int) -> L.Trainer:
    return fit_in_process(system, steps, VOCAB)


OPTIMIZERS = {
    "SGD": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    "Adam": partial(torch.optim.Adam, lr=1e-2),
    "AdamW": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    "RMSprop": partial(torch.optim.RMSprop, lr=1e-3),
    "Adagrad": partial(torch.optim.Adagrad, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_trains_every_parameter_and_lowers_the_loss(name: str) -> None:
    system = LitLM(tiny_network(), optimizer=OPTIMIZERS[name], lr_schedule=LRSchedule(name="constant"))
    before = {k: v.clone() for k, v in system.network.state_dict().items()}
    first_loss = system.network(**next(iter(batches()))).loss.item()
    trainer = fit(system, steps=12)
    assert type(trainer.optimizers[0]).__name__ == name
    changed = [k for k, v in system.network.state_dict().items() if not torch.equal(v, before[k])]
    trainable = [k for k, p in system.network.named_parameters()]
    assert set(trainable) <= set(changed)
    assert system.network(**next(iter(batches()))).loss.item() < first_loss


def test_weight_decay_is_kept_off_biases_and_norm_weights() -> None:
    network = tiny_network()
    decayed, not_decayed = param_groups(network)
    names = {id(p): n for n, p in network.named_parameters()}
    assert "weight_decay" not in decayed and not_decayed["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    no_decay_names = {names[id(p)] for p in not_decayed["params"]}
    assert any(n.endswith("ln_f.weight") for n in no_decay_names)
    assert any(n.endswith("c_attn.bias") for n in no_decay_names)
    # AdamW's decoupled decay moves a decayed weight with zero gradient; a no-decay one stays put.
    optimizer = torch.optim.AdamW(param_groups(network), lr=0.1, weight_decay=0.5)
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    ln_before = network.model.transformer.ln_f.weight.clone()
    wte_before = network.model.transformer.wte.weight.clone()
    optimizer.step()
    assert torch.equal(network.model.transformer.ln_f.weight, ln_before)
    assert torch.allclose(network.model.transformer.wte.weight, wte_before * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_per_optimizer_step(name: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LRSchedule(name=name, warmup_steps=4, min_lr_ratio=0.1).build(optimizer, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    end = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)), "linear": 1 / 16, "constant": 1.0}[name]
    assert lrs[-1] == pytest.approx(end)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup", "total", "min_ratio"), [(0, 7, 0.0), (3, 10, 0.1), (5, 6, 0.25)])
def test_schedule_equals_transformers_schedule_functions_exactly(
    name: str, warmup: int, total: int, min_ratio: float
) -> None:
    """litune writes the three schedules out (importing transformers.optimization costs every process ~1 s of
    start-up); they are transformers' schedules, bit for bit, at every step, past the end too."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    reference = {
        "cosine": partial(get_cosine_with_min_lr_schedule_with_warmup, min_lr_rate=min_ratio),
        "linear": get_linear_schedule_with_warmup,
        "constant": lambda optimizer, warmup, _total: get_constant_schedule_with_warmup(optimizer, warmup),
    }[name]
    ours = LRSchedule(name=name, warmup_steps=warmup, min_lr_ratio=min_ratio)
    theirs_optimizer, ours_optimizer = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3) for _ in "ab")
    theirs_schedule = reference(theirs_optimizer, warmup, total)
    ours_schedule = ours.build(ours_optimizer, total_steps=total)
    for _ in range(total + 3):
        assert ours_optimizer.param_groups[0]["lr"] == theirs_optimizer.param_groups[0]["lr"]
        for optimizer, schedule in ((theirs_optimizer, theirs_schedule), (ours_optimizer, ours_schedule)):
            optimizer.step()
            schedule.step()


def test_schedule_is_stepped_by_the_trainer_once_per_optimizer_step() -> None:
    system = LitLM(
        tiny_network(), optimizer=partial(torch.optim.SGD, lr=1.0), lr_schedule=LRSchedule("linear", warmup_steps=2)
    )
    trainer = fit(system, steps=6)
    # linear: warmup to 1.0 over 2 steps, then down to 0 at step 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6


def test_loss_ignores_positions_labelled_minus_100() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3:] = IGNORE_INDEX
    out = causal_lm_output(logits, labels)
    # Shifted: position t predicts labels[t+1]; the last position and the ignored ones carry no loss.
    kept = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE_INDEX]
    manual = torch.stack([-logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b, t in kept]).mean()
    torch.testing.assert_close(out.loss, manual)
    # Changing the logits where the target is ignored does not change the loss.
    scrambled = logits.clone()
    scrambled[0, 2:] = torch.randn(3, 7) * 10
    scrambled[:, -1] = 99.0
    torch.testing.assert_close(causal_lm_output(scrambled, labels).loss, out.loss)


def test_perplexity_metric_equals_exp_of_mean_token_loss_on_a_fixed_batch() -> None:
    network = tiny_network().eval()
    batch = next(iter(batches()))
    batch["labels"][0, :5] = IGNORE_INDEX
    with torch.no_grad():
        out = network(**batch)
    metric = Perplexity(ignore_index=IGNORE_INDEX)
    metric.update(out.logits, out.targets)
    torch.testing.assert_close(metric.compute(), out.loss.exp(), rtol=1e-5, atol=1e-4)
    system = LitLM(network)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(system, DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], 4))[0]
    assert metrics["val/ppl"] == pytest.approx(out.loss.exp().item(), rel=1e-4)
    assert metrics["val/loss"] == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_learning_rate_is_a_config_error(lr: float) -> None:
    with pytest.raises(ConfigError, match="(?i)invalid learning rate"):
        LitLM(tiny_network(), optimizer=partial(torch.optim.AdamW, lr=lr))


def test_tokenizer_larger_than_the_vocabulary_is_a_config_error(tokenizer_dir) -> None:
    with pytest.raises(ConfigError, match=r"512 tokens .* vocabulary has 300"):
        LitLM(tiny_network(), tokenizer=str(tokenizer_dir))


class _HookRecorder(L.Callback):
    """Overrides one per-batch hook and inherits the others as Lightning's no-ops; notes what it sees in training."""

    def __init__(self) -> None:
        self.zero_grad_calls = 0
        self.seen: dict[str, object] = {}

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        self.zero_grad_calls += 1
        self.seen = {
            "callback.on_after_backward": vars(self).get("on_after_backward", "inherited"),
            "callback.on_before_zero_grad": vars(self).get("on_before_zero_grad", "inherited"),
            "module.on_train_batch_end": vars(pl_module).get("on_train_batch_end", "inherited"),
            "module.on_validation_batch_end": vars(pl_module).get("on_validation_batch_end", "inherited"),
        }


def _fit_with(recorder: _HookRecorder, **trainer_kwargs: object) -> LitLM:
    system = LitLM(tiny_network(), optimizer=OPTIMIZERS["AdamW"])
    fit_in_process(system, 3, VOCAB, callbacks=[recorder], **trainer_kwargs)
    return system


def test_inherited_no_op_hooks_are_hidden_from_lightning_while_training_and_put_back_after() -> None:
    recorder = _HookRecorder()
    system = _fit_with(recorder)
    assert recorder.zero_grad_calls == 3  # an overridden hook is still called at every step
    assert recorder.seen == {
        "callback.on_after_backward": None,  # hidden: Lightning's callable() check skips it
        "callback.on_before_zero_grad": "inherited",  # overridden: left alone
        "module.on_train_batch_end": None,
        "module.on_validation_batch_end": "inherited",  # the eval loop inspects the module's signature: kept
    }
    assert "on_after_backward" not in vars(recorder) and "on_train_batch_end" not in vars(system)  # put back


def test_a_profiler_still_sees_every_hook_call() -> None:
    from lightning.pytorch.profilers import SimpleProfiler

    recorder, profiler = _HookRecorder(), SimpleProfiler()
    _fit_with(recorder, profiler=profiler)
    assert recorder.seen["callback.on_after_backward"] == "inherited"
    assert len(profiler.recorded_durations["[Callback]_HookRecorder.on_after_backward"]) == 3

"""The baselines that ``bench_overhead.py`` times against ``litune fit``: one training run per process.

    python bench/_worker.py loop SPEC.json       # a hand-written PyTorch loop
    python bench/_worker.py minimal SPEC.json    # the same loop without a DataLoader (batches sliced from one tensor)
    python bench/_worker.py trainer SPEC.json    # transformers.Trainer with its defaults

``SPEC.json`` (written by :mod:`_harness`) names the model folder, tokenizer, corpus, batch, steps, precision, device
and where to write the per-step losses. Both baselines take their batches from the same ``TextDataModule`` litune uses
(same tokens, same collation into ``input_ids``/``attention_mask``/``labels``) and start from the same saved weights,
so any difference in time is the training loop's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _datamodule(spec: dict):
    from litune.data.text import TextDataModule

    dm = TextDataModule(
        tokenizer=spec["tokenizer"],
        path=spec["corpus"],
        block_size=spec["block_size"],
        batch_size=spec["batch_size"],
        val_fraction=0.0,
        seed=spec["seed"],
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _param_groups(model, weight_decay: float) -> list[dict]:
    # The grouping every careful hand-written loop uses (nanoGPT's): decay matrices, not biases and norms.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _model_and_optimizer(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    if spec.get("compile"):
        model = torch.compile(model)
    # Fused, as the Trainer's default (adamw_torch_fused) and litune's (litune.optim.use_fast_kernels).
    groups = _param_groups(model, spec["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    return model, optimizer, device


def run_loop(spec: dict) -> list[list[float]]:
    """The loop a careful user writes by hand: fused AdamW, autocast in bf16-mixed, ``set_epoch`` on the distributed
    sampler at every epoch (as Lightning does), and ``loss.item()`` only on the logged steps (a host sync on a GPU).
    glibc's malloc settings come from the environment, as for every side (``bench_overhead.py``).

    Returns:
        ``[step, loss]`` of every ``log_every``-th step (0-based step indices, as litune's logged ``step``).
    """

    model, optimizer, device = _model_and_optimizer(spec)
    bf16 = spec["precision"] == "bf16-mixed"
    dm = _datamodule(spec)
    loader = dm.train_dataloader()
    every = spec["log_every"]
    losses: list[list[float]] = []
    step, epoch = 0, 0
    while step < spec["steps"]:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            step = _train_step(model, optimizer, batch, device, bf16, step, every, losses, spec.get("clip", 0.0))
            if step == spec["steps"]:
                break
        epoch += 1
    return losses


def _train_step(model: Any, optimizer: Any, batch: dict, device: Any, bf16: bool, step: int, every: int, losses: list,
                clip: float) -> int:  # fmt: skip
    """One plain step of the hand-written loops: forward (bf16 autocast if asked), backward, clipping by norm (if
    ``clip``), optimizer step, and ``loss.item()`` appended to ``losses`` as ``[step, loss]`` on every ``every``-th
    step. Returns the next step."""
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    if clip:  # over the optimizer's parameters in its order, as Lightning's and litune's clipping sum the norm
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if (step + 1) % every == 0:
        losses.append([step, loss.item()])
    return step + 1


def run_minimal(spec: dict) -> list[list[float]]:
    """The least a loop can do per step: the same batches in the same order, collated once before the first step (no
    DataLoader, no per-step collation; a batch without padding carries no attention mask, as litune's step), then
    forward, backward, fused AdamW, and ``loss.item()`` on the logged steps. Collating the whole epoch up front is
    start-up, the same for the short and the long run, so it cancels out of the per-step time.

    Returns:
        ``[step, loss]`` of every ``log_every``-th step, as :func:`run_loop`.
    """

    model, optimizer, device = _model_and_optimizer(spec)
    bf16 = spec["precision"] == "bf16-mixed"
    dm = _datamodule(spec)
    loader = dm.train_dataloader()  # only for its sampler (the loop's order) and collator
    collate, data, size = loader.collate_fn, loader.dataset, spec["batch_size"]
    every = spec["log_every"]
    losses: list[list[float]] = []
    step, epoch = 0, 0
    while step < spec["steps"]:
        loader.sampler.set_epoch(epoch)
        order = list(loader.sampler)
        batches = []
        for start in range(0, len(order), size):  # the whole epoch, however many steps run
            batch = collate([data[i] for i in order[start : start + size]])
            if bool(batch["attention_mask"].all()):
                del batch["attention_mask"]
            batches.append({k: v.to(device) for k, v in batch.items()})
        for batch in batches:
            step = _train_step(model, optimizer, batch, device, bf16, step, every, losses, spec.get("clip", 0.0))
            if step == spec["steps"]:
                break
        epoch += 1
    return losses


def run_trainer(spec: dict) -> list[list[float]]:
    """``transformers.Trainer`` with the same model, batches, optimizer settings and steps; its defaults otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    dm = _datamodule(spec)
    losses: list[list[float]] = []

    class KeepLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:  # the mean loss since the last log, at 0-based step global_step - 1
                losses.append([state.global_step - 1, float(logs["loss"])])

    args = TrainingArguments(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        weight_decay=spec["weight_decay"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=spec.get("clip", 0.0),  # 0: litune and the loops do not clip by default either
        logging_steps=spec["log_every"],  # as the other two sides
        save_strategy="no",
        report_to=[],
        bf16=spec["precision"] == "bf16-mixed",
        use_cpu=spec["device"] == "cpu",
        seed=spec["seed"],
        torch_compile=bool(spec.get("compile")),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dm.train_set.remove_columns([c for c in dm.train_set.column_names if c != "input_ids"]),
        data_collator=dm.collator(),
        callbacks=[KeepLosses()],
    )
    trainer.train()
    return losses


def main() -> None:
    side, spec_path = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    start = time.perf_counter()
    losses = {"loop": run_loop, "minimal": run_minimal, "trainer": run_trainer}[side](spec)
    Path(spec["losses"]).write_text(json.dumps({"losses": losses, "in_process_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()

"""Where one optimizer step's time goes: ``litune fit`` against ``transformers.Trainer``, same model, batches, AdamW.

Each side trains in this process (``--side``, one per process so that neither warms the other's caches) under
``cProfile``, switched on after ``--warmup`` steps and off at the end, and the step is split by the functions it ran
through: forward (the network and its loss), backward, optimizer (``step`` and ``zero_grad``), gradient clipping, data
(fetching and collating the next batch), litune's callbacks, logging, the finiteness and grad-norm checks, and the rest
(Lightning's or the Trainer's loop and hooks). cProfile adds a fixed cost per Python call, so the Python-heavy parts
(loops, hooks) read larger than they run; compare the sides with each other, and the total with ``bench_overhead.py``.

Both sides get litune's glibc malloc settings through the environment (``--glibc-defaults``: neither does).

``--clock`` times instead of profiling: ``perf_counter`` around the network's forward (with its loss), the backward
and the optimizer's ``step``, and around every step, with no profiler on, so nothing inflates the Python in between.
It prints medians per step of the step, the three timed parts and the rest (the framework's own time: data, loop,
hooks, callbacks, checks, logging, ``zero_grad``), which is the number to compare between the sides.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/profile_step.py --side litune --size tiny --steps 150
    OMP_NUM_THREADS=1 taskset -c 1 python bench/profile_step.py --side trainer --size tiny --steps 150
    OMP_NUM_THREADS=1 taskset -c 1 python bench/profile_step.py --side litune --steps 450 --warmup 50 --clock
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import SIZES, Setup, litune_config, model_dir, prepare  # noqa: E402

# category -> (path fragment, function name) of the outermost frames whose cumulative time it is
LOGGER_CONNECTOR = "lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py"
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "forward": [("litune/models/hf.py", "forward"), ("transformers/trainer.py", "compute_loss")],
    "backward": [("torch/_tensor.py", "backward")],
    "optimizer": [
        ("torch/optim/adam.py", "step"), ("torch/optim/adamw.py", "step"), ("torch/optim/optimizer.py", "zero_grad"),
    ],
    "clipping": [
        ("lightning/pytorch/plugins/precision/precision.py", "clip_gradients"),
        ("accelerate/accelerator.py", "clip_grad_norm_"),
    ],
    "data": [("torch/utils/data/dataloader.py", "__next__"), ("accelerate/data_loader.py", "__iter__")],
    "litune callbacks": [("litune/callbacks/", "on_")],
    "logging": [
        ("lightning/pytorch/core/module.py", "log"), (LOGGER_CONNECTOR, "update_train_step_metrics"),
        ("transformers/trainer.py", "_maybe_log_save_evaluate"),
    ],
    "finiteness + grad-norm checks": [("litune/module.py", "_step_is_finite")],
    "token count (look-ahead)": [("litune/module.py", "_start_window"), ("litune/module.py", "_end_window")],
}  # fmt: skip


def categorize(stats: pstats.Stats, steps: int, wall: float) -> dict[str, float]:
    """Milliseconds per step of each category; ``loop, hooks and rest`` is the wall time not in any of them."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for (path, _, name), (_, _, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        for category, keys in CATEGORIES.items():
            if any(fragment in path and name.startswith(func) for fragment, func in keys):
                out[category] += cumtime
                break
    per_step = {k: v / steps * 1e3 for k, v in out.items()}
    per_step["loop, hooks and rest"] = wall / steps * 1e3 - sum(per_step.values())
    per_step["total"] = wall / steps * 1e3
    return per_step


class _Window:
    """Profiles from step ``warmup`` to the end."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.profile, self.start, self.first = warmup, cProfile.Profile(), 0.0, 0

    def maybe_start(self, step: int) -> None:
        if step == self.warmup and not self.start:
            self.first, self.start = step, time.perf_counter()
            self.profile.enable()

    def stop(self, step: int) -> tuple[pstats.Stats, int, float]:
        self.profile.disable()
        return pstats.Stats(self.profile), step - self.first, time.perf_counter() - self.start


class _Clock:
    """Per-step wall time and the time of the forward, backward and optimizer step inside it (``--clock``)."""

    PARTS = ("forward", "backward", "optimizer")

    def __init__(self, warmup: int) -> None:
        self.warmup, self.spent, self.marks = warmup, dict.fromkeys(self.PARTS, 0.0), []

    def time(self, owner: object, name: str, part: str) -> None:
        """Replace ``owner.name`` by a timed wrapper (signature kept: the Trainer inspects ``forward``'s)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def maybe_start(self, step: int) -> None:  # called at every step's start, as _Window's
        if step >= self.warmup:
            self.marks.append((time.perf_counter(), dict(self.spent)))

    def stop(self, step: int) -> dict[str, float]:
        rows = []
        for (t0, spent0), (t1, spent1) in zip(self.marks[:-1], self.marks[1:], strict=True):
            row = {part: (spent1[part] - spent0[part]) * 1e3 for part in self.PARTS}
            row["step"] = (t1 - t0) * 1e3
            row["rest (framework)"] = row["step"] - sum(row[part] for part in self.PARTS)
            rows.append(row)
        return {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"steps": len(rows)}


def _clock_optimizer_and_backward(clock: _Clock) -> None:
    import torch

    clock.time(torch.Tensor, "backward", "backward")
    clock.time(torch.optim.AdamW, "step", "optimizer")  # before the optimizer exists: torch wraps it in its hooks


def run_litune(setup: Setup, size_name: str, steps: int, warmup: int, clock: _Clock | None = None) -> tuple:
    from lightning.pytorch import Callback

    from litune.cli import main

    window: _Window | _Clock = _Window(warmup)
    if clock is not None:
        from litune.models.hf import HFCausalLM

        window = clock
        clock.time(HFCausalLM, "forward", "forward")
        _clock_optimizer_and_backward(clock)
    result: dict[str, tuple] = {}

    class Profiler(Callback):
        def on_train_batch_start(self, trainer, *args):  # noqa: ANN001, ANN002
            window.maybe_start(trainer.global_step)

        def on_train_end(self, trainer, *args):  # noqa: ANN001, ANN002
            result["r"] = window.stop(trainer.global_step)

    size = SIZES[size_name]
    config = litune_config(setup, size, model_dir(setup, size, size.vocab), steps)
    path = setup.work / "profile-litune.json"
    path.write_text(json.dumps(config))
    sys.modules["__main__"].Profiler = Profiler  # type: ignore[attr-defined]
    callbacks = json.dumps([{"class_path": "__main__.Profiler"}])
    args = ["fit", "--config", str(path), f"--runs_dir={setup.work / 'runs'}", "--loggers=[csv]"]
    assert main([*args, f"--trainer.callbacks={callbacks}"]) == 0
    return result["r"]


def run_trainer(setup: Setup, size_name: str, steps: int, warmup: int, clock: _Clock | None = None) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from litune.data.text import TextDataModule

    size = SIZES[size_name]
    window: _Window | _Clock = _Window(warmup) if clock is None else clock
    result: dict[str, tuple] = {}

    class Profiler(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            window.maybe_start(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            result["r"] = window.stop(state.global_step)

    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir(setup, size, size.vocab), attn_implementation="sdpa")
    if clock is not None:
        clock.time(type(model), "forward", "forward")
        _clock_optimizer_and_backward(clock)
    dm = TextDataModule(tokenizer=str(setup.tokenizer), path=str(setup.corpus), block_size=size.block,
                        batch_size=size.batch, val_fraction=0.0, seed=setup.seed)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    args = TrainingArguments(
        output_dir=str(setup.work / "trainer"), per_device_train_batch_size=size.batch, max_steps=steps,
        learning_rate=setup.lr, weight_decay=setup.weight_decay, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=setup.log_every, save_strategy="no", report_to=[], use_cpu=True, seed=setup.seed,
        disable_tqdm=True,
    )  # fmt: skip
    columns = [c for c in dm.train_set.column_names if c != "input_ids"]
    trainer = Trainer(model=model, args=args, train_dataset=dm.train_set.remove_columns(columns),
                      data_collator=dm.collator(), callbacks=[Profiler()])  # fmt: skip
    trainer.train()
    return result["r"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", required=True, choices=["litune", "trainer"])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--glibc-defaults", action="store_true", help="Do not give glibc litune's malloc settings.")
    parser.add_argument("--clock", action="store_true", help="Time forward, backward, optimizer and the rest instead.")
    args = parser.parse_args(argv)
    from litune.host_memory import MALLOC_ENV

    if not args.glibc_defaults and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # Like bench_overhead.py: both sides get the same malloc settings, through the environment (read at start-up).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        work = Path(tmp)
        corpus, tokenizer = prepare(work)
        setup = Setup(work=work, corpus=corpus, tokenizer=tokenizer, log_every=args.log_every)
        run = run_litune if args.side == "litune" else run_trainer
        if args.clock:
            per_step = run(setup, args.size, args.steps, args.warmup, _Clock(args.warmup))
            steps = per_step.pop("steps")
        else:
            stats, steps, wall = run(setup, args.size, args.steps, args.warmup)
    if not args.clock:
        per_step = categorize(stats, steps, wall)
    kind = "timed steps (no profiler), medians" if args.clock else "profiled steps (cProfile on)"
    print(f"{args.side}, {args.size}, {steps} {kind}, ms per step:")
    for key, value in per_step.items():
        print(f"  {key:32s} {value:8.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"side": args.side, "size": args.size, "steps": steps, "clock": args.clock, "ms": per_step})
        )
    return per_step


if __name__ == "__main__":
    main()

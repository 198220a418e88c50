"""Helpers for the distributed tests: run ``litune`` as a user would, and probe the model inside real runs.

``FinalLogits`` is a Lightning callback loaded into ``litune fit`` runs by class path (the tests put ``tests/`` on
PYTHONPATH). It records what the model being trained computes on one fixed batch at chosen optimizer steps, on the live
(possibly sharded) model, so tests can compare runs on different strategies, world sizes and launchers, and compare an
exported Hugging Face folder with the model as it was in training.

The reference run (1 process, accumulation 2) is shared by the strategy and launch tests through a folder under the
session's base temp dir, so it runs once per pytest session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from litune.data.text import TextDataModule
from litune.data.tokenizer import TrainedBPE
from litune.models import DeferredHFCausalLM
from litune.models.hf import HFCausalLM
from litune.models.output import LMOutput, causal_lm_output

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
LITUNE = str(Path(sys.executable).parent / "litune")
NETWORK = {  # tests/configs/tiny.yaml's network without dropout, so runs with different world sizes can agree
    "model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}  # fmt: skip
FIRST, SECOND = 3, 5  # optimizer steps of a first leg and of the leg resumed from it
PROBED = [1, FIRST, SECOND]
PROBE_SHAPE = (2, 16)
PROBE_SEED = 1234
PEAK_FLOPS = 1.0e12
# NETWORK's training FLOPs per token at its 32-token rows: 6 * matmul weights (output layer 512*32 + 2 blocks of
# 32*96 + 32*32 + 32*128 + 128*32) + 12 * layers * width * 32 = 6 * 40,960 + 24,576.
FLOPS_PER_TOKEN = 270_336


def probe_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed ``[2, 16]`` batch every probe uses."""
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


class FinalLogits(Callback):
    """Save ``logits`` and ``loss`` of the training model on the probe batch as ``<directory>/step<N>.pt``.

    Every rank runs the forward (under ZeRO-3 the parameters are gathered collectively); rank 0 writes.

    Args:
        directory: output folder.
        steps: optimizer steps (``trainer.global_step`` after the step) at which to record.
    """

    def __init__(self, directory: str, steps: list[int]) -> None:
        self.directory = Path(directory)
        self.steps = set(steps)
        self.done: set[int] = set()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if 0 in self.steps and trainer.global_step == 0:  # the model as built/loaded, before any optimizer step
            self._record(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.done:
            self.done.add(step)
            self._record(trainer, pl_module, step)

    @torch.no_grad()
    def _record(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        network = pl_module.network
        ids = probe_input_ids(network.vocab_size).to(pl_module.device)
        was_training = network.training
        network.eval()
        # Whole logits under sequence parallelism too: the probe runs unsplit on every rank.
        sequence_group = getattr(network, "sequence_group", None)
        if sequence_group is not None:
            network.split_sequences(None)
        out = network(input_ids=ids, labels=ids)
        if sequence_group is not None:
            network.split_sequences(sequence_group)
        network.train(was_training)
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            record = {
                "logits": out.logits.float().cpu(),
                "loss": float(out.loss),
                "world_size": trainer.world_size,
                "sequence_parallel": getattr(trainer.strategy, "sequence_parallel_size", 1),
                "gradient_checkpointing": bool(
                    getattr(getattr(network, "model", None), "is_gradient_checkpointing", None)
                    or getattr(network, "gradient_checkpointing", False)  # litune's own networks
                ),
                "built_partitioned": getattr(network, "built_partitioned", None),  # see ProbedDeferredHFCausalLM
                # Under DDP/DeepSpeed pl_module.network is the module itself (the engine wraps the LightningModule).
                "compiled": getattr(network, "_compiled_call_impl", None) is not None,
                "optimizer": stepping_optimizer(trainer),
            }
            torch.save(record, self.directory / f"step{step}.pt")


def stepping_optimizer(trainer: Trainer) -> str:
    """The optimizer that updates the weights and its kernel, e.g. ``AdamW fused`` or ``DeepSpeedCPUAdam``.

    DeepSpeed's ZeRO optimizer wraps the configured one (``.optimizer``) and steps it over its fp32 partitions.
    """
    optimizer = trainer.optimizers[0]
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    name, defaults = type(optimizer).__name__, getattr(optimizer, "defaults", {})
    if name == "DeepSpeedCPUAdam":
        return name
    return f"{name} {'fused' if defaults.get('fused') else 'foreach' if defaults.get('foreach') else 'for-loop'}"


class ProbedDeferredHFCausalLM(DeferredHFCausalLM):
    """:class:`litune.models.DeferredHFCausalLM` that records whether its weights were born as shards (ZeRO-3, FSDP2).

    Checked right after ``configure_model`` builds them, before the DeepSpeed engine exists (the engine would partition
    a whole model too, so checking later could not tell the two apart). DeepSpeed marks shards with ``ds_id``.
    """

    built_partitioned: bool | None = None

    def configure_model(self, shard=None) -> None:
        if self.is_built:
            return
        super().configure_model() if shard is None else super().configure_model(shard=shard)
        # ZeRO-3 marks shards with `ds_id`; FSDP2's are DTensors (they have a device mesh).
        self.built_partitioned = all(hasattr(p, "ds_id") or hasattr(p, "device_mesh") for p in self.model.parameters())


def probe(root: Path, step: int) -> dict:
    """What :class:`FinalLogits` recorded in the run under ``root`` at ``step``."""
    return torch.load(root / "probe" / f"step{step}.pt")


def litune_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    # The launch scripts call torchrun/deepspeed/litune by name: find this interpreter's, as an activated venv would.
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("LITUNE_RUN_DIR", None)  # each command is its own run
    return env


def check_ok(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def run_litune(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the ``litune`` console script; fail with its output tail unless it exits 0."""
    proc = subprocess.run([LITUNE, *args], env=litune_env(), capture_output=True, text=True, timeout=timeout)
    check_ok(proc, f"litune {args[0]}")
    return proc


def tiny_args(corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """``tests/configs/tiny.yaml`` on the ``corpus_dir`` documents with the ``tokenizer_dir`` tokenizer, then ``extra``
    (no subcommand): the arguments every tiny ``litune`` run starts from."""
    return [
        "--config", str(TINY),
        f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        *extra,
    ]  # fmt: skip


def fit_args(root: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str, steps: int = FIRST) -> list[str]:
    """``litune fit`` arguments for the tiny run under ``root`` (no subcommand): global batch 8, fp32, clipped, probed.

    Topology (``--trainer.devices``, a strategy fragment) comes in ``extra``; the micro-batch is 4, so accumulation
    is 2 on one process and 1 on two.
    """
    callbacks = [
        {
            "class_path": "litune_testing.FinalLogits",
            "init_args": {"directory": str(root / "probe"), "steps": PROBED},
        },
        {"class_path": "litune.callbacks.model_state.ModelStateReport"},
        # A made-up peak (the CPU has none), so that MFU is logged and can be checked under every strategy.
        {"class_path": "litune.callbacks.ThroughputMonitor", "init_args": {"peak_flops": PEAK_FLOPS}},
    ]
    return tiny_args(
        corpus_dir, tokenizer_dir,
        f"--model.network.init_args.config={json.dumps(NETWORK)}",
        "--data.init_args.batch_size=4", "--global_batch_size=8",
        f"--runs_dir={root / 'runs'}",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.precision=32-true",
        "--trainer.gradient_clip_val=0.1",  # small enough to clip every step: clipping must agree across strategies
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *extra,
    )  # fmt: skip


def the_run(root: Path) -> Path:
    """The one run folder under ``root``."""
    (run,) = sorted((root / "runs").iterdir())
    return run


def reference_run(base: Path, corpus_dir: Path, tokenizer_dir: Path, resumed: bool = False) -> Path:
    """The 1-process baseline of ``FIRST`` steps (and, if ``resumed``, resumed from ``last`` to ``SECOND``).

    Each leg runs once per pytest session, whichever test asks first.

    Args:
        base: the session's base temp dir (``tmp_path_factory.getbasetemp()``), shared by all test modules.
    """
    root = base / "reference-1-process"
    if not (root / "probe" / f"step{FIRST}.pt").exists():
        run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, "--trainer.devices=1"))
    if resumed and not (root / "probe" / f"step{SECOND}.pt").exists():
        extra = ("--trainer.devices=1", "--ckpt_path=last")
        run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *extra, steps=SECOND))
    return root


def assert_mfu(root: Path, world_size: int = 2) -> None:
    """The run's logged ``perf/mfu`` is the model's full FLOPs per token x tokens/s / (peak x devices)."""
    import csv

    with (the_run(root) / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/mfu")]
    assert rows
    for row in rows:
        want = FLOPS_PER_TOKEN * float(row["perf/tokens_per_sec"]) / (PEAK_FLOPS * world_size)
        assert float(row["perf/mfu"]) == pytest.approx(want, rel=1e-9)


def assert_matches(root: Path, reference: Path, step: int, world_size: int = 2) -> None:
    """The run under ``root`` computes what the 1-process reference computes after ``step`` optimizer steps."""
    got, want = probe(root, step), probe(reference, step)
    assert got["world_size"] == world_size and want["world_size"] == 1
    # litune's default kernel under every strategy (ZeRO optimizer offload: DeepSpeed's CPU Adam, litune.optim)
    assert got["optimizer"] in ("AdamW fused", "DeepSpeedCPUAdam") and want["optimizer"] == "AdamW fused", (got, want)
    # Same optimization, different reduction order (all-reduce vs. accumulation): fp32 round-off only.
    torch.testing.assert_close(got["logits"], want["logits"], atol=2e-4, rtol=1e-4)
    assert abs(got["loss"] - want["loss"]) < 1e-4


class StepRecorder(Callback):
    """Record, at every optimizer step, the logged ``train/loss``, ``train/grad_norm`` and ``train/tokens_seen``, and
    at the end of training the network's parameters; rank 0 saves both to ``<directory>/record.pt``.

    Under ZeRO-1/2 every rank holds the whole model, so the parameters are read as they are; under ZeRO-3 and FSDP2
    they are gathered at the end (:func:`whole_state_dict`).

    Args:
        directory: output folder.
        mean_of_means: train with the objective litune had before its token-weighted one (each micro-batch returns
            its own mean token loss, which Lightning and the strategy then average), to show what the equivalence
            tests would catch.
    """

    KEYS = ("train/loss", "train/grad_norm", "train/tokens_seen", "train/skipped_steps")

    def __init__(self, directory: str, mean_of_means: bool = False, snapshots: bool = False) -> None:
        self.directory = Path(directory)
        self.mean_of_means = mean_of_means
        self.snapshots = snapshots
        self.steps: dict[int, dict[str, float]] = {}
        self.params_at: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer_at: dict[int, list[torch.Tensor]] = {}
        self._last = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.mean_of_means:
            from litune.objective import BATCH_TAG

            def training_step(batch: dict, batch_idx: int) -> torch.Tensor:
                batch = {k: v for k, v in batch.items() if k != BATCH_TAG}
                return pl_module.network(**batch).loss

            pl_module.training_step = training_step  # instance attribute: what Lightning's strategies call

    def _flush(self, trainer: Trainer) -> None:
        # Read after every callback's on_train_batch_end of the step (the DeepSpeed grad norm is logged there).
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            metrics = trainer.callback_metrics
            self.steps[trainer.global_step] = {k: float(metrics[k]) for k in self.KEYS if k in metrics}
            if self.snapshots:  # weights and optimizer state (e.g. momentum) as they are after this step
                network = trainer.lightning_module.network
                self.params_at[trainer.global_step] = {k: v.detach().clone() for k, v in network.state_dict().items()}
                state = trainer.optimizers[0].state_dict().get("state", {})  # {} for DeepSpeed's ZeRO optimizer
                self.optimizer_at[trainer.global_step] = [
                    v.detach().clone() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)
                ]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)
        self.directory.mkdir(parents=True, exist_ok=True)
        params = whole_state_dict(pl_module.network)
        record = {"steps": self.steps, "params": params, "world_size": trainer.world_size}
        record.update(params_at=self.params_at, optimizer_at=self.optimizer_at)
        name = "record.pt" if trainer.is_global_zero else f"record-rank{trainer.global_rank}.pt"
        torch.save(record, self.directory / name)


def whole_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s state dict with whole tensors on the CPU, on every rank (a collective under ZeRO-3 and FSDP2:
    ZeRO-3's partitioned parameters are gathered, FSDP2's DTensor shards assembled)."""
    from torch.distributed.tensor import DTensor

    params = list(network.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in network.state_dict().items()
    }


class LiveReference(Callback):
    """The wrong reference of a preference run, for the teeth of its equivalence tests: the live policy itself, not
    its frozen copy (what a sharded reference that aliased the policy's parameters would compute)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.preference.reference = pl_module.network


class ReferenceShards(Callback):
    """Write, per rank, how many elements of the preference reference's parameters the rank holds, of how many, and
    whether any of them requires or holds a gradient, to ``<directory>/reference-rank<r>.json`` at the end of training.

    Args:
        directory: output folder.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        held = total = 0
        grads = False
        for p in pl_module.preference.reference.parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition, or all of a persistent (small) parameter
                held += p.ds_numel if p.ds_persist else p.ds_tensor.numel()
                total += p.ds_numel
            else:
                held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                total += p.numel()
            grads = grads or p.requires_grad or p.grad is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        report = {"held": held, "total": total, "grads": grads}
        (self.directory / f"reference-rank{trainer.global_rank}.json").write_text(json.dumps(report))


class NaNAtStep(HFCausalLM):
    """``HFCausalLM`` whose ``nan_at``-th training forward (1-based; the optimizer step without accumulation) gives
    NaN logits, on rank ``nan_rank`` only (all ranks when ``None``): a loss that blows up at a chosen step.

    Args:
        nan_at: the training forward that returns NaN.
        nan_rank: the global rank that produces it.
        **kwargs: ``HFCausalLM``'s.
    """

    def __init__(self, nan_at: int = 2, nan_rank: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.nan_at = nan_at
        self.nan_rank = nan_rank
        self._forwards = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object) -> LMOutput:
        out = super().forward(input_ids, labels=labels, **kwargs)
        if not self.training:
            return out
        self._forwards += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self._forwards == self.nan_at and self.nan_rank in (None, rank):
            return causal_lm_output(out.logits * float("nan"), labels)
        return out


class HostReads(Callback):
    """Count, per optimizer step, what a step reads back to the host and which collectives it makes.

    Tensor reads (``item``, ``tolist``, ``int()``, ``float()``, ``bool()``, ``cpu``, ``nonzero``, ``numpy``...) are
    seen by a ``TorchFunctionMode``: on a GPU each makes the host wait for the device's queue. Calls of
    ``torch.distributed`` collectives (object broadcasts and gathers, ``barrier``, ``all_reduce``, ...) are counted
    by wrapping them: an object collective pickles and reads back, a barrier blocks the host under NCCL.

    A step is counted whole: from its first micro-batch's ``on_train_batch_start`` to the next step's, so that every
    callback's ``on_train_batch_end`` is inside it (Lightning runs the checkpoint callbacks last). Writes
    ``{global_step: [calls]}`` to ``<directory>/reads.json`` on rank 0, each call as ``name package/file.py:function
    device`` (the code that asked for it, and the device of the tensor read, or ``dist`` for a collective).
    """

    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu", "nonzero"}
    SCALAR_ONLY = {"__len__"}  # of a 1-element tensor only (len() of a batch is not a read)
    COLLECTIVES = (
        "all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter_tensor",
        "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "monitored_barrier",
    )  # fmt: skip

    def __init__(self, directory: str) -> None:
        from torch.overrides import TorchFunctionMode

        self.directory = Path(directory)
        self.reads: dict[int, list[str]] = {}
        callback = self

        class Reads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = getattr(func, "__name__", "")
                tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if tensor is not None and (
                    name in HostReads.READS or (name in HostReads.SCALAR_ONLY and tensor.numel() == 1)
                ):
                    callback.record(f"{name} {_caller()} {tensor.device.type}")
                return func(*args, **(kwargs or {}))

        self.mode = Reads()
        self.step = -1
        self.active = False
        self._wrapped: dict[str, Any] = {}

    def record(self, call: str) -> None:
        self.reads.setdefault(self.step, []).append(call)

    def _wrap_collectives(self) -> None:
        import torch.distributed as dist

        for name in self.COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue

            def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                self.record(f"{_name} {_caller()} dist")
                return _original(*args, **kwargs)

            self._wrapped[name] = original
            setattr(dist, name, counted)

    def _unwrap_collectives(self) -> None:
        import torch.distributed as dist

        for name, original in self._wrapped.items():
            setattr(dist, name, original)
        self._wrapped.clear()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.active = True
        self._wrap_collectives()
        self.mode.__enter__()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step != self.step:  # the first micro-batch of a step: the previous step is over
            self.step = trainer.global_step
            self.reads.setdefault(self.step, [])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active:
            self.mode.__exit__(None, None, None)
            self._unwrap_collectives()
            self.active = False
        self.reads.pop(-1, None)  # before the first step (nothing, unless set-up read something)
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "reads.json").write_text(json.dumps(self.reads))


def _caller() -> str:
    """``package/path.py:function`` of the innermost frame outside torch (or in ``torch.optim``, whose optimizers
    read their host-side step counters): who asked for a host read."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename or "/torch/optim/" in frame.filename:
            path = frame.filename
            for root in ("site-packages/", "/src/", "/tests/"):
                path = path.split(root)[-1]
            return f"{path}:{frame.name}"
    return "?"


# --- tiny data: seeded sentences, a BPE trained on them, a TextDataModule over a file ---------------------------------

WORDS = "the quick brown fox jumps over a lazy dog while cats sit on warm mats and birds sing".split()


def sentences(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[str]:
    """``n`` random sentences of ``lo``..``hi`` words, seeded."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def make_tokenizer(tmp: Path, vocab_size: int = 300) -> TrainedBPE:
    """A byte-level BPE trained on a small local corpus (cached under ``tmp``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "tok_corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(sentences(300, seed=1)))
    return TrainedBPE(corpus=[str(corpus)], vocab_size=vocab_size, cache_dir=str(tmp / "cache"))


def make_dm(tmp: Path, path: str, **kw) -> TextDataModule:
    kw.setdefault("block_size", 32)
    kw.setdefault("batch_size", 4)
    return TextDataModule(make_tokenizer(tmp), path=path, cache_dir=str(tmp / "cache"), **kw)


# --- in-process training on random token rows (the LightningModule and adapter tests) --------------------------------


def random_batches(vocab_size: int, n: int = 16, seq: int = 12) -> DataLoader:
    """``n`` seeded rows of ``seq`` random tokens in batches of 4: ``input_ids``/``labels`` ``[4, seq]``, no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (n, seq), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    return DataLoader(rows, batch_size=4)


def fit_in_process(
    system: LightningModule, steps: int, vocab_size: int, precision: str = "32-true", **trainer_kwargs: Any
) -> Trainer:
    """Train ``system`` for ``steps`` optimizer steps on ``random_batches(vocab_size)`` with a bare CPU Trainer
    (``trainer_kwargs``: further Trainer arguments, e.g. ``callbacks`` or a ``profiler``)."""
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(system, random_batches(vocab_size))
    return trainer

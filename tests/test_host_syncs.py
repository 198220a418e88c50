"""A training step reads one value back to the host: whether to step the optimizer (``model.nonfinite``).

On a GPU every read (``.item()``, ``float(t)``, ``.tolist()``) makes the host wait until the device has run everything
queued, so the next step's kernels cannot be queued behind the current ones. litune keeps the step's token count and
loss on the device between logging steps and joins the loss's NaN check to the gradients' (one all-reduce, one read);
on several processes the preemption flag and the time-based checkpoint's decision ride on that same all-reduce
(:mod:`litune.callbacks.step_votes`) instead of a read and an object broadcast of their own.
Counted here on CPU with a ``TorchFunctionMode`` and wrapped ``torch.distributed`` collectives over whole optimizer
steps of a real ``litune fit`` (litune's default callbacks, checkpoint callbacks included: ``HostReads``); on one
process (accumulation 2) and on two (DDP, gloo). Logging steps, the first step (which checks the network's target
count once) and the last (the final checkpoint) read more, by design. On a GPU (``gpu`` variant, run by
``bench/gpu.sh``) the same count is taken over CUDA tensors only, which separates host data from device values by
construction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from litune.cli import main
from litune.models.transformer import DecoderLM
from litune.module import LitLM
from litune_testing import REPO, fit_args, run_litune

STEPS, LOG_EVERY = 8, 3
FRAMEWORK = ("litune/", "lightning/")  # where the reads counted come from
HOST_BATCH_COUNT = "__int__ litune/objective.py:count cpu"
HOST_BATCH_MASK = "__bool__ litune/module.py:on_before_batch_transfer cpu"  # drops an all-ones mask before transfer
HOST_RNG = "numpy litune/callbacks/resume.py:set_rng_states cpu"  # the RNG states ExactResume puts back: host memory
SKIP_DECISION = "tolist litune/callbacks/step_votes.py:agree"
# the token count; the skip decision with the votes
STEP_ALL_REDUCE = "all_reduce litune/strategies/collectives.py:sum_over_ranks dist"


def host_reads(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str, processes: int = 1
) -> dict[int, list[str]]:
    """Train ``STEPS`` steps of the tiny run (in this process, or ``litune fit`` on ``processes`` DDP processes);
    the host reads and collectives of each optimizer step."""
    args = fit_args(tmp_path, corpus_dir, tokenizer_dir, *extra, steps=STEPS)
    flag = "--trainer.callbacks="
    callbacks = json.loads(next(a for a in args if a.startswith(flag)).removeprefix(flag))
    callbacks.append({"class_path": "litune_testing.HostReads", "init_args": {"directory": str(tmp_path / "reads")}})
    args = [a for a in args if not a.startswith(flag)]
    args += [f"{flag}{json.dumps(callbacks)}", f"--trainer.log_every_n_steps={LOG_EVERY}"]
    if processes > 1:
        # Ranks that disagree on entering a collective fail within 120 s naming it, instead of hanging the test.
        ddp = ("--config", str(REPO / "configs" / "strategy" / "ddp.yaml"), f"--trainer.devices={processes}",
               "--dist_timeout=120")  # fmt: skip
        run_litune("fit", *args, *ddp)
    else:
        try:
            assert main(["fit", *args]) == 0
        finally:
            os.environ.pop("LITUNE_RUN_DIR", None)
    reads = {int(step): calls for step, calls in json.loads((tmp_path / "reads" / "reads.json").read_text()).items()}
    assert sorted(reads) == list(range(STEPS))
    return reads


def quiet_steps() -> list[int]:
    """Steps that neither log nor are the first or the last one."""
    quiet = [step for step in range(1, STEPS - 1) if (step + 1) % LOG_EVERY != 0]
    assert quiet == [1, 3, 4, 6]
    return quiet


def test_steps_between_logging_steps_read_one_value_to_the_host(tmp_path: Path, corpus_dir, tokenizer_dir) -> None:
    reads = host_reads(tmp_path, corpus_dir, tokenizer_dir)
    quiet = quiet_steps()
    for step in quiet:
        # Reads asked for by litune and Lightning (those inside transformers' model and torch.optim's step counters
        # happen in a hand-written loop too; the test's own probe callback is not counted). The look-ahead counts the
        # targets of host batches, and padding is looked for, before batches move to the device. The one read of a
        # device value: the skip decision.
        ours = [call for call in reads[step] if call.split()[1].startswith(FRAMEWORK)]
        host_batch = (HOST_BATCH_COUNT, HOST_BATCH_MASK, HOST_RNG)
        assert [call for call in ours if call not in host_batch] == [f"{SKIP_DECISION} cpu"], (step, reads[step])
    logging = [step for step in range(STEPS - 1) if step not in quiet]
    for step in logging:  # teeth: the counter sees the reads of the logging steps (loss, token count, metrics)
        assert sum(call.split()[1].startswith("litune/module.py") for call in reads[step]) > 1, (step, reads[step])


@pytest.mark.slow
@pytest.mark.distributed
def test_on_two_processes_a_step_reads_one_value_and_makes_two_all_reduces(
    tmp_path: Path, corpus_dir, tokenizer_dir
) -> None:
    """DDP on 2 processes: the token count and the skip decision are each one all-reduce, and the skip decision's
    carries the preemption flag and the time-based checkpoint's decision (no ``.item()`` of the preemption check, no
    object broadcast of Lightning's checkpoint clock, no barrier before the all-reduces, no broadcast and ``.item()``
    of Lightning's SIGTERM flag on every micro-batch)."""
    reads = host_reads(tmp_path, corpus_dir, tokenizer_dir, processes=2)
    for step in quiet_steps():
        ours = [call for call in reads[step] if call.split()[1].startswith(FRAMEWORK)]
        host_data = (HOST_BATCH_COUNT, HOST_BATCH_MASK, HOST_RNG)
        values = [call for call in ours if not call.endswith(" dist") and call not in host_data]
        assert values == [f"{SKIP_DECISION} cpu"], (step, reads[step])
        assert [call for call in ours if call.endswith(" dist")] == [STEP_ALL_REDUCE] * 2, (step, reads[step])
    # Teeth: the counter sees the first step's check of the token count (a read and a reduce more) and the last step's
    # final checkpoint (barriers, the gather of every rank's RNG states).
    assert len(reads[0]) > len(reads[1]), reads
    assert sum(call.endswith(" dist") for call in reads[STEPS - 1]) > 2, reads[STEPS - 1]


@pytest.mark.gpu
def test_on_a_gpu_steps_between_logging_steps_read_one_device_value(tmp_path: Path, corpus_dir, tokenizer_dir) -> None:
    reads = host_reads(tmp_path, corpus_dir, tokenizer_dir, "--trainer.accelerator=gpu", "--trainer.devices=1")
    for step in quiet_steps():
        ours = [call for call in reads[step] if call.split()[1].startswith(FRAMEWORK) and call.endswith(" cuda")]
        assert ours == [f"{SKIP_DECISION} cuda"], (step, reads[step])


class MaskRecorder(DecoderLM):
    """litune's decoder, recording whether each forward got an ``attention_mask``."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.got_mask: list[bool] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):  # noqa: ANN001, ANN201
        self.got_mask.append(attention_mask is not None)
        return super().forward(input_ids, attention_mask=attention_mask, **kwargs)


def test_unpadded_batches_reach_the_network_without_a_mask_and_callbacks_still_see_it() -> None:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    full = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    padded = [dict(row) for row in full]
    padded[1]["attention_mask"] = torch.tensor([1] * 8 + [0] * 4)
    seen: list[bool] = []

    class SeesMask(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen.append("attention_mask" in batch)

    network = MaskRecorder(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=64, max_seq_len=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SeesMask()],
    )  # fmt: skip
    trainer.fit(LitLM(network), DataLoader(full[:2] + padded[:2], batch_size=2))
    assert seen == [True, True]  # the batch itself keeps its mask
    assert network.got_mask == [False, True]  # no padding: no mask for the network; padding: the mask

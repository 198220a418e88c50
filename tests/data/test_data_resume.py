"""Exact mid-epoch resume: an interrupted and resumed run sees the same batch sequence as an uninterrupted one, through
the real Trainer, checkpointing and a real tiny litune decoder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from litune.data.sampler import ResumableSampler
from litune.models.transformer import DecoderLM
from litune.module import LitLM
from litune_testing import make_dm, sentences


class BatchRecorder(Callback):
    """Keeps the input ids of every training batch, in order."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int):
        self.batches.append(batch["input_ids"].clone())


def fit(
    tmp: Path, data: Path, max_steps: int, ckpt_path: str | None = None, reload: int = 0, every: int | None = 7, **dm_kw
) -> list[torch.Tensor]:
    dm = make_dm(tmp, str(data), sample_by="line", block_size=32, batch_size=4, val_fraction=0.0, **dm_kw)
    torch.manual_seed(0)
    net = DecoderLM(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=len(dm.tokenizer), max_seq_len=32)
    recorder = BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[
            recorder,
            ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=reload,
    )
    trainer.fit(LitLM(net), datamodule=dm, ckpt_path=ckpt_path, weights_only=False)  # our own checkpoint
    return recorder.batches


@pytest.mark.parametrize(("group_by_length", "num_workers"), [(False, 0), (True, 0), (False, 2)])
def test_resumed_run_sees_the_same_batches(tmp_path: Path, group_by_length: bool, num_workers: int) -> None:
    data = tmp_path / "d.txt"
    data.write_text("\n".join(sentences(50, seed=2, lo=2, hi=25)))
    kw = {
        "group_by_length": group_by_length,
        "layout": "pad" if group_by_length else "concat",
        "num_workers": num_workers,
    }  # worker processes iterate the sampler ahead of training
    full = fit(tmp_path / "full", data, max_steps=30, **kw)
    epoch_len = len(
        make_dm(
            tmp_path / "full", str(data), sample_by="line", block_size=32, batch_size=4, val_fraction=0.0, **kw
        ).train_dataloader()
    )
    assert epoch_len < 30 and epoch_len % 7 != 0 and epoch_len < 14 < 2 * epoch_len  # step 7 and 14 are mid-epoch
    # epochs really differ in order (else the test could not tell a restarted epoch from a resumed one)
    assert not torch.equal(
        torch.cat([b.flatten() for b in full[:3]]), torch.cat([b.flatten() for b in full[epoch_len : epoch_len + 3]])
    )

    first = fit(tmp_path / "run", data, max_steps=14, **kw)  # leaves step7 and step14 checkpoints
    ckpts = sorted((tmp_path / "run" / "ckpt").glob("*step=14*.ckpt"))
    assert ckpts, list((tmp_path / "run" / "ckpt").iterdir())
    resumed = fit(tmp_path / "run", data, max_steps=30, ckpt_path=str(ckpts[0]), **kw)
    assert len(first) + len(resumed) == len(full) == 30
    for i, (a, b) in enumerate(zip(full, first + resumed, strict=True)):
        assert torch.equal(a, b), f"batch {i} differs after resuming at step 14"


def test_extending_a_finished_run_continues_its_epoch(tmp_path: Path) -> None:
    """A run stopped by max_steps mid-epoch and extended from its ``last.ckpt``: Lightning has already counted that
    epoch as complete in the checkpoint, yet the data must continue where the stopped run left off."""
    data = tmp_path / "d.txt"
    data.write_text("\n".join(sentences(50, seed=2, lo=2, hi=25)))
    last = str(tmp_path / "run" / "ckpt" / "last.ckpt")  # saved when max_steps ends each leg (no periodic saves)
    full = fit(tmp_path / "full", data, max_steps=40, every=None)
    first = fit(tmp_path / "run", data, max_steps=10, every=None)
    second = fit(tmp_path / "run", data, max_steps=25, ckpt_path=last, every=None)
    third = fit(tmp_path / "run", data, max_steps=40, ckpt_path=last, every=None)
    assert len(first) + len(second) + len(third) == len(full) == 40
    for i, (a, b) in enumerate(zip(full, first + second + third, strict=True)):
        assert torch.equal(a, b), f"batch {i} differs in the extended run"


def test_streaming_resume_sees_the_same_batches(tmp_path: Path) -> None:
    """Streams have no sampler: the epoch reshuffle (reloading the loader every epoch) and the skip of consumed rows
    are done by the data module, and must give the same batches too."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"{i} {s}"}) for i, s in enumerate(sentences(50, seed=2, hi=25))))
    kw = {"streaming": True, "layout": "pad", "reload": 1}
    probe = make_dm(
        tmp_path / "probe",
        str(data),
        sample_by="line",
        block_size=32,
        batch_size=4,
        val_fraction=0.0,
        streaming=True,
        layout="pad",
    )
    probe.setup("fit")
    epoch_len = sum(1 for _ in probe.train_dataloader())
    assert epoch_len < 14 < 2 * epoch_len and epoch_len % 7
    full = fit(tmp_path / "full", data, max_steps=30, **kw)
    assert not torch.equal(full[0], full[epoch_len])  # the stream is reshuffled each epoch
    fit(tmp_path / "run", data, max_steps=14, **kw)
    first = fit(tmp_path / "run2", data, max_steps=14, **kw)
    ckpt = next((tmp_path / "run" / "ckpt").glob("*step=14*.ckpt"))
    resumed = fit(tmp_path / "run", data, max_steps=30, ckpt_path=str(ckpt), **kw)
    assert len(first) + len(resumed) == len(full) == 30
    for i, (a, b) in enumerate(zip(full, first + resumed, strict=True)):
        assert torch.equal(a, b), f"batch {i} differs after resuming at step 14"


def test_restart_without_resume_state_would_differ(tmp_path: Path) -> None:
    """The sampler state is what makes the resume exact: a plain restart of the epoch repeats batches."""
    data = list(range(40))
    s = ResumableSampler(data, shuffle=True, seed=1)
    s.set_epoch(3)
    order = list(s)
    resumed = ResumableSampler(data, shuffle=True, seed=1)
    resumed.resume(epoch=3, rows_consumed=12)
    resumed.set_epoch(3)
    assert list(resumed) == order[12:]
    assert list(resumed) == order[12:]  # every pass over the resumed epoch (Lightning may iterate twice)
    resumed.set_epoch(4)
    s.set_epoch(4)
    assert list(resumed) == list(s)  # the next epoch starts from its beginning


def test_shards_are_disjoint_and_cover_the_epoch() -> None:
    data = list(range(103))
    for world in (2, 3):
        shards = [list(ResumableSampler(data, num_replicas=world, rank=r, seed=5)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank the same number of rows (no DDP hang)
        seen = [i for s in shards for i in s]
        assert set(seen) == set(data)
        assert len(seen) - len(set(seen)) == -len(data) % world  # only DistributedSampler's padding repeats
        # resuming on a different world size continues with exactly the rows nobody has seen
        consumed = 2 * 4 * world  # 2 batches of 4 per rank
        first = [i for r in range(world) for i in shards[r][:8]]
        rest = []
        for r in range(2):
            s = ResumableSampler(data, num_replicas=2, rank=r, seed=5)
            s.resume(0, consumed)
            rest += list(s)
        assert set(first) | set(rest) == set(data) and not set(first) & set(rest[: len(data) - consumed - 2])

"""A real 2-process CPU run (DDP over gloo; DeepSpeed ZeRO-2 too, marked slow): rank 0 tokenizes into the cache
while rank 1 waits and then reads the same files; each rank trains on a disjoint shard of the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from litune_testing import sentences

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from litune_testing import make_dm
    from litune.models.transformer import DecoderLM
    from litune.module import LitLM

    tmp, data, strategy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if strategy == "deepspeed":
        from litune.strategies import DeepSpeedStrategy
        strategy = DeepSpeedStrategy(stage=2)

    class Rows(Callback):
        def __init__(self):
            self.rows = []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                self.rows.append(ids[mask.bool()].tolist())

    dm = make_dm(tmp, data, sample_by="line", layout="pad", block_size=64, batch_size=4, val_fraction=0.1)
    torch.manual_seed(0)
    net = DecoderLM(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=300, max_seq_len=64)
    rows = Rows()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[rows])
    trainer.fit(LitLM(net), datamodule=dm)
    out = {{"rank": trainer.global_rank, "cache_hit": dm.cache_hit, "rows": rows.rows,
           "train_rows": len(dm.train_set), "cache_folder": dm.stats["cache_folder"]}}
    (tmp / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(out))
    # As litune fit does: end the process group before exit. Left to interpreter shutdown, DeepSpeed's gloo group once
    # aborted the process ("terminate called without an active exception") after a finished fit.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_rank0_prepares_and_shards_are_disjoint(tmp_path: Path, strategy: str) -> None:
    data = tmp_path / "d.txt"
    data.write_text("\n".join(f"{i} {s}" for i, s in enumerate(sentences(64, seed=9))))  # unique rows
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1])))  # tests/: litune_testing.py
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(data), strategy],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 0 built the cache in prepare_data; rank 1 did not tokenize: it found the finished cache after the barrier
    # (had it looked before rank 0 finished, setup would have raised) and loaded the same folder
    assert r0["cache_hit"] is False and r1["cache_hit"] is True
    assert r0["cache_folder"] == r1["cache_folder"]
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1
    # disjoint shards that together cover the training rows (64 lines, 6 held out -> 58 rows, 29 per rank)
    rows0, rows1 = ({tuple(r) for r in x["rows"]} for x in (r0, r1))
    assert len(r0["rows"]) == len(r1["rows"]) == r0["train_rows"] // 2
    assert not rows0 & rows1
    assert len(rows0 | rows1) == r0["train_rows"]

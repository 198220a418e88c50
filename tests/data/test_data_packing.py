"""Packing: full rows from short samples, position ids restarting per document, and (with a real litune decoder) no
attention across the document boundary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from litune.data.collate import PadCollator
from litune.data.packing import concat_into_blocks, pack_samples
from litune.models import HFCausalLM
from litune.models.transformer import DecoderLM
from litune_testing import make_dm, sentences


def test_pack_samples_never_splits_a_sample_and_fills_rows() -> None:
    rng = random.Random(0)
    samples = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 30))] for _ in range(300)]
    out = pack_samples({"input_ids": samples}, block_size=32, document_positions=True)
    assert all(len(r) <= 32 for r in out["input_ids"])
    # every sample appears whole, exactly once: split rows at position-id restarts and compare as multisets
    pieces = []
    for ids, pos in zip(out["input_ids"], out["position_ids"], strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        pieces += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    assert sorted(pieces) == sorted(tuple(s) for s in samples)
    efficiency = sum(map(len, samples)) / (32 * len(out["input_ids"]))
    assert efficiency >= 0.95


def test_concat_positions_restart_at_documents_and_rows() -> None:
    out = concat_into_blocks({"input_ids": [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 9, 10, 11, 9]]}, 5, True)
    assert out["input_ids"] == [[1, 2, 3, 9, 4], [5, 9, 6, 7, 8], [9, 10, 11, 9]]
    assert out["position_ids"] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3]]


def test_collator_pads_to_multiple_of_8_capped_at_block_size() -> None:
    c = PadCollator(pad_token_id=0, pad_to_multiple_of=8, max_length=20)
    assert c.padded_length(9) == 16 and c.padded_length(17) == 20 and c.padded_length(20) == 20
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [4], "position_ids": [0]},  # no labels: every real token is a target
    ]
    batch = c(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [0] * 5, [4] + [0] * 7]  # longest row 3 -> 8
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [4] + [-100] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 0] + [0] * 5, [0] * 8]
    long = c([{"input_ids": list(range(1, 18)), "position_ids": list(range(17))}])
    assert long["input_ids"].shape == (1, 20)  # 17 would round up to 24: capped at max_length
    assert c([{"input_ids": [5, 6], "labels": []}])["labels"].tolist() == [[5, 6] + [-100] * 6]  # empty: as none
    with pytest.raises(ValueError, match="a row's labels has 3 entries but its input_ids 2"):
        c([{"input_ids": [5, 6], "labels": [5, 6, 7]}])  # misaligned targets are refused, never truncated


def _docs_file(tmp_path: Path) -> Path:
    f = tmp_path / "mixed.txt"
    f.write_text("\n".join(sentences(200, seed=5, lo=2, hi=30)))
    return f


def test_packed_layout_is_efficient_and_padding_is_not(tmp_path: Path) -> None:
    f = _docs_file(tmp_path)
    packed = make_dm(tmp_path, str(f), sample_by="line", layout="pack", block_size=64, val_fraction=0.0)
    packed.setup("fit")
    padded = make_dm(tmp_path, str(f), sample_by="line", layout="pad", block_size=64, val_fraction=0.0)
    padded.setup("fit")
    assert packed.stats["tokens"] == padded.stats["tokens"]  # the same tokens, differently laid out
    assert packed.stats["train"]["packing_efficiency"] >= 0.95
    assert padded.stats["train"]["packing_efficiency"] < 0.7


def _decoder(vocab_size: int) -> torch.nn.Module:
    return DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=vocab_size, max_seq_len=64)


def _hf_gpt2(vocab_size: int) -> torch.nn.Module:
    cfg = {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}
    return HFCausalLM(config=cfg)


@pytest.mark.parametrize("network", [_decoder, _hf_gpt2], ids=["litune-decoder", "hf-gpt2"])
def test_no_attention_across_packed_documents(tmp_path: Path, network) -> None:
    """A real network (litune's decoder, or the HF GPT-2 wrapper) gives the 2nd document of a packed row the same
    logits as that document alone."""
    f = _docs_file(tmp_path)
    dm = make_dm(
        tmp_path,
        str(f),
        sample_by="line",
        layout="pack",
        document_mask=True,
        block_size=64,
        val_fraction=0.0,
        shuffle=False,
    )
    dm.setup("fit")
    # the row holding the most documents, batched by the module's own collator
    i = max(range(len(dm.train_set)), key=lambda k: dm.train_set[k]["position_ids"].count(0))
    batch = dm.collator()([dm.train_set[i]])
    row, pos, mask = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
    assert int(((pos[0] == 0) & mask[0].bool()).sum()) >= 3, "a packed row should hold several documents"
    torch.manual_seed(0)
    net = network(len(dm.tokenizer)).eval()
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    a, b = starts[1], starts[2]
    with torch.no_grad():
        packed = net(row, attention_mask=mask, position_ids=pos).logits[0, a:b]
        alone = net(row[:, a:b]).logits[0]
        unmasked = net(row, attention_mask=mask).logits[0, a:b]  # one sequence: the earlier document is visible
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the document mask the context leaks in


def test_length_grouped_batches_need_less_padding() -> None:
    from litune.data.sampler import ResumableSampler

    rng = random.Random(1)
    lengths = [rng.randint(4, 512) for _ in range(2000)]
    collator = PadCollator(pad_token_id=0, pad_to_multiple_of=8, max_length=512)

    def padding(order: list[int]) -> float:
        padded = sum(
            collator.padded_length(max(lengths[j] for j in order[i : i + 8])) * len(order[i : i + 8])
            for i in range(0, len(order), 8)
        )
        return 1 - sum(lengths) / padded

    shuffled = list(ResumableSampler(lengths, seed=0))
    grouped = ResumableSampler(lengths, seed=0, lengths=lengths, group_by_length=True, batch_size=8)
    order = list(grouped)
    assert sorted(order) == sorted(shuffled) == list(range(2000))  # the same rows, another order
    assert padding(order) < 0.1 < 0.4 < padding(shuffled)
    assert max(lengths[j] for j in order[:8]) == max(lengths)  # the longest batch first: out-of-memory shows at once

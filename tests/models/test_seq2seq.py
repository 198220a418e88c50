"""The encoder-decoder and its data: teacher forcing, padding on both sides, checkpointing, saving, the synthetic
task learned through the real CLI, and source/target files with configurable columns."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch

from litune.data.seq2seq import Seq2SeqDataModule
from litune.data.sources import write_pairs
from litune.data.synthetic import SyntheticSeq2SeqDataModule
from litune.data.tokenizer import SymbolTokenizer, load_tokenizer
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune.models.seq2seq import Seq2SeqLM

PAD_ID, EOS_ID = SymbolTokenizer.PAD_ID, SymbolTokenizer.EOS_ID

REPO = Path(__file__).resolve().parents[2]
VOCAB = 32


def tiny(seed: int = 0, **kw: object) -> Seq2SeqLM:
    torch.manual_seed(seed)
    args = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=24)
    return Seq2SeqLM(**{**args, "init_std": 0.1, **kw})


def ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the network --------------------------------------------------------------------------------------------------


def test_teacher_forcing_shifts_the_target_right_and_takes_the_loss_on_target_tokens_only() -> None:
    net = tiny().eval()
    src, tgt = ids(2, 7), ids(2, 5, seed=1)
    tgt[1, 3:] = IGNORE_INDEX
    shifted = net.shift_right(tgt)
    assert shifted[:, 0].eq(net.decoder_start_token_id).all() and torch.equal(shifted[0, 1:], tgt[0, :4])
    assert shifted[1, 4] == net.pad_token_id  # an ignored label becomes padding in the decoder input
    out = net(src, labels=tgt)
    assert out.logits.shape == (2, 5, VOCAB) and torch.equal(out.targets, tgt)
    keep = tgt != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(out.logits[keep], tgt[keep])
    torch.testing.assert_close(out.loss, manual)
    # Explicit decoder input gives the same logits on the real target positions (padding queries may differ).
    torch.testing.assert_close(net(src, decoder_input_ids=shifted).logits[keep], out.logits[keep])


def test_padding_on_either_side_does_not_change_the_real_tokens() -> None:
    net = tiny().eval()
    src, tgt = ids(2, 9), ids(2, 6, seed=1)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    tgt[1, 4:] = IGNORE_INDEX
    with torch.no_grad():
        batched = net(src, mask, tgt).logits
        alone = net(src[1:, :5], labels=tgt[1:, :4]).logits
    torch.testing.assert_close(batched[1:, :4], alone, rtol=1e-5, atol=1e-5)
    # The source mask matters: without it row 1's output changes.
    with torch.no_grad():
        assert not torch.allclose(net(src, None, tgt).logits[1:, :4], alone, atol=1e-3)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_checkpointing_gives_the_same_gradients(norm_first: bool) -> None:
    net = tiny(dropout=0.1, norm_first=norm_first, activation="relu").train()
    src, tgt = ids(3, 8), ids(3, 6, seed=1)

    def grads() -> dict[str, torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(7)
        net(src, labels=tgt).loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    plain = grads()
    net.gradient_checkpointing = True
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_strict_loading_names_missing_and_unexpected_keys() -> None:
    from litune.models.state_dict import load_strict

    net = tiny()
    load_strict(tiny(seed=1), net.state_dict(), source="test")  # the same architecture loads
    state = net.state_dict()
    state["decoder.h.7.ln_1.weight"] = state.pop("decoder.h.1.ln_1.weight")
    with pytest.raises(ConfigError, match=r"missing keys \['decoder.h.1.ln_1.weight'\].*unexpected keys"):
        load_strict(tiny(), state, source="test")


def test_bad_encoder_decoder_settings() -> None:
    with pytest.raises(ConfigError, match="num_encoder_layers=0"):
        tiny(num_encoder_layers=0)
    with pytest.raises(ConfigError, match="num_decoder_layers=0"):
        tiny(num_decoder_layers=0)
    with pytest.raises(ConfigError, match="nhead=5"):
        tiny(nhead=5)
    with pytest.raises(ConfigError, match="decoder_start_token_id=40"):
        tiny(decoder_start_token_id=40)
    with pytest.raises(ConfigError, match="30 tokens.*max_seq_len=24"):
        tiny()(ids(1, 30), labels=ids(1, 4))


# --- data ---------------------------------------------------------------------------------------------------------


def test_synthetic_reverse_task_batches() -> None:
    dm = SyntheticSeq2SeqDataModule(task="reverse", num_symbols=6, min_length=3, max_length=5, num_train=64,
                                    batch_size=8)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for src, mask, tgt in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert 3 <= n <= 5 and (src[n:] == PAD_ID).all()
        assert torch.equal(tgt[:n], src[:n].flip(0)) and tgt[n] == EOS_ID and (tgt[n + 1 :] == IGNORE_INDEX).all()
        assert ((src[:n] >= 4) & (src[:n] < 10)).all()
    again = SyntheticSeq2SeqDataModule(task="reverse", num_symbols=6, min_length=3, max_length=5, num_train=64)
    again.setup("fit")
    assert torch.equal(again.val_set[0]["input_ids"], dm.val_set[0]["input_ids"])  # seeded


def test_symbol_tokenizer_round_trips_the_task_ids() -> None:
    tok = load_tokenizer(SymbolTokenizer(num_symbols=10))
    assert len(tok) == 14 and tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID
    assert tok("3 1 4")["input_ids"] == [7, 5, 8]
    assert tok.decode([8, 5, 7, EOS_ID], skip_special_tokens=True) == "4 1 3"


def test_synthetic_task_rejects_a_tokenizer_or_network_that_does_not_match() -> None:
    with pytest.raises(ConfigError, match="num_symbols: 6"):
        SyntheticSeq2SeqDataModule(num_symbols=6, tokenizer=SymbolTokenizer(num_symbols=10))
    with pytest.raises(ConfigError, match="max_length=2 < min_length=4"):
        SyntheticSeq2SeqDataModule(max_length=2)


def test_pairs_from_jsonl_and_csv_with_configurable_columns(tmp_path, tokenizer_dir) -> None:
    pairs = [(f"def f{i}(x): return x + {i}", f"add {i}") for i in range(40)]
    write_pairs(tmp_path / "train.jsonl", pairs, source="code", target="summary")
    with open(tmp_path / "val.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["code", "summary"])
        writer.writerows(pairs[:6])
    dm = Seq2SeqDataModule(
        tokenizer=str(tokenizer_dir), path=str(tmp_path / "train.jsonl"), validation_path=str(tmp_path / "val.csv"),
        source_column="code", target_column="summary", max_target_length=4, batch_size=4,
    )  # fmt: skip
    dm.setup("fit")
    tok = load_tokenizer(str(tokenizer_dir))
    assert len(dm.train_set) == 40 and len(dm.val_set) == 6
    batch = next(iter(dm.val_dataloader()))
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert tok.decode(row) == pairs[0][0]  # the source, tokenized on its own
    target = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert target[-1] == tok.eos_token_id and len(target) <= 4  # truncated to max_target_length, EOS kept
    assert tok.decode(target[:-1]) == tok.decode(tok(pairs[0][1])["input_ids"][:3])


def test_a_missing_column_lists_the_columns_of_the_file(tmp_path, tokenizer_dir) -> None:
    write_pairs(tmp_path / "p.jsonl", [("a", "b"), ("c", "d")], source="src", target="tgt")
    dm = Seq2SeqDataModule(tokenizer=str(tokenizer_dir), path=str(tmp_path / "p.jsonl"), source_column="source",
                           target_column="tgt")  # fmt: skip
    with pytest.raises(ConfigError, match=r"no column\(s\) \['source'\]; its columns are \['src', 'tgt'\]"):
        dm.setup("fit")


def test_token_accuracy_callback_is_the_micro_average_over_the_epoch(tmp_path) -> None:
    import lightning as L

    from litune.callbacks.token_accuracy import TokenAccuracy
    from litune.module import LitLM

    dm = SyntheticSeq2SeqDataModule(num_symbols=6, min_length=2, max_length=9, num_train=8, num_val=50, batch_size=16)
    system = LitLM(network=tiny(vocab_size=10))
    trainer = L.Trainer(accelerator="cpu", callbacks=[TokenAccuracy()], logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    calls = []
    system.network.register_forward_hook(lambda *args: calls.append(1))
    (metrics,) = trainer.validate(system, datamodule=dm, verbose=False)
    assert len(calls) == len(dm.val_dataloader())  # the callback reuses validation_step's output, no second forward
    correct = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():  # batches with different numbers of target tokens
            out = system.network.eval()(**batch)
            keep = out.targets != IGNORE_INDEX
            correct += int((out.logits.argmax(-1) == out.targets)[keep].sum())
            total += int(keep.sum())
    assert metrics["val/acc"] == pytest.approx(correct / total, abs=1e-6)
    assert 0 < correct < total  # an untrained network: neither all right nor all wrong


# --- end to end through the CLI -----------------------------------------------------------------------------------


def read_metric(run: Path, name: str) -> list[float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [float(r[name]) for r in rows if r.get(name)]


def test_litune_fit_learns_to_reverse_and_generate_reverses(tmp_path, monkeypatch, capsys) -> None:
    from litune.cli import main

    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)
    start = time.perf_counter()
    args = ["fit", "--config", str(REPO / "configs" / "seq2seq-reverse.yaml"), f"--runs_dir={tmp_path}",
            "--trainer.max_steps=250", "--trainer.val_check_interval=250", "--trainer.enable_progress_bar=false",
            "--data.init_args.num_train=16000"]  # fmt: skip
    assert main(args) == 0
    seconds = time.perf_counter() - start
    (run,) = list(tmp_path.glob("*-seq2seq-reverse"))
    accuracy = read_metric(run, "val/acc")[-1]
    with capsys.disabled():  # shown with `pytest -s`: the number the issue asks for
        print(f"\nseq2seq reverse: val/acc={accuracy:.4f} after 250 steps, litune fit took {seconds:.1f}s")
    assert accuracy >= 0.95
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "3 1 4 1 5 9 2 6", "--max-length", "16"]) == 0
    assert capsys.readouterr().out.split("--- sequence 0 ---\n")[1].strip() == "6 2 9 5 1 4 1 3"
    # No Hugging Face equivalent: `litune export` says so (exit 2) rather than writing a folder AutoModel can't load.
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 2
    assert "no Hugging Face equivalent" in capsys.readouterr().err


def test_litune_fit_on_text_pairs_and_generate(tmp_path, tokenizer_dir, monkeypatch, capsys) -> None:
    from litune.cli import main

    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)
    write_pairs(tmp_path / "pairs.jsonl", [(f"x = {i}", f"print({i})") for i in range(64)])
    args = ["fit", "--config", str(REPO / "configs" / "seq2seq-pairs.yaml"), f"--runs_dir={tmp_path / 'runs'}",
            f"--model.tokenizer={tokenizer_dir}", f"--data.init_args.path={tmp_path / 'pairs.jsonl'}",
            "--model.network.init_args.vocab_size=512", "--model.network.init_args.d_model=32",
            "--model.network.init_args.num_encoder_layers=1", "--model.network.init_args.num_decoder_layers=1",
            "--model.network.init_args.max_seq_len=64", "--data.init_args.max_source_length=32",
            "--data.init_args.max_target_length=32", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
            "--model.lr_schedule.warmup_steps=1", "--trainer.enable_progress_bar=false"]  # fmt: skip
    assert main(args) == 0
    (run,) = list((tmp_path / "runs").glob("*-seq2seq-pairs"))
    # The logged accuracy is the argmax accuracy over the held-out targets, recomputed here from the checkpoint.
    from litune.resume import load_system

    network = load_system(run).network.eval()
    dm = Seq2SeqDataModule(
        tokenizer=str(tokenizer_dir), path=str(tmp_path / "pairs.jsonl"), max_source_length=32, max_target_length=32
    )
    dm.setup("validate")
    correct = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = network(**batch)
            scored = out.targets != IGNORE_INDEX
            correct += int((out.logits.argmax(-1) == out.targets)[scored].sum())
            total += int(scored.sum())
    assert total > 0
    assert read_metric(run, "val/acc")[-1] == pytest.approx(correct / total, abs=1e-6)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x = 3", "--max-length", "8"]) == 0
    assert "--- sequence 0 ---" in capsys.readouterr().out

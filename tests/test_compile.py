"""``model.compile``: one switch that compiles any network family in place, refused where torch.compile cannot work."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from litune.cli import main
from litune.module import LitLM
from litune_testing import FIRST, assert_matches, fit_args, probe, run_litune

REPO = Path(__file__).resolve().parents[1]


def test_compile_with_zero3_is_a_config_error_before_any_process_starts(tmp_path, corpus_dir, tokenizer_dir, capsys):
    code = main([
        "fit", "--config", str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--config", str(REPO / "configs" / "strategy" / "deepspeed_zero3.yaml"),
        f"--model.tokenizer={tokenizer_dir}", f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        f"--runs_dir={tmp_path / 'runs'}", "--model.compile=true", "--trainer.devices=2",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "model.compile" in err and "ZeRO-3" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _network(family: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "decoder":
        from litune.models.transformer import DecoderLM

        return DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=64, max_seq_len=16,
                         gradient_checkpointing=checkpointing)  # fmt: skip
    if family == "seq2seq":
        from litune.models.seq2seq import Seq2SeqLM

        return Seq2SeqLM(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, vocab_size=64,
                         max_seq_len=16, gradient_checkpointing=checkpointing)  # fmt: skip
    from litune.models.hf import HFCausalLM

    config = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2}
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return HFCausalLM(config=config, gradient_checkpointing=checkpointing)


def _losses(family: str, compile: bool, checkpointing: bool, steps: int = 3) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (steps * 2, 16), generator=gen)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    system = LitLM(_network(family, checkpointing), compile=compile)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(system, DataLoader(rows, batch_size=2))
    assert (getattr(system.network, "_compiled_call_impl", None) is not None) == compile
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,checkpointing",
    [("decoder", True), ("seq2seq", False), ("hf", True)],
    ids=["decoder+ckpt", "seq2seq", "hf+ckpt"],
)
def test_compiled_training_matches_eager_for_every_family(family: str, checkpointing: bool) -> None:
    eager = _losses(family, compile=False, checkpointing=checkpointing)
    compiled = _losses(family, compile=True, checkpointing=checkpointing)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["decoder", "seq2seq", "hf"])
def test_every_family_compiles_to_one_graph_on_padded_and_packed_batches(family: str) -> None:
    """No graph break (each would also be a host sync on a GPU): data-dependent shortcuts are skipped when compiling."""
    network = _network(family, checkpointing=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    if family == "decoder":  # two packed documents per row: positions restart at 0
        batches.append({"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).remainder(9).expand(2, 16)})
    for batch in batches:
        explained = torch._dynamo.explain(network)(**batch)
        assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero1", "deepspeed_zero2"])
def test_compiled_two_process_training_matches_the_eager_one_process_run(
    strategy: str, tmp_path: Path, reference: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    """``model.compile`` under DDP and ZeRO-1/2 on 2 processes, with gradient checkpointing: the model after 3 steps
    computes what the eager 1-process reference does (the probe runs the compiled network)."""
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    extra = ("--config", fragment, "--trainer.devices=2", "--model.compile=true",
             "--model.network.init_args.gradient_checkpointing=true")  # fmt: skip
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *extra), timeout=900)
    assert probe(tmp_path, FIRST)["compiled"] and not probe(reference, FIRST)["compiled"]
    assert probe(tmp_path, FIRST)["gradient_checkpointing"]
    assert_matches(tmp_path, reference, FIRST)

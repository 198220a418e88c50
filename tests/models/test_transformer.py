"""The custom decoder: config validation, masks (padding, packed documents), checkpointing, init, counting, CLI."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from litune.errors import ConfigError
from litune.models.transformer import DecoderLM, TransformerConfig

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
VOCAB = 128


def tiny(seed: int = 0, **kw: object) -> DecoderLM:
    torch.manual_seed(seed)
    args = dict(d_model=32, nhead=4, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=32, init_std=0.1)
    return DecoderLM(**{**args, **kw})


def ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --- bad input ---------------------------------------------------------------------------------------------------


def test_nhead_that_does_not_divide_d_model_names_the_head_dim_and_valid_choices() -> None:
    with pytest.raises(ConfigError) as err:
        TransformerConfig(d_model=500, nhead=8)
    msg = str(err.value)
    assert err.value.field == "model.network.init_args.nhead"
    assert "d_model=500 is not divisible by nhead=8" in msg and "62.5" in msg
    assert "{1, 2, 4, 5, 10, 20, 25, 50, 100, 125, 250, 500}" in msg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_decoder_layers": 0}, "num_decoder_layers"),
        ({"num_encoder_layers": -1}, "num_encoder_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"d_model": 0}, "d_model"),
        ({"dim_feedforward": 0}, "dim_feedforward"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "swish"}, "activation"),
    ],
)
def test_bad_sizes_are_config_errors_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        TransformerConfig(**kwargs)
    assert err.value.field == f"model.network.init_args.{field}"


def test_zero_layer_decoder_is_rejected_at_construction() -> None:
    with pytest.raises(ConfigError, match="num_decoder_layers=0"):
        DecoderLM(num_decoder_layers=0, vocab_size=VOCAB)


def test_sequence_longer_than_max_seq_len_is_a_clear_error_with_both_numbers() -> None:
    net = tiny()
    with pytest.raises(ConfigError) as err:
        net(ids(1, 33))
    assert "33 tokens" in str(err.value) and "max_seq_len=32" in str(err.value)
    with pytest.raises(ConfigError, match="max_seq_len=32"):
        net.generate(ids(1, 4), max_length=40)


def test_tokenizer_larger_than_the_vocabulary_fails_at_setup_naming_both_sizes(tokenizer_dir) -> None:
    from litune.module import LitLM

    with pytest.raises(ConfigError) as err:
        LitLM(network=tiny(), tokenizer=str(tokenizer_dir))
    assert "512" in str(err.value) and str(VOCAB) in str(err.value)


# --- masks --------------------------------------------------------------------------------------------------------


def test_packed_documents_do_not_attend_across_the_boundary() -> None:
    net = tiny().eval()
    a, b = ids(1, 7, seed=1), ids(1, 9, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        together = net(packed, position_ids=positions).logits
        alone_a, alone_b = net(a).logits, net(b).logits
    torch.testing.assert_close(together[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[:, 7:], alone_b, rtol=1e-5, atol=1e-5)
    # Without position_ids the second document sees the first: the mask is what made the difference.
    with torch.no_grad():
        assert not torch.allclose(net(packed).logits[:, 7:], alone_b, atol=1e-3)


def test_right_padding_does_not_change_the_real_positions() -> None:
    net = tiny().eval()
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        padded = net(x, attention_mask=mask).logits
        short = net(x[1:, :8]).logits
    torch.testing.assert_close(padded[1:, :8], short, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()


def test_loss_is_taken_only_where_labels_are_not_ignored() -> None:
    net = tiny().eval()
    x = ids(2, 10)
    labels = x.clone()
    labels[:, :6] = -100
    out = net(x, labels=labels)
    assert (out.targets[:, :5] == -100).all() and (out.targets[:, 5:9] == x[:, 6:]).all()
    manual = torch.nn.functional.cross_entropy(out.logits[:, 5:9].reshape(-1, VOCAB), x[:, 6:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def saved_bytes(net: DecoderLM, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the autograd graph keeps for backward during one forward, and the gradients of that step."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    net.zero_grad()
    torch.manual_seed(123)  # same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x, labels=x).loss
    loss.backward()
    return total, {n: p.grad.clone() for n, p in net.named_parameters()}


def test_checkpointing_gives_the_same_gradients_and_saves_fewer_activations() -> None:
    net = tiny(dropout=0.1, num_decoder_layers=3).train()
    x = ids(4, 32)
    plain_bytes, plain = saved_bytes(net, x)
    net.gradient_checkpointing = True
    ckpt_bytes, ckpt = saved_bytes(net, x)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_checkpointing_is_a_constructor_flag_that_recomputes_in_the_backward_pass() -> None:
    """The YAML flag (not the attribute set by hand, as above) is what switches recomputation on: the same weights
    built with it keep fewer activations and give the same gradients."""
    x = ids(2, 32)
    plain_bytes, plain = saved_bytes(tiny(num_decoder_layers=3).train(), x)
    ckpt_bytes, ckpt = saved_bytes(tiny(num_decoder_layers=3, gradient_checkpointing=True).train(), x)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


# --- init and counting --------------------------------------------------------------------------------------------


def test_gpt2_initialisation_scales_the_residual_projections() -> None:
    torch.manual_seed(0)
    net = DecoderLM(d_model=256, nhead=4, num_decoder_layers=8, vocab_size=1000, max_seq_len=64)
    std = torch.cat([b.attn.c_proj.weight.flatten() for b in net.h] + [b.mlp.c_proj.weight.flatten() for b in net.h])
    assert std.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert net.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net.h[0].attn.c_attn.bias.abs().max() == 0 and net.ln_f.weight.eq(1).all()
    assert net.lm_head.weight is net.wte.weight


def test_parameter_counts_with_and_without_embeddings_are_logged(caplog) -> None:
    with caplog.at_level(logging.INFO):
        net = DecoderLM(d_model=32, nhead=4, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=16)
    d, f, L = 32, 128, 2
    block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    body = L * block + 2 * d
    assert net.num_parameters(exclude_embeddings=True) == body
    assert net.num_parameters() == body + VOCAB * d + 16 * d  # the tied head is counted once
    assert f"n_params={net.num_parameters():,}" in caplog.text
    assert f"without embeddings: {body:,}" in caplog.text
    matmuls = L * (3 * d * d + d * d + d * f + f * d) + VOCAB * d  # the tied head yes; norms, biases, lookups no
    assert net.flops_per_token(16) == 6 * matmuls + 12 * L * d * 16


# --- end to end through the CLI -----------------------------------------------------------------------------------


def test_litune_fit_and_generate_with_the_custom_decoder(tmp_path, corpus_dir, tokenizer_dir, monkeypatch, capsys):
    from litune.cli import main

    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)
    args = [
        "fit", "--config", TINY, "--config", str(REPO / "configs" / "model" / "custom-decoder.yaml"),
        f"--model.tokenizer={tokenizer_dir}", f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        "--model.network.init_args.d_model=32", "--model.network.init_args.num_decoder_layers=2",
        "--model.network.init_args.vocab_size=512", "--model.network.init_args.max_seq_len=64",
        "--model.network.init_args.gradient_checkpointing=true",
        # documents concatenated into rows with positions restarting at each one: the block-diagonal mask in training
        "--data.init_args.document_mask=true",
        "--trainer.max_steps=6", f"--runs_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    assert main(args) == 0
    (run,) = list((tmp_path / "runs").glob("*-tiny"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["network"]["class_path"] == "litune.models.transformer.DecoderLM"
    assert any(k.startswith("network.h.1.attn.c_attn") for k in ckpt["state_dict"])
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-length", "20"]) == 0
    printed = capsys.readouterr().out
    assert "--- sequence 0 ---" in printed and printed.split("--- sequence 0 ---\n")[1].startswith("def")
    # litune export writes a Hugging Face GPT-2 folder that gives the trained network's logits.
    from transformers import AutoModelForCausalLM

    from litune.module import LitLM

    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = LitLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=False).network.eval()
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trained(x).logits, rtol=1e-5, atol=1e-5)

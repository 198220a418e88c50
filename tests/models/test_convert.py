"""Hugging Face GPT-2 <-> litune DecoderLM: logit/loss parity, export through from_pretrained, strict loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from litune.errors import ConfigError
from litune.models.convert import from_gpt2, gpt2_to_litune, litune_to_gpt2, save_pretrained, to_hf_gpt2
from litune.models.state_dict import load_strict
from litune.models.transformer import DecoderLM

VOCAB = 300


def tiny_hf(seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0, **overrides
    )
    return GPT2LMHeadModel(config).eval()


def batch(seed: int = 1, b: int = 3, t: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [True, False])
def test_hf_gpt2_weights_give_the_same_logits_and_loss(tied: bool) -> None:
    hf = tiny_hf(tie_word_embeddings=tied)
    ours = from_gpt2(hf).eval()
    assert ours.config.tie_embeddings is tied
    x = batch()
    labels = x.clone()
    labels[0, :5] = -100  # a prompt that takes no loss
    with torch.no_grad():
        ref, out = hf(x, labels=labels), ours(x, labels=labels)
    # fp32 on CPU, same math in the same order up to SDPA vs HF's attention kernel: agreement to float rounding.
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    print(f"parity max abs logit error: {(out.logits - ref.logits).abs().max().item():.3e}")


def test_state_dict_round_trip_transposes_only_conv1d_weights() -> None:
    hf_state = tiny_hf().state_dict()
    ours = gpt2_to_litune(hf_state)
    assert ours["h.0.attn.c_attn.weight"].shape == (96, 32)  # nn.Linear [out, in]
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D [in, out]
    assert torch.equal(ours["wpe.weight"], hf_state["transformer.wpe.weight"])  # embeddings are not transposed
    back = litune_to_gpt2(ours)
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key


def test_trained_decoder_exports_to_a_folder_that_from_pretrained_loads(tmp_path) -> None:
    torch.manual_seed(0)
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=64)
    # A few real optimizer steps, so the exported weights are not the initialisation.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for step in range(3):
        x = batch(seed=step)
        loss = net(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    save_pretrained(net, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, net(x).logits, rtol=1e-5, atol=1e-5)
    # ... and back into litune from the folder.
    again = from_gpt2(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, net(x).logits, rtol=0, atol=0)


def test_export_keeps_the_network_dtype(tmp_path) -> None:
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=32).to(torch.bfloat16)
    save_pretrained(net, tmp_path / "bf16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.transformer.wte.weight, net.wte.weight)


def test_bias_free_decoder_exports_with_zero_biases(tmp_path) -> None:
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=32, bias=False).eval()
    hf = to_hf_gpt2(net).eval()
    x = batch(t=16)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, net(x).logits, rtol=1e-5, atol=1e-5)


def test_post_norm_decoder_refuses_to_export() -> None:
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=32, norm_first=False)
    with pytest.raises(ConfigError, match="norm_first"):
        to_hf_gpt2(net)


def test_loading_weights_with_missing_and_unexpected_keys_lists_them() -> None:
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=64)
    state = gpt2_to_litune(tiny_hf().state_dict())
    del state["h.1.mlp.c_fc.weight"]
    state["h.2.attn.c_attn.weight"] = torch.zeros(96, 32)
    with pytest.raises(ConfigError) as err:
        load_strict(net, state, source="test")
    message = str(err.value)
    assert "missing keys ['h.1.mlp.c_fc.weight']" in message
    assert "unexpected keys ['h.2.attn.c_attn.weight']" in message


def test_loading_weights_of_another_size_names_the_shapes() -> None:
    net = DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=VOCAB + 1, max_seq_len=64)
    with pytest.raises(ConfigError, match=r"wte.weight: checkpoint \(300, 32\) vs network \(301, 32\)"):
        load_strict(net, gpt2_to_litune(tiny_hf().state_dict()), source="test")

"""The chunked loss equals the plain loss in value and gradients, and never keeps a [rows, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litune.errors import ConfigError
from litune.models.chunked_loss import check_chunk_size, chunked_cross_entropy
from litune.models.output import IGNORE_INDEX


def _problem(
    vocab: int = 50, d: int = 16, shape: tuple[int, int] = (3, 7)
) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, d, generator=gen, requires_grad=True)
    head = nn.Linear(d, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[0, :4] = IGNORE_INDEX  # a prompt
    targets[:, -1] = IGNORE_INDEX  # the causal shift's last position
    return hidden, head, targets


def _value_and_grads(loss_fn, hidden, head, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    loss = loss_fn(hidden, head, targets)
    loss.backward()
    return loss.detach(), [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]


def _plain(reduction: str):
    def loss(hidden, head, targets):
        logits = head(hidden).float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)

    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])
def test_value_and_gradients_match_the_plain_loss_in_fp32(reduction: str, chunk_size: int) -> None:
    hidden, head, targets = _problem()
    want, want_grads = _value_and_grads(_plain(reduction), hidden, head, targets)
    got, got_grads = _value_and_grads(
        lambda h, m, t: chunked_cross_entropy(h, m, t, chunk_size=chunk_size, reduction=reduction),
        hidden,
        head,
        targets,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_mean_of_chunk_means_would_fail_the_same_comparison() -> None:
    """Teeth: averaging per-chunk means (chunks hold different numbers of targets) is a different objective."""
    hidden, head, targets = _problem()
    want = _plain("mean")(hidden, head, targets)
    rows, flat = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    means = [_plain("mean")(rows[i : i + 5], head, flat[i : i + 5]) for i in range(0, rows.size(0), 5)]
    wrong = torch.stack([m for m in means if m.isfinite()]).mean()
    assert (wrong - want).abs() > 1e-3


def test_no_tensor_of_all_logits_is_kept_for_backward() -> None:
    """What autograd saves stays at one chunk's logits: the [rows, vocab] float32 copy of the plain loss is gone."""
    hidden, head, targets = _problem(vocab=512, shape=(4, 32))
    rows, vocab, chunk = 4 * 32, 512, 16

    def largest_saved(loss_fn) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(hidden, head, targets).backward()
        return max(sizes)

    assert largest_saved(_plain("mean")) >= rows * vocab
    assert largest_saved(lambda h, m, t: chunked_cross_entropy(h, m, t, chunk_size=chunk)) <= chunk * vocab


def test_bad_chunk_size_is_a_config_error() -> None:
    check_chunk_size(None, "f")
    check_chunk_size(8, "f")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="loss_chunk_size"):
            check_chunk_size(bad, "model.network.init_args.loss_chunk_size")


def _decoder(chunk: int | None):
    from litune.models.transformer import DecoderLM

    torch.manual_seed(0)
    return DecoderLM(d_model=32, nhead=2, num_decoder_layers=2, vocab_size=97, max_seq_len=16, loss_chunk_size=chunk)


def _seq2seq(chunk: int | None):
    from litune.models.seq2seq import Seq2SeqLM

    torch.manual_seed(0)
    return Seq2SeqLM(
        d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2, vocab_size=97, max_seq_len=16,
        loss_chunk_size=chunk,
    )  # fmt: skip


def _hf(chunk: int | None):
    from litune.models.hf import HFCausalLM

    torch.manual_seed(0)
    config = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2}
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return HFCausalLM(config=config, loss_chunk_size=chunk)


@pytest.mark.parametrize("build", [_decoder, _seq2seq, _hf], ids=["decoder", "seq2seq", "hf"])
def test_every_network_family_gives_the_same_objective_terms_and_gradients(build) -> None:
    plain, chunked = build(None), build(5)
    chunked.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 12), generator=gen)
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, 9:] = IGNORE_INDEX  # padding
    outs = []
    for net in (plain, chunked):
        net.train()
        out = net(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        out.loss_sum.backward()
        outs.append(out)
    assert outs[0].logits is not None and outs[1].logits is None  # the chunked path never built [B, T, V]
    assert int(outs[1].num_targets) == int(outs[0].num_targets)
    torch.testing.assert_close(outs[1].loss_sum, outs[0].loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation keeps the logits that perplexity and accuracy need
        assert chunked.eval()(input_ids=input_ids, labels=labels).logits.shape == (3, 12, 97)


def test_hf_models_that_rescale_logits_after_the_head_are_refused() -> None:
    from litune.models.hf import HFCausalLM

    config = {"model_type": "gemma2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        HFCausalLM(config=config, loss_chunk_size=8)

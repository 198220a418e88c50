"""Generation for both architectures: the KV cache changes nothing but speed; sampling, EOS and bad settings."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from litune.errors import ConfigError
from litune.models.convert import from_gpt2
from litune.models.generation import decode
from litune.models.seq2seq import Seq2SeqLM
from litune.models.transformer import DecoderLM

VOCAB = 64


def decoder(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    # A larger init_std than GPT-2's makes the random network's argmax depend on the context, so that a wrong cache
    # (a wrong position, a missing key) changes the tokens.
    return DecoderLM(d_model=32, nhead=4, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=48, init_std=0.2).eval()


def seq2seq(seed: int = 0) -> Seq2SeqLM:
    torch.manual_seed(seed)
    return Seq2SeqLM(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, vocab_size=VOCAB, max_seq_len=48, init_std=0.2
    ).eval()


def prompts(b: int = 3, t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def token_counts(net: torch.nn.Module) -> list[int]:
    """Record how many tokens each forward step embeds (the token embedding sees every step's new tokens)."""
    counts: list[int] = []
    net.wte.register_forward_hook(lambda module, args, out: counts.append(args[0].size(1)))
    return counts


def test_decoder_cached_and_uncached_greedy_generation_give_the_same_tokens() -> None:
    net, x = decoder(), prompts()
    counts = token_counts(net)
    cached = net.generate(x, max_length=40)
    assert counts == [6] + [1] * 33  # the prompt once, then one token per step
    counts.clear()
    uncached = net.generate(x, max_length=40, use_cache=False)
    assert counts == list(range(6, 40))
    assert cached.shape == (3, 40)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], x)  # the prompt is included
    assert len(set(cached[0, 6:].tolist())) > 1  # not a degenerate constant continuation


def test_decoder_left_padded_batch_matches_each_prompt_alone() -> None:
    net = decoder()
    long, short = prompts(1, 6, seed=1), prompts(1, 3, seed=2)
    x = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    both = net.generate(x, mask, max_length=20)
    assert torch.equal(both, net.generate(x, mask, max_length=20, use_cache=False))
    assert torch.equal(both[0], net.generate(long, max_length=20)[0])
    assert torch.equal(both[1, 3:], net.generate(short, max_length=17)[0])


def test_decoder_greedy_generation_matches_hugging_face_generate() -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=48, bos_token_id=0, eos_token_id=0,
        initializer_range=0.2,
    )  # fmt: skip
    hf = GPT2LMHeadModel(config).eval()
    x = prompts()
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_length=30, do_sample=False, pad_token_id=0)
    assert torch.equal(from_gpt2(hf).generate(x, max_length=30), ref)


def test_seq2seq_cached_and_uncached_greedy_generation_give_the_same_tokens() -> None:
    net, src = seq2seq(), prompts(3, 9)
    mask = torch.ones_like(src)
    mask[2, 5:] = 0  # right-padded source
    counts = token_counts(net)
    cached = net.generate(src, mask, max_length=25)
    assert counts == [9] + [1] * 25  # the source once, then one target token per step
    uncached = net.generate(src, mask, max_length=25, use_cache=False)
    assert cached.shape == (3, 25)  # target tokens only, no start token
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[2], net.generate(src[2:, :5], max_length=25)[0])  # source padding is masked


def test_eos_stops_rows_and_pads_them() -> None:
    net, x = decoder(), prompts()
    free = net.generate(x, max_length=30)
    eos = int(free[0, 8])  # the token row 0 produces third: make it the EOS
    out = net.generate(x, max_length=30, eos_token_id=eos, pad_token_id=1)
    for row, ref in zip(out, free, strict=True):
        gen = ref[6:].tolist()
        stop = 6 + gen.index(eos) + 1 if eos in gen else 30
        assert torch.equal(row[:stop], ref[:stop])
        assert (row[stop:] == 1).all()
    # Once every row has finished the loop stops early: row 0 alone ends right after its first EOS.
    first = 6 + free[0, 6:].tolist().index(eos) + 1
    assert net.generate(x[:1], max_length=30, eos_token_id=eos, pad_token_id=1).size(1) == first < 30


def test_sampling_num_return_sequences_and_reproducibility() -> None:
    net, x = decoder(), prompts(2, 4)
    kwargs = dict(max_length=16, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, num_return_sequences=3)
    a = net.generate(x, **kwargs, generator=torch.Generator().manual_seed(0))
    b = net.generate(x, **kwargs, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 16) and torch.equal(a, b)
    assert torch.equal(a[:3, :4], x[:1].expand(3, 4)) and torch.equal(a[3:, :4], x[1:].expand(3, 4))
    assert len({tuple(r.tolist()) for r in a[:3]}) > 1  # different samples for one prompt
    # top_k=1 sampling is greedy decoding.
    greedy = net.generate(x, max_length=16)
    assert torch.equal(net.generate(x, max_length=16, do_sample=True, top_k=1), greedy)
    # sampling with a cache equals sampling without (same random stream)
    s = net.generate(x, max_length=16, do_sample=True, generator=torch.Generator().manual_seed(5))
    u = net.generate(x, max_length=16, do_sample=True, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s, u)


def test_seq2seq_sampling_returns_several_sequences_per_source() -> None:
    out = seq2seq().generate(prompts(2, 5), max_length=8, do_sample=True, num_return_sequences=4)
    assert out.shape == (8, 8)


def test_top_p_keeps_only_the_nucleus() -> None:
    # One step over a fixed distribution: with top_p=0.5 only the most likely token (p=0.6) may be drawn.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    draws = [
        decode(lambda t, c: (logits, None), torch.zeros(1, 1, dtype=torch.long), 2, do_sample=True, top_p=0.5,
               generator=torch.Generator().manual_seed(i))[0, 1].item()
        for i in range(20)
    ]  # fmt: skip
    assert set(draws) == {0}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0, "do_sample": True}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_bad_generation_settings_are_config_errors(kwargs: dict, field: str) -> None:
    kwargs = {"max_length": 10, **kwargs}
    for net in (decoder(), seq2seq()):
        with pytest.raises(ConfigError) as err:
            net.generate(prompts(1, 3), **kwargs)
        assert err.value.field == f"generate.{field}"

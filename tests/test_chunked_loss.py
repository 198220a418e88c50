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

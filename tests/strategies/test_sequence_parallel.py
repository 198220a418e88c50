"""Ulysses sequence parallelism on 2 CPU processes over gloo, against the same network on one process.

One spawn of 2 ranks checks, with float64 networks, litune's decoder (plain and chunked loss, and with DoRA adapters)
and a Hugging Face Llama (grouped-query attention, through the registered ``litune_ulysses`` attention function; and
with LoRA adapters, their gradients compared): each rank's logits
equal the one-process logits of its half of the sequence, and the ranks' summed losses and summed gradients equal the
one-process ones, on a padded batch, a packed multi-document batch and a batch of odd length (padded to split).
Teeth: slices that number their positions from 0 (no offset), and next-token labels shifted after slicing instead of
before, both change the result by more than 1e-3.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from test_tensor_parallel import LLAMA, NETWORK, TOL, batches, free_port

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune.models.sequence_parallel import SequenceSplit
from litune.models.transformer import DecoderLM


def all_batches() -> dict[str, dict[str, torch.Tensor]]:
    """The tensor-parallel tests' padded and packed batches (12 tokens), and a padded one of 11 tokens."""
    odd = {key: value[:, :11] for key, value in batches()["padded"].items()}
    return {**batches(), "odd": odd}


def summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks."""
    import torch.distributed as dist

    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def gaps(reference: torch.nn.Module, split: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest differences between the split network (on this rank) and the whole one: this rank's logits on its
    real tokens, the loss summed over ranks, every gradient summed over ranks."""
    for net in (reference, split):
        net.zero_grad()
    want, got = reference(**batch), split(**batch)
    want.loss_sum.backward()
    got.loss_sum.backward()
    # The float32 loss sums, relative (summed in another order); logits and gradients absolute (float64).
    out = {"loss": float((summed(got.loss_sum) - want.loss_sum).abs() / want.loss_sum.abs())}
    if want.logits is not None:
        part = SequenceSplit.of(split.sequence_group, batch["input_ids"].size(1))
        real = part.local(part.padded(batch.get("attention_mask", torch.ones_like(batch["input_ids"])), 0)).bool()
        logits = part.local(part.padded(want.logits.transpose(1, 2), 0).transpose(1, 2))
        out["logits"] = float((got.logits - logits)[real].abs().max())  # padding positions' outputs are never used
    grads = {name: p.grad for name, p in split.named_parameters()}
    trained = [(name, p) for name, p in reference.named_parameters() if p.requires_grad]  # adapters: the base frozen
    out["grads"] = max(float((summed(grads[name]) - p.grad).abs().max()) for name, p in trained)
    return out


def assert_split_matches(reference: torch.nn.Module, group, label: str) -> None:  # noqa: ANN001
    split = copy.deepcopy(reference)
    split.split_sequences(group)
    for name, batch in all_batches().items():
        found = gaps(reference, split, batch)
        assert max(found.values()) < TOL["atol"], (label, name, found)
    ids = batches()["padded"]["input_ids"]
    with torch.no_grad():  # no labels (generation, evaluation harnesses): the whole sequence on every rank
        torch.testing.assert_close(split(input_ids=ids).logits, reference(input_ids=ids).logits, **TOL)


def with_adapters(network: torch.nn.Module, method: str = "lora") -> torch.nn.Module:
    """``network`` (float64) with adapters on every linear layer (peft, in place; the base frozen), their ``B``
    matrices made nonzero so every adapter weight gets a gradient."""
    from litune.models.adapters import Adapters, add_adapters

    torch.manual_seed(0)
    network = network.double()
    add_adapters(network, Adapters(method=method, r=4))
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return network


class NoOffset(SequenceSplit):
    """Wrong: every slice numbers its positions from 0."""

    def whole_batch(self, input_ids, attention_mask, position_ids):  # noqa: ANN001, ANN201
        ids, mask, positions = super().whole_batch(input_ids, attention_mask, position_ids)
        return ids, mask, positions % (self.length // self.size)


class ShiftedAfterSlicing(SequenceSplit):
    """Wrong: labels shifted within each slice, so a slice's last token loses its target (the next slice's first)."""

    def targets(self, targets):  # noqa: ANN001, ANN201
        local = super().targets(targets)
        return torch.cat([local[:, :-1], torch.full_like(local[:, -1:], IGNORE_INDEX)], dim=1)


def assert_wrong_splits_fail(reference: torch.nn.Module, group, module) -> None:  # noqa: ANN001
    """Teeth: each wrong split, put where ``module`` makes its splits, is off by more than 1e-3 on the padded batch."""
    split = copy.deepcopy(reference)
    split.split_sequences(group)
    for wrong in (NoOffset, ShiftedAfterSlicing):
        original, module.SequenceSplit = module.SequenceSplit, wrong
        try:
            found = gaps(reference, split, batches()["padded"])
        finally:
            module.SequenceSplit = original
        assert max(found.values()) > 1e-3, (wrong.__name__, found)


def check_rank(rank: int, port: int) -> None:
    import torch.distributed as dist

    import litune.models.hf as hf_module
    import litune.models.transformer as decoder_module
    from litune.models.hf import HFCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        group = dist.group.WORLD
        for chunk in (None, 5):
            torch.manual_seed(0)
            assert_split_matches(DecoderLM(**NETWORK, loss_chunk_size=chunk).double(), group, f"decoder {chunk}")
        torch.manual_seed(0)
        llama = HFCausalLM(config=LLAMA).double()
        assert_split_matches(llama, group, "llama")
        assert_split_matches(with_adapters(HFCausalLM(config=LLAMA)), group, "llama + LoRA")
        assert_split_matches(with_adapters(DecoderLM(**NETWORK), "dora"), group, "decoder + DoRA")
        torch.manual_seed(0)
        assert_wrong_splits_fail(DecoderLM(**NETWORK).double(), group, decoder_module)
        assert_wrong_splits_fail(llama, group, hf_module)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # 2 spawned ranks: ~12 s of CPU idle, ~30 s on the shared machine
def test_sequence_parallel_equals_one_process() -> None:
    mp.spawn(check_rank, args=(free_port(),), nprocs=2)


def test_sequence_parallel_refuses_heads_the_ranks_cannot_split() -> None:
    from litune.models.hf import HFCausalLM
    from litune.models.sequence_parallel import check_divisible

    with pytest.raises(ConfigError, match=r"init_args.nhead: nhead=2 is not divisible by sequence_parallel_size=4"):
        check_divisible(DecoderLM(**{**NETWORK, "nhead": 2}).sequence_parallel_sizes(), 4)
    llama = HFCausalLM(config=LLAMA)
    with pytest.raises(ConfigError, match=r"config.num_key_value_heads: .*=2 is not divisible by .*size=4"):
        check_divisible(llama.sequence_parallel_sizes(), 4)


CHECKPOINTING = "--model.network.init_args.gradient_checkpointing=true"


def assert_counts_each_row_once(root) -> None:  # noqa: ANN001
    """ThroughputMonitor's samples per optimizer step are the global batch (8), not 8 per rank of a sequence group."""
    import csv

    from litune_testing import the_run

    with (the_run(root) / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/samples_per_sec")]
    assert rows
    for row in rows:
        assert float(row["perf/samples_per_sec"]) * float(row["perf/step_time_s"]) == pytest.approx(8)


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallel_fit_matches_one_process_resumes_and_exports(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """``litune fit`` with configs/strategy/fsdp2_sp2.yaml on 2 processes (a 1 x 2 data x sequence mesh: both ranks
    read the same rows, each keeps half of every sequence; accumulation 2 as on one process) trains litune's decoder
    as one process does; its DCP checkpoint resumes exactly and exports a Hugging Face folder with the trained
    logits."""
    from test_fsdp2 import FRAGMENTS, assert_export_matches, decoder_args

    from litune.strategies.fsdp2 import is_fsdp2_checkpoint
    from litune_testing import FIRST, SECOND, assert_matches, probe, run_litune, the_run

    one, two = tmp_path / "one", tmp_path / "two"
    # Gradient checkpointing on in the SP run, off in the reference: recomputing the blocks (all-to-alls included) in
    # the backward pass must not change the math.
    sp = ("--config", str(FRAGMENTS / "fsdp2_sp2.yaml"), "--trainer.devices=2", CHECKPOINTING)
    # One uninterrupted 1-process run (probed at FIRST and SECOND); the SP run stops at FIRST and resumes from there.
    run_litune(
        "fit", *decoder_args(one, corpus_dir, tokenizer_dir, "--trainer.devices=1"), f"--trainer.max_steps={SECOND}"
    )
    run_litune("fit", *decoder_args(two, corpus_dir, tokenizer_dir, *sp))
    assert_matches(two, one, FIRST)
    recorded = probe(two, FIRST)
    assert recorded["sequence_parallel"] == 2  # the 2 ranks split sequences (not 2 data-parallel ranks)
    assert recorded["gradient_checkpointing"] and not probe(one, FIRST)["gradient_checkpointing"]
    assert_counts_each_row_once(two)
    # Teeth: two optimizer steps move the logits far beyond the comparison's tolerance.
    assert (probe(one, FIRST)["logits"] - probe(one, 1)["logits"]).abs().max() > 1e-2
    assert is_fsdp2_checkpoint(the_run(two) / "checkpoints" / "last.ckpt")
    resume = decoder_args(two, corpus_dir, tokenizer_dir, *sp, "--ckpt_path=last")
    run_litune("fit", *resume, f"--trainer.max_steps={SECOND}")
    assert_matches(two, one, SECOND)
    assert_export_matches(two, SECOND)


def test_estimate_divides_activations_by_the_sequence_group(capsys) -> None:
    """`litune estimate` with configs/strategy/fsdp2_sp2.yaml on 4 devices: model state sharded over all 4 ranks as
    with fsdp2, activations (and logits) halved."""
    import json

    from test_fsdp2 import FRAGMENTS

    from litune.commands import estimate as command
    from litune_testing import TINY

    def per_device(fragment: str) -> dict:
        config = ["--config", str(TINY), "--config", str(FRAGMENTS / f"{fragment}.yaml")]
        assert command.main([*config, "--devices", "4", "--json"]) == 0
        out = capsys.readouterr().out
        data = json.loads(out[out.index("{") :])
        assert data["strategy"] == fragment
        return data["per_device_bytes"]

    whole, split = per_device("fsdp2"), per_device("fsdp2_sp2")
    assert split["params"] == whole["params"] and split["optimizer"] == whole["optimizer"]
    assert split["activations"] == pytest.approx(whole["activations"] / 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallel_fit_of_the_hf_gpt2_matches_and_resumes_on_another_layout(
    tmp_path, reference, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    """The Hugging Face GPT-2 (attention through the registered ``litune_ulysses`` function) under fsdp2_sp2 on 2
    processes trains as the shared 1-process reference does; its DCP checkpoint resumes on one FSDP2 process (DCP
    reshards from FSDP2's 2-rank split) exactly as the reference resumes."""
    from test_fsdp2 import FRAGMENTS, fsdp2_args, resume

    from litune_testing import FIRST, SECOND, assert_matches, fit_args, probe, run_litune

    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, "--config", str(FRAGMENTS / "fsdp2_sp2.yaml"),
                                "--trainer.devices=2", CHECKPOINTING))  # fmt: skip
    assert_matches(tmp_path, reference, FIRST)
    recorded = probe(tmp_path, FIRST)
    assert recorded["sequence_parallel"] == 2 and recorded["gradient_checkpointing"]
    resume(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(devices=1))
    assert_matches(tmp_path, resumed_reference, SECOND, world_size=1)

"""Tensor parallelism of litune's decoder on 2 CPU processes over gloo, against the same network on one process.

One spawn of 2 ranks checks, with float64 networks: logits, loss and every gradient of
the tensor-parallel network equal the unsharded one's on a padded batch and on a packed multi-document batch, with the
plain and with the chunked (vocab-parallel) loss; a few AdamW steps with gradient clipping give the same parameters;
and the teeth: GPT-2's fused q|k|v projection sharded as a plain column-parallel layer without the exchange of heads
(rank 0 would attend with all of q and half of k) computes something else. The same for Hugging Face GPT-2 (its
``Conv1D`` projections, the vocabulary-parallel tied head, an odd vocabulary split unevenly) and Llama.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune.models.transformer import DecoderLM
from litune.strategies.checks import cpu_cores
from litune.strategies.fsdp2 import is_fsdp2_checkpoint
from litune_testing import FIRST, LITUNE, SECOND, assert_matches, fit_args, litune_env, probe, run_litune, the_run

# Float64 networks; the loss is taken in float32 as litune always does (logits upcast to float32), so sums in another
# order differ by float32 round-off: measured <= 3e-7 on gradients up to 9, well inside the 1e-5.
TOL = {"atol": 1e-6, "rtol": 1e-6}
NETWORK = {"d_model": 32, "nhead": 4, "num_decoder_layers": 2, "vocab_size": 64, "max_seq_len": 32, "dropout": 0.0}


def batches() -> dict[str, dict[str, torch.Tensor]]:
    """A padded batch (right padding, labels ignored there) and a packed one (3 documents in row 0, 2 in row 1)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    packed_labels = ids.clone()
    packed_labels[positions == 0] = IGNORE_INDEX  # no target across a document boundary (shifted: first token)
    packed = {"input_ids": ids, "position_ids": positions, "labels": packed_labels}
    return {"padded": padded, "packed": packed}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p.grad) for name, p in network.named_parameters()}


def assert_same_forward_and_backward(
    reference: torch.nn.Module, sharded: torch.nn.Module, label: str, logits: bool = True
) -> None:
    """On the padded and the packed batch: the sharded network's summed loss, logits (when ``logits``) and every
    gradient equal the reference's within ``TOL``."""
    for name, batch in batches().items():
        for net in (reference, sharded):
            net.zero_grad()
        want, got = reference(**batch), sharded(**batch)
        want.loss_sum.backward()
        got.loss_sum.backward()
        torch.testing.assert_close(got.loss_sum, want.loss_sum, **TOL, msg=f"{name} loss, {label}")
        if logits:
            torch.testing.assert_close(got.logits, want.logits, **TOL, msg=f"{name} logits, {label}")
        for key, grad in grads(reference).items():
            torch.testing.assert_close(grads(sharded)[key], grad, **TOL, msg=f"{name} grad {key}, {label}")


def assert_a_wrong_plan_changes_the_logits(reference: torch.nn.Module, overrides: dict, mesh) -> None:  # noqa: ANN001
    """Teeth: ``reference``'s plan with ``overrides`` applied to a copy gives other logits on the padded batch."""
    from litune.models.tensor_parallel import apply_tensor_parallel

    wrong = copy.deepcopy(reference)
    plan = wrong.tensor_parallel_plan()
    wrong.tensor_parallel_plan = lambda: {**plan, **overrides}
    wrong = apply_tensor_parallel(wrong, mesh)
    batch = batches()["padded"]
    gap = (wrong(**batch).logits - reference(**batch).logits).abs().max()
    assert gap > 1e-3, gap


def check_rank(rank: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel

    from litune.models.tensor_parallel import apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
        for chunk in (None, 5):
            torch.manual_seed(0)
            reference = DecoderLM(**NETWORK, loss_chunk_size=chunk).double()
            sharded = apply_tensor_parallel(copy.deepcopy(reference), mesh)
            assert sharded.lm_head.weight is sharded.wte.weight  # still tied, one shard for both
            assert sharded.h[0].attn.c_attn.weight.to_local().shape == (48, 32)  # rows 48 r .. 48 (r + 1) of q|k|v
            assert_same_forward_and_backward(reference, sharded, f"chunk {chunk}", logits=chunk is None)

        # A few optimizer steps with clipping (the norm over DTensor shards and replicated parameters): same weights.
        # SGD, not Adam: Adam's normalized update turns float32 round-off on a near-zero gradient into a full step.
        torch.manual_seed(0)
        reference = DecoderLM(**NETWORK).double()
        sharded = apply_tensor_parallel(copy.deepcopy(reference), mesh)
        optimizers = [torch.optim.SGD(n.parameters(), lr=0.5, momentum=0.9) for n in (reference, sharded)]
        for step in range(3):
            batch = list(batches().values())[step % 2]
            for net, opt in zip((reference, sharded), optimizers, strict=True):
                opt.zero_grad()
                net(**batch).loss_sum.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
                opt.step()
        moved = (reference.h[0].mlp.c_fc.weight - DecoderLM(**NETWORK).double().h[0].mlp.c_fc.weight).abs().max()
        for (name, want_p), got_p in zip(reference.named_parameters(), sharded.parameters(), strict=True):
            torch.testing.assert_close(full(got_p.detach()), want_p.detach(), **TOL, msg=f"trained {name}")
        assert moved > 1e-3

        # Teeth: the fused q|k|v weight split as one plain column-parallel layer mixes q and k heads on rank 0.
        torch.manual_seed(0)
        reference = DecoderLM(**NETWORK).double()
        assert_a_wrong_plan_changes_the_logits(
            reference, {f"h.{i}.attn.c_attn": ColwiseParallel() for i in range(2)}, mesh
        )
    finally:
        dist.destroy_process_group()


LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64, "max_position_embeddings": 32,
}  # fmt: skip


GPT2 = {
    "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 65, "n_positions": 32,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
"""An odd vocabulary: the tied vocabulary-parallel head and embedding are split 33 + 32 rows."""


def check_hf_rank(rank: int, port: int) -> None:
    """One rank of 2: Hugging Face GPT-2 (fused ``Conv1D`` q|k|v, tied vocabulary-parallel head, plain and chunked
    loss) and Llama (grouped-query attention, transformers' own plan) split over 2 ranks compute the 1-process
    logits, loss and gradients, on padded and packed batches; a wrong split of either fails."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import RowwiseParallel

    from litune.models.hf import HFCausalLM
    from litune.models.tensor_parallel import Conv1DColwiseParallel, apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
        for chunk in (None, 5):
            torch.manual_seed(0)
            reference = HFCausalLM(config=GPT2, loss_chunk_size=chunk).double()
            sharded = apply_tensor_parallel(copy.deepcopy(reference), mesh)
            body = sharded.model.transformer
            assert sharded.model.lm_head.weight is body.wte.weight  # still tied, one shard for both
            assert body.wte.weight.to_local().shape == ((33, 32), (32, 32))[rank]  # 65 rows: an uneven split
            assert body.h[0].attn.c_attn.weight.to_local().shape == (32, 48)  # Conv1D [in, out]: q|k|v columns
            assert (body.h[0].attn.num_heads, body.h[0].attn.split_size) == (2, 16)  # 2 of 4 heads per rank
            assert_same_forward_and_backward(reference, sharded, f"gpt2 chunk {chunk}", logits=chunk is None)
        # Teeth: c_attn split as a plain column-parallel Conv1D (no exchange of heads): rank 0 mixes q and k heads.
        torch.manual_seed(0)
        reference = HFCausalLM(config=GPT2).double()
        c_attn = {f"model.transformer.h.{i}.attn.c_attn": Conv1DColwiseParallel() for i in range(2)}
        assert_a_wrong_plan_changes_the_logits(reference, c_attn, mesh)

        torch.manual_seed(0)
        reference = HFCausalLM(config=LLAMA).double()
        sharded = apply_tensor_parallel(copy.deepcopy(reference), mesh)
        attention = sharded.model.model.layers[0].self_attn
        local_shapes = (attention.q_proj.weight.to_local().shape, attention.k_proj.weight.to_local().shape)
        assert local_shapes == ((16, 32), (8, 32))  # 2 of 4 query heads, 1 of 2 key/value heads
        assert sharded.model.lm_head.weight.to_local().shape == (32, 32)  # untied vocabulary-parallel head
        assert_same_forward_and_backward(reference, sharded, "llama")

        # Teeth: the row-parallel outputs left as per-rank partial sums (no all-reduce) change the logits.
        plan = reference.tensor_parallel_plan()
        rows = [k for k, v in plan.items() if isinstance(v, RowwiseParallel) and ".layers." in k]
        assert_a_wrong_plan_changes_the_logits(
            reference, {k: RowwiseParallel(output_layouts=Partial()) for k in rows}, mesh
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow  # ~25 s of CPU for 2 ranks (about a minute on the shared machine)
def test_tensor_parallel_decoder_equals_one_process() -> None:
    mp.spawn(check_rank, args=(free_port(),), nprocs=2)


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_hf_gpt2_and_llama_equal_one_process() -> None:
    mp.spawn(check_hf_rank, args=(free_port(),), nprocs=2)


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_fit_of_a_hf_llama_matches_one_process(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """``litune fit`` of an ``HFCausalLM`` Llama under configs/strategy/fsdp2_tp2.yaml (transformers' plan, 1 x 2 mesh)
    trains what one process trains; its vocabulary (515 > the tokenizer's 512) splits 258 + 257 rows over the ranks."""
    from test_fsdp2 import FRAGMENTS

    one, two = tmp_path / "one", tmp_path / "two"
    llama = {**LLAMA, "vocab_size": 515, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0}
    network = f"--model.network.init_args.config={json.dumps(llama)}"
    tp = ("--config", str(FRAGMENTS / "fsdp2_tp2.yaml"), "--trainer.devices=2")
    run_litune("fit", *fit_args(one, corpus_dir, tokenizer_dir, "--trainer.devices=1"), network)
    run_litune("fit", *fit_args(two, corpus_dir, tokenizer_dir, *tp), network)
    assert_matches(two, one, FIRST)
    assert (probe(one, FIRST)["logits"] - probe(one, 1)["logits"]).abs().max() > 1e-2  # teeth: it trained


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_fit_of_a_hf_gpt2_matches_one_process_resumes_and_exports(
    tmp_path, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    """``litune fit`` of the tiny Hugging Face GPT-2 under configs/strategy/fsdp2_tp2.yaml (Conv1D plan, tied
    vocabulary-parallel head) trains what the shared 1-process reference trains, resumes exactly from its DCP
    checkpoint, and exports a Hugging Face folder with the trained logits."""
    from test_fsdp2 import FRAGMENTS, assert_export_matches

    tp = ("--config", str(FRAGMENTS / "fsdp2_tp2.yaml"), "--trainer.devices=2")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *tp))
    assert_matches(tmp_path, resumed_reference, FIRST)
    assert is_fsdp2_checkpoint(the_run(tmp_path) / "checkpoints" / "last.ckpt")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *tp, "--ckpt_path=last", steps=SECOND))
    assert_matches(tmp_path, resumed_reference, SECOND)
    # Teeth: the steps between the probes move the logits far beyond the comparison's tolerance.
    assert (probe(resumed_reference, FIRST)["logits"] - probe(resumed_reference, SECOND)["logits"]).abs().max() > 1e-2
    assert_export_matches(tmp_path, SECOND)


@pytest.mark.distributed
@pytest.mark.slow  # 4 processes: 53 s on the shared 2-core machine with litune's core check bypassed
@pytest.mark.skipif(cpu_cores() < 4, reason="litune fit refuses more CPU processes than cores (strategies.checks)")
def test_fsdp2_x_tensor_parallel_fit_on_a_2x2_mesh_matches_one_process(
    tmp_path, reference, corpus_dir, tokenizer_dir
) -> None:
    """``litune fit`` on 4 processes with configs/strategy/fsdp2_tp2.yaml: a 2 x 2 (data_parallel x tensor_parallel)
    mesh, the Hugging Face GPT-2 split by its plan within each pair and FSDP2 sharding over the pairs, trains what
    the shared 1-process reference trains (2 data-parallel ranks: accumulation 1 instead of 2)."""
    from test_fsdp2 import FRAGMENTS

    mesh = ("--config", str(FRAGMENTS / "fsdp2_tp2.yaml"), "--trainer.devices=4")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *mesh))
    assert_matches(tmp_path, reference, FIRST, world_size=4)
    assert (probe(reference, FIRST)["logits"] - probe(reference, 1)["logits"]).abs().max() > 1e-2  # it trained


def test_hf_families_take_transformers_plan_or_are_refused() -> None:
    """Llama's plan comes from transformers (q/k/v/gate/up column-, o/down row-parallel, every layer), GPT-2's from
    litune (Conv1D styles, local heads); both add the vocabulary-parallel head. A grouped-query Llama whose key/value
    heads do not split, a GPT-2 with cross-attention and a family without a plan are refused, naming what to change."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from transformers import AutoConfig

    from litune.models.hf import HFCausalLM, tensor_parallel_layout
    from litune.models.tensor_parallel import Conv1DColwiseParallel, Conv1DRowwiseParallel, LocalHeads, check_divisible

    llama = HFCausalLM(config=LLAMA)
    plan = llama.tensor_parallel_plan()
    assert len(plan) == 2 * 7 + 2 and isinstance(plan["model.model.layers.1.self_attn.k_proj"], ColwiseParallel)
    assert isinstance(plan["model.model.layers.0.mlp.down_proj"], RowwiseParallel)
    assert isinstance(plan["model.lm_head"], ColwiseParallel) and isinstance(
        plan["model.model.embed_tokens"], RowwiseParallel
    )
    kv_heads = r"init_args.config.num_key_value_heads: config.num_key_value_heads=2 does not split evenly over .*=4"
    with pytest.raises(ConfigError, match=kv_heads):
        check_divisible(llama.tensor_parallel_sizes(), 4)
    gpt2 = HFCausalLM(config={**GPT2, "n_layer": 1})
    plan = gpt2.tensor_parallel_plan()
    assert isinstance(plan["model.transformer.h.0.attn"], LocalHeads)
    assert plan["model.transformer.h.0.attn.c_attn"].fused_parts == 3
    assert isinstance(plan["model.transformer.h.0.mlp.c_fc"], Conv1DColwiseParallel)
    assert isinstance(plan["model.transformer.h.0.mlp.c_proj"], Conv1DRowwiseParallel)
    with pytest.raises(ConfigError, match=r"config.n_head: config.n_head=4 does not split evenly over .*=8"):
        check_divisible(gpt2.tensor_parallel_sizes(), 8)
    crossed = HFCausalLM(config={**GPT2, "n_layer": 1, "add_cross_attention": True})
    with pytest.raises(ConfigError, match=r"init_args.config.add_cross_attention: .*cross-attention"):
        crossed.tensor_parallel_plan()
    with pytest.raises(ConfigError, match=r"model.network: transformers' gpt_neo declares no tensor-parallel plan"):
        tensor_parallel_layout(AutoConfig.for_model("gpt_neo"))


def test_tensor_parallel_refuses_sizes_the_ranks_cannot_split() -> None:
    from litune.models.tensor_parallel import check_divisible

    network = DecoderLM(**{**NETWORK, "nhead": 2, "d_model": 30, "vocab_size": 63})
    with pytest.raises(ConfigError, match=r"nhead=2 does not split evenly over tensor_parallel_size=4"):
        check_divisible(network.tensor_parallel_sizes(), 4)
    with pytest.raises(ConfigError, match=r"vocab_size=63 .* tensor_parallel_size=2"):
        check_divisible(network.tensor_parallel_sizes(), 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_fit_matches_one_process_resumes_and_exports(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """``litune fit`` with configs/strategy/fsdp2_tp2.yaml on 2 processes (a 1 x 2 data x tensor mesh: both ranks read
    the same rows, accumulation 2 as on one process) trains litune's decoder as one process does; its DCP checkpoint
    resumes exactly, on the same layout and on another one (TP2 -> DP2: 2 data-parallel ranks, accumulation 1, each
    parameter resharded from the tensor-parallel split to FSDP2's row split), and exports a Hugging Face folder with
    the trained logits."""
    from test_fsdp2 import FRAGMENTS, assert_export_matches, decoder_args

    one, two, other_layout = tmp_path / "one", tmp_path / "two", tmp_path / "other-layout"
    tp = ("--config", str(FRAGMENTS / "fsdp2_tp2.yaml"), "--trainer.devices=2")
    dp = ("--config", str(FRAGMENTS / "fsdp2.yaml"), "--trainer.devices=2")
    run_litune("fit", *decoder_args(one, corpus_dir, tokenizer_dir, "--trainer.devices=1"))
    run_litune("fit", *decoder_args(two, corpus_dir, tokenizer_dir, *tp))
    assert_matches(two, one, FIRST)
    # Teeth: two optimizer steps move the logits far beyond the comparison's tolerance.
    assert (probe(one, FIRST)["logits"] - probe(one, 1)["logits"]).abs().max() > 1e-2
    last = the_run(two) / "checkpoints" / "last.ckpt"
    assert is_fsdp2_checkpoint(last)
    shutil.copytree(two, other_layout)  # the TP2 run at FIRST steps, resumed below as DP2
    for root, extra in ((one, ("--trainer.devices=1",)), (two, tp), (other_layout, dp)):
        run_litune(
            "fit", *decoder_args(root, corpus_dir, tokenizer_dir, *extra, "--ckpt_path=last"), "--trainer.max_steps=5"
        )
    assert_matches(two, one, SECOND)
    assert_matches(other_layout, one, SECOND)
    assert_export_matches(two, SECOND)


def test_tensor_parallel_without_a_plan_fails_before_spawning(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """A Hugging Face GPT-2 with cross-attention (not in the plan) under fsdp2_tp2: one paragraph, exit 2, no run
    folder."""
    from test_fsdp2 import FRAGMENTS

    from litune_testing import NETWORK as TINY_GPT2

    crossed = f"--model.network.init_args.config={json.dumps({**TINY_GPT2, 'add_cross_attention': True})}"
    args = [*fit_args(tmp_path, corpus_dir, tokenizer_dir, "--config", str(FRAGMENTS / "fsdp2_tp2.yaml")), crossed]
    proc = subprocess.run([LITUNE, "fit", *args, "--trainer.devices=2"], env=litune_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.network.init_args.config.add_cross_attention" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def check_mesh_rank(rank: int, port: int) -> None:
    """One rank of a 2 x 2 (data_parallel x tensor_parallel) mesh: tensor parallelism, then FSDP2 over the data axis,
    for litune's decoder and the Hugging Face GPT-2 (its odd vocabulary split unevenly, then sharded by FSDP2)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from litune.models.hf import HFCausalLM
    from litune.models.tensor_parallel import apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
        for build in (lambda: DecoderLM(**NETWORK), lambda: HFCausalLM(config=GPT2)):
            torch.manual_seed(0)
            reference = build().double()
            network = apply_tensor_parallel(copy.deepcopy(reference), mesh["tensor_parallel"])
            for block in network.sharding_units():  # as FSDP2Strategy.shard_network does
                fully_shard(block, mesh=mesh["data_parallel"])
            fully_shard(network, mesh=mesh["data_parallel"])
            batch = batches()["packed"]
            row = mesh["data_parallel"].get_local_rank()  # each data-parallel rank one row, its TP group shares it
            network(**{key: value[row : row + 1] for key, value in batch.items()}).loss_sum.backward()
            reference(**batch).loss_sum.backward()
            got, label = grads(network), type(reference).__name__
            for key, grad in grads(reference).items():  # FSDP2 averages the 2 data-parallel ranks' gradients
                torch.testing.assert_close(got[key] * 2, grad, **TOL, msg=f"2x2 grad {key} of {label}")
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 0.1)
            want = torch.nn.utils.get_total_norm(list(grads(reference).values()))
            torch.testing.assert_close(full(norm) * 2, want, msg=f"2x2 gradient norm of {label}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # 4 processes
def test_fsdp2_over_tensor_parallel_on_a_2x2_mesh_equals_one_process() -> None:
    mp.spawn(check_mesh_rank, args=(free_port(),), nprocs=4)

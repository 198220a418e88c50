"""Per-rank memory of parallel layouts (tensor and sequence parallelism) on CPU vs `litune estimate`.

Every layout runs in its own group of CPU processes (gloo), a fresh group per measurement, on a Hugging Face GPT-2
split by litune's plan (``HFCausalLM.tensor_parallel_plan()``, exactly what ``litune fit`` applies under
``configs/strategy/fsdp2_tp2.yaml`` on a 1 x 2 mesh). Two tables:

1. **Model state per rank**: one AdamW step at a short sequence; each rank counts the bytes of the parameters, the
   gradients and the Adam moments it holds (a DTensor's local shard), and the growth of its resident memory over a
   baseline taken after the imports and the process group (peak RSS, ``ru_maxrss``; and the RSS after the step). Beside
   them ``litune.memory_model.estimate`` for the same layout (what ``litune estimate`` prints).
2. **Activations per rank vs sequence length**: the bytes autograd saves for the backward pass in one training forward
   (``torch.autograd.graph.saved_tensors_hooks``, one count per storage, weights excluded; a DTensor counted by its
   local shard), batch 1, at 4k-16k tokens, beside ``estimate``'s activation term.

Usage::

    python bench/bench_parallel.py                 # both tables, TP=1 vs TP=2 vs SP=2, 4k / 8k / 16k tokens (minutes)
    python bench/bench_parallel.py --quick         # a tiny model at 256 tokens: checks the script
    python bench/bench_parallel.py --layouts tp1 tp2 --seq 4096 8192 --json out.json

Sequence parallelism (``sp2``): Ulysses over 2 ranks (``split_sequences``) plus FSDP2 over both, as ``litune fit``
applies under ``configs/strategy/fsdp2_sp2.yaml``; every rank gets the whole batch and keeps its half of each
sequence.

Adding a layout: append a :class:`Layout` to :data:`LAYOUTS` with its ``split`` (network, mesh
-> network) and ``shard_batch`` (batch, mesh -> this rank's batch), and its ``strategy`` shape for ``estimate``; the
tables pick it up. ``mesh`` is a 1-D device mesh over the layout's processes, named by ``Layout.mesh_name``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import versions, write_json  # noqa: E402

from litune.memory_model import ModelShape, RunShape, StrategyShape, estimate  # noqa: E402

MiB = 1024**2
Batch = dict[str, torch.Tensor]


def _whole(network: torch.nn.Module, mesh) -> torch.nn.Module:  # noqa: ANN001
    return network


def _same_batch(batch: Batch, mesh) -> Batch:  # noqa: ANN001
    return batch


def _tensor_parallel(network: torch.nn.Module, mesh) -> torch.nn.Module:  # noqa: ANN001
    from litune.models.tensor_parallel import apply_tensor_parallel

    return apply_tensor_parallel(network, mesh)


def _sequence_parallel(network: torch.nn.Module, mesh) -> torch.nn.Module:  # noqa: ANN001
    """Ulysses over the mesh, then FSDP2 over the same ranks (as ``litune fit`` under fsdp2_sp2 on a 1 x 2 mesh:
    each rank keeps half of every sequence and half of the model state). The batch is given whole to every rank: the
    network keeps its own slice."""
    from litune.strategies.fsdp2 import sharding_units

    network.split_sequences(mesh.get_group())
    from torch.distributed.fsdp import fully_shard

    for unit in sharding_units(network):
        fully_shard(unit, mesh=mesh)
    return fully_shard(network, mesh=mesh)


@dataclass(frozen=True)
class Layout:
    """One row of the tables: how many processes, how a network and a batch are split over them.

    Args:
        name: the row's label.
        processes: ranks of the group (a 1-D mesh named ``mesh_name``).
        strategy: the shape ``litune estimate`` predicts for (``StrategyShape``).
        split: ``(network, mesh) -> network`` applied on every rank after the whole network is built.
        shard_batch: ``(batch, mesh) -> batch``: this rank's part of the ``[1, T]`` batch (all of it for TP).
        mesh_name: the mesh dimension's name.
    """

    name: str
    processes: int
    strategy: StrategyShape = field(default_factory=StrategyShape)
    split: Callable[[torch.nn.Module, object], torch.nn.Module] = _whole
    shard_batch: Callable[[Batch, object], Batch] = _same_batch
    mesh_name: str = "tensor_parallel"


LAYOUTS = {
    "tp1": Layout("tp1", processes=1),
    "tp2": Layout("tp2", processes=2, strategy=StrategyShape(fsdp=True, tensor_parallel=2), split=_tensor_parallel),
    "sp2": Layout(
        "sp2",
        processes=2,
        strategy=StrategyShape(fsdp=True, sequence_parallel=2),
        split=_sequence_parallel,
        mesh_name="sequence_parallel",
    ),
}
"""The layouts measured; sequence-parallel rows are added here."""


def gpt2(args: argparse.Namespace, seq_len: int) -> dict:
    return {
        "model_type": "gpt2", "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
        "vocab_size": args.vocab, "n_positions": seq_len, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 0, "eos_token_id": 0,
    }  # fmt: skip


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:  # noqa: ANN001
    return sum(_local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.ndim)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_state(network: torch.nn.Module, layout: Layout, mesh, seq_len: int) -> dict:  # noqa: ANN001
    """One AdamW step; the bytes of parameters, gradients and Adam moments this rank holds (before zero_grad)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    ids = torch.randint(0, network.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(mesh.device_type)
    batch = layout.shard_batch({"input_ids": ids, "labels": ids}, mesh)
    network(**batch).loss.backward()
    optimizer.step()
    params = list(network.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values()]
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params), "optimizer": _bytes(moments)}


def saved_activations(network: torch.nn.Module, batch: Batch) -> int:
    """Bytes autograd keeps for backward in one training forward, per storage, weights excluded."""
    weights = {_local(p).untyped_storage().data_ptr() for p in network.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
        # FSDP2 swaps each block's gathered (unsharded) parameters in while the block runs: those are weights too.
        gathered = {p.untyped_storage().data_ptr() for p in network.parameters() if not hasattr(p, "to_local")}
        if storage.data_ptr() not in weights | gathered:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(**batch)
    return sum(saved.values())


def rank_main(rank: int, layout: Layout, args: argparse.Namespace, port: int, out: str) -> None:
    """One rank: the model-state step, then one forward per sequence length, each on a freshly built network split by
    the layout (the state first, so that the peak RSS is its own); writes ``<out>/rank<R>.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from litune.models.hf import HFCausalLM

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = args.device
    if device == "cuda":  # one GPU per rank (a GPU run: bench/gpu.sh's long-context row)
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=layout.processes)
    try:
        mesh = init_device_mesh(device, (layout.processes,), mesh_dim_names=(layout.mesh_name,))
        base_peak, base_now = _peak_rss(), _rss_now()
        torch.manual_seed(0)
        network = layout.split(HFCausalLM(config=gpt2(args, args.state_seq)).train().to(device), mesh)
        state = model_state(network, layout, mesh, args.state_seq)
        state.update(peak_rss=_peak_rss() - base_peak, rss_after=_rss_now() - base_now)
        state["num_params"] = sum(p.numel() for p in network.parameters())  # a DTensor's numel() is the whole
        del network
        saved = {}
        for seq_len in args.seq:
            network = layout.split(HFCausalLM(config=gpt2(args, seq_len)).train().to(device), mesh)
            ids = torch.randint(0, args.vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
            saved[seq_len] = saved_activations(network, layout.shard_batch({"input_ids": ids, "labels": ids}, mesh))
            del network
        Path(out, f"rank{rank}.json").write_text(json.dumps({"state": state, "saved": saved}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(layout: Layout, args: argparse.Namespace) -> list[dict]:
    """Run every measurement of ``layout`` on one fresh group of ``layout.processes`` ranks; each rank's results."""
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as out:
        mp.spawn(rank_main, args=(layout, args, _free_port(), out), nprocs=layout.processes)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(layout.processes)]


def predicted(args: argparse.Namespace, layout: Layout, num_params: int, seq_len: int, batch: int):  # noqa: ANN201
    model = ModelShape(num_params, args.n_layer, args.n_embd, args.n_head, args.vocab)
    run = RunShape(seq_len=seq_len, micro_batch=batch, precision="32-true", devices=layout.processes)
    return estimate(model, run, layout.strategy)


def state_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[dict]:
    print(f"\nModel state per rank (GPT-2 {args.n_layer} x {args.n_embd}, vocabulary {args.vocab}, fp32, AdamW; MiB)")
    print("| layout | params | grads | Adam moments | state measured | state predicted | measured / predicted "
          "| peak RSS growth | RSS growth after step |")  # fmt: skip
    print("|---" * 9 + "|")
    rows = []
    for name, ranks in results.items():
        r0 = ranks[0]["state"]
        want = predicted(args, LAYOUTS[name], r0["num_params"], args.state_seq, 2)
        state = r0["params"] + r0["grads"] + r0["optimizer"]
        print(
            f"| {name} | {r0['params'] / MiB:.2f} | {r0['grads'] / MiB:.2f} | {r0['optimizer'] / MiB:.2f} "
            f"| {state / MiB:.2f} | {want.model_state / MiB:.2f} | {state / want.model_state:.3f} "
            f"| {r0['peak_rss'] / MiB:.0f} | {r0['rss_after'] / MiB:.0f} |"
        )
        rows.append({"layout": name, "measured": state, "predicted": want.model_state})
    return rows


def activation_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[dict]:
    print(f"\nActivations per rank, one training forward, batch 1 (GPT-2 {args.n_layer} x {args.n_embd}, "
          f"{args.n_head} heads, SDPA, fp32; MiB)")  # fmt: skip
    print("| layout | tokens | saved measured (rank 0) | predicted | measured / predicted |")
    print("|---" * 5 + "|")
    rows = []
    for seq_len in args.seq:
        for name, ranks in results.items():
            want = predicted(args, LAYOUTS[name], 1, seq_len, 1).activations  # (its model state is not used)
            got = ranks[0]["saved"][str(seq_len)]
            print(f"| {name} | {seq_len} | {got / MiB:.1f} | {want / MiB:.1f} | {got / want:.3f} |")
            rows.append({"layout": name, "seq_len": seq_len, "measured": got, "predicted": want})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--state-seq", type=int, default=128, help="tokens per row of the model-state step")
    parser.add_argument("--seq", type=int, nargs="*", default=[4096, 8192, 16384], help="activation sequence lengths")
    parser.add_argument("--quick", action="store_true", help="tiny model, 256 tokens: checks the script")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank (NCCL)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.n_embd, args.vocab, args.state_seq, args.seq = 64, 512, 32, [256]
    print("machine:", json.dumps(versions()), "OMP/torch threads per rank: 1")
    results = {name: measure(LAYOUTS[name], args) for name in args.layouts}
    state = state_table(args, results)
    activations = activation_table(args, results)
    write_json(args.json, {"benchmark": "parallel", "args": vars(args), "results": results, "state": state,
                           "activations": activations})  # fmt: skip


if __name__ == "__main__":
    main()

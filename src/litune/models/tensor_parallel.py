"""Tensor parallelism (Megatron-style, through ``torch.distributed.tensor.parallel``): the pieces a network's plan uses.

A network that supports tensor parallelism declares its plan next to ``sharding_units()``: a method
``tensor_parallel_plan()`` returning ``{module path: ParallelStyle}`` for :func:`parallelize_module`. The usual
layout (Megatron-LM, torchtitan): the projections that fan out (attention q/k/v, the MLP's up projection) are
column-parallel (each rank computes ``1/N`` of the heads and of the hidden units), the ones that fan back in (attention
output, MLP down projection) are row-parallel (each rank's partial sum is all-reduced), so a block costs two
all-reduces forward and two backward, and everything between blocks (norms, residual stream) is replicated.

Two things PyTorch does not provide, hand-written here:

* :func:`heads_of_this_rank`: GPT-2's attention computes q, k and v in one ``[3·d, d]`` projection (``c_attn``).
  Plain column sharding gives rank 0 all of q and part of k; the projection's sharded output is exchanged so that
  rank ``r`` attends with the heads ``r·h/N .. (r+1)·h/N`` of each of q, k and v.
* :func:`vocab_parallel_cross_entropy_sum`: with the output layer column-parallel (``[V/N, d]`` rows of the vocabulary
  per rank, tied to the row-parallel token embedding), the logits stay sharded on the vocabulary and the loss is
  taken without gathering them (Megatron's vocab-parallel cross-entropy: max and sum of exponentials all-reduced).
  ``torch.distributed.tensor.parallel.loss_parallel`` does the same but must also wrap the backward call, which
  Lightning owns; this version's collectives carry their own gradients, so it works inside the chunked loss and its
  recomputation too.
* :class:`Conv1DColwiseParallel` / :class:`Conv1DRowwiseParallel` and :class:`LocalHeads`: Hugging Face GPT-2's
  projections are ``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, the transpose of ``nn.Linear``'s),
  which torch's ``ColwiseParallel``/``RowwiseParallel`` refuse (they partition ``nn.Linear``/``nn.Embedding`` only);
  the styles below keep torch's input/output handling and shard the transposed weight on the other dim. HF's
  ``GPT2Attention`` splits q|k|v by ``split_size`` and counts ``num_heads``: :class:`LocalHeads` sets both to this
  rank's share, as transformers' own tensor-parallel loading does for the families it plans.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from litune.errors import NETWORK_ARGS, ConfigError


def heads_of_this_rank(fused: DTensor, parts: int = 3) -> torch.Tensor:
    """This rank's heads of each of ``parts`` side-by-side outputs (GPT-2's q|k|v), from a column-parallel projection.

    Args:
        fused: DTensor ``[B, T, parts * width]`` sharded on the last dim in contiguous blocks (``Shard(-1)``).
        parts: number of equal outputs computed side by side.

    Returns:
        Local ``[B, T, parts * width / N]``: ``[q_r, k_r, v_r]``, the ``r``-th ``1/N`` of each part.

    The exchange costs an all-gather of the fused output forward and a reduce-scatter of its gradient backward
    (Megatron shards the fused weight head-interleaved instead and needs neither). Interleaving would need a strided
    DTensor placement (``_StridedShard``), which DCP's checkpoint planner rejects as overlapping chunks in torch 2.13;
    the contiguous ``Shard(0)`` weight saves, resumes and reshards like any other.
    """
    mesh = fused.device_mesh
    n, r = mesh.size(), mesh.get_local_rank()
    # Each rank's slice receives only its heads' gradient: the sum over ranks (Partial) is the full gradient.
    whole = fused.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    return torch.cat([part.chunk(n, dim=-1)[r] for part in whole.chunk(parts, dim=-1)], dim=-1)


class ReplicateParallel(ParallelStyle):
    """Every parameter of the module replicated on the tensor-parallel ranks, as a ``Replicate()`` DTensor.

    For the layers a plan leaves whole (norms, position embeddings): their inputs are the same on every rank, so are
    their gradients. As DTensors, they join the sharded ones in one gradient-norm computation (``clip_grad_norm_``
    refuses a mix of DTensors and plain tensors) and in DCP checkpoints. Inputs are taken as replicated and the output
    is returned as a plain tensor.
    """

    @staticmethod
    def _replicate(name, module, device_mesh):  # noqa: ANN001
        for param_name, param in list(module.named_parameters(recurse=False)):
            dist_param = nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()]), param.requires_grad)
            module.register_parameter(param_name, dist_param)

    @staticmethod
    def _inputs(mod, inputs, device_mesh):  # noqa: ANN001
        return tuple(
            DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    @staticmethod
    def _outputs(mod, outputs, device_mesh):  # noqa: ANN001
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:  # noqa: ANN001
        from torch.distributed.tensor import distribute_module

        return distribute_module(module, device_mesh, self._replicate, self._inputs, self._outputs)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank uses the sum identically afterwards (Megatron's
    "reduce from the tensor-parallel region"), so each rank's input gets the gradient of its own term once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


def vocab_parallel_cross_entropy_sum(logits: DTensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of vocabulary-sharded logits, without gathering them.

    Args:
        logits: DTensor ``[..., V]`` sharded on the last dim (``Shard(-1)``) over a 1-D tensor-parallel mesh; ``V``
            need not divide by the mesh size (DTensor's uneven split: ``ceil(V/N)`` columns per rank, fewer on the
            last ones).
        targets: ``[...]`` target ids (a plain tensor, the same on every rank), ``ignore_index`` where no loss.
        ignore_index: the target id that takes no loss (``litune.models.output.IGNORE_INDEX``).

    Returns:
        Scalar float32, replicated: ``sum_i (logsumexp(logits_i) - logits_i[targets_i])`` over non-ignored ``i``.
    """
    mesh = logits.device_mesh
    group = mesh.get_group()
    local = logits.to_local().float()
    width = local.size(-1)
    local = local.reshape(-1, width)  # [n, V/N]
    flat = targets.reshape(-1)
    start = min(mesh.get_local_rank() * -(-logits.size(-1) // mesh.size()), logits.size(-1))  # torch.chunk's split
    top = local.detach().max(dim=-1).values  # [n]; any per-row constant works, the global max avoids overflow
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = local - top[:, None]
    sum_exp = _SumOverRanks.apply(shifted.exp().sum(dim=-1), group)  # [n]
    offset = flat - start
    mine = (offset >= 0) & (offset < width) & (flat != ignore_index)
    picked = shifted.gather(-1, offset.clamp(0, width - 1)[:, None]).squeeze(-1) * mine  # [n]: 0 off this shard
    picked = _SumOverRanks.apply(picked, group)
    losses = sum_exp.log() - picked
    return torch.where(flat != ignore_index, losses, torch.zeros_like(losses)).sum()


def _distribute(module: nn.Module, mesh, placements: dict[str, Placement], src_data_rank: int | None) -> None:  # noqa: ANN001
    """Replace each of ``module``'s own parameters by a DTensor with the placement named for it."""
    for name, param in list(module.named_parameters(recurse=False)):
        dist_param = distribute_tensor(param, mesh, [placements[name]], src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))


class Conv1DColwiseParallel(ColwiseParallel):
    """:class:`ColwiseParallel` for a Hugging Face ``Conv1D`` (``y = x @ W + b``, ``W [in, out]``): ``W`` is split on
    its output dim 1 and ``b`` on dim 0, so each rank computes ``out/N`` of the outputs.

    Args:
        fused_parts: the layer computes this many equal outputs side by side (GPT-2's ``c_attn``: q|k|v, 3); the
            output is then each rank's share of every part (:func:`heads_of_this_rank`), ``[B, T, parts·width/N]``.
        **kwargs: :class:`ColwiseParallel`'s (``input_layouts``, ``output_layouts``, ``use_local_output``).
    """

    def __init__(self, *, fused_parts: int | None = None, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.fused_parts = fused_parts

    def _partition_conv1d(self, name: str, module: nn.Module, mesh) -> None:  # noqa: ANN001
        _distribute(module, mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank)

    def _output(self, mod: nn.Module, outputs: DTensor, mesh) -> torch.Tensor:  # noqa: ANN001
        if self.fused_parts is not None:
            return heads_of_this_rank(outputs, self.fused_parts)
        return self._prepare_output_fn(self.output_layouts, self.use_local_output, mod, outputs, mesh)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:  # noqa: ANN001
        # torch's _apply dispatches on nn.Linear/nn.Embedding only; same input handling, Conv1D's partition.
        inputs = partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts)
        return distribute_module(module, device_mesh, self._partition_conv1d, inputs, self._output)


class Conv1DRowwiseParallel(RowwiseParallel):
    """:class:`RowwiseParallel` for a Hugging Face ``Conv1D``: ``W [in, out]`` split on its input dim 0 (the input
    arrives split on its last dim), ``b`` replicated; the partial sums are all-reduced (``output_layouts``)."""

    def _partition_conv1d(self, name: str, module: nn.Module, mesh) -> None:  # noqa: ANN001
        _distribute(module, mesh, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:  # noqa: ANN001
        self.desired_input_layouts = (Shard(-1),)
        inputs = partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts)
        outputs = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
        return distribute_module(module, device_mesh, self._partition_conv1d, inputs, outputs)


class LocalHeads(ParallelStyle):
    """An attention module whose projections are split by heads computes with ``1/N`` of them: its head count and
    its q|k|v split width (GPT-2's ``num_heads`` and ``split_size``) become this rank's share. No parameters."""

    ATTRIBUTES = ("num_heads", "split_size")

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:  # noqa: ANN001
        for name in self.ATTRIBUTES:
            setattr(module, name, getattr(module, name) // device_mesh.size())
        return module


def tensor_parallel_plan(network: nn.Module) -> dict:
    """The network's ``tensor_parallel_plan()``.

    Raises:
        ConfigError: when the network declares none.
    """
    from litune.errors import ConfigError

    hook = getattr(network, "tensor_parallel_plan", None)
    if not callable(hook):
        raise ConfigError(
            "trainer.strategy.init_args.tensor_parallel_size",
            f"{type(network).__name__} declares no tensor-parallel plan (no `tensor_parallel_plan()` method)",
            "use litune.models.transformer.DecoderLM, or tensor_parallel_size: 1 (FSDP2 alone)",
        )
    return hook()


def check_divisible(sizes: dict[str, int], tensor_parallel_size: int, field: str = NETWORK_ARGS) -> None:
    """Raise a :class:`ConfigError` naming the first size (heads, hidden units, vocabulary) the ranks cannot split."""
    for name, size in sizes.items():
        if size % tensor_parallel_size:
            raise ConfigError(
                f"{field}.{name}",
                f"{name}={size} does not split evenly over tensor_parallel_size={tensor_parallel_size} ranks",
                f"use a tensor_parallel_size that divides {size}, or change {name}",
            )


def apply_tensor_parallel(network: nn.Module, mesh) -> nn.Module:  # noqa: ANN001 (a 1-D DeviceMesh)
    """Split ``network``'s layers over the ranks of ``mesh`` by its plan; tied weights stay tied (one shard).

    Raises:
        ConfigError: when the network has no plan or its sizes do not divide by the mesh size.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tensor_parallel_plan(network)
    sizes = getattr(network, "tensor_parallel_sizes", dict)()
    check_divisible(sizes, mesh.size())
    # Parameters reachable under several names (a head tied to the embedding): parallelize_module replaces each
    # module's parameter on its own, so the ties are restored afterwards to the first name's new shard.
    owners: dict[int, list[str]] = {}
    for name, param in network.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    ties = [names for names in owners.values() if len(names) > 1]
    parallelize_module(network, mesh, plan)
    # What the plan leaves whole is replicated (see ReplicateParallel): every parameter becomes a DTensor.
    replicated = {
        name: ReplicateParallel()
        for name, module in network.named_modules()
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False))
    }
    parallelize_module(network, mesh, replicated)
    for first, *others in ties:
        shared = network.get_parameter(first)
        for name in others:
            module_name, _, attr = name.rpartition(".")
            setattr(network.get_submodule(module_name), attr, shared)
    return network

"""Per-device training memory, computed from the model's shape, the strategy and the precision (``litune estimate``).

Model state follows the ZeRO paper (Rajbhandari et al., 2020, section 3): with mixed-precision Adam a parameter costs
2 bytes (16-bit weight) + 2 (16-bit gradient) + K = 12 (fp32 master weight, momentum, variance) = 16 bytes, and with
N data-parallel processes

* DDP / no ZeRO:  (2 + 2 + 12) Ψ          (litune's DDP keeps fp32 weights and grads: 4 + 4 + 8, also 16 bytes)
* ZeRO-1:         2Ψ + 2Ψ + 12Ψ/N = 4Ψ + 12Ψ/N
* ZeRO-2:         2Ψ + (2 + 12)Ψ/N = 2Ψ + 14Ψ/N
* ZeRO-3:         (2 + 2 + 12)Ψ/N = 16Ψ/N
* FSDP2:          (4 + 4 + 8)Ψ/N = 16Ψ/N    (fp32 sharded masters and gradients, bf16 only in the gathered copies);
                  hybrid sharding divides by the shard group (a node's processes) instead of N

Under ``32-true`` DeepSpeed stores 4-byte weights and gradients but still keeps a separate fp32 master partition
(K = 12), which the per-rank measurements in the tests confirm. Offload moves the optimizer partition (with its
gradient partition) or the parameter partition from device memory to host memory.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models", eq. 1
without tensor parallelism: ``s·b·h·(34 + 5·a·s/h)`` bytes per layer with 16-bit activations (the ``5·a·s/h``
score term only where attention keeps its probabilities: eager attention, not SDPA's fused kernels), and ``2·s·b·h`` per
layer (the layer input) with full recomputation (gradient checkpointing). fp32 activations double those. The output
layer adds the logits ``s·b·V`` in training precision plus the fp32 copy the loss takes. Tensor parallelism over ``t``
ranks follows eq. 2: ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` per layer and ``1/t`` of the (vocabulary-parallel) logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from litune.errors import ConfigError, check_group_divides

GiB = 1024**3

GPU_SIZES_GIB: dict[str, float] = {
    "16 GB (V100-16, T4)": 16,
    "24 GB (A10, L4, RTX 4090)": 24,
    "40 GB (A100-40)": 40,
    "48 GB (L40S, A6000)": 48,
    "80 GB (A100-80, H100)": 80,
    "141 GB (H200)": 141,
    "192 GB (B200, MI300X)": 192,
}
"""Device memory sizes that ``litune estimate`` checks a run against."""

RESERVED_GIB = 1.5
"""Device memory not available to tensors: CUDA context, NCCL and DeepSpeed communication buffers, fragmentation."""

PRECISION_BYTES = {"32-true": 4, "bf16-mixed": 2, "16-mixed": 2, "bf16-true": 2, "16-true": 2}
"""Bytes per element of the activations (and of DeepSpeed's weights and gradients) for each precision flag."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only Transformer that memory depends on.

    Args:
        num_params: Ψ, trainable parameters (tied embeddings counted once).
        n_layer: Transformer blocks.
        hidden: model width h.
        n_head: attention heads a.
        vocab_size: V, for the logits.
        attention_probabilities: attention keeps its ``[b, a, s, s]`` softmax probabilities (and dropout mask) for
            backward: eager attention, or SDPA's math fallback (attention dropout on CPU). False, the default: SDPA's
            fused kernels (flash, memory-efficient: litune's decoder and Hugging Face's ``sdpa``), which keep only a
            ``[b, a, s]`` log-sum-exp, so Korthikanti et al.'s ``5·a·s²`` term is not spent.
    """

    num_params: int
    n_layer: int
    hidden: int
    n_head: int
    vocab_size: int
    attention_probabilities: bool = False

    def __post_init__(self) -> None:
        for name in ("num_params", "n_layer", "hidden", "n_head", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}", f"{name}={value!r} must be a positive integer", "check the model")


@dataclass(frozen=True)
class StrategyShape:
    """How model state is split and where it lives.

    Args:
        stage: ZeRO stage, 0 for DDP / a single device.
        deepspeed: whether DeepSpeed runs the optimizer (fp32 master copy, 16-bit weights under mixed precision).
        offload_optimizer: optimizer state (and its gradient partition) in host memory.
        offload_params: parameter partition in host memory (ZeRO-3 and FSDP2 only).
        fsdp: FSDP2 (``litune.strategies.FSDP2Strategy``): parameters, gradients and optimizer state sharded.
        hybrid: FSDP2 hybrid sharding: shard within a node (or ``shard_size`` processes), replicate across nodes.
        shard_size: processes per shard group under ``hybrid`` (default: the processes of one node).
        tensor_parallel: ranks of a tensor-parallel group under FSDP2 (``tensor_parallel_size``): each holds ``1/tp``
            of every split layer, and FSDP2 shards that over the ``N / tp`` data-parallel ranks, so model state is
            ``1/N`` per device as with full sharding (the few replicated norm and position weights are not counted).
        sequence_parallel: ranks of a Ulysses sequence group under FSDP2 (``sequence_parallel_size``): each holds
            ``1/sp`` of every sequence's activations (token-wise ones, and attention's ``heads/sp`` over the whole
            sequence) and logits; model state is sharded over all ``N`` ranks as with full sharding.
    """

    stage: int = 0
    deepspeed: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp: bool = False
    hybrid: bool = False
    shard_size: int | None = None
    tensor_parallel: int = 1
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.sequence_parallel != 1 and (not self.fsdp or self.hybrid or self.tensor_parallel != 1):
            raise ConfigError(
                "trainer.strategy.init_args.sequence_parallel_size",
                "sequence parallelism is composed with FSDP2's full sharding only (no tensor parallelism)",
                "use configs/strategy/fsdp2_sp2.yaml",
            )
        if self.tensor_parallel != 1 and (not self.fsdp or self.hybrid):
            raise ConfigError(
                "trainer.strategy.init_args.tensor_parallel_size",
                "tensor parallelism is composed with FSDP2's full sharding only",
                "use configs/strategy/fsdp2_tp2.yaml",
            )
        if self.fsdp and (self.deepspeed or self.stage):
            raise ConfigError("trainer.strategy", "FSDP2 and DeepSpeed ZeRO exclude each other", "pick one strategy")
        if (self.hybrid or self.shard_size) and not self.fsdp:
            raise ConfigError("trainer.strategy.init_args.sharding", "hybrid sharding needs FSDP2", "use fsdp2_hybrid")
        if self.fsdp:
            if self.offload_optimizer != self.offload_params:
                raise ConfigError(
                    "trainer.strategy.init_args.cpu_offload",
                    "FSDP2 offloads parameters, gradients and optimizer state together",
                    "set cpu_offload: true (configs/strategy/fsdp2_offload.yaml)",
                )
            return
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError("trainer.strategy.init_args.stage", f"stage={self.stage} is not a ZeRO stage", "use 1-3")
        if self.stage and not self.deepspeed:
            raise ConfigError("trainer.strategy", f"ZeRO stage {self.stage} needs DeepSpeed", "use a deepspeed config")
        if self.offload_params and self.stage != 3:
            raise ConfigError(
                "trainer.strategy.init_args.offload_parameters",
                f"parameter offload needs ZeRO stage 3, got stage {self.stage}",
                "use configs/strategy/deepspeed_zero3_offload.yaml",
            )

    @property
    def name(self) -> str:
        if self.fsdp:
            tp = f"_tp{self.tensor_parallel}" if self.tensor_parallel > 1 else ""
            tp += f"_sp{self.sequence_parallel}" if self.sequence_parallel > 1 else ""
            return "fsdp2" + ("_hybrid" if self.hybrid else "") + tp + ("_offload" if self.offload_params else "")
        if not self.deepspeed:
            return "ddp"
        suffix = "_offload" if self.offload_optimizer or self.offload_params else ""
        return f"deepspeed_zero{self.stage}{suffix}"


STRATEGIES_BY_COST: tuple[StrategyShape, ...] = (
    StrategyShape(),
    StrategyShape(stage=1, deepspeed=True),
    StrategyShape(stage=2, deepspeed=True),
    StrategyShape(stage=3, deepspeed=True),
    StrategyShape(stage=2, deepspeed=True, offload_optimizer=True),
    StrategyShape(stage=3, deepspeed=True, offload_optimizer=True, offload_params=True),
    StrategyShape(fsdp=True, hybrid=True),
    StrategyShape(fsdp=True),
    StrategyShape(fsdp=True, offload_optimizer=True, offload_params=True),
)
"""litune's strategy fragments from cheapest to dearest in communication and host traffic (DeepSpeed's first, so
that the cheapest fitting choice stays DeepSpeed's where both shard the same; FSDP2's per-device state equals ZeRO-3's
under full sharding)."""


@dataclass(frozen=True)
class RunShape:
    """Batch geometry, precision and topology.

    Args:
        seq_len: s, tokens per sequence (the data's ``block_size``).
        micro_batch: b, sequences per forward/backward per device.
        precision: Lightning precision flag.
        gradient_checkpointing: full activation recomputation.
        devices: processes per node.
        nodes: nodes.
    """

    seq_len: int
    micro_batch: int
    precision: str = "bf16-mixed"
    gradient_checkpointing: bool = False
    devices: int = 1
    nodes: int = 1

    def __post_init__(self) -> None:
        for name, fix in (("seq_len", "data.init_args.block_size"), ("micro_batch", "data.init_args.batch_size"),
                          ("devices", "--devices"), ("nodes", "--nodes")):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(fix, f"{name}={value!r} must be a positive integer", f"set {fix} to 1 or more")
        if self.precision not in PRECISION_BYTES:
            raise ConfigError(
                "trainer.precision", f"precision={self.precision!r} is unknown", f"use one of {sorted(PRECISION_BYTES)}"
            )

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes


@dataclass
class MemoryEstimate:
    """Bytes per device (and per process in host memory, for offloaded state).

    Attributes:
        params / grads / optimizer: model state on the device (``optimizer`` includes DeepSpeed's fp32 master copy).
        activations: saved for backward, for one micro-batch.
        host: model state offloaded to host memory, per process.
    """

    strategy: StrategyShape
    params: float
    grads: float
    optimizer: float
    activations: float
    host: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    def fits(self, capacity_gib: float) -> bool:
        """Whether the device total plus :data:`RESERVED_GIB` fits in ``capacity_gib``."""
        return self.total + RESERVED_GIB * GiB <= capacity_gib * GiB


def model_state_bytes_per_param(strategy: StrategyShape, precision: str) -> tuple[float, float, float]:
    """Bytes per parameter of (weights, gradients, optimizer state) before partitioning.

    DeepSpeed keeps weights and gradients in the training precision and an fp32 master copy plus two fp32 Adam moments
    (12 bytes). Lightning without DeepSpeed keeps fp32 weights and gradients under mixed precision (autocast casts on
    the fly) and two Adam moments in the weights' dtype.
    """
    if strategy.deepspeed:
        width = PRECISION_BYTES[precision]
        return width, width, 12.0
    width = 2 if precision.endswith("-true") and precision != "32-true" else 4
    return width, width, 2.0 * width


def activation_bytes(model: ModelShape, run: RunShape, tensor_parallel: int = 1) -> float:
    """Activation memory of one micro-batch: Korthikanti et al.'s per-layer term times layers, plus the logits.

    The paper's ``s·b·h·(34 + 5as/h)`` counts 16-bit activations (and 1-byte dropout masks); fp32 runs roughly double
    it, which is what the ``width / 2`` factor says. Its ``5as/h`` term (the ``[a, s, s]`` scores, their softmax and
    dropout mask) is counted only for attention that keeps them (``model.attention_probabilities``): SDPA's fused
    kernels recompute them in the backward pass, and the measured activations of such a run grow linearly with
    ``s`` (``docs/benchmarks.md``, parallelism tables). Under tensor parallelism over ``t`` ranks (its eq. 2, without
    sequence parallelism) a rank keeps ``s·b·h·(10 + 24/t + 5as/(ht))``: the residual stream, the norms' and the
    column-parallel layers' inputs stay whole on every rank, the rest is split by heads and hidden units, and the
    vocabulary-parallel logits are ``1/t`` of the whole.
    """
    s, b, h, a, t = run.seq_len, run.micro_batch, model.hidden, model.n_head, tensor_parallel
    width = PRECISION_BYTES[run.precision]
    scores = 5 * a * s / (h * t) if model.attention_probabilities else 0.0  # fused SDPA keeps no [s, s] scores
    per_layer = 2 * s * b * h if run.gradient_checkpointing else s * b * h * (10 + 24 / t + scores)
    logits = s * b * model.vocab_size * (width + 4) / t  # logits, and the fp32 copy the loss takes
    return model.n_layer * per_layer * width / 2 + logits


def check_sequence_groups(sequence_parallel: int, world_size: int, notes: list[str]) -> int:
    """The factor Ulysses divides activations by (1 without it); refuses a group size that does not divide the
    processes and notes what is not counted."""
    if sequence_parallel == 1:
        return 1
    check_group_divides("sequence_parallel_size", sequence_parallel, world_size)
    notes.append(
        f"sequence parallel x{sequence_parallel}: activations and logits / {sequence_parallel} per rank (plus the "
        "all-to-all buffers of one layer's q, k, v and output, and the whole sequence's mask when batches are padded "
        "or packed: not counted)"
    )
    return sequence_parallel


def estimate(model: ModelShape, run: RunShape, strategy: StrategyShape) -> MemoryEstimate:
    """Per-device memory of one training process.

    Args:
        model: the network's sizes.
        run: batch geometry, precision and topology (N = devices x nodes).
        strategy: ZeRO stage and offload.
    """
    psi, n = model.num_params, run.world_size
    p, g, k = model_state_bytes_per_param(strategy, run.precision)
    params = p * psi / (n if strategy.stage >= 3 else 1)
    grads = g * psi / (n if strategy.stage >= 2 else 1)
    optimizer = k * psi / (n if strategy.stage >= 1 else 1)
    host = 0.0
    result_notes: list[str] = []
    activations = activation_bytes(model, run, strategy.tensor_parallel if strategy.fsdp else 1)
    if strategy.fsdp:
        shards = (strategy.shard_size or run.devices) if strategy.hybrid else n
        params, grads, optimizer = p * psi / shards, g * psi / shards, k * psi / shards
        result_notes.append("plus one gathered block's parameters and gradients while it computes (not counted)")
        if strategy.tensor_parallel > 1:
            check_group_divides("tensor_parallel_size", strategy.tensor_parallel, n)
            result_notes.append(
                f"tensor parallel x{strategy.tensor_parallel}: each layer split over a group (activations per "
                "Korthikanti et al. eq. 2: the residual stream and the layers' inputs replicated in the group, the "
                "rest and the logits split)"
            )
        activations /= check_sequence_groups(strategy.sequence_parallel, n, result_notes)
        if strategy.offload_params:
            # CPUOffloadPolicy: sharded parameters, gradients and optimizer state all live in host memory.
            host, params, grads, optimizer = params + grads + optimizer, 0.0, 0.0, 0.0
            result_notes.append("optimizer step on the CPU over the offloaded shards")
    elif strategy.offload_optimizer:
        # ZeRO-Offload: the optimizer partition and its (fp32) gradient partition move to host memory.
        host += optimizer + 4 * psi / n
        optimizer, grads = 0.0, 0.0
        result_notes.append("optimizer step on the CPU (DeepSpeed CPU Adam): needs fast host memory and cores")
    if strategy.offload_params:
        host += params
        params = 0.0
        result_notes.append("parameters fetched from host memory layer by layer: the largest layer must fit too")
    return MemoryEstimate(
        strategy=strategy,
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        host=host,
        notes=result_notes,
    )


def cheapest_fitting(model: ModelShape, run: RunShape, capacity_gib: float) -> tuple[StrategyShape, bool] | None:
    """The cheapest strategy (then with gradient checkpointing) whose estimate fits ``capacity_gib``.

    Returns:
        ``(strategy, needs_gradient_checkpointing)``, or None when nothing fits at this micro-batch and world size.
    """
    checkpointing_options = (False, True) if not run.gradient_checkpointing else (True,)
    for checkpointing in checkpointing_options:
        trial = RunShape(run.seq_len, run.micro_batch, run.precision, checkpointing, run.devices, run.nodes)
        for strategy in STRATEGIES_BY_COST:
            if estimate(model, trial, strategy).fits(capacity_gib):
                return strategy, checkpointing and not run.gradient_checkpointing
    return None

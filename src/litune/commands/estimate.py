"""``litune estimate --config X [--devices N --nodes M]``: will this run fit, and what is the cheapest way to fit it?

Reads the same config files ``litune fit`` would (several ``--config`` merge, dotted overrides work), builds the network
on PyTorch's ``meta`` device to count its parameters without allocating or downloading weights (only a pretrained
model's ``config.json`` is read), and prints per-device memory for parameters, gradients, optimizer state and
activations under the configured strategy, precision, gradient checkpointing and micro-batch (see
:mod:`litune.memory_model` for the formulas), then which GPU sizes it fits and the cheapest strategy that
fits each.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from jsonargparse import Namespace

from litune.errors import NETWORK_FIELD, ConfigError
from litune.memory_model import (
    GPU_SIZES_GIB,
    STRATEGIES_BY_COST,
    GiB,
    MemoryEstimate,
    ModelShape,
    RunShape,
    StrategyShape,
    cheapest_fitting,
    estimate,
)

if TYPE_CHECKING:
    import torch

# torch, Lightning (via litune.strategies) and transformers are imported where the numbers are computed, not here:
# `litune estimate --help` then answers at once.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litune estimate", description=__doc__)
    parser.add_argument("--config", action="append", required=True, help="Config file(s), as for `litune fit`.")
    parser.add_argument("--devices", type=int, default=None, help="Processes per node (default: trainer.devices).")
    parser.add_argument("--nodes", type=int, default=None, help="Nodes (default: trainer.num_nodes).")
    parser.add_argument("--json", action="store_true", help="Print the numbers as JSON.")
    return parser


def load_config(configs: list[str], overrides: list[str]) -> Namespace:
    """Parse config files and ``--a.b=c`` overrides exactly as ``litune fit`` does, instantiating nothing."""
    from litune.commands.fit import parse_config

    return parse_config([item for path in configs for item in ("--config", path)] + overrides)


def _network_on_meta(network: Namespace) -> torch.nn.Module:
    """Build the configured network with no storage (``meta`` device), reading only a pretrained model's config."""
    import torch
    from jsonargparse import ArgumentParser

    init_args = network.get("init_args") or Namespace()
    pretrained = init_args.get("pretrained")
    with torch.device("meta"):
        if pretrained:
            from transformers import AutoConfig, AutoModelForCausalLM

            hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=init_args.get("trust_remote_code"))
            attention = init_args.get("attn_implementation") or "sdpa"  # HFCausalLM's default
            return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--network", type=torch.nn.Module)
        built = parser.instantiate_classes(parser.parse_object({"network": network.as_dict()})).network
        deferred = getattr(built, "configure_model", None)  # e.g. DeferredHFCausalLM creates its weights there
        if callable(deferred):
            deferred()
        return built


def model_shape(network: torch.nn.Module) -> ModelShape:
    """Ψ, layers, width, heads and vocabulary of a litune network or Hugging Face model."""
    num_params = sum(p.numel() for p in network.parameters())  # parameters() counts tied weights once
    hf = getattr(network, "model", network)
    cfg = getattr(hf, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        eager = getattr(cfg, "_attn_implementation", None) == "eager"  # keeps its [b, a, s, s] probabilities
        return ModelShape(
            num_params, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, eager
        )
    cfg = getattr(network, "config", None)
    if cfg is not None and hasattr(cfg, "d_model"):
        layers = getattr(cfg, "num_encoder_layers", 0) + getattr(cfg, "num_decoder_layers", 0)
        return ModelShape(num_params, layers, cfg.d_model, cfg.nhead, cfg.vocab_size)
    raise ConfigError(
        NETWORK_FIELD,
        f"cannot read layers/width/heads from {type(network).__name__}",
        "estimate a litune.models network or a Hugging Face causal LM",
    )


def run_shape(cfg: Namespace, network: torch.nn.Module, devices: int | None, nodes: int | None) -> RunShape:
    """Sequence length, micro-batch, precision, checkpointing and topology from the config and the command line."""
    from litune.strategies.checks import processes_per_node, resolve_accelerator

    data = cfg.data.get("init_args") or Namespace()
    seq_len = data.get("block_size") or getattr(network, "max_seq_len", None)
    micro_batch = data.get("batch_size")
    trainer = cfg.trainer
    if devices is None:
        devices = processes_per_node(trainer.get("devices", "auto"), resolve_accelerator(trainer.get("accelerator")))
        if devices is None:
            raise ConfigError("--devices", "trainer.devices is 'auto' here", "pass --devices N (GPUs per node)")
    init_args = cfg.model.network.get("init_args") or Namespace()
    precision = str(trainer.get("precision") or "32-true")
    precision = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(precision, precision)
    return RunShape(
        seq_len=int(seq_len) if seq_len else 0,
        micro_batch=int(micro_batch) if micro_batch else 0,
        precision=precision,
        gradient_checkpointing=bool(init_args.get("gradient_checkpointing", False)),
        devices=devices,
        nodes=nodes if nodes is not None else int(trainer.get("num_nodes") or 1),
    )


def report(model: ModelShape, run: RunShape, strategy: StrategyShape) -> dict[str, Any]:
    """Everything ``litune estimate`` prints, as plain data (bytes)."""
    result = estimate(model, run, strategy)
    fits = {name: result.fits(size) for name, size in GPU_SIZES_GIB.items()}
    cheapest = {}
    for name, size in GPU_SIZES_GIB.items():
        found = cheapest_fitting(model, run, size)
        cheapest[name] = None if found is None else found[0].name + (" + gradient checkpointing" if found[1] else "")
    by_strategy = {s.name: estimate(model, run, s).total for s in STRATEGIES_BY_COST}
    return {
        "model": vars(model),
        "run": {**vars(run), "world_size": run.world_size},
        "strategy": strategy.name,
        "per_device_bytes": _components(result),
        "host_bytes_per_process": result.host,
        "fits": fits,
        "cheapest_fitting_strategy": cheapest,
        "total_by_strategy": by_strategy,
        "notes": result.notes,
    }


def _components(result: MemoryEstimate) -> dict[str, float]:
    return {
        "params": result.params,
        "grads": result.grads,
        "optimizer": result.optimizer,
        "activations": result.activations,
        "total": result.total,
    }


def _gib(n: float) -> str:
    return f"{n / GiB:10.3f} GiB"


def format_report(data: dict[str, Any]) -> str:
    """The human-readable table."""
    m, r = data["model"], data["run"]
    lines = [
        f"model: {m['num_params'] / 1e6:.2f}M parameters, {m['n_layer']} layers, width {m['hidden']}, "
        f"{m['n_head']} heads, vocab {m['vocab_size']}",
        f"run: {data['strategy']}, {r['precision']}, micro-batch {r['micro_batch']} x {r['seq_len']} tokens, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
        f"{r['devices']} device(s) x {r['nodes']} node(s) = {r['world_size']} processes",
        "per device:",
        *(f"  {k:<12}{_gib(v)}" for k, v in data["per_device_bytes"].items()),
    ]
    if data["host_bytes_per_process"]:
        lines.append(f"  host memory per process (offloaded): {_gib(data['host_bytes_per_process']).strip()}")
    lines += [f"  note: {note}" for note in data["notes"]]
    lines.append("fits (with a reserve for CUDA context and buffers):")
    for name, ok in data["fits"].items():
        cheapest = data["cheapest_fitting_strategy"][name] or "nothing fits: lower the micro-batch or add devices"
        lines.append(f"  {name:<28}{'yes' if ok else 'no ':<5} cheapest that fits: {cheapest}")
    lines.append("per-device total by strategy:")
    lines += [f"  {k:<28}{_gib(v)}" for k, v in data["total_by_strategy"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    network = _network_on_meta(cfg.model.network)
    model = model_shape(network)
    run = run_shape(cfg, network, args.devices, args.nodes)
    from litune.strategies.descriptor import describe

    data = report(model, run, describe(cfg.trainer.get("strategy")).memory_shape())
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0

"""Benchmark evaluation through lm-evaluation-harness, on the model in memory.

The harness's ``HFLM`` accepts an already-built ``transformers`` model, so litune hands it the network's own Hugging
Face model (with its peft adapters on, or merged): nothing is exported or reloaded. Tasks are the harness's registry
(these download their datasets) plus litune's offline tasks in ``configs/eval/`` and any folder of task YAML files
given as ``include``.

Results are written into a folder as ``eval_results.json`` (all metrics, the harness's config) and
``eval_results.md`` (a Markdown table), and ``litune report`` shows them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litune.errors import ConfigError

if TYPE_CHECKING:  # litune report reads results without importing torch
    import torch

EVAL_TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
"""litune's offline task files (YAML + data), found beside the source tree."""

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"


def harness_model(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` in the form ``HFLM(pretrained=...)`` takes: a module with ``.config``, ``.device``,
    ``.tie_weights()`` and a forward returning ``.logits`` (see :class:`HarnessView`)."""
    import torch
    from transformers import GPT2Config

    class HarnessView(torch.nn.Module):
        """A view of a litune network that the harness can call. The forward goes through the litune network's
        own forward (with its adapters, and through the FSDP2/DeepSpeed root hooks that gather sharded weights),
        not around it: ``[N, T]`` token ids -> an object whose ``.logits`` is ``[N, T, vocab]``.

        ``config`` is the Hugging Face model's, or, for litune's own decoder, a GPT-2 config with its context and
        vocabulary (the harness reads only ``model_type``, the context length and the vocabulary size).
        """

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.network = net
            inner = getattr(net, "model", None)
            config = getattr(getattr(inner, "base_model", inner), "config", None) or getattr(inner, "config", None)
            if config is None and getattr(net, "max_seq_len", None) and getattr(net, "vocab_size", None):
                config = GPT2Config(
                    n_positions=net.max_seq_len, vocab_size=net.vocab_size, bos_token_id=None, eos_token_id=None
                )
            if config is None or getattr(net, "is_encoder_decoder", False):
                raise ConfigError(
                    "--checkpoint",
                    f"the network {type(net).__name__} is not a decoder the harness can run",
                    "evaluate a decoder (litune.models.HFCausalLM or the custom decoder)",
                )
            self.config = config
            self.name_or_path = getattr(config, "_name_or_path", "") or "litune"

        @property
        def device(self) -> torch.device:
            return next(self.network.parameters()).device

        def tie_weights(self) -> None:
            """The network ties its own weights when it is built."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.network(input_ids=input_ids, attention_mask=attention_mask).logits)

        def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            """Generation tasks: the Hugging Face model's own loop (litune's networks take other arguments)."""
            inner = getattr(self.network, "model", None)
            if inner is None or not hasattr(inner, "generate"):
                raise ConfigError("--tasks", "generation tasks need a Hugging Face model", "use loglikelihood tasks")
            return inner.generate(*args, **kwargs)

    return HarnessView(network)


def task_manager(tasks: list[str], include: list[str] | None = None) -> Any:
    """A harness ``TaskManager`` that knows litune's offline tasks and the YAML folders in ``include``; the harness's
    own registry (thousands of files, seconds to index) only when a task is not found in those.

    Raises:
        ConfigError: an ``include`` path does not exist, or a task is nowhere.
    """
    from lm_eval.tasks import TaskManager

    for p in include or []:
        if not Path(p).exists():
            raise ConfigError("--include", f"{p} does not exist", "give a folder (or file) of lm-eval task YAML")
    paths = [str(EVAL_TASKS_DIR)] + [str(p) for p in include or []]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            "--tasks",
            f"unknown task(s) {', '.join(unknown)}",
            f"use harness tasks or litune's offline ones ({', '.join(offline_tasks())}), or --include a task folder",
        )
    return manager


def evaluate(
    network: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include: list[str] | None = None,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``tasks`` on ``network`` with the harness and return its results (``results``, ``configs``, ``n-samples``);
    ``{}`` on a process whose ``LOCAL_RANK`` is not 0 (the harness keeps results to one process per node).

    Every process that calls this evaluates every document (the harness's own sharding is off for a model passed in),
    so a sharded model (ZeRO-3, FSDP2) runs the same forwards on all ranks in step; see
    :class:`litune.callbacks.evaluation.HarnessEval`.

    Args:
        network: a litune network (see :func:`harness_model`); put in eval mode and restored afterwards.
        tokenizer: its tokenizer.
        tasks: task or group names.
        limit: at most this many documents per task (a fraction: of each task).
        num_fewshot: few-shot examples per prompt (None: the task's default).
        batch_size: documents per forward.
        include: extra folders of task YAML files.
        max_length: the context the harness fills (default: the model's ``n_positions``/``max_position_embeddings``).
        seed: the harness's random, numpy, torch and few-shot seeds.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include)
    model = harness_model(network)
    was_training = network.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with torch.no_grad():
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        network.train(was_training)
    # The harness returns results only where LOCAL_RANK is 0 (its guard against duplicate writes under torchrun); the
    # other ranks ran the same forwards and get {}.
    return _plain(out) if out is not None else {}


def offline_tasks() -> list[str]:
    """The task names litune ships in ``configs/eval/``."""
    return sorted(p.stem for p in EVAL_TASKS_DIR.glob("*.yaml"))


def _plain(out: Any) -> dict[str, Any]:
    """The harness's result as JSON-safe data (numbers, strings), the parts worth keeping."""
    keep = {k: out[k] for k in ("results", "configs", "versions", "n-shot", "n-samples") if k in out}
    return json.loads(json.dumps(keep, default=str))


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``{"eval/TASK/METRIC": value}`` of the numeric metrics (the harness's ``"acc,none"`` filter suffix and
    standard errors dropped), for loggers and the report."""
    flat: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            name, _, filt = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if "_stderr" in name or name == "sample_len" or not numeric:
                continue
            suffix = "" if filt in ("", "none") else f"/{filt}"
            flat[f"eval/{task}/{name}{suffix}"] = float(value)
    return flat


def markdown_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for key, value in sorted(metrics(results).items()):
        _, task, metric = key.split("/", 2)
        shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"| {task} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def write_results(folder: str | Path, results: dict[str, Any], step: int | None = None) -> Path:
    """Write ``eval_results.json`` and ``eval_results.md`` into ``folder`` (made if missing); ``step`` recorded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {**results, "step": step, "metrics": metrics(results)}
    (folder / RESULTS_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (folder / RESULTS_MD).write_text(markdown_table(results))
    return folder / RESULTS_JSON


def read_results(folder: str | Path) -> dict[str, float]:
    """The flat metrics of a folder's ``eval_results.json`` (empty when there is none)."""
    path = Path(folder) / RESULTS_JSON
    return json.loads(path.read_text()).get("metrics", {}) if path.is_file() else {}

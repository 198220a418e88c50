"""``litune report RUN_DIR [RUN_DIR ...]``: plots and a summary table of one or several runs, without a server.

Reads each run folder's ``metrics.csv`` (CSV logger) or, when there is none, its TensorBoard event files, and writes
into ``--out``:

* ``loss.png``, ``perplexity.png``, ``learning_rate.png``, ``tokens_per_sec.png``: each metric against the logged
  step, one colour per run (train solid, validation dashed with markers);
* ``summary.md``: a Markdown table with one column per run (final and best metrics, throughput, MFU, peak memory,
  wall time), also printed to stdout.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from litune.errors import ConfigError

Series = list[tuple[int, float]]
"""(logged step, value) pairs in step order."""

PLOTS: dict[str, tuple[str, list[str]]] = {
    "loss": ("loss", ["train/loss", "val/loss"]),
    "perplexity": ("perplexity", ["train/ppl", "val/ppl"]),
    "learning_rate": ("learning rate", ["lr"]),  # "lr": any LearningRateMonitor key (lr-AdamW, lr-SGD/pg1, ...)
    "tokens_per_sec": ("tokens/s (all devices)", ["perf/tokens_per_sec"]),
    "rewards": ("reward accuracy (preference runs)", ["train/rewards/accuracy", "val/rewards/accuracy"]),
    "reward_margin": ("reward margin (preference runs)", ["train/rewards/margin", "val/rewards/margin"]),
    "reward": ("reward (GRPO runs)", ["train/reward", "val/reward"]),
}
"""Plot file stem -> (y label, metric keys)."""


@dataclass
class Run:
    """The metrics of one run folder."""

    name: str
    path: Path
    source: str  # the file the metrics came from
    metrics: dict[str, Series] = field(default_factory=dict)
    wall_time_s: float | None = None  # from TensorBoard event times, when there is no perf/elapsed_s

    def series(self, key: str) -> dict[str, Series]:
        """Metrics matching ``key``; ``"lr"`` matches every learning-rate key."""
        if key == "lr":
            return {k: v for k, v in self.metrics.items() if k.startswith(("lr-", "lr/", "lr_"))}
        return {key: self.metrics[key]} if key in self.metrics else {}

    def last(self, key: str) -> float | None:
        return self.metrics[key][-1][1] if self.metrics.get(key) else None


def read_csv_metrics(path: Path) -> dict[str, Series]:
    """Read a Lightning ``metrics.csv`` (one row per logging call, empty cells where a metric was not logged).

    A run resumed from a checkpoint older than its last logged step logs those steps again: the later row wins.
    """
    metrics: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in ("", None):
                    continue
                metrics.setdefault(key, {})[step] = float(cell)
    return {k: sorted(v.items()) for k, v in metrics.items()}


def read_tensorboard_metrics(run_dir: Path) -> tuple[dict[str, Series], float | None]:
    """Read every scalar of the TensorBoard event files under ``run_dir`` with TensorBoard's own reader.

    Returns:
        The series, and the wall time between the first and the last event.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics: dict[str, Series] = {}
    times: list[float] = []
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            metrics.setdefault(tag, []).extend((e.step, e.value) for e in events)
            times += [e.wall_time for e in events]
    wall = max(times) - min(times) if times else None
    return {k: sorted(v, key=lambda sv: sv[0]) for k, v in metrics.items()}, wall


def load_run(path: Path) -> Run:
    """Load a run folder's metrics: ``metrics.csv`` if there is one (searched recursively), else TensorBoard events.

    Raises:
        ConfigError: if the folder does not exist or holds neither.
    """
    if not path.is_dir():
        raise ConfigError(
            "RUN_DIR", f"{path} is not a folder", "give run folders such as runs/20261125-101502-quickstart"
        )
    csvs = sorted(path.rglob("metrics.csv"))
    if csvs:
        metrics: dict[str, Series] = {}
        for csv_path in csvs:
            for key, series in read_csv_metrics(csv_path).items():
                metrics[key] = sorted(metrics.get(key, []) + series, key=lambda sv: sv[0])
        return with_eval_results(Run(path.name, path, str(csvs[0].relative_to(path)), metrics))
    metrics, wall = read_tensorboard_metrics(path)
    if not metrics:
        raise ConfigError(
            "RUN_DIR",
            f"{path} has no metrics.csv and no TensorBoard events with scalars",
            "train with the CSV or TensorBoard logger (the default) and point at the run folder",
        )
    return with_eval_results(Run(path.name, path, "TensorBoard events", metrics, wall_time_s=wall))


def with_eval_results(run: Run) -> Run:
    """Add the metrics of ``litune eval`` (``RUN_DIR/eval/eval_results.json``) at the step they were measured."""
    import json

    from litune.evaluation import RESULTS_JSON

    path = run.path / "eval" / RESULTS_JSON
    if path.is_file():
        record = json.loads(path.read_text())
        step = record.get("step") or 0
        for key, value in record.get("metrics", {}).items():
            run.metrics[key] = sorted([*(sv for sv in run.metrics.get(key, []) if sv[0] != step), (step, value)])
    return run


def _mean(series: Series | None) -> float | None:
    return sum(v for _, v in series) / len(series) if series else None


def _max(series: Series | None) -> float | None:
    return max(v for _, v in series) if series else None


def summary_rows(run: Run) -> dict[str, float | None]:
    """The numbers of one run's summary column (``None`` where the run did not log the metric)."""
    m = run.metrics
    val_loss = m.get("val/loss")
    elapsed = run.last("perf/elapsed_s")
    steps = [s for series in m.values() for s, _ in series]
    return {
        # Lightning logs the k-th optimizer step's metrics at step k - 1.
        "steps": float(max(steps) + 1) if steps else None,
        "final train/loss": run.last("train/loss"),
        "final val/loss": run.last("val/loss"),
        "best val/loss": min(v for _, v in val_loss) if val_loss else None,
        "final val/ppl": run.last("val/ppl"),
        "tokens seen": run.last("train/tokens_seen"),
        "mean tokens/s": _mean(m.get("perf/tokens_per_sec")),
        "mean samples/s": _mean(m.get("perf/samples_per_sec")),
        "mean step time (s)": _mean(m.get("perf/step_time_s")),
        "mean MFU": _mean(m.get("perf/mfu")),
        "peak memory (GiB)": _max(m.get("memory/peak_gib")),
        "wall time": elapsed if elapsed is not None else run.wall_time_s,
        **{f"final {key}": run.last(key) for key in PREFERENCE_METRICS},
        **{f"final {key}": run.last(key) for key in RL_METRICS},
        # GRPO's step time split: the mean seconds of a step spent generating the rollouts.
        "mean generation time (s)": _mean(m.get("train/generation_s")),
        **{f"final {key}": run.last(key) for key in sorted(m) if key.startswith("val/rewards/") and key[-4:] == "mean"},
        # Benchmark results (the eval callback's, `litune eval`'s): the last measured value of each.
        **{f"final {key}": run.last(key) for key in sorted(m) if key.startswith("eval/")},
    }


PREFERENCE_METRICS = (
    "val/rewards/accuracy", "val/rewards/margin", "val/rewards/chosen", "val/rewards/rejected", "val/logps/chosen",
    "val/logps/rejected", "train/rewards/accuracy", "train/rewards/margin",
)  # fmt: skip
"""Rows of preference runs (``model.preference``), shown when some run logged them."""

RL_METRICS = (
    "val/reward", "val/reward_std", "train/reward", "train/reward_std", "train/completion_length",
    "train/clip_ratio", "train/kl", "train/entropy",
)  # fmt: skip
"""Rows of online RL runs (``model.rl``), shown when some run logged them; per-function rewards are added below."""


def format_value(key: str, value: float | None) -> str:
    """How a summary number is written: 4 significant digits, integers for counts, seconds or h:mm:ss for wall time."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "wall time":
        return f"{value:.1f} s" if value < 60 else str(timedelta(seconds=round(value)))
    if key in ("tokens seen", "steps"):
        return f"{int(value):,}"
    if key == "mean MFU":
        return f"{100 * value:.3g}%"
    return f"{value:.4g}"


def summary_table(runs: list[Run]) -> str:
    """A Markdown table, one column per run."""
    rows = [summary_rows(r) for r in runs]
    lines = ["| metric | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for key in dict.fromkeys(k for row in rows for k in row):  # every run's keys, in order (eval tasks differ)
        optional = (*PREFERENCE_METRICS, *RL_METRICS, "mean generation time (s)")
        if key.removeprefix("final ") in optional and all(row.get(key) is None for row in rows):
            continue
        lines.append(f"| {key} | " + " | ".join(format_value(key, row.get(key)) for row in rows) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], keys: list[str], ylabel: str, path: Path) -> bool:
    """Plot ``keys`` of every run against the logged step into ``path``; ``False`` (nothing written) if no run has
    any of them."""
    from matplotlib.figure import Figure  # here, not at the top: `litune report --help` needs no matplotlib (~1 s)

    fig = Figure(figsize=(7, 4.2), dpi=100)  # a Figure with the Agg canvas: no pyplot global state, no display
    ax = fig.add_subplot()
    drew = False
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for key in keys:
            for name, series in run.series(key).items():
                steps, values = zip(*series, strict=True)
                val = name.startswith("val/")
                style = {"linestyle": "--", "marker": "o", "markersize": 3} if val else {"linewidth": 1.2}
                ax.plot(steps, values, color=color, label=f"{run.name}: {name}", **style)
                drew = True
    if not drew:
        return False
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if min(values) > 0 and max(values) / min(values) > 20:  # early losses dwarf late ones: log scale shows both
        ax.set_yscale("log")
    ax.set_xlabel("step (as logged: the k-th optimizer step is k - 1)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_report(runs: list[Run], out: Path) -> str:
    """Write the plots and ``summary.md`` into ``out``; return the summary's Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    images = [stem for stem, (ylabel, keys) in PLOTS.items() if plot(runs, keys, ylabel, out / f"{stem}.png")]
    sources = "\n".join(f"- `{r.name}`: {r.path} ({r.source})" for r in runs)
    text = f"# litune report\n\n{summary_table(runs)}\n\nRuns:\n{sources}\n\n"
    text += "".join(f"![{stem}]({stem}.png)\n" for stem in images)
    (out / "summary.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litune report", description="Plots and a Markdown summary of one or several runs, side by side."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (runs/<time>-<name>)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: RUN_DIR/report for one run, ./report for more)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    runs = [load_run(p) for p in args.run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder name under different parents: use the paths
        for run in runs:
            run.name = str(run.path)
    out = args.out or (args.run_dirs[0] / "report" if len(runs) == 1 else Path("report"))
    text = write_report(runs, out)
    print(text.split("\n\nRuns:")[0].removeprefix("# litune report\n\n"))
    print(f"\nreport written to {out}/ (summary.md, {', '.join(p.name for p in sorted(out.glob('*.png')))})")
    return 0

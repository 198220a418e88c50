"""``litune tune lr``, ``litune tune batch-size`` and ``litune sweep``, run as a user would on a tiny config."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

import litune_testing
from litune.cli import main as litune_main
from litune.errors import ConfigError
from litune.tuning.batch_size import Probe, _cuda_peak_gib, find_largest, judge, run_probe, split_global_batch
from litune.tuning.runner import run_child
from litune_testing import LITUNE, TINY, litune_env, run_litune


def tiny_args(corpus_dir: Path, tokenizer_dir: Path, runs: Path, *extra: str) -> list[str]:
    return litune_testing.tiny_args(corpus_dir, tokenizer_dir, f"--runs_dir={runs}", *extra)


# ---------------------------------------------------------------------------------------------- learning-rate finder


def test_lr_finder_suggests_a_finite_rate_writes_a_plot_and_a_fragment_that_composes(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    runs = tmp_path / "runs"
    proc = run_litune("tune", "lr", *tiny_args(corpus_dir, tokenizer_dir, runs), "--num-training=30", "--apply")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("suggested learning rate:"))
    suggestion = float(line.split(":")[1])
    assert math.isfinite(suggestion) and 1e-7 < suggestion < 1.0
    (run_dir,) = runs.glob("*-tiny-lr-find")
    # litune's own command on CPU: glibc keeps freed buffers, as in `litune fit` (litune.host_memory)
    assert json.loads((run_dir / "lr_find.json").read_text())["host_allocator"] == "keep_freed"
    image = imread(run_dir / "lr_find.png")  # [H, W, RGBA] in [0, 1]
    assert image[..., :3].std() > 0.02, "lr_find.png is blank"
    fragment = run_dir / "lr.yaml"
    assert yaml.safe_load(fragment.read_text())["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        suggestion, rel=1e-2
    )
    # The fragment merges over the experiment: the rate changes, the optimizer class and its other arguments stay.
    printed = run_litune(
        "fit", *tiny_args(corpus_dir, tokenizer_dir, runs), "--config", str(fragment), "--print_config"
    )
    optimizer = yaml.safe_load(printed.stdout)["model"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert optimizer["init_args"]["lr"] == pytest.approx(suggestion, rel=1e-2)
    assert not list(run_dir.glob(".lr_find_*.ckpt")), "the finder's temporary checkpoint was left behind"


@pytest.mark.slow
def test_lr_finder_suggestion_is_within_10x_of_the_best_rate_of_real_runs(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    """The range test's suggestion against ground truth on the same problem: a grid of real 20-step runs, one per
    decade (a ``litune sweep``), ranked by validation loss; the suggestion lies within a factor of 10 of the best."""
    steps = ("--trainer.max_steps=20", "--trainer.val_check_interval=20", "--validate_before_fit=false")
    proc = run_litune("tune", "lr", *tiny_args(corpus_dir, tokenizer_dir, tmp_path / "runs"), "--num-training=30")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("suggested learning rate:"))
    suggestion = float(line.split(":")[1])
    sweep_file = tmp_path / "grid.yaml"
    grid = {"method": "grid", "pruner": "none", "parameters": {LR: {"values": [1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1]}}}
    sweep_file.write_text(yaml.safe_dump(grid))
    sweep = run_litune(
        "sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "grid"),
        *tiny_args(corpus_dir, tokenizer_dir, tmp_path / "unused"), *steps, timeout=900,
    )  # fmt: skip
    rows = read_results(tmp_path / "grid")
    assert [r["state"] for r in rows] == ["complete"] * 4, sweep.stdout[-4000:]
    best = float(rows[0][LR])
    assert best / 10 <= suggestion <= best * 10, (suggestion, [(r[LR], r["val/loss"]) for r in rows])


# -------------------------------------------------------------------------------------------------- batch-size finder


def test_search_doubles_then_bisects_to_the_largest_size_that_fits() -> None:
    tried: list[int] = []

    def fits_up_to(limit: int):
        def probe(size: int) -> Probe:
            tried.append(size)
            return Probe(size, None, size <= limit)

        return probe

    assert find_largest(fits_up_to(37), start=1, precision=0)[0] == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling until 64 misses, then bisecting 32..64
    tried.clear()
    assert find_largest(fits_up_to(37), start=1, precision=1)[0] == 32  # powers of two only
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert find_largest(fits_up_to(0), start=4)[0] == 0
    assert find_largest(fits_up_to(10_000), start=1, max_batch_size=16)[0] == 16
    # A max_batch_size that no doubling reaches is probed itself: start 1, max 20 gives 20, not 16.
    tried.clear()
    assert find_largest(fits_up_to(10_000), start=1, max_batch_size=20)[0] == 20
    assert tried == [1, 2, 4, 8, 16, 20]
    tried.clear()
    assert find_largest(fits_up_to(18), start=1, max_batch_size=20, precision=0)[0] == 18
    assert tried[:6] == [1, 2, 4, 8, 16, 20]  # 20 misses: bisect 16..20
    assert find_largest(fits_up_to(10_000), start=3, max_batch_size=3)[0] == 3


def test_gpu_mode_reads_the_largest_logged_peak_over_runs_and_ranks(tmp_path: Path) -> None:
    """On GPU a probe's peak is the largest ``memory/peak_gib`` in its metrics.csv (CUDA max allocated), over ranks.

    CPU runs log the same column (their RSS), but a CPU probe is judged by the kernel's RSS high-water mark instead;
    so the GPU reading is checked here on files in litune's metrics.csv layout (CSVLogger: one row per logged step).
    """
    assert _cuda_peak_gib(tmp_path) is None  # nothing logged (e.g. the run died first)
    for name, rows in {"a": [("0", "1.5", ""), ("1", "", "0.1"), ("2", "2.25", "")], "b": [("0", "2.0", "")]}.items():
        (tmp_path / name).mkdir()
        with (tmp_path / name / "metrics.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "memory/peak_gib", "train/loss"])
            writer.writerows(rows)
    assert _cuda_peak_gib(tmp_path) == 2.25


def test_gpu_mode_out_of_memory_and_budget_decisions_on_real_child_processes(tmp_path: Path) -> None:
    """How a probe is judged, on real children: CUDA's out-of-memory error (raised by hand: there is no GPU here),
    a SIGKILL (the kernel's OOM killer), any other failure (a ConfigError naming the probe), and the budget."""
    cuda_oom = "import torch; raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0)')"
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    broken = "raise SystemExit('litune: something else went wrong')"
    oom, sigkill, other = (run_child([sys.executable, "-c", code]) for code in (cuda_oom, killed, broken))
    assert oom.returncode == 1 and oom.out_of_memory
    assert judge(64, oom, None, 8.0) == Probe(64, None, False, "out of memory")
    assert sigkill.returncode == -9 and sigkill.out_of_memory
    assert not judge(64, sigkill, None, None).fits
    assert other.returncode == 1 and not other.out_of_memory
    with pytest.raises(ConfigError, match="micro batch 64 failed"):
        judge(64, other, None, 8.0)
    ok = run_child([sys.executable, "-c", "pass"])
    assert judge(64, ok, 7.9, 8.0) == Probe(64, 7.9, True)
    assert judge(64, ok, 8.1, 8.0) == Probe(64, 8.1, False, "8.10 GiB > budget 8.00 GiB")
    assert judge(64, ok, 8.1, None).fits  # no budget on GPU: only an out-of-memory error is a miss


def test_a_childs_peak_memory_is_its_own_not_its_large_parents() -> None:
    """The peak RSS of a probe is the probe's own, even started from a large process (a test runner, a sweep).

    Teeth: ``wait4`` on a child started straight from this process reports this process's pre-exec size (Linux keeps
    that high-water mark across ``exec``), which is what made two probes at different batch sizes read the same peak.
    """
    parent_ballast = bytearray(600 * 2**20)
    parent_ballast[::4096] = b"\x01" * len(parent_ballast[::4096])  # touch every page: it is resident
    allocates_200_mib = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    small, large = (run_child([sys.executable, "-c", code]) for code in ("pass", allocates_200_mib))
    assert small.peak_rss_bytes < 150 * 2**20, small.peak_rss_bytes
    assert 200 * 2**20 < large.peak_rss_bytes < 350 * 2**20, large.peak_rss_bytes
    direct = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(direct.pid, 0)
    assert usage.ru_maxrss * 1024 > 600 * 2**20  # the measurement this replaces would have read the parent
    del parent_ballast


def test_global_batch_splits_into_the_largest_micro_batch_that_divides_it() -> None:
    assert split_global_batch(64, largest_micro=24, world_size=2) == (16, 2)
    assert split_global_batch(48, largest_micro=100, world_size=1) == (48, 1)
    assert split_global_batch(30, largest_micro=4, world_size=1) == (3, 10)


@pytest.mark.slow
def test_batch_size_finder_respects_a_cpu_budget_between_two_sizes(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    args = tiny_args(corpus_dir, tokenizer_dir, tmp_path / "runs", "--data.init_args.block_size=64")
    small, large = run_probe(args, 128, None, on_gpu=False), run_probe(args, 256, None, on_gpu=False)
    assert small.fits and large.fits and large.peak_gib > small.peak_gib + 0.05, (small, large)
    budget = (small.peak_gib + large.peak_gib) / 2
    proc = run_litune(
        "tune", "batch-size", *args, "--start=128", "--max-batch-size=256", "--precision=1",
        f"--max-memory-gib={budget:.3f}", "--global-batch-size=512",
    )  # fmt: skip
    assert "largest micro batch that fits: 128" in proc.stdout, proc.stdout
    assert "micro batch 128 x accumulation 4" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------------------------- sweeps

SWEEP = {
    "method": "grid",
    "metric": "val/loss",
    "pruner": "median",
    "startup_trials": 1,
    # lr 1e-6 learns nothing in 4 steps: worse than the first trial at step 2, so the median pruner stops it there.
    "parameters": {"model.optimizer.init_args.lr": {"values": [3.0e-3, 1.0e-6, 1.0e-2]}},
}


LR = "model.optimizer.init_args.lr"


def sweep_command(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path) -> list[str]:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    return [
        LITUNE, "sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "sweep"),
        *tiny_args(corpus_dir, tokenizer_dir, tmp_path / "unused"),
        "--trainer.max_steps=4", "--trainer.val_check_interval=2",
    ]  # fmt: skip


def read_results(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def last_step(run_dir: Path) -> int:
    """The largest optimizer step a run logged in its metrics.csv."""
    with (run_dir / "metrics.csv").open() as handle:
        return max(int(row["step"]) for row in csv.DictReader(handle) if row.get("step"))


@pytest.mark.slow
def test_sweep_runs_every_trial_prunes_a_bad_one_sorts_the_table_and_restarts_to_nothing(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = sweep_command(tmp_path, corpus_dir, tokenizer_dir)
    folder = tmp_path / "sweep"
    first = subprocess.Popen(command, env=litune_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / ".litune.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # A second sweep on the running sweep's folder is refused before it touches anything.
        assert litune_main(command[1:]) == 2
        err = capsys.readouterr().err
        assert "--sweep-dir" in err and "in use by another litune sweep" in err and "Fix:" in err, err
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert not (folder / ".litune.lock").exists()  # released at the end
    run_dirs = sorted((folder / "trials").iterdir())
    assert [d.name[-9:] for d in run_dirs] == ["trial-000", "trial-001", "trial-002"]
    assert all((d / "config.yaml").exists() and (d / "metrics.csv").exists() for d in run_dirs)  # ordinary runs
    rows = read_results(folder)
    assert len(rows) == 3
    by_lr = {float(r["model.optimizer.init_args.lr"]): r for r in rows}
    assert by_lr[1e-6]["state"] == "pruned"
    complete = [float(r["val/loss"]) for r in rows if r["state"] == "complete"]
    assert len(complete) == 2 and complete == sorted(complete)
    assert rows[-1]["state"] == "pruned"  # pruned trials rank after every complete one
    # The pruned trial really stopped early: it trained fewer steps than the trials that ran to the end.
    steps = {float(r["model.optimizer.init_args.lr"]): last_step(Path(r["run folder"])) for r in rows}
    assert steps[1e-6] < steps[3e-3] == steps[1e-2], steps
    assert "| rank | trial | state | val/loss |" in (folder / "results.md").read_text()
    assert (folder / "report" / "summary.md").exists()

    again = subprocess.run(command, env=litune_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to run" in again.stdout
    assert sorted((folder / "trials").iterdir()) == run_dirs  # no trial ran again
    assert read_results(folder) == rows


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_sweeps_run_two_trials_at_once_within_the_ranges(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, method: str
) -> None:
    """``random`` (RandomSampler) and ``bayes`` (TPESampler) on real trials, ``parallel: 2``: the two overlap."""
    sweep_file = tmp_path / "sweep.yaml"
    lr = {"low": 1.0e-4, "high": 1.0e-2, "log": True}
    sweep = {"method": method, "trials": 2, "parallel": 2, "pruner": "none", "parameters": {LR: lr}}
    sweep_file.write_text(yaml.safe_dump(sweep))
    folder = tmp_path / "sweep"
    run_litune(
        "sweep", "--sweep", str(sweep_file), "--sweep-dir", str(folder),
        *tiny_args(corpus_dir, tokenizer_dir, tmp_path / "unused"),
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--validate_before_fit=false",
        timeout=600,
    )  # fmt: skip
    rows = read_results(folder)
    assert [r["state"] for r in rows] == ["complete", "complete"], rows
    rates = [float(r[LR]) for r in rows]
    assert all(1e-4 <= rate <= 1e-2 for rate in rates) and rates[0] != rates[1], rates
    losses = [float(r["val/loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses == sorted(losses)
    # Run at once: Optuna started each trial before the other one completed (its own records, not file times: a
    # trial's config.yaml is written after its start-up, which on a loaded machine can outlast the other trial).
    import optuna

    from litune.tuning.sweep import STUDY_NAME

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(folder / 'sweep.db').resolve()}")
    first, second = study.trials
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete


@pytest.mark.slow
def test_an_interrupted_sweep_reruns_only_the_unfinished_trial(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    command = sweep_command(tmp_path, corpus_dir, tokenizer_dir)
    trials = tmp_path / "sweep" / "trials"
    sweep = subprocess.Popen(
        command, env=litune_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list(trials.glob("*-trial-001")) and time.monotonic() < deadline:
            assert sweep.poll() is None, "the sweep ended before the test could interrupt it"
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and the trial it is running, as a lost terminal would
        sweep.wait()
    resumed = subprocess.run(command, env=litune_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rerunning interrupted trial(s) [1]" in resumed.stdout
    assert len(list(trials.glob("*-trial-000"))) == 1, "a finished trial ran again"
    rows = read_results(tmp_path / "sweep")
    assert sorted(float(r["model.optimizer.init_args.lr"]) for r in rows) == [1e-6, 3e-3, 1e-2]  # each point once


@pytest.mark.parametrize(
    ("sweep", "field"),
    [
        ({"method": "annealing", "parameters": {"a.b": [1, 2]}}, "method"),
        ({"method": "grid", "parameters": {"a.b": {"low": 1, "high": 2}}}, "parameters.a.b"),
        ({"method": "random", "parameters": {"a.b": {"low": 2, "high": 1}}, "trials": 3}, "parameters.a.b"),
        ({"method": "random", "parameters": {"a.b": {"low": 0, "high": 1, "log": True}}, "trials": 3}, "a.b.low"),
        ({"method": "random", "parameters": {"a.b": [1]}}, "trials"),
        ({"method": "grid", "parameters": {}}, "parameters"),
        ({"method": "grid", "direction": "up", "parameters": {"a.b": [1]}}, "direction"),
        ({"method": "grid", "trails": 3, "parameters": {"a.b": [1]}}, "trails"),
    ],
)
def test_bad_sweep_files_are_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sweep: dict, field: str
) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    assert litune_main(["sweep", "--sweep", str(sweep_file), "--config", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("litune: configuration error:") and field in err and "Fix:" in err
    assert not (tmp_path / "runs").exists()


def test_tune_rejects_an_unknown_tuner(capsys: pytest.CaptureFixture[str]) -> None:
    assert litune_main(["tune", "momentum", "--config", str(TINY)]) == 2
    assert "unknown tuner 'momentum'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["tune", "lr"], "--config"),
        (["tune", "lr", "--config", str(TINY), "--trainer.max_stepz=3"], "trainer.max_stepz"),
        (["tune", "batch-size", "--config", str(TINY), "--trainer.max_stepz=3"], "trainer.max_stepz"),
        # prepare and estimate parse through the same subcommand-less LightningCLI as the tuners
        (["estimate", "--config", str(TINY), "--trainer.max_stepz=3"], "trainer.max_stepz"),
        (["prepare", "--config", str(TINY), "--data.init_args.nope=1"], "data.init_args.nope"),
    ],
)
def test_commands_without_subcommand_parsers_report_bad_keys_as_one_paragraph(
    capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    assert litune_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"litune: configuration error: {field}") and "Fix:" in err and "Traceback" not in err

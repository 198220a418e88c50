"""``litune sweep``: grid, random or Bayesian (TPE) search over any config field, with pruning, resumable.

The search is an Optuna study stored in ``<sweep folder>/sweep.db`` (SQLite). Each trial is an ordinary ``litune fit``
run in a child process with the trial's values as dotted overrides, its run folder under ``<sweep folder>/trials/``.
A :class:`~litune.tuning.pruning.SweepPruning` callback inside the trial reports every validation to the study and
stops the run when the pruner says it is worse than the trials before it at the same step.

The trials run in Optuna's own loop (``study.optimize``), whose heartbeat thread marks each running trial alive in
the study every ``HEARTBEAT_S`` seconds. Interrupted and started again with the same sweep file and folder, the sweep
keeps every finished trial; the trial that was running stops beating, Optuna fails it as stale and its
``RetryHeartbeatStaleTrialCallback`` (formerly ``RetryFailedTrialCallback``) queues it again with the same values; the
rest follow. A sweep holds its folder's lock (``<sweep folder>/.litune.lock``) while it runs, so a second sweep on
that folder is refused instead of running the same trials twice.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import queue
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from litune.errors import ConfigError
from litune.tuning.pruning import SQLITE_ENGINE, TRIAL_FILE, make_pruner
from litune.tuning.runner import run_fit

METHODS = ("grid", "random", "bayes")
STUDY_NAME = "litune-sweep"
HEARTBEAT_S = 5
"""How often Optuna's heartbeat thread marks a running trial alive in the study."""
GRACE_S = 20
"""A running trial whose last heartbeat is older than this is stale: its sweep died."""


class TrialFailed(RuntimeError):
    """A trial's ``litune fit`` failed (or logged no metric); the sweep records it and goes on with the next."""


@dataclass
class Parameter:
    """One searched config field.

    Attributes:
        name: its dotted name, e.g. ``model.optimizer.init_args.lr``.
        values: the choices (grid, or a categorical choice); empty for a range.
        low: the range's lower end (inclusive).
        high: the range's upper end (inclusive).
        log: sample the range on a log scale.
        integer: sample integers.
        step: quantize the range to this step.
    """

    name: str
    values: list[Any] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    step: float | None = None

    def suggest(self, trial: Any) -> Any:
        """This parameter's value in an Optuna trial (a queued grid point or a retried trial gets its fixed value)."""
        if self.values:
            return trial.suggest_categorical(self.name, self.values)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass
class SweepSpec:
    """A sweep file, validated.

    Attributes:
        parameters: the searched fields.
        method: ``grid`` (every combination of ``values``), ``random`` or ``bayes`` (Optuna's TPE).
        metric: the logged validation metric that ranks trials.
        direction: ``minimize`` or ``maximize`` the metric.
        trials: how many trials to finish (grid: at most the number of combinations, which is the default).
        seed: the sampler's seed.
        parallel: trials run at once (on GPUs: one device each).
        pruner: ``median`` (stop a trial whose best metric so far is worse than the median of the completed trials'
            metric at the same step; see :func:`~litune.tuning.pruning.make_pruner`) or ``none``.
        startup_trials: trials that always run to the end before the pruner acts.
        warmup_steps: optimizer steps of every trial before the pruner acts.
        best: how many of the best trials ``litune report`` compares.
    """

    parameters: list[Parameter]
    method: str = "random"
    metric: str = "val/loss"
    direction: str = "minimize"
    trials: int = 0
    seed: int = 0
    parallel: int = 1
    pruner: str = "median"
    startup_trials: int = 2
    warmup_steps: int = 0
    best: int = 3

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the parameters' values, in the file's order."""
        names = [p.name for p in self.parameters]
        return [
            dict(zip(names, combo, strict=True)) for combo in itertools.product(*(p.values for p in self.parameters))
        ]


def _parameter(name: str, spec: Any) -> Parameter:
    where = f"parameters.{name}"
    if isinstance(spec, list):
        spec = {"values": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            where,
            f"expected a list of values or a mapping, got {spec!r}",
            "write {values: [...]} or {low: .., high: ..}",
        )
    unknown = set(spec) - {"values", "low", "high", "log", "type", "step"}
    if unknown:
        raise ConfigError(where, f"unknown keys {sorted(unknown)}", "use values, or low/high with log, step, type")
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values", f"expected a non-empty list, got {values!r}", "list the choices")
        return Parameter(name, values=list(values))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(where, "needs either values or both low and high", "add values: [...] or low/high")
    kind = spec.get("type", "int" if isinstance(spec["low"], int) and isinstance(spec["high"], int) else "float")
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}.type", f"unknown type {kind!r}", "use int or float")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (TypeError, ValueError):
        raise ConfigError(
            where, f"low/high must be numbers, got {spec['low']!r}/{spec['high']!r}", "fix them"
        ) from None
    if not low < high:
        raise ConfigError(where, f"low={spec['low']} is not below high={spec['high']}", "swap or widen the range")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}.low", f"a log-scale range must be positive, got low={spec['low']}", "raise low")
    return Parameter(name, low=low, high=high, log=log, integer=kind == "int", step=spec.get("step"))


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a sweep file.

    Raises:
        ConfigError: naming the sweep file's field at fault and the fix.
    """
    if not path.is_file():
        raise ConfigError("--sweep", f"{path} does not exist", "give the path of a sweep YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("--sweep", f"{path} is not valid YAML ({err})", "fix the file") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("parameters"), Mapping) or not raw["parameters"]:
        raise ConfigError(
            "parameters", f"{path} names no parameters", "add parameters: {dotted.field: {values: [...]}}"
        )
    known = set(SweepSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(str(sorted(unknown)[0]), f"unknown sweep field in {path}", f"use only {sorted(known)}")
    spec = SweepSpec(**{**raw, "parameters": [_parameter(n, s) for n, s in raw["parameters"].items()]})
    if spec.method not in METHODS:
        raise ConfigError("method", f"unknown method {spec.method!r}", f"use one of {', '.join(METHODS)}")
    if spec.direction not in ("minimize", "maximize"):
        raise ConfigError("direction", f"unknown direction {spec.direction!r}", "use minimize or maximize")
    if spec.pruner not in ("median", "none"):
        raise ConfigError("pruner", f"unknown pruner {spec.pruner!r}", "use median or none")
    for name in ("parallel", "best"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ConfigError(
                name, f"must be a positive integer, got {getattr(spec, name)!r}", f"set {name}: 1 or more"
            )
    for name in ("startup_trials", "warmup_steps", "trials"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(name, f"must be a whole number >= 0, got {value!r}", f"set {name}: 0 or more")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise ConfigError("seed", f"must be a whole number, got {spec.seed!r}", "set seed: 0 (any integer)")
    if not isinstance(spec.metric, str) or not spec.metric:
        raise ConfigError("metric", f"must be the name of a logged metric, got {spec.metric!r}", "e.g. val/loss")
    if spec.method == "grid":
        ranged = [p.name for p in spec.parameters if not p.values]
        if ranged:
            raise ConfigError(f"parameters.{ranged[0]}", "a grid needs a list of values", "give values: [...]")
        spec.trials = min(spec.trials, len(spec.grid())) if spec.trials else len(spec.grid())
    elif not isinstance(spec.trials, int) or spec.trials < 1:
        raise ConfigError("trials", f"{spec.method} search needs trials >= 1, got {spec.trials!r}", "set trials: 10")
    return spec


def override(name: str, value: Any) -> str:
    """``--name=value`` as ``litune fit`` parses it (JSON for lists, mappings, booleans and None)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{name}={text}"


@dataclass
class TrialRow:
    """One line of the results table."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_dir: str


class Sweep:
    """A sweep folder: the study, its trials' run folders, the results table.

    Args:
        spec: the validated sweep file.
        fit_args: ``--config`` files and overrides shared by every trial.
        folder: the sweep folder (kept between restarts).
        accelerator: ``cpu`` or ``gpu``, for how parallel trials share the machine.
    """

    def __init__(self, spec: SweepSpec, fit_args: list[str], folder: Path, accelerator: str = "cpu") -> None:
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        self.spec = spec
        self.fit_args = fit_args
        self.folder = folder
        self.accelerator = accelerator
        self.storage = f"sqlite:///{(folder / 'sweep.db').resolve()}"
        folder.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # litune prints each trial's outcome itself
        pruner = make_pruner(spec.pruner, spec.startup_trials, spec.warmup_steps)
        sampler = (
            optuna.samplers.TPESampler(seed=spec.seed)
            if spec.method == "bayes"
            else optuna.samplers.RandomSampler(seed=spec.seed)  # grid points are enqueued, see _enqueue_grid
        )
        with warnings.catch_warnings():  # the heartbeat's retry callback is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                self.storage,
                engine_kwargs=SQLITE_ENGINE,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None),
            )
        self.study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            direction=spec.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )

    def _retried(self) -> set[int]:
        """Numbers of the stale trials that Optuna queued again (each retry names its predecessors)."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        retried: set[int] = set()
        for trial in self.study.get_trials(deepcopy=False):
            retried.update(RetryHeartbeatStaleTrialCallback.retry_history(trial))
        return retried

    def _finished(self) -> list[Any]:
        from optuna.trial import TrialState

        retried = self._retried()
        return [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in retried)
        ]

    def recover(self) -> list[int]:
        """Trials left running by an interrupted sweep: failed as stale by Optuna and queued again, same values.

        This sweep holds the folder's lock, so a trial still marked running belongs to a sweep that died. Optuna
        calls a trial stale once its last heartbeat is ``GRACE_S`` old: wait that long, then let Optuna's
        ``fail_stale_trials`` fail them and its retry callback queue them again.

        Returns:
            The numbers of the trials that will run again.
        """
        import optuna
        from optuna.trial import TrialState

        running = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            return []
        print(f"litune sweep: trial(s) {running} were running when the sweep stopped; waiting {GRACE_S} s for their "
              "heartbeat to go stale", flush=True)  # fmt: skip
        time.sleep(GRACE_S + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        retried = self._retried()
        return [n for n in running if n in retried]

    def _enqueue_grid(self) -> None:
        """Queue every grid point that no finished, running or queued trial covers (once, in the file's order)."""
        from optuna.trial import TrialState

        retried = self._retried()
        covered = [
            t.params if t.params else t.system_attrs.get("fixed_params", {})
            for t in self.study.get_trials(deepcopy=False)
            if not (t.state == TrialState.FAIL and t.number in retried)
        ]
        for point in self.spec.grid()[: self.spec.trials]:
            if point not in covered:
                self.study.enqueue_trial(point)

    def run(self) -> list[TrialRow]:
        """Run trials until ``spec.trials`` have finished (completed, pruned or failed), then write the table.

        Raises:
            ConfigError: a trial was rejected before training (then every trial would be).
        """
        rerun = self.recover()
        if rerun:
            print(f"litune sweep: rerunning interrupted trial(s) {rerun}", flush=True)
        if self.spec.method == "grid":
            self._enqueue_grid()
        todo = max(0, self.spec.trials - len(self._finished()))
        if todo == 0:
            print(f"litune sweep: all {self.spec.trials} trials already finished; nothing to run", flush=True)
        else:
            jobs = min(self.spec.parallel, todo)
            slots: queue.Queue[int] = queue.Queue()  # free device slots of parallel trials
            for slot in range(jobs):
                slots.put(slot)
            # Optuna's own loop: it asks for trials (queued ones first), beats their heartbeat while they run, and
            # records each outcome; TrialFailed is recorded as a failed trial, a ConfigError ends the sweep.
            self.study.optimize(
                lambda trial: self._objective(trial, slots), n_trials=todo, n_jobs=jobs, catch=(TrialFailed,)
            )
        rows = self.rows()
        self.write_table(rows)
        return rows

    def _objective(self, trial: Any, slots: queue.Queue[int]) -> float:
        for parameter in self.spec.parameters:
            parameter.suggest(trial)
        trial.set_user_attr("run_dir", "")  # a retried trial inherits its predecessor's; this run writes its own
        slot = slots.get()
        try:
            return self._run_trial(trial, slot)
        finally:
            slots.put(slot)

    def trial_args(self, trial: Any, slot: int) -> tuple[list[str], dict[str, str]]:
        """The ``litune fit`` arguments and extra environment of one trial."""
        callback = {
            "class_path": "litune.tuning.pruning.SweepPruning",
            "init_args": {
                "storage": self.storage,
                "study_name": STUDY_NAME,
                "trial_number": trial.number,
                "metric": self.spec.metric,
                "pruner": self.spec.pruner,
                "startup_trials": self.spec.startup_trials,
                "warmup_steps": self.spec.warmup_steps,
            },
        }
        args = [
            *self.fit_args,
            *(override(name, value) for name, value in trial.params.items()),
            f"--runs_dir={self.folder / 'trials'}",
            f"--experiment=trial-{trial.number:03d}",
            f"--trainer.callbacks+={json.dumps(callback)}",
        ]
        env: dict[str, str] = {}
        if self.spec.parallel > 1:
            args.append("--trainer.devices=1")
            if self.accelerator == "gpu":
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
        return args, env

    def _run_trial(self, trial: Any, slot: int) -> float:
        """Run one trial's ``litune fit``; its metric, or raise ``TrialPruned``/``TrialFailed``/``ConfigError``."""
        import optuna

        args, env = self.trial_args(trial, slot)
        values = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"litune sweep: trial {trial.number} ({values})", flush=True)
        child = run_fit(args, env=env, log=self.folder / "logs" / f"trial-{trial.number:03d}.log")
        record = self._trial_record(trial.number)
        if child.returncode == 2 and not record:
            # Rejected before training: the shared config or a searched field is wrong, and so is every trial.
            raise ConfigError("--config/--sweep", f"trial {trial.number} was rejected:\n{child.tail(8)}", "fix it")
        if child.returncode != 0:
            print(f"litune sweep: trial {trial.number} failed (exit {child.returncode}):\n{child.tail(5)}")
            raise TrialFailed(f"exit {child.returncode}")
        if record.get("state") == "pruned":
            print(f"litune sweep: trial {trial.number} pruned at step {record.get('step')}", flush=True)
            raise optuna.TrialPruned(f"pruned at step {record.get('step')}")
        if record.get("value") is None:
            # Every later trial would log the same metrics: stop the sweep now, naming the ones that exist.
            raise self._metric_missing(trial.number, record)
        print(f"litune sweep: trial {trial.number} {self.spec.metric}={record['value']:.4f}", flush=True)
        return float(record["value"])

    def _metric_missing(self, number: int, record: dict[str, Any]) -> ConfigError:
        logged = record.get("logged") or []
        validation = [m for m in logged if not m.startswith("train/")]
        hint = f"set metric to one of {', '.join(validation or logged)}" if logged else "name a metric the run logs"
        if not validation:
            hint += "; a validation metric needs validation: trainer.limit_val_batches > 0 and a val_check_interval "
            hint += "that the run reaches"
        return ConfigError(
            "metric",
            f"trial {number} finished but never logged {self.spec.metric!r}, the metric this sweep ranks by "
            f"(it logged: {', '.join(logged) or 'no metric'}); every other trial would do the same, so the sweep stops",
            hint,
        )

    def _trial_record(self, number: int) -> dict[str, Any]:
        run_dir = self._run_dir(number)
        path = Path(run_dir) / TRIAL_FILE if run_dir else None
        return json.loads(path.read_text()) if path and path.exists() else {}

    def _run_dir(self, number: int) -> str:
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        return str(trial.user_attrs.get("run_dir", ""))

    def rows(self) -> list[TrialRow]:
        """Every trial that ended (interrupted ones aside), best first by the metric; failed trials last."""
        from optuna.trial import TrialState

        rows = []
        for trial in self._finished():
            if trial.state == TrialState.COMPLETE:
                value = trial.value
            else:  # pruned: its last reported value; failed: none
                value = self._trial_record(trial.number).get("value") if trial.state == TrialState.PRUNED else None
            state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
            rows.append(TrialRow(trial.number, state, value, dict(trial.params), self._run_dir(trial.number)))
        sign = 1 if self.spec.direction == "minimize" else -1
        return sorted(rows, key=lambda r: (r.state != "complete", r.value is None, sign * (r.value or 0.0), r.number))

    def write_table(self, rows: list[TrialRow]) -> str:
        """Write ``results.md`` and ``results.csv`` into the sweep folder and return the Markdown."""
        names = [p.name for p in self.spec.parameters]
        header = ["rank", "trial", "state", self.spec.metric, *names, "run folder"]
        table = []
        for rank, row in enumerate(rows, start=1):
            value = "" if row.value is None else f"{row.value:.4f}"
            params = [str(row.params.get(n, "")) for n in names]
            table.append([str(rank), str(row.number), row.state, value, *params, os.path.relpath(row.run_dir or ".")])
        markdown = "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in table]
        )
        (self.folder / "results.md").write_text(markdown + "\n")
        with (self.folder / "results.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(table)
        return markdown

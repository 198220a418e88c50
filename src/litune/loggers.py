"""Experiment loggers: CSV, TensorBoard, wandb and MLflow, chosen by config and combinable, all writing into the run
folder.

litune's loggers are Lightning's, with two additions:

* every logger removes secrets (:mod:`litune.tracking.secrets`) from hyperparameters before saving or sending them;
* :class:`WandbLogger` runs offline unless online mode *and* an API key are configured, never kills training when
  wandb fails (it warns once and falls back to an offline run, then to no wandb at all), and continues the same
  wandb run when training resumes from a checkpoint: :class:`WandbRunId` keeps the run id in the checkpoint and
  :func:`resume_wandb_id` hands it back to the logger before the run starts.

* :class:`MLFlowLogger` stores locally in the run folder unless pointed at a server, continues the same MLflow run
  when the run resumes, and uploads the run folder's config, report plots and eval results.

Lightning's ``WandbLogger`` and ``MLFlowLogger`` already create the run on global rank 0 only, so DDP, DeepSpeed and
multi-node training make exactly one wandb/MLflow run.
"""

from __future__ import annotations

import csv
import netrc
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch import loggers as pl_loggers
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from litune.errors import ConfigError
from litune.lightning_private import flatten_params
from litune.tracking.secrets import REDACTED, scrub

LOGGERS: dict[str, str] = {
    "csv": "litune.loggers.CSVLogger",
    "tensorboard": "litune.loggers.TensorBoardLogger",
    "wandb": "litune.loggers.WandbLogger",
    "mlflow": "litune.loggers.MLFlowLogger",
}
"""Logger names accepted by ``--loggers`` -> class path."""


def _scrubbed(params: dict[str, Any] | Namespace) -> dict[str, Any]:
    return scrub(vars(params) if isinstance(params, Namespace) else dict(params))


class _AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts. A resumed litune run continues in its
    own run folder, so this writer appends to the file instead, keeping its columns (new ones rewrite the header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class _RunFolderLogger:
    """What litune's CSV and TensorBoard loggers add to Lightning's, written once: ``save_dir`` defaults to the run
    folder (the CLI fills it in; the current folder outside the CLI) with no ``name``/``version`` sub-folders, and
    secrets are removed from hyperparameters. Mixed in before the Lightning class."""

    def __init__(
        self, save_dir: str | None = None, name: str | None = "", version: int | str | None = "", **kwargs: Any
    ) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, version=version, **kwargs)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        super().log_hyperparams(_scrubbed(params), *args, **kwargs)  # type: ignore[misc]


class CSVLogger(_RunFolderLogger, pl_loggers.CSVLogger):
    """Lightning's ``CSVLogger`` (``metrics.csv``, ``hparams.yaml``) with secrets removed from hyperparameters, and
    appending to ``metrics.csv`` when a run resumes.

    Args:
        save_dir: ``None``: the run folder (the CLI fills it in; the current folder outside the CLI).
        name: sub-folder under ``save_dir``; ``""`` writes straight into it.
        version: sub-folder under ``name``; ``""`` writes straight into it.
        **kwargs: Lightning's ``CSVLogger`` arguments (``prefix``, ``flush_logs_every_n_steps``).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


class TensorBoardLogger(_RunFolderLogger, pl_loggers.TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with secrets removed from hyperparameters.

    View a run with ``tensorboard --logdir runs/<run folder>`` (or ``--logdir runs`` to compare all runs).

    Args:
        save_dir: ``None``: the run folder (the CLI fills it in; the current folder outside the CLI).
        name: sub-folder under ``save_dir``; ``""`` writes straight into it.
        version: sub-folder under ``name``; ``""`` writes straight into it.
        **kwargs: Lightning's ``TensorBoardLogger`` arguments (``log_graph``, ``default_hp_metric``, ...).
    """


def _has_wandb_key(api_key: str | None) -> bool:
    if api_key or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(pl_loggers.WandbLogger):
    """Weights & Biases, offline unless configured otherwise; wandb problems never stop training.

    Args:
        project: wandb project.
        name: display name of the run (default: wandb's random name).
        save_dir: where the ``wandb/`` folder goes; ``None``: the run folder (the current folder outside the CLI).
        mode: ``"offline"`` (default; upload later with ``wandb sync <run folder>/wandb/offline-run-*``),
            ``"online"`` (needs an API key: ``api_key``, ``$WANDB_API_KEY`` or ``wandb login``; without one litune
            warns and stays offline), or ``"disabled"``. ``None`` reads ``$WANDB_MODE``, then falls back to offline.
        api_key: wandb API key for online mode. Prefer ``$WANDB_API_KEY``; either way the key is never written to a
            saved config or log.
        id: the wandb run id to continue; set automatically when resuming from a checkpoint.
        tags: run tags.
        init_timeout: seconds wandb may take to reach its server before litune falls back to offline.
        settings: further ``wandb.Settings`` fields, e.g. ``{base_url: https://wandb.example.com}`` for a
            self-hosted server.
        **kwargs: passed to Lightning's ``WandbLogger`` and on to ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "litune",
        name: str | None = None,
        save_dir: str | None = None,
        mode: Literal["offline", "online", "disabled"] | None = None,
        api_key: str | None = None,
        id: str | None = None,
        tags: list[str] | None = None,
        init_timeout: float = 90.0,
        settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"  # type: ignore[assignment]
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # type: ignore[arg-type]
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                "trainer.logger[WandbLogger].init_args.mode",
                f"'{mode}' is not a wandb mode",
                "use offline, online or disabled",
            )
        api_key = None if api_key == REDACTED else api_key
        if mode == "online" and not _has_wandb_key(api_key):
            rank_zero_warn("wandb: online mode needs an API key (api_key, $WANDB_API_KEY or `wandb login`); offline")
            mode = "offline"
        settings = dict(settings or {})
        settings.setdefault("init_timeout", init_timeout)
        settings.setdefault("quiet", True)
        if api_key:
            settings["api_key"] = api_key  # given to wandb in memory only: `wandb.login` would write it to ~/.netrc
        super().__init__(
            name=name,
            save_dir=save_dir if save_dir is not None else ".",
            id=id,
            project=project,
            tags=tags,
            mode=mode,
            settings=settings,
            **kwargs,
        )
        self._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it is deprecated
        self._failed = False

    @property
    def experiment(self) -> Any:  # a wandb Run, or Lightning's dummy on ranks other than 0
        try:
            return super().experiment
        except Exception as err:  # any wandb failure (login, network, server) must not stop training
            return self._fall_back(err)

    def _fall_back(self, err: Exception) -> Any:
        self._experiment = None
        mode = self._wandb_init.get("mode")
        next_mode = "offline" if mode == "online" else "disabled"
        if not self._failed:
            rank_zero_warn(f"wandb: {type(err).__name__}: {err}. Continuing with wandb {next_mode}; training goes on.")
            self._failed = True
        self._wandb_init["mode"] = next_mode
        self._wandb_init["settings"] = {k: v for k, v in self._wandb_init["settings"].items() if k != "api_key"}
        if mode == "disabled":
            raise err  # wandb cannot even create a disabled run: nothing sensible is left to try
        return self.experiment

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:  # type: ignore[override]
        try:
            super().log_hyperparams(_scrubbed(params))
        except Exception as err:  # same: never stop training for wandb
            self._warn_once(err)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as err:  # a dropped wandb service must not end a week-long run
            self._warn_once(err)

    def _warn_once(self, err: Exception) -> None:
        if not self._failed:
            rank_zero_warn(f"wandb: {type(err).__name__}: {err}. wandb logging may be incomplete; training goes on.")
            self._failed = True


class WandbRunId(Callback):
    """Keeps the wandb run id in every checkpoint, so a resumed training continues the same wandb run."""

    def __init__(self) -> None:
        self.wandb_id: str | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, pl_loggers.WandbLogger) and isinstance(logger.version, str):
                self.wandb_id = logger.version

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_id": self.wandb_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wandb_id = state_dict.get("wandb_id")


def resume_wandb_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The wandb run id stored by :class:`WandbRunId` in a checkpoint (a ``.ckpt`` file or a DeepSpeed folder).

    Called before the trainer starts, because Lightning creates the wandb run before it restores callbacks.
    """
    path = Path(ckpt_path or "")
    if not ckpt_path or not path.exists():  # e.g. "last" before the CLI resolved it: nothing to read yet
        return None
    files = sorted(path.rglob("*model_states.pt")) if path.is_dir() else [path]
    for file in files[:1]:
        # mmap: only the small callback state is read from disk, not the weights.
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        for key, state in checkpoint.get("callbacks", {}).items():
            if key.startswith(WandbRunId.__qualname__) and state.get("wandb_id"):
                return state["wandb_id"]
    return None


MLFLOW_RUN_ID_FILE = "mlflow_run_id"
"""The MLflow run id of a run folder: a resumed run (which continues in its own folder) continues that MLflow run."""


class MLFlowLogger(pl_loggers.MLFlowLogger):
    """Lightning's ``MLFlowLogger`` with litune's habits.

    * The default store is local: ``RUN/mlflow.db`` and ``RUN/mlartifacts`` (``mlflow ui --backend-store-uri
      sqlite:///RUN/mlflow.db`` shows it); a ``tracking_uri`` (or ``$MLFLOW_TRACKING_URI``) points at a server.
    * Hyperparameters (the config, the environment) are logged with secrets removed. A resumed run keeps the values
      its first leg logged (MLflow refuses to change a param) and adds only new ones.
    * The run id is written into the run folder (``mlflow_run_id``), so a resumed training, which continues in its
      run folder, continues the same MLflow run.
    * At the end the run folder's ``config.yaml``, the report plots (``litune report``) and the eval results are
      logged as artifacts.

    Lightning creates the run and logs on global rank 0 only, so DDP, DeepSpeed and FSDP2 make one MLflow run and
    log every metric once.

    Args:
        experiment_name: the MLflow experiment.
        run_name: the MLflow run's name (default: the run folder's name).
        tracking_uri: an MLflow server (``http://host:5000``) or store URI; None: ``$MLFLOW_TRACKING_URI``, else the
            local ``sqlite:///RUN/mlflow.db``.
        save_dir: the run folder (the CLI fills it in).
        tags: tags of the MLflow run.
        log_model: Lightning's checkpoint upload (``False``, ``True`` or ``"all"``).
        run_id: continue this MLflow run (default: the run folder's ``mlflow_run_id``, when there is one).
        **kwargs: other Lightning ``MLFlowLogger`` arguments (``prefix``, ``artifact_location``, ``synchronous``).
    """

    def __init__(
        self,
        experiment_name: str = "litune",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        save_dir: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        run_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.run_dir = Path(save_dir if save_dir is not None else ".").resolve()
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:  # local: a SQLite store (MLflow 3 refuses new file stores) and artifacts beside it
            tracking_uri = f"sqlite:///{self.run_dir / 'mlflow.db'}"
            kwargs.setdefault("artifact_location", (self.run_dir / "mlartifacts").as_uri())
        id_file = self.run_dir / MLFLOW_RUN_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        super().__init__(
            experiment_name=experiment_name,
            run_name=scrub(run_name or self.run_dir.name),  # the folder is named after the experiment: scrubbed too
            tracking_uri=tracking_uri,
            tags=_scrubbed(tags or {}),
            log_model=log_model,
            run_id=run_id,
            **kwargs,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        client = super().experiment
        id_file = self.run_dir / MLFLOW_RUN_ID_FILE
        if self._run_id and not id_file.is_file():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self._run_id + "\n")
        return client

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:  # type: ignore[override]
        flat = flatten_params(_scrubbed(params))
        logged = self.experiment.get_run(self.run_id).data.params
        fresh = {k: v for k, v in flat.items() if k[:250] not in logged}  # MLflow keys are at most 250 characters
        if fresh:
            super().log_hyperparams(fresh)

    @rank_zero_only
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder into the run's artifacts (under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self.experiment.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.experiment.log_artifact(self.run_id, str(path), artifact_path)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized:
            self._log_run_folder()
        super().finalize(status)

    def _log_run_folder(self) -> None:
        """``config.yaml``, the eval results and the report plots of the run folder, as artifacts."""
        for name in ("config.yaml", "env.json"):
            self.log_artifact(self.run_dir / name)
        self.log_artifact(self.run_dir / "eval", "eval")
        if (self.run_dir / "metrics.csv").is_file():
            try:
                from litune.commands.report import load_run, write_report

                write_report([load_run(self.run_dir)], self.run_dir / "report")
                self.log_artifact(self.run_dir / "report", "report")
            except Exception as err:  # a plot must never fail the run at its very end
                rank_zero_warn(f"litune: the report for MLflow was not written: {err}")


def logger_entries(names: list[str]) -> list[Namespace]:
    """Config entries (``class_path`` / ``init_args``) for logger names such as ``["csv", "wandb"]``.

    Raises:
        ConfigError: for an unknown name, listing the valid ones.
    """
    from jsonargparse import Namespace as ConfigNamespace

    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            "loggers", f"unknown logger name(s) {unknown}", f"choose from {sorted(LOGGERS)} (combine several in a list)"
        )
    return [ConfigNamespace(class_path=LOGGERS[n], init_args=ConfigNamespace()) for n in dict.fromkeys(names)]

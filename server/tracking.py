"""Experiment tracking (output.tracking): each round's metrics, ε per site, the config and
the final model, recorded into the run directory for TensorBoard or MLflow.

    <run>/tracking/tensorboard/   a SummaryWriter's event files (`tensorboard --logdir runs/`)
    <run>/tracking/mlflow/        MLflow's store: mlflow.db (SQLite) and artifacts/

Nothing leaves the machine: TensorBoard writes event files; MLflow gets an explicit local
SQLite URI (never MLFLOW_TRACKING_URI or a server) and its telemetry is off
(deploy/offline.py). MLflow's `file:` store raises in MLflow 3 unless
MLFLOW_ALLOW_FILE_STORE is set ("maintenance mode"), so the store is SQLite, which MLflow
recommends and which needs only SQLAlchemy and alembic (installed with Flower).

The run loop (server/app.py) opens one tracker per run at the edge and calls it where it
writes metrics.jsonl; `round_metrics` is what both backends log of a metrics row.
TensorBoard has no artifact store: the model's path and the config are text summaries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fedshield.privacy.errors import FedShieldError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

TrackingKind = Literal["none", "tensorboard", "mlflow"]
TRACKING_DIR = "tracking"  # <run>/tracking/<kind>/
# Per choice: the module it imports, and the distribution that installs it (the `tracking` extra).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}
EXPERIMENT = "fedshield"
RUN_TAG = "fedshield.run"  # an MLflow run's tag naming its fedshield run (a resume continues it)
MLFLOW_BATCH = 1000  # MLflow's most metrics per log_batch (a cross-device run has 1,000 sites)
# One part of a metric key: MLflow takes letters, digits, "_-. /" (":" not on Windows), and no
# key that a path normalisation changes ("a//b", "x/.."): a name keeps the safe ASCII ones but "/".
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. ]")
MAX_KEY_PART = 200  # MLflow's keys: at most 250 characters


class TrackingError(FedShieldError):
    """output.tracking cannot be used as configured (its package is missing)."""


def missing_package(kind: str) -> str | None:
    """The one line saying which package `kind` needs, or None when it is there (or needs none).
    Looked up without importing it, so a command reports it before any work."""
    if kind not in PACKAGES:
        return None
    module, distribution = PACKAGES[kind]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"output.tracking={kind} needs the package {distribution}: pip install 'fedshield[tracking]'"


def require(kind: str) -> None:
    problem = missing_package(kind)
    if problem:
        raise TrackingError(problem)


def metric_key(name: str) -> str:
    """A class or site name as one part of a metric key both backends accept."""
    key = _UNSAFE_KEY.sub("_", name)[:MAX_KEY_PART]
    return key if key.strip(".") else "_" + key


def round_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a metrics.jsonl row tracks: central metrics, per-class F1, ε (max and mean
    of this run's verified spends, each site's own ledger ε, site-level ε) and site counts."""
    out = ({"perplexity": float(row["perplexity"])} if "perplexity" in row  # text-generation
           else {"accuracy": float(row["accuracy"]), "macro_f1": float(row["macro_f1"])})
    if row.get("loss") is not None:
        out["loss"] = float(row["loss"])
    for name, scores in row.get("per_class", {}).items():
        out[f"f1/{metric_key(name)}"] = float(scores["f1-score"])
    out["epsilon/max"] = float(row["epsilon_max"])
    out["epsilon/mean"] = float(row["epsilon_mean"])
    for site, eps in row.get("epsilon", {}).items():
        out[f"epsilon/site/{metric_key(site)}"] = float(eps)
    if row.get("site_level_epsilon") is not None:
        out["epsilon/site_level"] = float(row["site_level_epsilon"])
    out["sites/sampled"] = float(len(row.get("sampled", [])))
    out["sites/trained"] = float(row.get("trained", 0))
    out["sites/declined"] = float(row.get("declined", 0))
    out["sites/dropped"] = float(row.get("rejected", 0) + row.get("failed", 0))  # as the round's line counts them
    if row.get("secagg_dropped") is not None:
        out["sites/secagg_dropped"] = float(len(row["secagg_dropped"]))
    return {k: v for k, v in out.items() if math.isfinite(v)}  # an infinite ε stays in metrics.jsonl only


def _param(value: Any) -> str | int | float | bool:
    """A config value as a hyperparameter both backends take (None and lists as text)."""
    if isinstance(value, bool | int | float | str):
        return value
    return "null" if value is None else str(value)


class Tracker(Protocol):
    def log_config(self, params: Mapping[str, Any], config_yaml: str) -> None: ...
    def log_round(self, row: Mapping[str, Any]) -> None: ...
    def log_final_model(self, model_dir: Path) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class NoTracker:
    """output.tracking=none: metrics.jsonl only."""

    def log_config(self, params: Mapping[str, Any], config_yaml: str) -> None:
        pass

    def log_round(self, row: Mapping[str, Any]) -> None:
        pass

    def log_final_model(self, model_dir: Path) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker:
    """Scalars per round (step = round), the config as hparams and text, the model's path as text."""

    def __init__(self, log_dir: Path, resume_after: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run purges what a crashed process logged after its checkpoint's round.
        purge = None if resume_after is None else resume_after + 1
        self.writer: SummaryWriter = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_config(self, params: Mapping[str, Any], config_yaml: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Into this writer's own file (SummaryWriter.add_hparams would start another run folder);
        # the HParams tab shows each run's latest values of these scalars.
        metrics = {"accuracy": 0.0, "macro_f1": 0.0, "epsilon/max": 0.0}
        file_writer = self.writer.file_writer
        assert file_writer is not None  # SummaryWriter opens it in __init__
        for summary in hparams({k: _param(v) for k, v in params.items()}, metrics):
            file_writer.add_summary(summary)
        self.writer.add_text("config.yaml", _markdown_code(config_yaml))

    def log_round(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for key, value in round_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a crashed run keeps its rounds

    def log_final_model(self, model_dir: Path) -> None:
        self.writer.add_text("final_model", f"`{model_dir}` (TensorBoard stores no artifacts: the model "
                             "stays in the run directory)")

    def close(self, failed: bool = False) -> None:
        with _quiet_if(failed):
            self.writer.close()


def _markdown_code(text: str) -> str:
    """TensorBoard renders text summaries as Markdown: indented, YAML stays verbatim."""
    return "\n".join("    " + line for line in text.splitlines())


class MlflowTracker:
    """One MLflow run per fedshield run in a SQLite store of the run's own; step = round."""

    def __init__(self, store: Path, run_name: str, resume_after: int | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." per run
            logging.getLogger(noisy).setLevel(logging.WARNING)
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
        self.client: MlflowClient = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(
            EXPERIMENT, artifact_location=(store.resolve() / "artifacts").as_uri())
        earlier = self.client.search_runs([experiment], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'")
        self.resumed = resume_after is not None and bool(earlier)
        if self.resumed:
            self.run_id: str = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment, run_name=run_name, tags={RUN_TAG: run_name}).info.run_id

    def log_config(self, params: Mapping[str, Any], config_yaml: str) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        if self.resumed:  # logged when the run began; MLflow refuses to change a param (output.* may differ)
            return
        items = [Param(k, str(_param(v))) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's most params per log_batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_round(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(row["round"]), int(time.time() * 1000)
        items = [Metric(k, v, stamp, step) for k, v in round_metrics(row).items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + MLFLOW_BATCH])

    def log_final_model(self, model_dir: Path) -> None:
        self.client.log_artifacts(self.run_id, str(model_dir), "model")

    def close(self, failed: bool = False) -> None:
        with _quiet_if(failed):
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _quiet_if(failed: bool) -> AbstractContextManager[None]:
    """Closing the tracker of a run that is failing: the run's own error is the one to report."""
    return contextlib.suppress(Exception) if failed else contextlib.nullcontext()


def open_tracker(kind: str, run_dir: Path, resume_after: int | None = None) -> Tracker:
    """The run's tracker for output.tracking=`kind`; `resume_after`: the checkpoint's round."""
    require(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / TRACKING_DIR / "tensorboard", resume_after)
    if kind == "mlflow":
        return MlflowTracker(run_dir / TRACKING_DIR / "mlflow", run_dir.name, resume_after)
    return NoTracker()

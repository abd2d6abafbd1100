"""output.tracking: each tracker driven with fake rounds and read back from its own store;
the run loop's metrics writer feeds it; a missing package is one line before any work; and
(e2e) a real simulation records its rounds and ε."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from fedshield import conf
from fedshield.server import tracking
from fedshield.server.tracking import MlflowTracker, TensorBoardTracker, open_tracker, round_metrics

CONFIG_YAML = "federation:\n  rounds: 2\noutput:\n  tracking: tensorboard\n"
PARAMS = {"federation.rounds": 2, "privacy.target_epsilon": 8.0, "privacy.noise_multiplier": None,
          "task.labels": ["neg", "pos"], "output.save_model": True}


def fake_row(server_round: int) -> dict[str, Any]:
    """A metrics.jsonl row as RoundLog.on_evaluated writes it (the keys trackers read)."""
    return {
        "round": server_round, "accuracy": 0.5 + 0.1 * server_round, "macro_f1": 0.4 + 0.1 * server_round,
        "per_class": {"sci/tech": {"precision": 1.0, "recall": 0.5, "f1-score": 0.25 * server_round, "support": 4},
                      "bäd:name?": {"precision": 1.0, "recall": 0.5, "f1-score": 0.5, "support": 4}},
        "epsilon": {"site-0": 1.5 * server_round, "site-1": 1.0 * server_round},
        "epsilon_max": 1.5 * server_round, "epsilon_mean": 1.25 * server_round, "site_level_epsilon": None,
        "sampled": ["site-0", "site-1"] if server_round else [], "trained": 1 if server_round else 0,
        "declined": 1 if server_round else 0, "rejected": 0, "failed": 0, "secagg_dropped": None,
    }


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection a tracker tries (from any thread), refused and listed."""
    tried: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        tried.append(address)
        raise OSError("fedshield tests: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def model_folder(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    return model


def test_round_metrics_names_every_number_a_row_tracks() -> None:
    got = round_metrics({**fake_row(2), "loss": 0.7, "epsilon": {"site-0": 3.0, "site-1": float("inf")},
                         "site_level_epsilon": 0.9, "secagg_dropped": {"site-1": "unmask"}, "failed": 1})
    assert got == {
        "accuracy": 0.7, "macro_f1": pytest.approx(0.6), "loss": 0.7, "f1/sci_tech": 0.5, "f1/b_d_name_": 0.5,
        "epsilon/max": 3.0, "epsilon/mean": 2.5, "epsilon/site/site-0": 3.0, "epsilon/site_level": 0.9,
        "sites/sampled": 2.0, "sites/trained": 1.0, "sites/declined": 1.0, "sites/dropped": 1.0,
        "sites/secagg_dropped": 1.0,
    }  # an infinite ε (a site without DP accounting) is left out: neither backend plots it
    assert [tracking.metric_key(n) for n in ("a\tb<c>", "..", "", "x" * 300)] == ["a_b_c_", "_..", "_", "x" * 200]


def test_tensorboard_tracker_writes_scalars_per_round_config_and_model_path(tmp_path: Path,
                                                                           no_network: list[object]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    tracker = TensorBoardTracker(log_dir)
    tracker.log_config(PARAMS, CONFIG_YAML)
    for r in (0, 1, 2):
        tracker.log_round(fake_row(r))
    tracker.log_final_model(model_folder(tmp_path))
    tracker.close()

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"accuracy", "macro_f1", "epsilon/max", "epsilon/mean", "epsilon/site/site-0", "epsilon/site/site-1",
            "f1/sci_tech", "sites/trained", "sites/declined", "sites/dropped"} <= scalars
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("accuracy")] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert [e.value for e in events.Scalars("epsilon/site/site-0")] == [0.0, 1.5, 3.0]
    assert [e.value for e in events.Scalars("sites/declined")] == [0.0, 1.0, 1.0]
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "rounds: 2" in texts["config.yaml/text_summary"]
    assert str(tmp_path / "model") in texts["final_model/text_summary"]
    hparams = events.PluginTagToContent("hparams")
    assert hparams and any(b"federation.rounds" in content for content in hparams.values())
    assert no_network == []


def test_tensorboard_resume_purges_rounds_after_the_checkpoint(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardTracker(tmp_path)
    for r in (0, 1, 2):  # round 2 logged, then the coordinator died before its checkpoint
        first.log_round(fake_row(r))
    first.close()
    again = TensorBoardTracker(tmp_path, resume_after=1)
    again.log_round({**fake_row(2), "accuracy": 0.9})
    again.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("accuracy")] == [(0, 0.5), (1, 0.6), (2, 0.9)]


def mlflow_client(store: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def test_mlflow_tracker_records_metrics_params_config_and_model_in_the_run_directory(tmp_path: Path,
                                                                                   no_network: list[object]) -> None:
    store = tmp_path / "run" / "tracking" / "mlflow"
    tracker = MlflowTracker(store, "run-7")
    tracker.log_config(PARAMS, CONFIG_YAML)
    for r in (0, 1, 2):
        tracker.log_round(fake_row(r))
    tracker.log_final_model(model_folder(tmp_path))
    tracker.close()

    client = mlflow_client(store)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.artifact_location == (store / "artifacts").as_uri()  # inside the run directory
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-7" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "epsilon/site/site-0")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.5), (2, 3.0)]
    assert run.data.metrics["accuracy"] == pytest.approx(0.7) and run.data.metrics["sites/trained"] == 1.0
    assert run.data.metrics["f1/b_d_name_"] == 0.5
    assert run.data.params["federation.rounds"] == "2" and run.data.params["privacy.noise_multiplier"] == "null"
    assert run.data.params["task.labels"] == "['neg', 'pos']"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "model"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/config.json"]
    assert (store / "artifacts").is_dir() and sorted(p.name for p in store.iterdir()) == ["artifacts", "mlflow.db"]
    assert no_network == []  # a local SQLite store and a file artifact root: no server, no telemetry


def test_mlflow_resume_continues_the_same_run_and_a_failed_run_says_so(tmp_path: Path) -> None:
    first = MlflowTracker(tmp_path, "run-8")
    first.log_config(PARAMS, CONFIG_YAML)
    first.log_round(fake_row(0))
    first.log_round(fake_row(1))
    first.close(failed=True)
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"

    again = MlflowTracker(tmp_path, "run-8", resume_after=1)
    again.log_config({**PARAMS, "output.save_model": False}, CONFIG_YAML)  # output.* may change on resume
    again.log_round(fake_row(2))
    again.close()
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["output.save_model"] == "True"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0, 1, 2]


def test_closing_the_tracker_of_a_failing_run_never_hides_the_run_s_error(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = MlflowTracker(tmp_path, "run-9")

    def store_gone(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tracker.client, "set_terminated", store_gone)
    tracker.close(failed=True)  # the run loop is re-raising the run's own error
    with pytest.raises(OSError, match="disk full"):
        tracker.close()  # a run that succeeded: a tracker that cannot close is an error


def test_mlflow_logs_a_thousand_sites_in_batches_mlflow_accepts(tmp_path: Path) -> None:
    tracker = MlflowTracker(tmp_path, "many")
    tracker.log_config({f"k{i}": i for i in range(250)}, CONFIG_YAML)  # more params than one batch takes
    tracker.log_round({**fake_row(1), "epsilon": {f"site-{i}": 0.001 * i for i in range(1000)}})
    tracker.close()
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert run.data.metrics["epsilon/site/site-999"] == pytest.approx(0.999) and len(run.data.params) == 250


def test_the_run_loop_tracks_each_metrics_row_it_writes(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedshield.server.app import RoundLog
    from fedshield.server.settings import CoordinatorSettings

    settings = CoordinatorSettings.from_config(conf.load_config(["output.tracking=tensorboard"]))
    assert settings.tracking == "tensorboard"
    log = RoundLog(tmp_path, settings, {1: {"site": "site-0"}, 2: {"site": "site-1"}})
    log.tracker = open_tracker(settings.tracking, tmp_path)
    log.epsilon = {"site-0": 0.25, "site-1": 0.5}
    log.on_evaluated(0, {"accuracy": 0.5, "macro_f1": 0.25, "per_class": {"a": {"f1-score": 0.25}}})
    log.tracker.close()
    events = EventAccumulator(str(tmp_path / "tracking" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("epsilon/site/site-1")] == [0.5]
    assert [e.value for e in events.Scalars("macro_f1")] == [0.25]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_tracking_choices_are_checked_with_the_rest_of_the_config() -> None:
    from fedshield.conf import schema

    assert tuple(get_args(tracking.TrackingKind)) == schema.TRACKING
    assert conf.load_config([]).output.tracking == "none"
    with pytest.raises(conf.ConfigError, match=r"^config: output.tracking='wandb': must be one of none, "
                                               r"tensorboard, mlflow$"):
        conf.load_config(["output.tracking=wandb"])
    assert isinstance(open_tracker("none", Path("never-made")), tracking.NoTracker)
    assert not Path("never-made").exists()


def test_a_missing_package_is_one_line_before_any_run_directory(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    from fedshield.server.settings import CoordinatorSettings
    from fedshield.simulations.cli import main

    monkeypatch.setitem(tracking.PACKAGES, "mlflow", ("fedshield_no_such_module", "mlflow-skinny"))
    line = "output.tracking=mlflow needs the package mlflow-skinny: pip install 'fedshield[tracking]'"
    assert tracking.missing_package("mlflow") == line and tracking.missing_package("tensorboard") is None
    with pytest.raises(tracking.TrackingError, match=r"^output\.tracking=mlflow needs"):
        CoordinatorSettings.from_config(conf.load_config(["output.tracking=mlflow"]))  # the coordinator's edge
    from fedshield.server.cli import check_inputs

    with pytest.raises(tracking.TrackingError, match=r"^output\.tracking=mlflow needs"):  # `fedshield server`
        check_inputs(conf.load_config(["output.tracking=mlflow", "task.model=/nonexistent"]), admitted=8)
    out = tmp_path / "runs"
    assert main(["simulate", "output.tracking=mlflow", f"output.dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(line)
    assert not out.exists()  # nothing made


def test_entry_points_turn_mlflow_telemetry_off() -> None:
    # A clean environment: MLflow also stays quiet in CI or under pytest, which would hide the switch.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))}
    probe = ("from mlflow.telemetry.utils import is_telemetry_disabled as off; before = off(); "
             "import fedshield.deploy.offline; print(before, off())")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split() == ["False", "True"]  # on by default; off once an entry point's first import ran


@pytest.mark.e2e
def test_a_default_run_tracks_its_rounds_epsilon_config_and_model(default_run: Path) -> None:
    """The default config's run (tests/conftest.py: 2 rounds, output.tracking=mlflow) as MLflow
    recorded it. TensorBoard's tracker is the same hook (server/tracking.py open_tracker);
    its store is read back above (the run loop's rows, resume)."""
    from fedshield.server.run_dir import read_jsonl

    run = default_run
    rows = read_jsonl(run / "metrics.jsonl")
    sites = sorted(rows[-1]["epsilon"])
    assert len(rows) == 3 and len(sites) == 8
    client = mlflow_client(run / "tracking" / "mlflow")
    (found,) = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    series = {key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
              for key in found.data.metrics}
    assert found.data.params["output.tracking"] == "mlflow" and found.data.params["federation.rounds"] == "2"
    model = {a.path for a in client.list_artifacts(found.info.run_id, "model")}
    assert "model/config.json" in model and {"config.yaml", "model"} == {
        a.path for a in client.list_artifacts(found.info.run_id)}
    # Every round as metrics.jsonl has it: accuracy, ε max and each site's ε.
    for key, field in (("accuracy", "accuracy"), ("macro_f1", "macro_f1"), ("epsilon/max", "epsilon_max"),
                       ("sites/trained", "trained")):
        assert [s for s, _ in series[key]] == [0, 1, 2]
        assert [v for _, v in series[key]] == pytest.approx([r[field] for r in rows], rel=1e-6)
    for site in sites:
        got = [v for _, v in series[f"epsilon/site/{site}"]]
        assert got == pytest.approx([r["epsilon"][site] for r in rows], rel=1e-6) and got[-1] > got[1] > 0

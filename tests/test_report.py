"""server/report.py: report.md and privacy/sites.json from typed settings and the run's records."""

from __future__ import annotations

import json

from fedshield.conf.config import Config
from fedshield.privacy.ledger import SITE_MECHANISM
from fedshield.server.report import summarize, write_report
from fedshield.server.settings import CoordinatorSettings

SITES = {1: {"site": "a", "n": 50}, 2: {"site": "b", "n": 60}}
ROWS = [{"round": 0, "accuracy": 0.25, "macro_f1": 0.125, "epsilon_max": 0.0, "trained": 0, "declined": 0,
         "rejected": 0, "failed": 0},
        {"round": 1, "accuracy": 0.5, "macro_f1": 0.25, "epsilon_max": 1.5, "trained": 2, "declined": 0,
         "rejected": 0, "failed": 0, "update_norms": {"a": 1.0, "b": 2.0}}]


def _run(tmp_path, overrides, federation_entries=()):
    settings = CoordinatorSettings.from_config(Config.load(overrides))
    (tmp_path / "privacy").mkdir(parents=True)
    (tmp_path / "privacy" / "federation-ledger.jsonl").write_text("".join(json.dumps(e) + "\n"
                                                                          for e in federation_entries))
    summary = summarize(tmp_path, settings.accounting, SITES, {"a": 1.5, "b": 1.25, "gone": 0.5},
                        {"gone": ["after round 1: did not rejoin the resumed run"]})
    write_report(tmp_path, settings, ROWS, summary)
    return summary, (tmp_path / "report.md").read_text()


def test_the_budget_is_the_lifetime_budget_and_a_site_gone_after_a_resume_stays_in_the_table(tmp_path):
    summary, report = _run(tmp_path, ["privacy.budget_epsilon=20", "privacy.neighbouring=replace-one"])
    assert json.loads((tmp_path / "privacy" / "sites.json").read_text()) == summary
    assert summary["a"]["budget"] == 20.0 and summary["a"]["neighbouring"] == "replace-one"
    assert summary["gone"]["records"] is None and summary["gone"]["epsilon"] == 0.5
    assert "| a | 50 | - | - | 0 | 1.5000 | 20.0 | - |" in report  # no DP-SGD entry in this run's ledger
    assert "| gone | - | - | - | 0 | 0.5000 | 20.0 | after round 1: did not rejoin the resumed run |" in report
    assert "Neighbouring relation: replace-one" in report and "### Site-level DP" not in report
    assert "REPLACE_ONE), whatever the accountant setting" in report  # the accountant line says what is computed


def test_without_dp_nothing_is_accounted(tmp_path):
    summary, report = _run(tmp_path, ["privacy=none", "federation.strategy=fedmedian"])
    assert summary["a"]["budget"] is None and summary["a"]["mechanism"] == "none"
    assert "No record-level differential privacy" in report
    assert "Aggregation `fedmedian`, withstanding federation.num_malicious=1 poisoned update(s) per round" in report


def test_site_level_dp_states_its_mechanism_from_the_settings(tmp_path):
    entries = [{"mechanism": SITE_MECHANISM, "neighbouring": "add-remove", "delta": 1e-5, "planned_sites": 8,
                "sample_rate": 0.5, "steps": 1, "noise_multiplier": 1.1, "epsilon": 0.25}]
    _, report = _run(tmp_path, ["privacy.unit=site", "training.center_features=false",
                                "federation.fraction_train=0.5", "privacy.site_clip_norm=2"], entries)
    assert ("each round each site is asked with probability q = 0.5 (Poisson sampling); each usable update "
            "clipped to S = 2; Gaussian noise of z = 1.1 x S on the sum; the sum divided by q x 8 (fixed)") in report
    assert "ε = **0.2500** at δ = 1e-05 after 1 round(s)" in report


def test_the_report_states_sigma_q_steps_versions_date_and_config_hash(tmp_path):
    """σ, q and steps per site from the run's ledger; fedshield's and Flower's versions, the date
    (UTC) and the sha256 of the config.yaml in the run directory; every round in the table."""
    import hashlib
    import importlib.metadata
    import re

    from fedshield._version import __version__

    (tmp_path / "privacy").mkdir()
    (tmp_path / "config.yaml").write_text("federation:\n  rounds: 12\n")
    dp = {"mechanism": "dp-sgd-poisson-gaussian", "release": "dp-sgd", "sample_rate": 0.25, "steps": 8}
    entries = [{"site": "a", "mechanism": "gaussian-count", "release": "record-count", "noise_multiplier": 10.0,
                "sample_rate": 1.0, "steps": 1},
               *({**dp, "site": "a", "noise_multiplier": 2.5, "round": r} for r in (1, 2)),
               {**dp, "site": "b", "noise_multiplier": 3.0, "sample_rate": 0.2, "round": 1}]
    (tmp_path / "privacy" / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    settings = CoordinatorSettings.from_config(Config.load(["federation.rounds=12"]))
    rows = [{**ROWS[1], "round": r} for r in range(13)]
    summary = summarize(tmp_path, settings.accounting, SITES, {"a": 1.5, "b": 1.25}, {})
    write_report(tmp_path, settings, rows, summary)
    report = (tmp_path / "report.md").read_text()
    assert "| a | 50 | 2.5 | 0.25 | 16 | 1.5000 |" in report and "| b | 60 | 3 | 0.2 | 8 | 1.2500 |" in report
    assert "| σ (DP-SGD noise multiplier) | q (sample rate) | DP-SGD steps |" in report
    digest = hashlib.sha256((tmp_path / "config.yaml").read_bytes()).hexdigest()
    assert f"fedshield {__version__}, Flower {importlib.metadata.version('flwr')};" in report
    assert f"config.yaml sha256 `{digest}`" in report
    assert re.search(r"report written \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", report)
    assert all(f"\n| {r} | 0.5000 |" in report for r in range(13))  # the full per-round table
    from fedshield.privacy.accountant import PLD_RECORD_INTERVAL

    assert f"PLD: dp-accounting's PLD (pessimistic discretisation, interval {PLD_RECORD_INTERVAL:g})" in report

"""End to end on Flower's simulation runtime (Ray): real ServerApp, real ClientApps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend, epsilon, epsilon_dp_accounting_rdp
from fedshield.server.run_dir import read_jsonl
from fedshield.simulations.simulate import run_simulation
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.e2e


def test_three_sites_two_rounds_beats_chance_and_writes_the_run_directory(tiny_bert, synthetic_csv, tmp_path):
    extra = {"privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 100, "privacy.target_epsilon": 100}
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **extra))
    run = run_simulation(cfg)

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] >= 0.75  # two balanced classes: chance is 0.5
    assert rows[-1]["trained"] == 3
    assert set(rows[-1]["per_class"]) == {"markets", "weather"}

    # Privacy records: one signed entry per site per round, ε equal to each site's own ledger,
    # below target, growing over rounds, and what an accountant computes for the history.
    entries = read_jsonl(run / "privacy" / "ledger.jsonl")
    sites = {e["site"] for e in entries}
    # Per site: the protected record count and the feature-mean release (round 0, each one
    # full-batch Gaussian step), then a round each.
    assert sites == {"site-0", "site-1", "site-2"} and len(entries) == 12
    summary = json.loads((run / "privacy" / "sites.json").read_text())
    for site in sites:
        own = read_jsonl(run / "sites" / site / "ledger.jsonl")
        assert [e["hash"] for e in own] == [e["hash"] for e in entries if e["site"] == site]
        assert [(e["release"], e["round"]) for e in own] == [
            ("record-count", 0), ("feature-mean", 0), ("dp-sgd", 1), ("dp-sgd", 2)]
        # Each under its own mechanism, in version 2 (privacy/events.py); the coordinator took them in.
        assert [(e["mechanism"], e["ledger_version"]) for e in own] == [
            ("gaussian-count", 2), ("gaussian-feature-sum", 2), ("dp-sgd-poisson-gaussian", 2),
            ("dp-sgd-poisson-gaussian", 2)]
        assert (own[0]["sample_rate"], own[0]["steps"], own[0]["noise_multiplier"]) == (1.0, 1, 10.0)
        assert (own[1]["sample_rate"], own[1]["steps"], own[1]["noise_multiplier"]) == (1.0, 1, 4.0)
        assert own[0]["epsilon"] < own[1]["epsilon"] < own[2]["epsilon"] < own[3]["epsilon"]
        history = [Spend(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in own]
        assert all(e["noise_multiplier"] == 0.5 for e in own[2:])
        # The recorded ε is dp-accounting's PLD (the default accountant), below the RDP bound.
        assert own[-1]["accountant"] == "pld"
        assert own[-1]["epsilon"] == pytest.approx(epsilon(history, cfg.privacy.delta, "pld"), rel=1e-12)
        assert own[-1]["epsilon"] < epsilon_dp_accounting_rdp(history, cfg.privacy.delta)
        assert summary[site]["epsilon"] == own[-1]["epsilon"]
        assert (run / "privacy" / "ledger-keys" / f"{site}.pub").is_file()
    assert rows[-1]["epsilon_max"] == max(e["epsilon"] for e in entries)

    for name in ("config.yaml", "report.md", "plots/accuracy.png", "plots/epsilon.png"):
        assert (run / name).is_file(), name
    assert "release: feature-mean" in (run / "report.md").read_text()  # the report states the release
    assert not list(run.glob("sites/*/cache"))  # derived features are not kept

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(run / "model"), device="cpu")
    assert clf("sunny rain cloud storm wind snow warm cold")[0]["label"] in {"weather", "markets"}


def test_site_over_budget_declines_and_the_round_still_completes(tiny_bert, synthetic_csv, tmp_path):
    # Sites plan for 3 rounds at ε=4; a budget of 2.5 lets each train only until it would cross.
    cfg = Config.load(tiny_overrides(
        tiny_bert, synthetic_csv, tmp_path,
        **{"federation.rounds": 3, "privacy.target_epsilon": 4, "privacy.budget_epsilon": 2.5,
           "training.trainable": "last_layers", "output.save_model": False},
    ))
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 4  # every round ran and was evaluated
    assert sum(r["declined"] for r in rows) > 0
    for e in read_jsonl(run / "privacy" / "ledger.jsonl"):
        assert e["epsilon"] <= 2.5
    report = (run / "report.md").read_text()
    assert "declines" in report and "budget" in report
    # A site that declined for budget is not asked again in that run.
    declined_before: set[str] = set()
    for r in rows[1:]:
        assert not declined_before & set(r["sampled"])
        declined_before |= set(r["declined_sites"])
    assert declined_before
    summary = json.loads((run / "privacy" / "sites.json").read_text())
    assert any(s["not_trained"] for s in summary.values())


def test_same_seed_same_partitions_and_sampling(tiny_bert, synthetic_csv, tmp_path):
    extra = {"federation.fraction_train": 0.67, "federation.rounds": 2, "privacy": "none",
             "output.save_model": False}
    runs = [run_simulation(Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path / str(i), **extra)))
            for i in range(2)]
    a, b = (read_jsonl(r / "metrics.jsonl") for r in runs)
    assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
    assert all(len(r["sampled"]) == 2 for r in a[1:])
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]


def test_runs_on_an_existing_ray_cluster_on_both_engines(tiny_bert, synthetic_csv, tmp_path, capsys):
    """simulation.ray_address attaches to a Ray head started here, on loopback: the batched
    engine (auto) serves the sites from worker actors placed on the cluster, Flower's runtime
    (simulation.engine=flower) sends each site's message to its actors."""
    import fedshield

    ray_bin = [sys.executable, "-m", "ray.scripts.scripts"]
    port = 6391
    start = subprocess.run(
        [*ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        cluster = {"simulation.ray_address": f"127.0.0.1:{port}", "output.save_model": False}
        batched = run_simulation(Config.load(tiny_overrides(
            tiny_bert, synthetic_csv, tmp_path, **cluster, **{"output.run_name": "batched"})))
        out = capsys.readouterr().out
        assert "engine batched (auto)" in out
        assert f"the batched engine: 2 worker actor(s) of 1 CPU on the Ray cluster at 127.0.0.1:{port}" in out
        rows = read_jsonl(batched / "metrics.jsonl")
        assert len(rows) == 3 and rows[-1]["trained"] == 3
        assert fedshield.audit(batched, write_report=False).ok  # every site's spends, signed on the cluster
        assert {p.parent.name for p in (batched / "sites").glob("*/ledger.jsonl")} == {"site-0", "site-1", "site-2"}

        flower = run_simulation(Config.load(tiny_overrides(
            tiny_bert, synthetic_csv, tmp_path, **cluster,
            **{"simulation.engine": "flower", "privacy": "none", "output.run_name": "flower"})))
        assert "engine flower)" in capsys.readouterr().out
        assert len(read_jsonl(flower / "metrics.jsonl")) == 3
    finally:
        subprocess.run([*ray_bin, "stop", "--force"], capture_output=True, timeout=120)

"""`fedshield sweep`: one simulation per ε, a table and a plot in one folder."""

from __future__ import annotations

import csv

import pytest

from fedshield.simulations.sweep import point_overrides, split_axes, sweep_main
from tests.helpers import tiny_overrides


def test_axes_and_inf_means_no_dp():
    axes, fixed = split_axes(["privacy.target_epsilon=1,4,inf", "federation.rounds=2", "task.labels=[a,b]"])
    assert axes == {"privacy.target_epsilon": ["1", "4", "inf"]}
    assert fixed == ["federation.rounds=2", "task.labels=[a,b]"]
    assert point_overrides({"privacy.target_epsilon": "inf"}) == ["privacy=none"]


@pytest.mark.e2e
def test_sweep_writes_table_and_plot(tiny_bert, synthetic_csv, tmp_path):
    over = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{"federation.rounds": 1, "output.save_model": False})
    out = tmp_path / "sweep"
    assert sweep_main(["--out", str(out), "privacy.target_epsilon=4,inf", *over]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["privacy.target_epsilon"] for r in rows] == ["4", "inf"]
    assert 0 < float(rows[0]["epsilon_max"]) <= 4.0
    assert float(rows[1]["epsilon_max"]) == 0.0  # inf: trained without DP, nothing spent
    assert (out / "results.md").is_file() and (out / "accuracy_vs_epsilon.png").is_file()

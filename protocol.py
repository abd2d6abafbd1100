"""The wire between the coordinator and its sites: every message kind, every record key, and
a typed builder and parser for each message, both ways. This is the only module that
spells a record key; client/, server/ and strategies/ build and read messages through it.

    coordinator -> site                     site -> coordinator
    HELLO        (query)               ->   SiteHello        | Decline
    FEATURE_SUM  (query.feature_mean)  ->   FeatureSumReply  | Decline
    TRAIN        (train)               ->   TrainReply       | Decline
    DONE         (query.done)          ->   Done             | Decline   (the run completed)

With secure aggregation (federation.secure_aggregation=secaggplus) a training round is
five exchanges (the SecAgg+ stages; privacy/secure_sum.py has the arithmetic):

    SECAGG_SETUP  (query.secagg_setup)  ->  SecAggKeys    | Decline   the site's two public keys,
                                                                      signed by its ledger key
    SECAGG_SHARE  (query.secagg_share)  ->  SecAggShares  | Decline   its secrets' shares, encrypted
                                                                      for each neighbour; its signed view
    SECAGG_CHECK  (query.secagg_check)  ->  SecAggCheck   | Decline   the neighbours' shares and signed
                                                                      views in; out: whose shares did
                                                                      not decrypt (dropped before masking)
    TRAIN + SECAGG {sources}            ->  TrainReply    | Decline   ARRAYS is the masked vector
                                                                      (uint64), never the weights
    SECAGG_UNMASK (query.secagg_unmask) ->  SecAggUnmask  | Decline   shares that remove the masks

Sites are named in these stages by their slot in the round (1..m), not by Flower's node
id (a uint64 that a ConfigRecord's sint64 cannot carry).

Every instruction carries the run's plan (`PLAN`, a ConfigRecord): the resolved config as
YAML, the run id, the frozen-weight fingerprint, the class names, the feature centre once
it is known, what Flower's strategy adds to a training round (`server-round`,
`proximal-mu`), and, once the coordinator knows which site a node is (after HELLO), the
head of that site's books it holds (`books-seq`, `books-hash`; `with_books_head`). TRAIN
also carries the trainable weights (`ARRAYS`); Flower's strategy builds it, with this
module's record names given to the strategy's constructor.

Every reply carries `SITE` (the site's name). Then:

    SiteHello        METRICS {num-examples}, SITE {name, ledger-public-key}
    FeatureSumReply  ARRAYS {feature-sum}, METRICS {num-examples}, LEDGER {entries}
    Done             nothing more
    TrainReply       ARRAYS {trainable weights}, METRICS {num-examples}, LEDGER {entries}
    Decline          DECLINE {kind, reason}

`LEDGER.entries` is the JSON list of the signed ledger entries of the spends behind the
reply (written and fsynced at the site before the reply left it). Nothing else leaves a
site: no training loss or timing (noiseless functions of the private data), and a decline's
reason is a generic line for errors (the details, which may name a data file or a row,
stay in the site's log). What each field reveals and how it is protected is the data-flow
table in docs/auditor.md; tests/test_data_flow.py checks that a site sends exactly that.

Parsing is strict: a record or key that is missing, extra or of the wrong type rejects
the message with one line. The coordinator's readers (`read_*`) never raise — whatever a
site sends, they return `Rejected(reason)` or `Failed(reason)` — so that no reply can
crash Flower's round loop. The site's reader (`read_plan`) raises `ProtocolError`, which
the site turns into a decline of kind `protocol`.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedshield.privacy.errors import FedShieldError

# ---------------------------------------------------------------- message kinds

HELLO = MessageType.QUERY  # who is this site: name, record count, ledger public key
FEATURE_SUM = MessageType.QUERY + ".feature_mean"  # once per run: the noisy feature sum
TRAIN = MessageType.TRAIN
FEATURE_SUM_HANDLER = "feature_mean"  # the name the ClientApp registers for FEATURE_SUM
DONE = MessageType.QUERY + ".done"  # after the run's report: a site not picked for the last round knows it ended
DONE_HANDLER = "done"
SECAGG_SETUP_HANDLER, SECAGG_SHARE_HANDLER, SECAGG_UNMASK_HANDLER = "secagg_setup", "secagg_share", "secagg_unmask"
SECAGG_CHECK_HANDLER = "secagg_check"
SECAGG_SETUP = MessageType.QUERY + "." + SECAGG_SETUP_HANDLER
SECAGG_SHARE = MessageType.QUERY + "." + SECAGG_SHARE_HANDLER
SECAGG_CHECK = MessageType.QUERY + "." + SECAGG_CHECK_HANDLER
SECAGG_UNMASK = MessageType.QUERY + "." + SECAGG_UNMASK_HANDLER

# ---------------------------------------------------------------- record names

PLAN = "config"  # ConfigRecord: the run's plan (Flower's strategies call this `configrecord_key`)
ARRAYS = "arrays"  # ArrayRecord: weights or the feature sum (`arrayrecord_key`)
METRICS = "metrics"  # MetricRecord: counts and figures
SITE = "site"  # ConfigRecord: who replies
LEDGER = "ledger"  # ConfigRecord: the signed spends behind the reply
DECLINE = "decline"  # ConfigRecord: why the site did not do what it was asked
SECAGG = "secagg"  # ConfigRecord: a SecAgg+ stage's fields, both ways

# ---------------------------------------------------------------- keys

# in PLAN
CONFIG_YAML = "fedshield-config"
RUN_ID = "run-id"
RUN_DIR = "run-dir"  # simulation only: where virtual sites keep their state; deployed sites ignore it
FROZEN_FINGERPRINT = "frozen-fingerprint"
CLASS_NAMES = "class-names"
FEATURE_CENTER = "feature-center"
SERVER_ROUND = "server-round"  # added by Flower's strategies to every TRAIN
PROXIMAL_MU = "proximal-mu"  # added by FedProx to every TRAIN
# The books head: the newest (seq, hash) of this site's ledger that the coordinator holds,
# verified (server/site_heads.py); in the PLAN of every instruction to a site it knows,
# from TRAIN and FEATURE_SUM on. The site refuses (decline kind `books`) when its own books
# are behind it: an older state of its ledger was put back (client/site.py `check_head`).
BOOKS_SEQ = "books-seq"
BOOKS_HASH = "books-hash"
# in METRICS
NUM_EXAMPLES = "num-examples"  # also the weighting key of Flower's strategies (`weighted_by_key`)
# in SITE
NAME = "name"
LEDGER_PUBLIC_KEY = "ledger-public-key"
CONNECTION_PROOF = "connection-proof"  # HELLO, deployment: `connection_statement` signed (bytes)
# in LEDGER
ENTRIES = "entries"
# in DECLINE
KIND = "kind"
REASON = "reason"
# in ARRAYS of a FeatureSumReply
FEATURE_SUM_ARRAY = "feature-sum"
# in SECAGG
SA_ROUND = "round"
SA_SLOT = "slot"  # the site's own slot (setup)
SA_SLOTS = "slots"  # the neighbourhood, the site itself included (share); whose shares (unmask reply)
SA_PK1S, SA_PK2S = "pk1s", "pk2s"  # their public keys, in slot order (share)
SA_PK1, SA_PK2 = "pk1", "pk2"  # mask key, encryption key (setup reply)
SA_DESTINATIONS = "destinations"  # share reply: the slot each ciphertext is for
SA_SOURCES = "sources"  # check: the slot each forwarded ciphertext came from; collect: the neighbours to mask with
SA_CIPHERTEXTS = "ciphertexts"
SA_COMMITMENT = "commitment"  # share reply: SHA-256 commitment to the private-mask seed
SA_ACTIVE, SA_DROPPED = "active", "dropped"  # unmask: slots whose masked vector is / is not in the sum
SA_SHARES = "shares"  # unmask reply
# Against a malicious coordinator (Bell et al. 2020): signed keys and signed views
SA_KEY_SIG = "key-signature"  # setup reply: the ledger key's signature of the round keys
SA_NAMES, SA_LEDGER_KEYS, SA_KEY_SIGS = "names", "ledger-keys", "key-signatures"  # share: per slot
SA_VIEW_SIG = "view-signature"  # share reply: the ledger key's signature of the neighbourhood it saw
SA_VIEWS, SA_VIEW_SIGS = "views", "view-signatures"  # check: each source's view and its signature
SA_UNREADABLE = "unreadable"  # check reply: the sources whose shares did not decrypt for this site

SECAGG_STAGES = {  # stage -> the kind of message, and its SECAGG fields: int | ints | bytes | bytes-list | views
    "setup": (SECAGG_SETUP, {SA_ROUND: "int", SA_SLOT: "int"}),
    "share": (SECAGG_SHARE, {SA_ROUND: "int", SA_SLOTS: "ints", SA_PK1S: "bytes-list", SA_PK2S: "bytes-list",
                             SA_NAMES: "bytes-list", SA_LEDGER_KEYS: "bytes-list", SA_KEY_SIGS: "bytes-list"}),
    "check": (SECAGG_CHECK, {SA_ROUND: "int", SA_SOURCES: "ints", SA_CIPHERTEXTS: "bytes-list", SA_VIEWS: "views",
                             SA_VIEW_SIGS: "bytes-list"}),
    "collect": (TRAIN, {SA_ROUND: "int", SA_SOURCES: "ints"}),
    "unmask": (SECAGG_UNMASK, {SA_ROUND: "int", SA_ACTIVE: "ints", SA_DROPPED: "ints"}),
}
SECAGG_REPLIES = {
    "setup": {SA_PK1: "bytes", SA_PK2: "bytes", SA_KEY_SIG: "bytes"},
    "share": {SA_DESTINATIONS: "ints", SA_CIPHERTEXTS: "bytes-list", SA_COMMITMENT: "bytes", SA_VIEW_SIG: "bytes"},
    "check": {SA_UNREADABLE: "ints"},
    "unmask": {SA_SLOTS: "ints", SA_SHARES: "bytes-list"},
}
MAX_SLOTS = 100_000  # sites in one secure round
MAX_SECAGG_BYTES = 4096  # one key, share or ciphertext
MAX_VIEW_BYTES = 36 * MAX_SLOTS  # one view: (slot, SHA-256) per neighbour (privacy/secure_sum.py)

DECLINE_KINDS = ("budget", "policy", "protocol", "error", "books", "model")

# \A...\Z, not ^...$: `$` also matches before a trailing newline ("site-1\n" would pass).
SITE_NAME = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9_.-])?\Z")
SITE_NAME_RULE = "1-64 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit"
MAX_REASON = 500  # characters of a decline reason
MAX_ENTRIES = 10_000  # ledger entries in one reply
MAX_COUNT = 2**31 - 1  # records at one site
MAX_PEM = 4096
MAX_SEQ = 2**40  # ledger entries of one site (a books head's seq is below it)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_PROOF = 160  # an ECDSA signature, DER: at most 139 bytes on P-521


class ProtocolError(FedShieldError):
    """A message is not what the protocol says: one line that names the field."""


# ---------------------------------------------------------------- typed messages

ArraySpec = tuple[tuple[int, ...], np.dtype[Any]]


@dataclass(frozen=True)
class BooksHead:
    """The newest entry of a site's ledger that the coordinator holds: its seq and hash."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Plan:
    """What the coordinator asks a site to do (read at the site by `read_plan`)."""

    config_yaml: str
    run_id: str
    run_dir: str
    frozen_fingerprint: str
    class_names: tuple[str, ...]
    feature_center: tuple[float, ...] | None = None
    server_round: int | None = None
    proximal_mu: float | None = None
    books_head: BooksHead | None = None  # None: the coordinator holds no entry of this site


@dataclass(frozen=True)
class SiteHello:
    site: str
    num_examples: int  # the count the site releases (add-remove: its noisy count)
    ledger_public_key: str  # PEM
    ledger_entries: tuple[dict[str, Any], ...] = ()  # add-remove: the count's release (maybe an earlier run's)
    connection_proof: bytes = b""  # deployment: `connection_statement` signed with the connection key


@dataclass(frozen=True)
class FeatureSumReply:
    site: str
    num_examples: int
    feature_sum: np.ndarray[Any, np.dtype[np.float64]]
    ledger_entries: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class TrainReply:
    site: str
    num_examples: int
    arrays: dict[str, np.ndarray[Any, Any]]
    ledger_entries: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class SecAggStep:
    """A SecAgg+ stage as the site reads it: which stage, the round, the stage's fields
    (checked against SECAGG_STAGES)."""

    stage: str
    server_round: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class SecAggReply:
    """A site's SecAgg+ reply as the coordinator reads it (checked against SECAGG_REPLIES)."""

    site: str
    stage: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Decline:
    site: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Rejected:
    """The reply broke the protocol; `site` is the name it claimed, if it was readable.

    `ledger_entries` are the reply's entries when they were readable and something after
    them was wrong (a NaN weight, an extra metric): the spend happened, so the coordinator
    still checks and records them."""

    reason: str
    site: str | None = None
    ledger_entries: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Failed:
    """Flower reported an error instead of a reply (the ClientApp crashed, timed out, ...)."""

    reason: str


# ---------------------------------------------------------------- arrays


def to_array_record(arrays: Mapping[str, np.ndarray[Any, Any]]) -> ArrayRecord:
    return array_record({k: encode_array(v) for k, v in arrays.items()})


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these very Arrays, as item assignment makes it (`filled`).
    `ArrayRecord(dict)` builds a copy of every Array (`from_array_dict`), half of a reply's
    cost on each side at 1,000 sites."""
    return filled(ArrayRecord(), arrays.items())


FilledRecord = TypeVar("FilledRecord", ArrayRecord, ConfigRecord, MetricRecord, RecordDict)


def filled(record: FilledRecord, items: Iterable[tuple[str, Any]]) -> FilledRecord:
    """`record[key] = value` for every item, as Flower's item assignment does it for these
    records (its TypedDict's: the record's own key and value checks, then the value kept;
    an ArrayRecord marked dirty; a RecordDict's key already held goes through its own
    assignment, which warns when the type of record changes), without the two typing
    casts Flower's builds at every item: most of what filling a record cost (a reply's 20
    arrays and 4 records, a plan per site a round). tests/test_protocol.py: the same
    objects, the same refusals."""
    fields = record.__dict__
    check_key, check_value, held = fields["_check_key_fn"], fields["_check_value_fn"], fields["_data"]
    replaces = isinstance(record, RecordDict)
    for key, value in items:
        if replaces and key in held:
            record[key] = value
            continue
        check_key(key)
        check_value(value)
        held[key] = value
    if isinstance(record, ArrayRecord):
        fields["_is_dirty"] = True
    return record


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray[Any, Any]]:
    return {k: decode_array(v) for k, v in record.items()}


def array_values(record: ArrayRecord) -> dict[str, np.ndarray[Any, Any]]:
    """`from_array_record`, each value read-only and read once per Array (`array_value`)."""
    return {k: array_value(v) for k, v in record.items()}


# Flower's Array holds an .npy file (np.save); np.load parses its header with
# ast.literal_eval, which made (de)serialising a reply's arrays most of the coordinator's
# time per reply at 1,000 sites. The same bytes are built, and read, with the header made
# once per (dtype, shape); anything else takes Flower's own way.

@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes | None:
    """What np.save writes before a C-order array of `dtype` and `shape`; None where the
    fast path does not apply (np.save then decides: an object dtype, a header past 1.0)."""
    if dtype.hasobject:
        return None
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": shape})
    except (ValueError, TypeError):
        return None
    return buf.getvalue()


def npy_bytes(value: np.ndarray[Any, Any]) -> bytes:
    """What `np.save(f, value)` writes, byte for byte (tests/test_protocol.py)."""
    value = np.ascontiguousarray(value)
    header = _npy_header(value.dtype, tuple(value.shape))
    if header is None:
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    return header + value.tobytes()


@functools.lru_cache(maxsize=256)
def dtype_name(dtype: np.dtype[Any]) -> str:
    """`str(dtype)`, computed once per dtype (numpy's __str__ is Python code: a fifth of
    encoding a small array)."""
    return str(dtype)


def encode_array(value: np.ndarray[Any, Any]) -> Array:
    """`Array(value)`, byte for byte (tests/test_protocol.py), without np.save's per-call cost."""
    value = np.ascontiguousarray(value)
    shape = tuple(value.shape)
    header = _npy_header(value.dtype, shape)
    if header is None:
        return Array(value)
    # The object `Array(dtype=, shape=, stype=, data=)` builds (its four fields, marked dirty),
    # made without its constructor's argument dispatch: a third of a reply's cost at 1,000
    # sites. tests/test_protocol.py checks the two are the same, field for field.
    array: Array = object.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype_name(value.dtype), shape=shape, stype=SType.NUMPY,
                          data=header + value.tobytes())
    return array


def decode_array(array: Array) -> np.ndarray[Any, Any]:
    """`array.numpy()`: the fast way only for exactly the bytes `encode_array` (and np.save)
    writes for the dtype and shape the Array declares, a writable copy; otherwise
    Flower's own np.load (which refuses what it must)."""
    return _decoded(array, copy=True)


def _decoded(array: Array, copy: bool) -> np.ndarray[Any, Any]:
    """decode_array; without `copy`, the fast way gives a read-only view of the Array's bytes."""
    layout: _Layout | None = None
    if array.stype == SType.NUMPY:
        try:
            key = (array.dtype, array.shape)
            layout = _LAYOUTS[key] if key in _LAYOUTS else _layout(array.dtype, array.shape)
        except (TypeError, ValueError, OverflowError):  # unhashable, or no dtype or shape at all
            layout = None
    data = array.data
    if layout is None or not isinstance(data, bytes) or len(data) != layout.size or not data.startswith(layout.header):
        return array.numpy()
    value = np.frombuffer(data, dtype=layout.dtype, offset=len(layout.header)).reshape(layout.shape)
    return value.copy() if copy else value


@dataclass(frozen=True)
class _Layout:
    """What the fast way reads for an Array declaring a dtype and shape: the .npy header that
    np.save writes for them, and the size of the whole file."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    header: bytes
    size: int


# (declared dtype, declared shape) -> its _Layout, or None where the fast way does not apply:
# a reply's 20 arrays repeat the same few, and working them out was half of reading one.
# Keys compare as the values they convert to (2 == 2.0, "float32" == np.dtype("float32")).
_LAYOUTS: dict[tuple[Any, Any], _Layout | None] = {}
_LAYOUTS_KEPT = 4096


def _layout(declared_dtype: Any, declared_shape: Any) -> _Layout | None:
    dtype, shape = np.dtype(declared_dtype), tuple(int(n) for n in declared_shape)
    header = _npy_header(dtype, shape) if dtype.itemsize > 0 and all(n >= 0 for n in shape) else None
    layout = None if header is None else _Layout(dtype, shape, header, len(header) + math.prod(shape) * dtype.itemsize)
    if len(_LAYOUTS) >= _LAYOUTS_KEPT:
        _LAYOUTS.clear()
    _LAYOUTS[(declared_dtype, declared_shape)] = layout
    return layout


# A reply's Arrays are read by the reply gate, the norm bound and the aggregation in turn, and a
# push's global weights by every virtual site of a batched worker: each Array's values are
# read once, kept with a weak reference to it (gone with the Array), and handed out
# read-only, so no reader can change what another one reads.
_VALUES: dict[int, tuple[weakref.ref[Array], object, str, tuple[int, ...], str, np.ndarray[Any, Any]]] = {}


def array_value(array: Array) -> np.ndarray[Any, Any]:
    """`decode_array(array)`, read-only, read once per Array object while its fields are the
    ones read (an Array whose data, dtype, shape or stype was set since is read again)."""
    key = id(array)
    kept = _VALUES.get(key)
    if (kept is not None and kept[0]() is array and kept[1] is array.data and kept[2] == array.dtype
            and kept[3] == array.shape and kept[4] == array.stype):
        return kept[5]
    value = _decoded(array, copy=False)
    value.flags.writeable = False
    _VALUES[key] = (weakref.ref(array, functools.partial(_forget_value, key)), array.data, array.dtype,
                    array.shape, array.stype, value)
    return value


def _forget_value(key: int, ref: weakref.ref[Array]) -> None:
    kept = _VALUES.get(key)
    if kept is not None and kept[0] is ref:
        del _VALUES[key]


def update_problem(update: Mapping[str, np.ndarray[Any, Any]], expected: Mapping[str, ArraySpec]) -> str | None:
    """None if `update` has exactly the expected tensors, shapes, dtypes and finite values."""
    missing = sorted(set(expected) - set(update))
    if missing:
        return f"missing tensor {missing[0]!r} ({len(missing)} missing)"
    extra = sorted(set(update) - set(expected))
    if extra:
        return f"unexpected tensor {extra[0]!r}"
    if _sound(update, expected):
        return None
    return _first_problem(update, expected)


def _sound(update: Mapping[str, np.ndarray[Any, Any]], expected: Mapping[str, ArraySpec]) -> bool:
    """Whether every tensor has its expected shape and dtype and only finite values, the
    values checked in one pass over all of them (a reply's 20 tensors, one check each, were
    a tenth of reading a reply at 1,000 a round); `_first_problem` names what is not."""
    floats = []
    for name, (shape, dtype) in expected.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
            return False
        if arr.dtype.kind == "f":  # np.floating
            floats.append(arr.ravel())
    # Joined in the widest of their dtypes (a widening: a finite value stays finite, a NaN or
    # an infinity stays one).
    return not floats or bool(np.isfinite(np.concatenate(floats)).all())


def _first_problem(update: Mapping[str, np.ndarray[Any, Any]], expected: Mapping[str, ArraySpec]) -> str | None:
    for name, (shape, dtype) in expected.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(shape):
            return f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
        if arr.dtype != dtype:
            return f"tensor {name!r} has dtype {arr.dtype}, expected {dtype}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # np.floating
            bad = int((~np.isfinite(arr)).sum())
            return f"tensor {name!r} has {bad} non-finite values (NaN/Inf)"
    return None


# ---------------------------------------------------------------- field readers (raise ProtocolError)


def _records(content: RecordDict, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    names = set(content.keys())
    missing = [r for r in required if r not in names]
    if missing:
        raise ProtocolError(f"record {missing[0]!r} is missing")
    extra = sorted(names - set(required) - set(optional))
    if extra:
        raise ProtocolError(f"unexpected record {extra[0]!r}")


def _record(content: RecordDict, name: str, kind: type[Any]) -> Any:
    record = content[name]
    if not isinstance(record, kind):
        raise ProtocolError(f"record {name!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _keys(record: Mapping[str, Any], where: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    missing = [k for k in required if k not in record]
    if missing:
        raise ProtocolError(f"{where}: {missing[0]!r} is missing")
    extra = sorted(set(record.keys()) - set(required) - set(optional))
    if extra:
        raise ProtocolError(f"{where}: unexpected key {extra[0]!r}")


def _str(record: Mapping[str, Any], key: str, where: str, max_len: int = 1 << 20) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.{key}: expected text, got {type(value).__name__}")
    if len(value) > max_len:
        raise ProtocolError(f"{where}.{key}: longer than {max_len} characters")
    return value


def _count(record: Mapping[str, Any], key: str, where: str, low: int = 1) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}.{key}: expected an integer, got {type(value).__name__}")
    if not low <= value <= MAX_COUNT:
        raise ProtocolError(f"{where}.{key}={value}: must be between {low} and {MAX_COUNT}")
    return value


def _real(record: Mapping[str, Any], key: str, where: str, low: float = -math.inf) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}.{key}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low:
        raise ProtocolError(f"{where}.{key}={value}: must be a finite number >= {low:g}")
    return value


def _site_name(value: str, where: str) -> str:
    if not SITE_NAME.match(value):
        raise ProtocolError(f"{where}: site name {value[:70]!r} is not valid ({SITE_NAME_RULE})")
    return value


def printable(text: str) -> str:
    """`text` with every character that is not printable written as its escape (ESC as
    ``\\x1b``, a bidi override as ``\\u202e``, a newline as ``\\n``).

    The one function every string from a site goes through before it reaches the
    operator's terminal, a log, report.md or metrics: a decline's reason or a crash line
    could otherwise carry ANSI escape sequences (move the cursor, recolour or erase what
    the operator reads) or a line break that forges a line of the report.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    line = printable(" ".join(text.split()))
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


def _secagg_fields(record: Mapping[str, Any], spec: Mapping[str, str]) -> dict[str, Any]:
    """A SECAGG record's fields, each of the kind `spec` names, within the size limits."""
    _keys(record, SECAGG, list(spec))
    out: dict[str, Any] = {}
    for key, kind in spec.items():
        value, where = record[key], f"{SECAGG}.{key}"
        if kind == "int":
            out[key] = _count(record, key, SECAGG)
        elif kind == "bytes":
            if not isinstance(value, bytes) or not 0 < len(value) <= MAX_SECAGG_BYTES:
                raise ProtocolError(f"{where}: expected 1 to {MAX_SECAGG_BYTES} bytes")
            out[key] = value
        else:
            item = int if kind == "ints" else bytes
            most = MAX_VIEW_BYTES if kind == "views" else MAX_SECAGG_BYTES
            if not isinstance(value, list) or len(value) > MAX_SLOTS or not all(
                    type(v) is item for v in value):
                raise ProtocolError(f"{where}: expected a list of at most {MAX_SLOTS} "
                                    f"{'integers' if item is int else 'byte strings'}")
            if item is int and not all(1 <= v <= MAX_SLOTS for v in value):
                raise ProtocolError(f"{where}: a slot must be between 1 and {MAX_SLOTS}")
            if item is bytes and not all(0 < len(v) <= most for v in value):
                raise ProtocolError(f"{where}: an item must have 1 to {most} bytes")
            if item is int and len(set(value)) != len(value):
                raise ProtocolError(f"{where}: a slot is listed twice")
            out[key] = list(value)
    return out


def parse_ledger_entries(text: str) -> tuple[dict[str, Any], ...]:
    """The signed ledger entries of a reply (a JSON list of objects)."""
    try:
        entries = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("ledger.entries: not valid JSON") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProtocolError("ledger.entries: expected a JSON list of entries")
    if len(entries) > MAX_ENTRIES:
        raise ProtocolError(f"ledger.entries: more than {MAX_ENTRIES} entries")
    return tuple(entries)


def _ledger(content: RecordDict) -> tuple[dict[str, Any], ...]:
    record = _record(content, LEDGER, ConfigRecord)
    _keys(record, LEDGER, [ENTRIES])
    return parse_ledger_entries(_str(record, ENTRIES, LEDGER))


def _arrays(content: RecordDict) -> dict[str, np.ndarray[Any, Any]]:
    record = _record(content, ARRAYS, ArrayRecord)
    try:
        return array_values(record)
    except Exception as exc:  # a tensor that does not deserialize
        raise ProtocolError(f"arrays: unreadable tensor ({type(exc).__name__})") from None


def _site(content: RecordDict, optional: Sequence[str] = ()) -> tuple[str, ConfigRecord]:
    record = _record(content, SITE, ConfigRecord)
    _keys(record, SITE, [NAME], optional)
    return _site_name(_str(record, NAME, SITE, 64), SITE), record


def _claimed_name(msg: Message) -> str | None:
    """The site name a reply claims, if it is readable and valid (for messages only)."""
    try:
        name, _ = _site(msg.content, optional=(LEDGER_PUBLIC_KEY, CONNECTION_PROOF))
        return name
    except Exception:
        return None


def _decline(content: RecordDict, site: str) -> Decline:
    _records(content, [SITE, DECLINE])
    record = _record(content, DECLINE, ConfigRecord)
    _keys(record, DECLINE, [KIND, REASON])
    kind = _str(record, KIND, DECLINE, 32)
    if kind not in DECLINE_KINDS:
        raise ProtocolError(f"decline.kind={kind[:32]!r}: must be one of {', '.join(DECLINE_KINDS)}")
    return Decline(site, kind, _one_line(_str(record, REASON, DECLINE, 10 * MAX_REASON)))


def _failure_line(msg: Message) -> str:
    reason = str(msg.error.reason).strip()
    if reason.startswith("<class '") and reason.endswith("'>"):  # Flower's "<class 'X'>:<'text'>" wrapper
        reason = reason[:-2]
    lines = [ln for ln in reason.splitlines() if ln.strip()]
    return _one_line(lines[-1]) if lines else f"error code {msg.error.code}"


def _guard(msg: Message, parse: Any) -> Any:
    """Run a reply parser so that nothing it meets can raise into the caller."""
    try:
        if msg.has_error():
            return Failed(_failure_line(msg))
        return parse(msg.content)
    except ProtocolError as exc:
        return Rejected(str(exc), _claimed_name(msg))
    except Exception as exc:  # whatever a hostile reply holds, the coordinator goes on
        return Rejected(f"unreadable reply ({type(exc).__name__})", _claimed_name(msg))


# ---------------------------------------------------------------- coordinator -> site


def plan_record(
    *, config_yaml: str, run_id: str, run_dir: str, frozen_fingerprint: str, class_names: Sequence[str]
) -> ConfigRecord:
    return ConfigRecord({
        CONFIG_YAML: config_yaml, RUN_ID: run_id, RUN_DIR: run_dir,
        FROZEN_FINGERPRINT: frozen_fingerprint, CLASS_NAMES: [str(c) for c in class_names],
    })


def with_feature_center(plan: ConfigRecord, center: Sequence[float]) -> ConfigRecord:
    """The plan with the federation's feature centre (sent with every later instruction)."""
    out = ConfigRecord(dict(plan))
    out[FEATURE_CENTER] = [float(v) for v in center]
    return out


def with_books_head(plan: ConfigRecord, head: BooksHead | None) -> ConfigRecord:
    """The plan for one site: with the head of its books the coordinator holds (None: as it is)."""
    if head is None:
        return plan
    if isinstance(head.seq, bool) or not isinstance(head.seq, int) or not 0 <= head.seq < MAX_SEQ \
            or not SHA256_HEX.match(head.hash):
        raise ValueError(f"with_books_head: seq must be an integer in [0, {MAX_SEQ}), hash 64 hex digits: {head}")
    return filled(ConfigRecord(), [*plan.items(), (BOOKS_SEQ, head.seq), (BOOKS_HASH, head.hash)])


def train_with_books_head(msg: Message, head: BooksHead | None) -> Message:
    """A TRAIN instruction (built by Flower's strategy) whose plan carries its site's books head."""
    if head is None:
        return msg
    # One RecordDict is shared by every TRAIN message of a round (as in `with_secagg`): a new one per site.
    plan = with_books_head(_record(msg.content, PLAN, ConfigRecord), head)
    msg.content = filled(RecordDict(), [*msg.content.items(), (PLAN, plan)])
    return msg


def instruction(kind: str, plan: ConfigRecord, node_id: int) -> Message:
    """A HELLO, FEATURE_SUM or DONE message to one site (TRAIN messages come from Flower's strategy)."""
    if kind not in (HELLO, FEATURE_SUM, DONE):
        raise ValueError(f"instruction: {kind!r} is not a query kind")
    return Message(content=RecordDict({PLAN: plan}), message_type=kind, dst_node_id=node_id)


def secagg_instruction(stage: str, plan: ConfigRecord, node_id: int, fields: Mapping[str, Any]) -> Message:
    """A SecAgg+ setup, share, check or unmask message to one site."""
    kind, spec = SECAGG_STAGES[stage]
    if kind == TRAIN or set(fields) != set(spec):
        raise ValueError(f"secagg_instruction: {stage!r} takes {sorted(spec)}, got {sorted(fields)}")
    return Message(content=RecordDict({PLAN: plan, SECAGG: ConfigRecord(dict(fields))}),
                   message_type=kind, dst_node_id=node_id)


def with_secagg(msg: Message, fields: Mapping[str, Any]) -> Message:
    """A TRAIN instruction (built by Flower's strategy) with the SecAgg+ collect stage's fields."""
    spec = SECAGG_STAGES["collect"][1]
    if set(fields) != set(spec):
        raise ValueError(f"with_secagg: takes {sorted(spec)}, got {sorted(fields)}")
    # Flower's strategies give every TRAIN message of a round one shared RecordDict: a new
    # one per site, or every site would get the last site's shares.
    content = RecordDict(dict(msg.content.items()))
    content[SECAGG] = ConfigRecord(dict(fields))
    msg.content = content
    return msg


def read_secagg(msg: Message) -> SecAggStep | None:
    """The SecAgg+ stage of an instruction (None: a TRAIN in the clear); raises ProtocolError."""
    kind = msg.metadata.message_type
    stages = [name for name, (k, _) in SECAGG_STAGES.items() if k == kind]
    if not stages or (kind == TRAIN and SECAGG not in msg.content):
        return None
    fields = _secagg_fields(_record(msg.content, SECAGG, ConfigRecord), SECAGG_STAGES[stages[0]][1])
    return SecAggStep(stages[0], fields[SA_ROUND], fields)


def read_plan(msg: Message) -> Plan:
    """The plan of an instruction, checked field by field (raises ProtocolError)."""
    content = msg.content
    kind = msg.metadata.message_type
    is_train = kind == TRAIN
    secagg = [SECAGG] if kind in (SECAGG_SETUP, SECAGG_SHARE, SECAGG_CHECK, SECAGG_UNMASK) else []
    _records(content, [PLAN, ARRAYS] if is_train else [PLAN, *secagg], [SECAGG] if is_train else [])
    record = _record(content, PLAN, ConfigRecord)
    _keys(record, PLAN, [CONFIG_YAML, RUN_ID, RUN_DIR, FROZEN_FINGERPRINT, CLASS_NAMES],
          [FEATURE_CENTER, SERVER_ROUND, PROXIMAL_MU, BOOKS_SEQ, BOOKS_HASH])
    classes = record[CLASS_NAMES]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ProtocolError(f"{PLAN}.{CLASS_NAMES}: expected a non-empty list of text")
    center = record.get(FEATURE_CENTER)
    if center is not None:
        if not isinstance(center, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in center
        ):
            raise ProtocolError(f"{PLAN}.{FEATURE_CENTER}: expected a list of finite numbers")
        center = tuple(float(v) for v in center)
    server_round = _count(record, SERVER_ROUND, PLAN) if SERVER_ROUND in record else None
    if is_train and server_round is None:
        raise ProtocolError(f"{PLAN}.{SERVER_ROUND} is missing from a training instruction")
    mu = _real(record, PROXIMAL_MU, PLAN, 0.0) if PROXIMAL_MU in record else None
    head = _books_head(record)
    return Plan(
        config_yaml=_str(record, CONFIG_YAML, PLAN),
        run_id=_str(record, RUN_ID, PLAN, 256),
        run_dir=_str(record, RUN_DIR, PLAN, 4096),
        frozen_fingerprint=_str(record, FROZEN_FINGERPRINT, PLAN, 256),
        class_names=tuple(classes),
        feature_center=center,
        server_round=server_round,
        proximal_mu=mu,
        books_head=head,
    )


def _books_head(record: Mapping[str, Any]) -> BooksHead | None:
    """The plan's books head (both keys or neither; seq bounded, hash 64 lowercase hex)."""
    if BOOKS_SEQ not in record and BOOKS_HASH not in record:
        return None
    if BOOKS_SEQ not in record or BOOKS_HASH not in record:
        raise ProtocolError(f"{PLAN}: {BOOKS_SEQ!r} and {BOOKS_HASH!r} come together")
    seq = record[BOOKS_SEQ]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ:
        raise ProtocolError(f"{PLAN}.{BOOKS_SEQ}: expected an integer in [0, {MAX_SEQ})")
    digest = record[BOOKS_HASH]
    if not isinstance(digest, str) or not SHA256_HEX.match(digest):
        raise ProtocolError(f"{PLAN}.{BOOKS_HASH}: expected 64 lowercase hex digits")
    return BooksHead(seq, digest)


def train_weights(msg: Message) -> dict[str, np.ndarray[Any, Any]]:
    """The global trainable weights of a TRAIN instruction, read-only (raises ProtocolError)."""
    return _arrays(msg.content)


# ---------------------------------------------------------------- site -> coordinator: builders


def _reply(msg: Message, records: dict[str, Any]) -> Message:
    return Message(content=filled(RecordDict(), records.items()), reply_to=msg)


def hello_reply(msg: Message, *, site: str, num_examples: int, ledger_public_key: str,
                ledger_entries: Sequence[Mapping[str, Any]] = ()) -> Message:
    return _reply(msg, {
        SITE: ConfigRecord({NAME: site, LEDGER_PUBLIC_KEY: ledger_public_key}),
        METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}),
        LEDGER: ConfigRecord({ENTRIES: json.dumps(list(ledger_entries))}),
    })


# ---------------------------------------------------------------- the HELLO's proof of the connection key


def connection_statement(run_id: str, node_id: int, site: str) -> bytes:
    """What a deployed site signs with its connection key in its HELLO: this name, in this
    run, from this node. Flower 1.41 does not check that a reply's `src_node_id` is the node
    that pushed it, so only this signature shows that the HELLO for node N came from the
    holder of N's key (deploy/enrolment.py; server/app.py `check_identity`)."""
    return json.dumps(["fedshield-hello-v1", str(run_id), int(node_id), str(site)]).encode()


def with_connection_proof(reply: Message, proof: bytes) -> Message:
    """A HELLO reply with its `connection_statement` signature (client/app.py)."""
    site = reply.content[SITE]
    if not isinstance(site, ConfigRecord):
        raise ValueError(f"with_connection_proof: {SITE!r} is not a ConfigRecord")
    site[CONNECTION_PROOF] = bytes(proof)
    return reply


def feature_sum_reply(
    msg: Message, *, site: str, num_examples: int, feature_sum: np.ndarray[Any, Any],
    ledger_entries: Sequence[Mapping[str, Any]],
) -> Message:
    return _reply(msg, {
        SITE: ConfigRecord({NAME: site}),
        ARRAYS: to_array_record({FEATURE_SUM_ARRAY: np.asarray(feature_sum, dtype=np.float64)}),
        METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}),
        LEDGER: ConfigRecord({ENTRIES: json.dumps(list(ledger_entries))}),
    })


def train_reply(
    msg: Message, *, site: str, arrays: Mapping[str, np.ndarray[Any, Any]], num_examples: int,
    ledger_entries: Sequence[Mapping[str, Any]],
) -> Message:
    return _reply(msg, {
        SITE: filled(ConfigRecord(), [(NAME, site)]),
        ARRAYS: to_array_record(arrays),
        METRICS: filled(MetricRecord(), [(NUM_EXAMPLES, int(num_examples))]),
        LEDGER: filled(ConfigRecord(), [(ENTRIES, json.dumps(list(ledger_entries)))]),
    })


def secagg_reply(msg: Message, *, site: str, stage: str, fields: Mapping[str, Any]) -> Message:
    """A site's reply to a SecAgg+ setup, share, check or unmask stage."""
    spec = SECAGG_REPLIES[stage]
    if set(fields) != set(spec):
        raise ValueError(f"secagg_reply: {stage!r} takes {sorted(spec)}, got {sorted(fields)}")
    return _reply(msg, {SITE: ConfigRecord({NAME: site}), SECAGG: ConfigRecord(dict(fields))})


def done_reply(msg: Message, *, site: str) -> Message:
    return _reply(msg, {SITE: ConfigRecord({NAME: site})})


def decline_reply(msg: Message, *, site: str, kind: str, reason: str) -> Message:
    if kind not in DECLINE_KINDS:
        raise ValueError(f"decline kind {kind!r}: must be one of {', '.join(DECLINE_KINDS)}")
    return _reply(msg, {
        SITE: ConfigRecord({NAME: site}),
        DECLINE: ConfigRecord({KIND: kind, REASON: _one_line(reason)}),
    })


# ---------------------------------------------------------------- site -> coordinator: readers (never raise)


def read_hello(msg: Message) -> SiteHello | Decline | Rejected | Failed:
    def parse(content: RecordDict) -> SiteHello | Decline:
        name, site = _site(content, optional=(LEDGER_PUBLIC_KEY, CONNECTION_PROOF))
        if DECLINE in content:
            for key in (LEDGER_PUBLIC_KEY, CONNECTION_PROOF):
                if key in site:
                    raise ProtocolError(f"{SITE}: unexpected key {key!r} in a decline")
            return _decline(content, name)
        _records(content, [SITE, METRICS, LEDGER])
        if LEDGER_PUBLIC_KEY not in site:
            raise ProtocolError(f"{SITE}: {LEDGER_PUBLIC_KEY!r} is missing")
        metrics = _record(content, METRICS, MetricRecord)
        _keys(metrics, METRICS, [NUM_EXAMPLES])
        pem = _str(site, LEDGER_PUBLIC_KEY, SITE, MAX_PEM)
        if not pem.startswith("-----BEGIN PUBLIC KEY-----"):
            raise ProtocolError(f"{SITE}.{LEDGER_PUBLIC_KEY}: not a PEM public key")
        proof = site.get(CONNECTION_PROOF, b"")
        if not isinstance(proof, bytes) or len(proof) > MAX_PROOF:
            raise ProtocolError(f"{SITE}.{CONNECTION_PROOF}: expected at most {MAX_PROOF} bytes")
        return SiteHello(name, _count(metrics, NUM_EXAMPLES, METRICS), pem, _ledger(content), proof)

    result: SiteHello | Decline | Rejected | Failed = _guard(msg, parse)
    return result


def _plain_site(content: RecordDict) -> str | Decline:
    name, _ = _site(content)
    if DECLINE in content:
        return _decline(content, name)
    return name


def read_feature_sum(msg: Message, width: int) -> FeatureSumReply | Decline | Rejected | Failed:
    def parse(content: RecordDict) -> FeatureSumReply | Decline | Rejected:
        name = _plain_site(content)
        if isinstance(name, Decline):
            return name
        _records(content, [SITE, ARRAYS, METRICS, LEDGER])
        entries = _ledger(content)
        try:  # past this point the spend is readable: a rejection keeps it for the books
            metrics = _record(content, METRICS, MetricRecord)
            _keys(metrics, METRICS, [NUM_EXAMPLES])
            arrays = _arrays(content)
            problem = update_problem(arrays, {FEATURE_SUM_ARRAY: ((width,), np.dtype(np.float64))})
            if problem:
                raise ProtocolError(f"arrays: {problem}")
            return FeatureSumReply(name, _count(metrics, NUM_EXAMPLES, METRICS), arrays[FEATURE_SUM_ARRAY], entries)
        except ProtocolError as exc:
            return Rejected(str(exc), name, entries)

    result: FeatureSumReply | Decline | Rejected | Failed = _guard(msg, parse)
    return result


def read_secagg_reply(msg: Message, stage: str) -> SecAggReply | Decline | Rejected | Failed:
    """A site's reply to the SecAgg+ `stage` (setup, share, check, unmask), its fields checked."""

    def parse(content: RecordDict) -> SecAggReply | Decline:
        name = _plain_site(content)
        if isinstance(name, Decline):
            return name
        _records(content, [SITE, SECAGG])
        return SecAggReply(name, stage, _secagg_fields(_record(content, SECAGG, ConfigRecord), SECAGG_REPLIES[stage]))

    result: SecAggReply | Decline | Rejected | Failed = _guard(msg, parse)
    return result


def read_train_reply(msg: Message, expected: Mapping[str, ArraySpec]) -> TrainReply | Decline | Rejected | Failed:
    """A training reply, its weights checked against `expected` (names, shapes, dtypes, finite)."""

    def parse(content: RecordDict) -> TrainReply | Decline | Rejected:
        name = _plain_site(content)
        if isinstance(name, Decline):
            return name
        _records(content, [SITE, ARRAYS, METRICS, LEDGER])
        entries = _ledger(content)
        try:  # past this point the spend is readable: a rejection keeps it for the books
            metrics = _record(content, METRICS, MetricRecord)
            _keys(metrics, METRICS, [NUM_EXAMPLES])
            arrays = _arrays(content)
            problem = update_problem(arrays, expected)
            if problem:
                raise ProtocolError(f"arrays: {problem}")
            return TrainReply(site=name, num_examples=_count(metrics, NUM_EXAMPLES, METRICS), arrays=arrays,
                              ledger_entries=entries)
        except ProtocolError as exc:
            return Rejected(str(exc), name, entries)

    result: TrainReply | Decline | Rejected | Failed = _guard(msg, parse)
    return result


def aggregation_content(reply: TrainReply, source: ArrayRecord | None = None) -> RecordDict:
    """What Flower's aggregation sees of a checked reply: the weights and the weighting count.

    Nothing else of the reply reaches Flower's strategy, so no extra or odd field a site
    sends can change the aggregate or break Flower's reply-consistency checks. `source`:
    the ArrayRecord `reply.arrays` were read from (`read_train_reply`); its Arrays of
    those names are handed on as they are instead of being encoded again (every Array
    reads back as the values checked: `decode_array` reads it as np.load does).
    """
    if source is None:
        arrays = to_array_record(reply.arrays)
    elif type(source) is ArrayRecord and source.keys() == reply.arrays.keys():
        arrays = source  # exactly the Arrays checked, nothing else: handed on as it is
    else:
        arrays = array_record({k: source[k] for k in reply.arrays})
    weight = filled(MetricRecord(), [(NUM_EXAMPLES, reply.num_examples)])
    return filled(RecordDict(), [(ARRAYS, arrays), (METRICS, weight)])

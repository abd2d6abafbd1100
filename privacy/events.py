"""Typed privacy events: what a ledger entry says, parsed once at the edge.

A ledger line (privacy/ledger.py) is a JSON object, signed over its canonical form. Here it
becomes a `LedgerEntry`: an immutable `PrivacyEvent` (the mechanism and its parameters:
what the accountants compose), its `Provenance` (site, run, round, release, chain fields)
and the accounting it was recorded under (δ, accountant, recorded ε). Every reader (the
audit, the coordinator's check, the accountants) takes the event; nobody looks fields up in
the dict past `LedgerEntry.from_dict`. Every writer builds its fields with `entry_fields`.

Mechanisms (`Mechanism`), each with the accounting it gets:

    dp-sgd-poisson-gaussian     a site's DP-SGD segment: `steps` steps of the Poisson-
                                subsampled Gaussian (σ, q), unit record
    gaussian-count              the record-count release (release "record-count"): the
                                Gaussian mechanism, sensitivity 1, one step at q = 1
    gaussian-feature-sum        the feature-centering release (release "feature-mean"): the
                                Gaussian mechanism on the sum of features clipped to C, one
                                step at q = 1
    dp-fedavg-poisson-gaussian  the coordinator's site-level DP-FedAvg round, unit site
    secagg-distributed-skellam  a secure round's distributed Skellam noise, unit site

The first three are record-level Gaussian mechanisms and compose in one chain: the count
and the feature sum are accounted exactly as a DP-SGD spend (σ, q = 1, 1 step) always was,
so their ε is the same number as before they had their own names.

Versions (`VERSION_FIELD`, "ledger_version"): entries without the field are version 1 (every
entry written before it existed). In version 1 the count and the feature-mean releases are
labelled dp-sgd-poisson-gaussian and told apart by their "release" field only: they are
read as gaussian-count and gaussian-feature-sum (`LedgerEntry.mechanism`); the signed
bytes are never changed, so version-1 signatures still verify. Version 2 (what sites write
now) carries the field and the mechanism that matches the release: a count release
labelled dp-sgd-poisson-gaussian, or a gaussian-count entry that is not a count release,
or one that is not one step at q = 1, is refused. Any other version is refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeGuard, cast

from fedshield.privacy.accountant import ACCOUNTANTS, Spend
from fedshield.privacy.errors import LedgerError

VERSION_FIELD = "ledger_version"
LEDGER_VERSION = 2  # what `entry_fields` writes
VERSIONS = (1, 2)  # what a reader accepts; 1 is "the field is absent"


class Mechanism(StrEnum):
    DP_SGD = "dp-sgd-poisson-gaussian"
    GAUSSIAN_COUNT = "gaussian-count"
    GAUSSIAN_FEATURE_SUM = "gaussian-feature-sum"
    DP_FEDAVG = "dp-fedavg-poisson-gaussian"
    SKELLAM = "secagg-distributed-skellam"


class Neighbouring(StrEnum):
    ADD_REMOVE = "add-remove"
    REPLACE_ONE = "replace-one"


RECORD, SITE = "record", "site"
UNIT = {Mechanism.DP_SGD: RECORD, Mechanism.GAUSSIAN_COUNT: RECORD, Mechanism.GAUSSIAN_FEATURE_SUM: RECORD,
        Mechanism.DP_FEDAVG: SITE, Mechanism.SKELLAM: SITE}
# The mechanisms a version-1 entry may name (the others did not exist).
V1_MECHANISMS = (Mechanism.DP_SGD, Mechanism.DP_FEDAVG, Mechanism.SKELLAM)
# Release labels (the "release" field) and the mechanism each one is.
COUNT_RELEASE, FEATURE_RELEASE, TRAIN_RELEASE, MODEL_RELEASE = "record-count", "feature-mean", "dp-sgd", "global-model"
RELEASE_MECHANISM = {COUNT_RELEASE: Mechanism.GAUSSIAN_COUNT, FEATURE_RELEASE: Mechanism.GAUSSIAN_FEATURE_SUM}
ONE_SHOT = (Mechanism.GAUSSIAN_COUNT, Mechanism.GAUSSIAN_FEATURE_SUM)  # one step at q = 1
# Mechanisms that compose in one chain under one accountant: the record-level Gaussians.
# Each site-level mechanism is a chain of its own.
RECORD_GAUSSIANS = (Mechanism.DP_SGD, Mechanism.GAUSSIAN_COUNT, Mechanism.GAUSSIAN_FEATURE_SUM)
SKELLAM_FIELDS = ("skellam_variance", "skellam_l1", "skellam_l2")

GENESIS = "0" * 64
FILLED = ("prev_hash", "hash", "signature", "key_fingerprint", "time", "seq", "run_seq")
REQUIRED = (
    "run_id", "round", "site", "mechanism", "privacy_unit", "noise_multiplier", "sample_rate",
    "steps", "max_grad_norm", "delta", "epsilon", "accountant", "time", "seq", "run_seq", "prev_hash",
    "hash", "signature", "key_fingerprint",
)

# Bounds on what an entry may say, checked before any arithmetic: an entry comes from a
# site, which may sign absurd values (a 401-digit integer overflows float() and
# math.isfinite(); 1e9 steps make the accountant allocate hundreds of GiB). They are far
# outside anything a site's plan produces (privacy/ledger_check.py then holds each
# spend to the plan of its round).
MAX_NOISE_MULTIPLIER = 1e6  # σ: ε is ~0 long before it
MAX_STEPS = 2**53  # steps: an integer a float holds exactly


def chain_kind(mechanism: Mechanism) -> str:
    """Which mechanisms may share one site's chain (composed by one accountant)."""
    return "record-gaussian" if mechanism in RECORD_GAUSSIANS else mechanism.value


@dataclass(frozen=True)
class SkellamNoise:
    """The noise a secure round's sum held (quantization levels²) and its integer sensitivities."""

    variance: float
    l1: float
    l2: float


@dataclass(frozen=True)
class PrivacyEvent:
    """One spend: the mechanism and what its accountant needs.

    `noise_multiplier` σ, `sample_rate` q, `steps`: the (Poisson-subsampled) Gaussian's
    parameters (one step at q = 1 for a count or feature sum; for Skellam, σ is only the
    equivalent sqrt(variance) / l2, for reading). `sensitivity`: the clipping norm C (the
    entry's max_grad_norm; 1 for a count)."""

    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    relation: Neighbouring
    sensitivity: float
    skellam: SkellamNoise | None = None

    @property
    def privacy_unit(self) -> str:
        return UNIT[self.mechanism]

    def spend(self) -> Spend:
        """The event as the Gaussian accountants compose it (privacy.accountant). Built (and
        checked) once per event: both are immutable, and a chain's ε is recomputed from its
        events' spends several times a reply."""
        kept = self.__dict__.get("_spend")
        if kept is None:
            kept = Spend(self.noise_multiplier, self.sample_rate, self.steps)
            object.__setattr__(self, "_spend", kept)
        return cast(Spend, kept)


@dataclass(frozen=True)
class Provenance:
    """Where a spend comes from: its site, run, round and release, and its place in the site's chain."""

    site: str
    run_id: str
    round: int
    release: str | None = None
    seq: int | None = None  # None in fields not yet appended
    run_seq: int | None = None
    prev_hash: str | None = None
    time: str | None = None
    key_fingerprint: str | None = None


@dataclass(frozen=True)
class LedgerEntry:
    """A ledger line, parsed: the event, its provenance, and the accounting it was recorded under.

    `fields` is the line's JSON object exactly as signed (read only): `to_dict` gives it
    back, so the hash and the signature are over the very bytes the site signed, whatever
    version wrote it. Fields the types do not name (released_count, plan_digest,
    budget_epsilon, ...) stay there, covered by the signature."""

    event: PrivacyEvent
    provenance: Provenance
    delta: float
    accountant: str
    epsilon: float | None  # the recorded cumulative ε (None: not yet computed)
    version: int
    hash: str | None
    signature: str | None
    fields: Mapping[str, Any]

    @property
    def mechanism(self) -> Mechanism:
        return self.event.mechanism

    @property
    def budget_epsilon(self) -> float | None:
        """The budget the site signed into the entry, if any (> 0)."""
        b = as_float(self.fields.get("budget_epsilon"))
        return b if b is not None and b > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    @classmethod
    def from_dict(cls, e: Mapping[str, Any], *, signed: bool = True) -> LedgerEntry:
        """Parse a ledger line's object: every field bounded before use; LedgerError naming
        the site, round and the first bad field otherwise. `signed` False: fields not yet
        appended (no chain fields, no ε needed)."""
        if not isinstance(e, Mapping):
            raise LedgerError(f"ledger entry: not a JSON object but {type(e).__name__}")
        missing = [k for k in REQUIRED if k not in e] if signed else []
        problem = f"missing field(s) {', '.join(missing)}" if missing else field_problem(e, need_epsilon=signed)
        if not problem and signed:
            problem = chain_problem(e)
        if problem:
            raise LedgerError(f"ledger entry of site {shown(e.get('site'))} round {shown(e.get('round'))}: {problem}")
        event = _event(e)
        eps = e.get("epsilon")
        prov = Provenance(
            site=str(e["site"]), run_id=str(e["run_id"]), round=int(e["round"]),
            release=str(e["release"]) if isinstance(e.get("release"), str) else None,
            seq=e.get("seq"), run_seq=e.get("run_seq"), prev_hash=_str_or_none(e.get("prev_hash")),
            time=_str_or_none(e.get("time")), key_fingerprint=_str_or_none(e.get("key_fingerprint")))
        return cls(event=event, provenance=prov, delta=float(e["delta"]), accountant=str(e["accountant"]),
                   epsilon=None if eps is None else as_float(eps), version=version_of(e),
                   hash=_str_or_none(e.get("hash")), signature=_str_or_none(e.get("signature")),
                   fields=MappingProxyType(dict(e)))


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


def entry_fields(event: PrivacyEvent, *, site: str, run_id: str, round: int, delta: float, accountant: str,
                 release: str | None = None, epsilon: float | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one serialisation of a new spend: the fields `Ledger.append` signs (version 2).
    `extra`: fields the types do not name (released_count, plan_digest, budget_epsilon,
    planned_sites, ...); they may not restate a typed field."""
    fields: dict[str, Any] = {
        VERSION_FIELD: LEDGER_VERSION, "run_id": run_id, "round": round, "site": site,
        "mechanism": event.mechanism.value, "privacy_unit": event.privacy_unit,
        "noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate, "steps": event.steps,
        "max_grad_norm": float(event.sensitivity), "delta": float(delta), "accountant": accountant,
        "neighbouring": event.relation.value,
    }
    if release is not None:
        fields["release"] = release
    if epsilon is not None:
        fields["epsilon"] = float(epsilon)
    if event.skellam is not None:
        fields.update(skellam_variance=float(event.skellam.variance), skellam_l1=float(event.skellam.l1),
                      skellam_l2=float(event.skellam.l2))
    clash = sorted(set(extra or {}) & (set(fields) | set(FILLED) | {"release", "epsilon", *SKELLAM_FIELDS}))
    if clash:
        raise LedgerError(f"ledger entry of site {site!r}: extra field(s) {', '.join(clash)} restate typed ones")
    fields.update(extra or {})
    problem = field_problem(fields, need_epsilon=False)
    if problem:
        raise LedgerError(f"ledger entry of site {site!r} round {round!r}: {problem}")
    return fields


def release_event(mechanism: Mechanism, noise_multiplier: float, sensitivity: float,
                  relation: str | Neighbouring) -> PrivacyEvent:
    """A one-shot record-level release (the count, the feature sum): one step at q = 1."""
    assert mechanism in ONE_SHOT
    return PrivacyEvent(mechanism, float(noise_multiplier), 1.0, 1, Neighbouring(relation), float(sensitivity))


# -- reading the fields (bounded) ---------------------------------------------------


def version_of(e: Mapping[str, Any]) -> int:
    """The entry's format version: 1 without the field (field_problem checks its value)."""
    v = e.get(VERSION_FIELD, 1)
    return v if isinstance(v, int) and not isinstance(v, bool) and v in VERSIONS else 0


def mechanism_of(e: Mapping[str, Any]) -> str:
    """The mechanism an entry is accounted as: its own name, except in version 1, where a
    count or feature-mean release labelled dp-sgd-poisson-gaussian is read as its own
    mechanism by its release field. (An entry without the field: DP-SGD, as ever.)"""
    name = str(e.get("mechanism", Mechanism.DP_SGD.value))
    if version_of(e) == 1 and name == Mechanism.DP_SGD.value:
        migrated = RELEASE_MECHANISM.get(str(e.get("release")))
        if migrated is not None:
            return migrated.value
    return name


def neighbouring_of(e: Mapping[str, Any]) -> str:
    """The neighbouring relation an entry is accounted under (add-remove if it predates the field)."""
    return str(e.get("neighbouring", Neighbouring.ADD_REMOVE.value))


def _event(e: Mapping[str, Any]) -> PrivacyEvent:
    """The event of fields that `field_problem` passed."""
    mechanism = Mechanism(mechanism_of(e))
    skellam = None
    if mechanism is Mechanism.SKELLAM:
        v, l1, l2 = (float(e[k]) for k in SKELLAM_FIELDS)
        skellam = SkellamNoise(v, l1, l2)
    return PrivacyEvent(mechanism, float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]),
                        Neighbouring(neighbouring_of(e)), float(e["max_grad_norm"]), skellam)


def event_of(e: Mapping[str, Any]) -> PrivacyEvent:
    """The event of an entry's fields (signed or not), bounded; LedgerError otherwise."""
    problem = field_problem(e, need_epsilon=False)
    if problem:
        raise LedgerError(f"ledger entry of site {shown(e.get('site'))} round {shown(e.get('round'))}: {problem}")
    return _event(e)


def _real(v: object) -> TypeGuard[float]:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def as_float(v: object) -> float | None:
    """`v` as a float if it is a real number (not a bool) that a float holds, else None: a
    NaN, or an integer too large for a float (OverflowError), is None."""
    if not _real(v):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):
        return None
    return None if math.isnan(f) else f


def _within(v: object, low: float, high: float) -> bool:
    f = as_float(v)
    return f is not None and low <= f <= high


def _index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_STEPS


# Entries found clean by `field_problem`: (id, need_epsilon) -> (the entry, its items with
# their types). A site's new entry is checked as it is built, appended, parsed for its event
# and verified in its chain, and the coordinator checks a reply's entries twice: the same
# object, unchanged, is not checked again (a tenth of a virtual site's bookkeeping).
_CLEAN: dict[tuple[int, bool], tuple[Mapping[str, Any], dict[str, tuple[type, Any]]]] = {}
_CLEAN_KEPT = 8192
_SCALARS = (str, int, float, bool, type(None))


def field_problem(e: Mapping[str, Any], need_epsilon: bool = True) -> str:
    """What is wrong with an entry's fields, or ''. Numbers are bounded before they are used:
    nothing an entry holds can raise (OverflowError) or cost unbounded work here. An entry
    found clean is not checked again while it is the same object holding the same fields,
    values and value types (only plain dicts of scalars are remembered)."""
    key = (id(e), need_epsilon)
    # Clean with ε required is clean without: the check without ε is the same, less one field.
    kept = _CLEAN.get(key) or (None if need_epsilon else _CLEAN.get((id(e), True)))
    if kept is not None and kept[0] is e and len(kept[1]) == len(e) and all(
            (was := kept[1].get(k)) is not None and type(v) is was[0] and v == was[1] for k, v in e.items()):
        return ""
    problem = _field_problem(e, need_epsilon)
    if not problem and type(e) is dict and all(type(v) in _SCALARS for v in e.values()):
        if len(_CLEAN) >= _CLEAN_KEPT:
            _CLEAN.clear()
        _CLEAN[key] = (e, {k: (type(v), v) for k, v in e.items()})
    return problem


def _field_problem(e: Mapping[str, Any], need_epsilon: bool) -> str:
    if VERSION_FIELD in e and version_of(e) != 2:
        return (f"{VERSION_FIELD} {shown(e.get(VERSION_FIELD))} is not one this reader knows (2; an entry "
                "without the field is version 1)")
    if not isinstance(e.get("site"), str) or not e.get("site"):
        return "site must be a non-empty string"
    if not isinstance(e.get("run_id"), str):
        return "run_id must be a string"
    if not _index(e.get("round")):
        return f"round must be an integer in [0, {MAX_STEPS}], got {shown(e.get('round'))}"
    named = e.get("mechanism")
    allowed = [m.value for m in (V1_MECHANISMS if version_of(e) == 1 else Mechanism)]
    if named not in allowed:
        return (f"mechanism {shown(named)} is not one of {', '.join(allowed)}"
                + (f" (in a version-1 entry; version {LEDGER_VERSION} has {VERSION_FIELD})"
                   if named in [m.value for m in Mechanism] else ""))
    mechanism = Mechanism(mechanism_of(e))
    release = e.get("release")
    if "release" in e and not isinstance(release, str):
        return f"release must be a string, got {shown(release)}"
    if version_of(e) == 2:
        want = RELEASE_MECHANISM.get(str(release))
        if want is not None and mechanism is not want:
            return f"mechanism {mechanism.value} is not the mechanism of a {release} release ({want.value})"
        if mechanism in ONE_SHOT and release != _release_of(mechanism):
            return f"mechanism {mechanism.value} is the {_release_of(mechanism)} release, not {shown(release)}"
    if e.get("privacy_unit") != UNIT[mechanism]:
        return (f"privacy_unit {shown(e.get('privacy_unit'))} is not {UNIT[mechanism]!r} "
                f"(the unit of {mechanism.value})")
    if e.get("accountant") not in ACCOUNTANTS:
        return f"accountant {shown(e.get('accountant'))} is not one of {', '.join(ACCOUNTANTS)}"
    if neighbouring_of(e) not in [n.value for n in Neighbouring]:
        return f"neighbouring {shown(e.get('neighbouring'))} is not one of {', '.join(n.value for n in Neighbouring)}"
    s, q, t = e.get("noise_multiplier"), e.get("sample_rate"), e.get("steps")
    if not _within(s, 0.0, MAX_NOISE_MULTIPLIER):
        return f"noise_multiplier must be a number in [0, {MAX_NOISE_MULTIPLIER:g}], got {shown(s)}"
    if not _within(q, 0.0, 1.0):
        return f"sample_rate must be in [0, 1], got {shown(q)}"
    if not _index(t):
        return f"steps must be an integer in [0, {MAX_STEPS}], got {shown(t)}"
    if version_of(e) == 2 and mechanism in ONE_SHOT and (as_float(q) != 1.0 or t != 1):
        return f"a {mechanism.value} release is one step at q = 1, got {shown(t)} steps at q = {shown(q)}"
    d = as_float(e.get("delta"))
    if d is None or not 0 < d < 1:
        return f"delta must be in (0, 1), got {shown(e.get('delta'))}"
    c = as_float(e.get("max_grad_norm"))
    if c is None or not 0 < c < math.inf:
        return f"max_grad_norm must be a finite number > 0, got {shown(e.get('max_grad_norm'))}"
    if mechanism is Mechanism.SKELLAM and not all(
            (f := as_float(e.get(k))) is not None and 0 < f < math.inf for k in SKELLAM_FIELDS):
        return f"{', '.join(SKELLAM_FIELDS)} must be finite numbers > 0"
    if need_epsilon or "epsilon" in e and e["epsilon"] is not None:
        eps = as_float(e.get("epsilon"))
        if eps is None or eps < 0:  # ∞ is allowed: what a spend without noise costs
            return f"epsilon must be a number >= 0 that a float holds, got {shown(e.get('epsilon'))}"
    return ""


def chain_problem(e: Mapping[str, Any]) -> str:
    """What is wrong with a signed entry's chain fields (their types and bounds), or ''."""
    if not (_index(e.get("seq")) and _index(e.get("run_seq"))):
        return (f"seq and run_seq must be integers in [0, {MAX_STEPS}], got {shown(e.get('seq'))}, "
                f"{shown(e.get('run_seq'))}")
    return ""


def _release_of(mechanism: Mechanism) -> str:
    return next(r for r, m in RELEASE_MECHANISM.items() if m is mechanism)


def shown(v: object) -> str:
    """A value from an entry as an error line may quote it: repr (which escapes what is not
    printable), at most 40 characters; an integer above 64 bits by its size (a 401-digit
    integer is not worth quoting, and str() refuses one past 4300 digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."

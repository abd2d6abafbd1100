"""Typed privacy events (privacy/events.py): the version-1 ledgers written by the old code
still verify and recompute to the same ε; new entries carry their own mechanism names; a
forged entry is refused with one line."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fedshield.privacy.accountant import Spend, epsilon_dp_accounting_pld
from fedshield.privacy.audit import audit
from fedshield.privacy.errors import LedgerError
from fedshield.privacy.events import (
    VERSION_FIELD,
    LedgerEntry,
    Mechanism,
    Neighbouring,
    PrivacyEvent,
    entry_fields,
    release_event,
)
from fedshield.privacy.ledger import Ledger, canonical, chain_epsilon, entry_hash, verify_ledger
from fedshield.privacy.signing import fingerprint, load_private_key, load_public_key, sign

V1 = Path(__file__).parent / "data" / "ledger-v1"
# alpha's signing key, derived from a public seed (make_v1.py.txt): a test vector, so no
# key file is kept in git, and the tests can continue and forge alpha's v1 chain.
ALPHA_SEED = b"fedshield tests/data/ledger-v1: alpha's key, a public test vector, not a secret"


def alpha_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(int.from_bytes(hashlib.sha256(ALPHA_SEED).digest(), "big") >> 1, ec.SECP256R1())
EXPECTED = json.loads((V1 / "expected.json").read_text())
DELTA = 1e-5


def _keys() -> dict:
    return {p.stem: load_public_key(p) for p in (V1 / "keys").glob("*.pub")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_v1_ledger_still_verifies_with_the_same_epsilon(name):
    """Written by the v1 code (tests/data/ledger-v1/make_v1.py.txt): every signature verifies,
    the chain ε and the audit's recomputation are the numbers the v1 code computed."""
    entries = Ledger(V1 / name).read().entries
    assert all(VERSION_FIELD not in e for e in entries)  # version 1: written before the field
    assert verify_ledger(entries, _keys()).ok
    want = EXPECTED[name]
    # To 1e-9: the accountants' last digits move with numpy/scipy patch releases (a fresh
    # install on 2026-12-03 moved them by up to 4e-12); a change of the accounting moves them by far more.
    same = functools.partial(pytest.approx, rel=1e-9, abs=0.0)
    assert [chain_epsilon(entries[: i + 1], DELTA) for i in range(len(entries))] == same(want["chain_epsilon"])
    result = audit(V1 / name, ledger_keys_dir=V1 / "keys")
    assert result.ok, result.flags
    assert [row["reference"] for row in result.entries] == same(want["reference"])
    for site, numbers in want["sites"].items():
        got = result.sites[site]
        assert got.recorded_epsilon == numbers["recorded"]  # read from the entries as signed: exact
        pld = None if got.pld_epsilon != got.pld_epsilon else got.pld_epsilon
        assert pld == (None if numbers["pld"] is None else same(numbers["pld"]))
    for e in entries:  # the typed entry gives back the very bytes that were signed
        parsed = LedgerEntry.from_dict(e)
        assert canonical(parsed.to_dict()) == canonical(e) and entry_hash(parsed.to_dict()) == e["hash"]


def test_v1_count_and_feature_mean_are_read_as_their_own_mechanisms():
    entries = [LedgerEntry.from_dict(e) for e in Ledger(V1 / "alpha.jsonl").read().entries]
    assert [e.fields["mechanism"] for e in entries] == ["dp-sgd-poisson-gaussian"] * 4  # as signed
    assert [e.mechanism for e in entries] == [Mechanism.GAUSSIAN_COUNT, Mechanism.GAUSSIAN_FEATURE_SUM,
                                             Mechanism.DP_SGD, Mechanism.DP_SGD]
    assert [e.version for e in entries] == [1, 1, 1, 1]
    assert entries[0].event.spend() == Spend(8.0, 1.0, 1)  # accounted as ever: one step at q = 1
    gamma = LedgerEntry.from_dict(Ledger(V1 / "gamma.jsonl").read().entries[0])  # before release/neighbouring
    assert gamma.mechanism is Mechanism.DP_SGD and gamma.event.relation is Neighbouring.ADD_REMOVE


def test_the_audit_names_the_mechanisms():
    result = audit(V1 / "alpha.jsonl", ledger_keys_dir=V1 / "keys")
    assert [row["mechanism"] for row in result.entries] == [
        "gaussian-count", "gaussian-feature-sum", "dp-sgd-poisson-gaussian", "dp-sgd-poisson-gaussian"]
    assert result.sites["alpha"].mechanisms == ["dp-sgd-poisson-gaussian", "gaussian-count", "gaussian-feature-sum"]


def test_a_v1_chain_continues_in_v2_and_composes(tmp_path):
    """A site that upgrades keeps its v1 entries (signed, never rewritten) and appends v2
    ones: one chain, one accountant, ε over all of it."""
    shutil.copy(V1 / "alpha.jsonl", tmp_path / "ledger.jsonl")
    shutil.copy(V1 / "alpha.jsonl.head", tmp_path / "ledger.jsonl.head")
    key = alpha_key()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    before = ledger.read().entries
    count = release_event(Mechanism.GAUSSIAN_COUNT, 8.0, 1.0, "add-remove")
    fields = entry_fields(count, site="alpha", run_id="run-v2", round=0, delta=DELTA, accountant="pld",
                          release="record-count", extra={"released_count": 97, "data_digest": "cd" * 32})
    new = ledger.append(fields, key)
    assert new[VERSION_FIELD] == 2 and new["mechanism"] == "gaussian-count" and new["privacy_unit"] == "record"
    spends = [Spend(8.0, 1.0, 1), Spend(20.0, 1.0, 1), Spend(3.1, 0.25, 8), Spend(3.1, 0.25, 8), Spend(8.0, 1.0, 1)]
    assert new["epsilon"] == epsilon_dp_accounting_pld(spends, DELTA, 1e-3)
    assert new["epsilon"] > before[-1]["epsilon"]
    entries = ledger.read().entries
    assert verify_ledger(entries, {"alpha": load_public_key(V1 / "keys" / "alpha.pub")}).ok
    ledger.check_own("alpha", load_public_key(V1 / "keys" / "alpha.pub"))


def _forged(key, **changes) -> dict:
    """alpha's v1 count entry, changed and signed again by alpha's own key (a site forging
    its own books: the signature verifies, the contents must not)."""
    e = dict(Ledger(V1 / "alpha.jsonl").read().entries[0], **changes)
    e = {k: v for k, v in e.items() if v is not None}
    e["hash"] = entry_hash(e)
    e["signature"] = base64.b64encode(sign(key, e["hash"].encode())).decode()
    return e


@pytest.mark.parametrize(("changes", "says"), [
    ({VERSION_FIELD: 2}, "mechanism dp-sgd-poisson-gaussian is not the mechanism of a record-count release"),
    ({VERSION_FIELD: 2, "mechanism": "gaussian-feature-sum"}, "is not the mechanism of a record-count release"),
    ({VERSION_FIELD: 2, "mechanism": "gaussian-count", "release": "dp-sgd"}, "record-count release, not 'dp-sgd'"),
    ({VERSION_FIELD: 2, "mechanism": "gaussian-count", "release": None}, "is the record-count release, not None"),
    ({VERSION_FIELD: 2, "mechanism": "gaussian-count", "steps": 2}, "one step at q = 1, got 2 steps"),
    ({"mechanism": "gaussian-count"}, "(in a version-1 entry; version 2 has ledger_version)"),
    ({VERSION_FIELD: 3}, "ledger_version 3 is not one this reader knows"),
    ({VERSION_FIELD: 1}, "ledger_version 1 is not one this reader knows"),
    ({VERSION_FIELD: True}, "ledger_version True is not one this reader knows"),
    ({VERSION_FIELD: 2, "mechanism": "gaussian-count", "noise_multiplier": 1e7}, "noise_multiplier must be a number"),
    ({"noise_multiplier": 10**400}, "noise_multiplier must be a number in [0, 1e+06], got an integer of 1329 bits"),
    ({"release": 7}, "release must be a string, got 7"),
])
def test_a_forged_entry_is_refused_with_one_line(changes, says):
    key = alpha_key()
    e = _forged(key, **changes)
    with pytest.raises(LedgerError) as info:
        LedgerEntry.from_dict(e)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("ledger entry of site 'alpha' round 0: ")
    result = verify_ledger([e], {"alpha": load_public_key(V1 / "keys" / "alpha.pub")})
    assert not result.ok and says in result.reason


def test_entry_fields_is_the_one_serialisation():
    event = PrivacyEvent(Mechanism.DP_SGD, 1.5, 0.25, 8, Neighbouring.REPLACE_ONE, 1.0)
    fields = entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", release="dp-sgd",
                          extra={"plan_digest": "x"})
    assert fields == {VERSION_FIELD: 2, "run_id": "r", "round": 3, "site": "s", "mechanism": "dp-sgd-poisson-gaussian",
                      "privacy_unit": "record", "noise_multiplier": 1.5, "sample_rate": 0.25, "steps": 8,
                      "max_grad_norm": 1.0, "delta": DELTA, "accountant": "rdp", "neighbouring": "replace-one",
                      "release": "dp-sgd", "plan_digest": "x"}
    assert LedgerEntry.from_dict(fields, signed=False).event == event
    with pytest.raises(LedgerError, match="extra field.s. steps restate typed ones"):
        entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", extra={"steps": 1})
    with pytest.raises(LedgerError, match="mechanism dp-sgd-poisson-gaussian is not the mechanism of a feature-mean"):
        entry_fields(event, site="s", run_id="r", round=0, delta=DELTA, accountant="rdp", release="feature-mean")


@pytest.mark.parametrize("change", [
    {"steps": True},  # == 1, but a bool: refused
    {"steps": 1.0},  # == 1, but a float
    {"noise_multiplier": float("nan")},
    {"sample_rate": 2.0},
    {"delta": None},
    {"site": ""},
])
def test_an_entry_found_clean_is_checked_again_once_any_field_or_its_type_changes(change):
    """field_problem remembers an entry it found clean (the same object, unchanged): an entry
    changed in place after a clean verdict, even to an equal value of another type, is
    checked again; a removed or an added field too."""
    from fedshield.privacy.events import field_problem

    event = PrivacyEvent(Mechanism.DP_SGD, 1.5, 0.25, 1, Neighbouring.ADD_REMOVE, 1.0)
    fields = entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", release="dp-sgd")
    assert field_problem(fields, need_epsilon=False) == "" == field_problem(fields, need_epsilon=False)
    assert field_problem(fields)  # need_epsilon is remembered apart: this entry has none
    fields.update(change)
    assert field_problem(fields, need_epsilon=False)
    with pytest.raises(LedgerError):
        LedgerEntry.from_dict(fields, signed=False)
    fields = entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", release="dp-sgd")
    assert field_problem(fields, need_epsilon=False) == ""
    del fields["delta"]
    assert "delta" in field_problem(fields, need_epsilon=False)
    fields["delta"] = DELTA
    fields["epsilon"] = -1.0
    assert "epsilon" in field_problem(fields, need_epsilon=False)


def test_a_verdict_with_epsilon_required_answers_the_check_without_and_never_the_reverse():
    """An entry found clean with ε required (a signed entry's check) is clean without it (an
    event's); clean without ε says nothing of an entry that lacks it; a change is seen either way."""
    from fedshield.privacy import events
    from fedshield.privacy.events import _CLEAN, field_problem

    event = PrivacyEvent(Mechanism.DP_SGD, 1.5, 0.25, 1, Neighbouring.ADD_REMOVE, 1.0)
    fields = entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", release="dp-sgd")
    fields["epsilon"] = 0.5
    assert field_problem(fields) == ""
    _CLEAN.pop((id(fields), False), None)  # entry_fields' own verdict (before ε was added): gone
    assert (id(fields), True) in _CLEAN
    calls = []
    real = events._field_problem
    events._field_problem = lambda e, need: calls.append(need) or real(e, need)
    try:
        assert field_problem(fields, need_epsilon=False) == ""
        assert calls == []  # answered by the verdict with ε required
        fields["sample_rate"] = 2.0
        assert field_problem(fields, need_epsilon=False)  # changed: checked again
        assert calls == [False]
    finally:
        events._field_problem = real
    bare = entry_fields(event, site="s", run_id="r", round=3, delta=DELTA, accountant="rdp", release="dp-sgd")
    assert field_problem(bare, need_epsilon=False) == ""
    assert "epsilon" in field_problem(bare)  # clean without ε is no verdict on ε


def test_a_chain_keeps_one_kind_of_mechanism(tmp_path):
    """The count and the feature sum compose with DP-SGD; a site-level mechanism does not."""
    key = alpha_key()
    shutil.copy(V1 / "alpha.jsonl", tmp_path / "ledger.jsonl")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    fedavg = PrivacyEvent(Mechanism.DP_FEDAVG, 1.2, 0.5, 1, Neighbouring.ADD_REMOVE, 0.5)
    with pytest.raises(LedgerError, match="cannot join them"):
        ledger.append(entry_fields(fedavg, site="alpha", run_id="r", round=1, delta=DELTA, accountant="pld"), key)
    assert fingerprint(key) == ledger.read().entries[-1]["key_fingerprint"]
    # What is appended is version 2: version 1 is only ever read.
    training = PrivacyEvent(Mechanism.DP_SGD, 3.1, 0.25, 8, Neighbouring.ADD_REMOVE, 1.0)
    old = {**entry_fields(training, site="alpha", run_id="r", round=1, delta=DELTA, accountant="pld"),
           VERSION_FIELD: 1}
    with pytest.raises(LedgerError, match="refusing to append a ledger_version 1 entry"):
        ledger.append(old, key)


def test_verify_reports_a_bad_mechanism_after_good_entries_and_does_not_raise():
    key = alpha_key()
    entries = Ledger(V1 / "alpha.jsonl").read().entries
    last = dict(entries[-1], mechanism="nope")
    last["hash"] = entry_hash(last)
    last["signature"] = base64.b64encode(sign(key, last["hash"].encode())).decode()
    result = verify_ledger([*entries[:-1], last], {"alpha": load_public_key(V1 / "keys" / "alpha.pub")})
    assert not result.ok and result.first_bad_index == 3 and "mechanism 'nope' is not one of" in result.reason


@pytest.mark.parametrize(("accountant", "relation"), [("rdp", "add-remove"), ("pld", "add-remove"),
                                                      ("pld", "replace-one")])
def test_every_record_kind_equals_an_independent_dp_accounting_recomputation(tmp_path, accountant, relation):
    """A v2 chain (count, feature sum, two DP-SGD rounds) built from typed events: its recorded ε
    is at least, and within the discretisation of, dp-accounting's own composition written
    independently: the one-shot releases as plain GaussianDpEvents (no subsampling), the
    rounds as Poisson-subsampled ones."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    from fedshield.privacy.accountant import OPACUS_RDP_ORDERS
    from fedshield.privacy.signing import generate_site_key

    generate_site_key(tmp_path / "site.key")
    key = load_private_key(tmp_path / "site.key")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    kinds = [(release_event(Mechanism.GAUSSIAN_COUNT, 8.0, 1.0, relation), "record-count", 0),
             (release_event(Mechanism.GAUSSIAN_FEATURE_SUM, 20.0, 5.0, relation), "feature-mean", 0),
             (PrivacyEvent(Mechanism.DP_SGD, 3.1, 0.25, 8, Neighbouring(relation), 1.0), "dp-sgd", 1),
             (PrivacyEvent(Mechanism.DP_SGD, 3.1, 0.25, 8, Neighbouring(relation), 1.0), "dp-sgd", 2)]
    if relation == "replace-one":
        kinds = kinds[1:]  # under replace-one the count is public: no count release
    rel = (dp_accounting.NeighboringRelation.REPLACE_ONE if relation == "replace-one"
           else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    independent = (RdpAccountant(OPACUS_RDP_ORDERS) if accountant == "rdp"
                   else PLDAccountant(neighboring_relation=rel, value_discretization_interval=1e-4))
    for event, release, rnd in kinds:
        entry = ledger.append(entry_fields(event, site="s", run_id="r", round=rnd, delta=DELTA,
                                           accountant=accountant, release=release), key)
        assert entry["mechanism"] == event.mechanism.value
        if event.mechanism is Mechanism.DP_SGD:
            independent.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)), event.steps))
        else:
            independent.compose(dp_accounting.GaussianDpEvent(event.noise_multiplier))
        want = independent.get_epsilon(DELTA)
        assert entry["epsilon"] >= want * (1 - 1e-9)  # never below: over-count at most
        assert entry["epsilon"] == pytest.approx(want, rel=1e-3 if accountant == "pld" else 1e-9)
    result = audit(tmp_path / "ledger.jsonl", ledger_keys_dir=None)
    assert [row["mechanism"] for row in result.entries] == [e.mechanism.value for e, _, _ in kinds]
    assert not any(row["flag"] for row in result.entries)

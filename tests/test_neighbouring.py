"""privacy.neighbouring: add-remove with the record count protected, replace-one with n public.

Under add-remove a deployed site releases its count once per dataset with Gaussian noise,
spends it in its ledger before it leaves, and computes everything else that depends on n
from the noisy count; under replace-one it sends n and accounts under replace-one. The
accountant, the ledger, the coordinator's books and the audit all state the relation and
recompute under it."""

from __future__ import annotations

import base64
import json

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedshield import protocol
from fedshield.privacy import signing
from fedshield.privacy.accountant import (
    PLD_RECORD_INTERVAL,
    REPLACE_ONE,
    Spend,
    calibrate_noise_multiplier,
    epsilon,
    epsilon_dp_accounting_pld,
)
from fedshield.privacy.errors import LedgerError
from fedshield.privacy.ledger import Ledger, entry_hash, verify_ledger
from fedshield.privacy.ledger_check import LedgerCheck
from fedshield.task.trainer import batches_per_epoch, poisson_rate
from tests.helpers import synthetic_rows, write_csv
from tests.test_site_policy import ask_to_train, coordinator_plan, deployed, spent

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

HISTORY = [Spend(4.0, 1.0, 1), Spend(3.04, 0.5, 80)]


# ------------------------------------------------------------ the accountant


def test_replace_one_is_dp_accountings_pld_under_replace_one_and_larger_than_add_remove():
    acc = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                        value_discretization_interval=PLD_RECORD_INTERVAL)
    for s in HISTORY:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)),
            s.steps))
    theirs = acc.get_epsilon(1e-5)
    for accountant in ("rdp", "prv"):  # replace-one has one analysis, whatever the accountant
        assert epsilon(HISTORY, 1e-5, accountant, REPLACE_ONE) == pytest.approx(theirs, rel=1e-12)
    assert theirs > 1.5 * epsilon_dp_accounting_pld(HISTORY, 1e-5)  # about twice the add-remove ε


def test_calibration_under_replace_one_reaches_the_target_with_more_noise():
    before = [Spend(4.0, 1.0, 1)]
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80, before=before, neighbouring=REPLACE_ONE)
    spent_eps = epsilon([*before, Spend(sigma, 0.5, 80)], 1e-5, "rdp", REPLACE_ONE)
    assert 7.9 < spent_eps <= 8.0
    assert sigma > calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80, before=before)


# ------------------------------------------------------------ the ledger


def entry(relation: str, round_: int = 1) -> dict:
    return {"run_id": "r", "round": round_, "site": "a", "noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 4,
            "max_grad_norm": 0.1, "delta": 1e-5, "accountant": "rdp", "neighbouring": relation}


def test_a_chain_is_accounted_under_one_relation(tmp_path):
    key = signing.generate_site_key(tmp_path / "a.key") and signing.load_private_key(tmp_path / "a.key")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    first = ledger.append(entry(REPLACE_ONE), key)
    assert first["epsilon"] == pytest.approx(epsilon([Spend(2.0, 0.5, 4)], 1e-5, "rdp", REPLACE_ONE))
    with pytest.raises(LedgerError, match="accounted under replace-one; a spend under add-remove cannot join"):
        ledger.append(entry("add-remove", 2), key)
    with pytest.raises(LedgerError, match="neighbouring 'swap-two'"):
        ledger.append(entry("swap-two", 2), key)
    # A chain that switches relation (written by hand, validly signed) fails verification.
    e0 = Ledger(tmp_path / "other.jsonl").append(entry("add-remove"), key)
    e1 = {**e0, "neighbouring": REPLACE_ONE, "seq": 1, "run_seq": 1, "prev_hash": e0["hash"], "round": 2}
    e1["hash"] = entry_hash(e1)
    e1["signature"] = base64.b64encode(signing.sign(key, e1["hash"].encode())).decode()
    verdict = verify_ledger([e0, e1], {"a": key.public_key()})
    assert not verdict.ok and "accounted under replace-one after spends under add-remove" in verdict.reason


def test_the_coordinator_refuses_entries_under_another_relation(tmp_path):
    key = signing.generate_site_key(tmp_path / "a.key") and signing.load_private_key(tmp_path / "a.key")
    written = Ledger(tmp_path / "ledger.jsonl").append(entry(REPLACE_ONE), key)
    books = LedgerCheck("r", {"a": key.public_key()}, dp=True, delta=1e-5, accountant="rdp")
    verdict = books.check("a", 1, [written], None)
    assert verdict.problem == "a ledger entry is accounted under replace-one; the run's relation is add-remove"
    books = LedgerCheck("r", {"a": key.public_key()}, dp=True, delta=1e-5, accountant="rdp", neighbouring=REPLACE_ONE)
    assert books.check("a", 1, [written], None).problem is None


# ------------------------------------------------------------ the site


def hello(plan, context):
    import fedshield.client.app as site

    return protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context))


def test_a_site_releases_a_noisy_count_once_and_derives_everything_from_it(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))
    plan, weights = coordinator_plan(tiny_bert, data, tmp_path)
    first = hello(plan, deployed(tmp_path, data))
    assert isinstance(first, protocol.SiteHello)
    [count] = first.ledger_entries
    assert count["release"] == "record-count" and count["neighbouring"] == "add-remove"
    assert (count["noise_multiplier"], count["sample_rate"], count["steps"]) == (10.0, 1.0, 1)
    assert count["max_grad_norm"] == 1.0  # the count's sensitivity
    assert count["released_count"] == first.num_examples and abs(first.num_examples - 200) < 60
    # Noisy (std 10) and from os.urandom at a deployed site: five fresh sites do not all say 200
    # (each rounds to it with probability 0.04).
    fresh = [hello(plan, deployed(tmp_path / f"fresh-{i}", data)).num_examples for i in range(5)]
    assert len(set(fresh + [first.num_examples])) > 1 and set(fresh) != {200}
    # The exact count is in no field (the noisy one may round to it: 4%; hex digests may hold "200").
    assert 200 not in [v for k, v in count.items() if k != "released_count"]
    assert spent(tmp_path) == [count]  # in the ledger before it left

    # Asked again (this run after a restart, or any later run): the same count, no new spend;
    # the entry goes with every hello (a later run's: as the signed proof, not a new spend).
    again = hello(plan, deployed(tmp_path, data))
    assert again.num_examples == first.num_examples and again.ledger_entries == first.ledger_entries
    later = protocol.plan_record(**{**_plan_args(plan), "run_id": "run-2"})
    assert hello(later, deployed(tmp_path, data)).ledger_entries == first.ledger_entries and len(spent(tmp_path)) == 1

    # Training: q, steps and the reply's count are the noisy count's, never the exact one's.
    reply = ask_to_train(plan, weights, deployed(tmp_path, data))
    assert isinstance(reply, protocol.TrainReply) and reply.num_examples == first.num_examples
    [train] = reply.ledger_entries
    tr = plan_training(plan)
    assert train["sample_rate"] == poisson_rate(first.num_examples, tr["batch_size"])
    assert train["steps"] == tr["local_epochs"] * batches_per_epoch(first.num_examples, tr["batch_size"])
    # σ was calibrated with the count's spend (this run's other release) inside the target.
    assert train["accountant"] == "pld"  # the default: dp-accounting's PLD
    assert train["epsilon"] <= 8.0 and train["epsilon"] == pytest.approx(
        epsilon([Spend(10.0, 1.0, 1), Spend(train["noise_multiplier"], train["sample_rate"], train["steps"])],
                1e-5, "pld"), rel=1e-9)

    # Other data for the next run (the site's file replaced, the same state folder): a new
    # count, spent anew.
    grown = write_csv(tmp_path / "site-v2.csv", synthetic_rows(201, seed=3))
    third = hello(protocol.plan_record(**{**_plan_args(plan), "run_id": "run-3"}), deployed(tmp_path, grown))
    assert len(third.ledger_entries) == 1 and third.ledger_entries[0]["hash"] != count["hash"]


def test_under_replace_one_the_exact_count_is_sent_and_accounted_so(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))
    plan, weights = coordinator_plan(tiny_bert, data, tmp_path, **{"privacy.neighbouring": "replace-one"})
    context = deployed(tmp_path, data, **{"privacy.neighbouring": "replace-one"})
    got = hello(plan, context)
    assert got.num_examples == 200 and got.ledger_entries == () and spent(tmp_path) == []
    reply = ask_to_train(plan, weights, context)
    [train] = reply.ledger_entries
    assert train["neighbouring"] == "replace-one"
    assert train["sample_rate"] == poisson_rate(200, plan_training(plan)["batch_size"])
    assert train["epsilon"] == pytest.approx(epsilon(
        [Spend(train["noise_multiplier"], train["sample_rate"], train["steps"])], 1e-5, "rdp", REPLACE_ONE), rel=1e-9)
    assert train["epsilon"] <= 8.0
    # The same site asked to add an add-remove spend to its replace-one ledger refuses.
    plan2, _ = coordinator_plan(tiny_bert, data, tmp_path)
    got = hello(plan2, deployed(tmp_path, data, **{"privacy.neighbouring": "add-remove"}))
    assert isinstance(got, protocol.Decline) and got.kind == "policy"
    assert "this site's ledger is accounted under 'replace-one'" in got.reason


def _plan_args(plan) -> dict:
    return {"config_yaml": plan[protocol.CONFIG_YAML], "run_id": plan[protocol.RUN_ID],
            "run_dir": plan[protocol.RUN_DIR], "frozen_fingerprint": plan[protocol.FROZEN_FINGERPRINT],
            "class_names": list(plan[protocol.CLASS_NAMES])}


def plan_training(plan) -> dict:
    from fedshield import conf

    cfg = conf.from_yaml(plan[protocol.CONFIG_YAML])
    return {"batch_size": int(cfg.training.batch_size), "local_epochs": int(cfg.training.local_epochs)}


# ------------------------------------------------------------ the coordinator and the audit


def test_the_coordinator_refuses_a_count_release_that_is_not_the_declared_count(tmp_path):
    from fedshield.server.app import check_released_counts

    key = signing.generate_site_key(tmp_path / "a.key") and signing.load_private_key(tmp_path / "a.key")
    release = Ledger(tmp_path / "ledger.jsonl").append({
        **entry("add-remove", 0), "noise_multiplier": 10.0, "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0,
        "release": "record-count", "released_count": 150}, key)
    for declared, joins in ((150, True), (151, False)):
        books = LedgerCheck("r", {"a": key.public_key()}, dp=True, delta=1e-5, accountant="rdp")
        sites, refused = {7: {"site": "a", "n": declared, "entries": (release,)}}, []
        counted, apart = check_released_counts(sites, books, refused)
        assert (7 in sites) is joins
        if joins:
            assert counted == [("a", (release,))] and apart == [] and refused == []
        else:
            assert counted == [] and apart == [("a", (release,))]
            assert refused == ["site a: not joining: its record-count release was refused: its count release does "
                               "not say the 151 records it declared"]


def test_the_audit_recomputes_under_the_entries_relation_and_a_changed_relation_fails(tmp_path):
    from fedshield.privacy.audit import audit

    key = signing.generate_site_key(tmp_path / "a.key") and signing.load_private_key(tmp_path / "a.key")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "a.pub").write_bytes(signing.public_key_pem(key))
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for r in (1, 2, 3):
        ledger.append(entry(REPLACE_ONE, r), key)
    result = audit(ledger.path, tmp_path / "keys")
    assert result.ok, result.flags
    site = result.sites["a"]
    assert site.neighbouring == REPLACE_ONE
    assert site.pld_epsilon == pytest.approx(epsilon([Spend(2.0, 0.5, 12)], 1e-5, "rdp", REPLACE_ONE), rel=1e-9)
    assert all(row["neighbouring"] == REPLACE_ONE and row["rdp"] is None for row in result.entries)
    # Claiming the smaller add-remove ε for the same spends breaks the signed hash.
    lines = ledger.path.read_text().splitlines()
    last = json.loads(lines[-1])
    last["neighbouring"] = "add-remove"
    ledger.path.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert not audit(ledger.path, tmp_path / "keys").ok

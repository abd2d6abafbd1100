"""A site's privacy state: ε composes across rounds and restarts; the budget is the site's."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedshield.client.site import SiteState
from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend, epsilon, epsilon_dp_accounting_rdp
from fedshield.privacy.errors import FedShieldError
from tests.helpers import train_message


def _entry(site: str, run: str, rnd: int, spend: Spend, eps: float) -> dict:
    return {
        "run_id": run, "round": rnd, "site": site, "mechanism": "dp-sgd-poisson-gaussian",
        "privacy_unit": "record", "noise_multiplier": spend.noise_multiplier,
        "sample_rate": spend.sample_rate, "steps": spend.steps, "max_grad_norm": 1.0,
        "delta": 1e-5, "accountant": "rdp", "epsilon": eps,
    }


def _spend_rounds(state: SiteState, spend: Spend, rounds: range, run: str = "run-1") -> list[float]:
    eps = []
    for r in rounds:
        history = state.history() + [spend]
        e = epsilon(history, 1e-5)
        state.record_spend(_entry(state.site, run, r, spend, e))
        eps.append(e)
    return eps


def test_epsilon_grows_every_round_and_survives_a_restart(tmp_path):
    spend = Spend(1.1, 0.25, 4)
    state = SiteState(tmp_path / "site", "st-marys")
    first = _spend_rounds(state, spend, range(1, 4))
    assert all(b > a for a, b in zip(first, first[1:], strict=False))
    # Restart: a new process reads the same folder and continues from where it was.
    again = SiteState(tmp_path / "site", "st-marys")
    assert again.history() == [spend] * 3
    assert again.epsilon(1e-5, "rdp") == pytest.approx(first[-1])
    later = _spend_rounds(again, spend, range(4, 6), run="run-2")  # a later run adds, never resets
    assert later[0] > first[-1]
    assert later[-1] == pytest.approx(epsilon_dp_accounting_rdp([spend] * 5, 1e-5), rel=1e-9)


def test_site_key_is_private_and_kept(tmp_path):
    state = SiteState(tmp_path / "site", "a")
    mode = stat.S_IMODE((tmp_path / "site" / "site.key").stat().st_mode)
    assert mode == 0o600
    pem = state.public_key_pem()
    assert SiteState(tmp_path / "site", "a").public_key_pem() == pem


def test_budget_check_declines_a_round_that_would_cross_and_survives_restart(tmp_path):
    spend = Spend(0.8, 0.5, 10)
    state = SiteState(tmp_path / "site", "bank-1")
    budget = epsilon([spend] * 2, 1e-5) + 1e-3  # room for exactly two rounds
    for r in (1, 2):
        decision = state.check_budget(spend, budget, 1e-5, "rdp")
        assert decision.ok
        _spend_rounds(state, spend, range(r, r + 1))
    decision = state.check_budget(spend, budget, 1e-5, "rdp")
    assert not decision.ok
    assert "budget" in decision.reason and f"{budget:g}" in decision.reason
    assert decision.epsilon_after > budget >= decision.epsilon_now
    restarted = SiteState(tmp_path / "site", "bank-1")
    assert not restarted.check_budget(spend, budget, 1e-5, "rdp").ok


def test_noise_calibration_is_kept_per_run(tmp_path):
    state = SiteState(tmp_path / "site", "s")
    sigma = state.noise_multiplier("run-a", 8.0, 1e-5, 0.25, 4, 5, "rdp")
    assert epsilon([Spend(sigma, 0.25, 20)], 1e-5) <= 8.0
    saved = json.loads((tmp_path / "site" / "runs" / "run-a.json").read_text())
    assert saved["noise_multiplier"] == sigma
    assert SiteState(tmp_path / "site", "s").noise_multiplier("run-a", 8.0, 1e-5, 0.25, 4, 5, "rdp") == sigma


def test_noise_calibration_leaves_room_for_the_runs_feature_mean_release(tmp_path):
    state = SiteState(tmp_path / "site", "s")
    release = Spend(4.0, 1.0, 1)
    alone = state.noise_multiplier("run-a", 8.0, 1e-5, 0.25, 4, 5, "rdp")
    sigma = state.noise_multiplier("run-b", 8.0, 1e-5, 0.25, 4, 5, "rdp", before=[release])
    assert sigma > alone
    assert epsilon([release, Spend(sigma, 0.25, 20)], 1e-5) <= 8.0 < epsilon([release, Spend(alone, 0.25, 20)], 1e-5)
    # A restarted site keeps it; a plan with another release is calibrated again.
    assert SiteState(tmp_path / "site", "s").noise_multiplier("run-b", 8.0, 1e-5, 0.25, 4, 5, "rdp",
                                                              before=[release]) == sigma
    assert state.noise_multiplier("run-b", 8.0, 1e-5, 0.25, 4, 5, "rdp", before=[]) == pytest.approx(alone)


def test_torn_ledger_line_is_set_aside_and_reported(tmp_path):
    state = SiteState(tmp_path / "site", "s")
    _spend_rounds(state, Spend(1.0, 0.1, 10), range(1, 3))
    ledger = tmp_path / "site" / "ledger.jsonl"
    with open(ledger, "a") as f:
        f.write('{"run_id": "run-1", "round": 3, "si')  # the process died mid-write
    restarted = SiteState(tmp_path / "site", "s")
    assert len(restarted.history()) == 2
    assert restarted.recovery_message
    assert list((tmp_path / "site").glob("ledger.jsonl.torn-*"))


def test_the_coordinators_plan_cannot_raise_a_sites_budget():
    """In deployment the site's own policy bounds the plan: a plan asking for a larger
    budget is refused; a stricter one is used; what is not policy is the site's own."""
    from fedshield import conf
    from fedshield.client.app import PolicyError, site_config

    node = {"site-name": "st-marys", "privacy.budget_epsilon": 2.0, "privacy.target_epsilon": 2.0,
            "privacy.delta": 1e-6, "training.device": "cpu"}
    with pytest.raises(PolicyError, match="privacy.budget_epsilon=100: above this site's 2"):
        site_config(Config.load(["privacy.budget_epsilon=100", "privacy.target_epsilon=1",
                                      "privacy.delta=1e-6"]), node)
    strict = site_config(Config.load(["privacy.target_epsilon=1", "privacy.delta=1e-7"]), node)
    assert strict.privacy.target_epsilon == 1 and strict.privacy.delta == 1e-7  # the plan's, stricter
    assert strict.training.device == "cpu"  # the site's operational setting
    with pytest.raises(conf.ConfigError, match="cannot be set by a site"):
        site_config(Config.load([]), {"federation.rounds": 3})
    loose = Config.load(["privacy=none"])
    assert site_config(loose, {}, deployed=False).privacy.mode == "none"  # a simulation's one config


def test_node_config_round_trips_through_flowers_parser():
    """What `fedshield client` hands flower-supernode is read back exactly, odd paths included."""
    from flwr.common.config import parse_config_args

    from fedshield.client.cli import node_config

    line = node_config("st-marys", Path(r"/secure/notes dir\2026.csv"), Path("/var/lib/fedshield"),
                       {"privacy.budget_epsilon": 4.0, "privacy.mode": "dp-sgd"})
    assert parse_config_args([line]) == {
        "site-name": "st-marys", "data-path": r"/secure/notes dir\2026.csv",
        "state-dir": "/var/lib/fedshield", "privacy.budget_epsilon": 4.0, "privacy.mode": "dp-sgd",
    }
    with pytest.raises(FedShieldError, match="single quotes"):
        node_config("st-marys", Path("/x/o'brien.csv"), Path("/s"), {})


def test_a_kept_release_is_replayed_only_for_the_same_request_and_a_spend_in_the_ledger(tmp_path):
    """After a coordinator restart the site re-sends its last reply instead of spending again:
    only for the same run, round and input, and (DP) only if its ledger holds the spend of that
    very request (an entry of that round whose plan_digest is the request's)."""
    import numpy as np

    state = SiteState(tmp_path / "site", "s")
    arrays = {"w": np.arange(4, dtype=np.float32)}
    meta = {"num_examples": 10}
    state.save_release("run-1", 3, "digest-a", arrays, meta)
    assert state.stored_release("run-1", 3, "digest-a", dp=True) is None  # kept, but its spend never recorded
    assert state.stored_release("run-1", 3, "digest-a", dp=False)[1] == meta  # no DP: nothing to spend
    spend = {"run_id": "run-1", "round": 3, "site": "s", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2,
             "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp", "release": "dp-sgd"}
    state.record_spend({**spend, "plan_digest": "digest-b"})
    assert state.stored_release("run-1", 3, "digest-a", dp=True) is None  # another request's spend: never re-used
    entry = state.record_spend({**spend, "plan_digest": "digest-a"})
    restarted = SiteState(tmp_path / "site", "s")
    got = restarted.stored_release("run-1", 3, "digest-a", dp=True)
    assert got is not None and got[1] == meta and got[2] == [entry]
    np.testing.assert_array_equal(got[0]["w"], arrays["w"])
    assert restarted.stored_release("run-1", 3, "digest-b", dp=True) is None  # other global weights: train anew
    assert restarted.stored_release("run-1", 4, "digest-a", dp=True) is None
    assert restarted.stored_release("run-2", 3, "digest-a", dp=True) is None
    path = tmp_path / "site" / "runs" / "run-1.release.npz"
    path.write_bytes(path.read_bytes()[:50])  # torn by a crash
    assert SiteState(tmp_path / "site", "s").stored_release("run-1", 3, "digest-a", dp=True) is None


# ------------------------------------------------------------ the site's own books


def _books(tmp_path, rounds=4) -> Path:
    state = SiteState(tmp_path / "site", "st-marys")
    _spend_rounds(state, Spend(1.1, 0.25, 4), range(1, rounds + 1))
    return tmp_path / "site" / "ledger.jsonl"


def _rewrite(path: Path, change) -> None:
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("".join(x + "\n" for x in lines))


@pytest.mark.parametrize("damage, says", [
    (lambda lines: lines.__setitem__(1, lines[1].replace('"noise_multiplier":1.1', '"noise_multiplier":1.9')),
     "its hash does not match its contents"),
    (lambda lines: lines.pop(), "its last entries were cut off"),
    (lambda lines: (lines.pop(), lines.pop()), "its last entries were cut off"),
    (lambda lines: lines.pop(0), "starts at seq 1, not 0"),
    (lambda lines: lines.__setitem__(2, lines[1]), "removed, inserted or reordered"),
])
def test_a_site_refuses_books_that_do_not_verify(tmp_path, damage, says):
    from fedshield.privacy.errors import LedgerError

    ledger = _books(tmp_path)
    _rewrite(ledger, damage)
    with pytest.raises(LedgerError, match="restore ledger.jsonl") as err:
        SiteState(tmp_path / "site", "st-marys")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_forged_entry_and_a_missing_or_forged_head_are_refused(tmp_path):
    import base64

    from fedshield.privacy import signing
    from fedshield.privacy.errors import LedgerError
    from fedshield.privacy.ledger import entry_hash

    ledger = _books(tmp_path)
    signing.generate_site_key(tmp_path / "other.key")
    other = signing.load_private_key(tmp_path / "other.key")

    def forge(lines):
        e = json.loads(lines[-1])
        e["epsilon"] = 0.1  # a lower ε, re-hashed, signed with another key
        e["hash"] = entry_hash(e)
        e["signature"] = base64.b64encode(signing.sign(other, e["hash"].encode())).decode()
        lines[-1] = json.dumps(e, sort_keys=True, separators=(",", ":"))

    original = ledger.read_text()
    _rewrite(ledger, forge)
    with pytest.raises(LedgerError, match="signature does not verify"):
        SiteState(tmp_path / "site", "st-marys")
    ledger.write_text(original)
    head = ledger.with_name("ledger.jsonl.head")
    saved = head.read_text()
    head.unlink()
    with pytest.raises(LedgerError, match="head record ledger.jsonl.head is missing"):
        SiteState(tmp_path / "site", "st-marys")
    head.write_text(saved.replace('"seq":3', '"seq":2').replace('"seq": 3', '"seq": 2'))
    with pytest.raises(LedgerError, match="not signed by the site's key"):
        SiteState(tmp_path / "site", "st-marys")
    head.write_text(saved)
    assert len(SiteState(tmp_path / "site", "st-marys").history()) == 4  # restored from a backup: trains again


def test_a_crash_between_the_entry_and_its_head_is_not_tampering(tmp_path):
    ledger = _books(tmp_path, rounds=3)
    head = ledger.with_name("ledger.jsonl.head")
    before = head.read_text()
    state = SiteState(tmp_path / "site", "st-marys")
    _spend_rounds(state, Spend(1.1, 0.25, 4), range(4, 5))
    head.write_text(before)  # the process died after the entry, before the head
    assert len(SiteState(tmp_path / "site", "st-marys").history()) == 4


@pytest.mark.usefixtures("flower_task_identity")
def test_a_site_with_damaged_books_releases_nothing(tiny_bert, tmp_path):
    """Through the ClientApp: the train message is declined and the ledger is not touched."""
    from flwr.app import Context, RecordDict

    import fedshield.client.app as site
    from fedshield import protocol
    from tests.helpers import synthetic_rows, tiny_overrides, write_csv

    data = write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))
    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{"privacy.delta": 1e-5,
                                                                        "training.center_features": False}))
    state = SiteState(tmp_path / "state", "st-marys")
    _spend_rounds(state, Spend(1.1, 0.25, 4), range(1, 3), run="old-run")
    ledger = tmp_path / "state" / "ledger.jsonl"
    _rewrite(ledger, lambda lines: lines.pop())  # a local attacker erases the last spend
    damaged = ledger.read_bytes()
    msg = train_message(cfg, "run-2")
    context = Context(run_id=7, node_id=1, node_config={"site-name": "st-marys", "data-path": str(data),
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    got = protocol.read_train_reply(site.train(msg, context), {})
    assert isinstance(got, protocol.Decline) and "LedgerError" in got.reason
    assert ledger.read_bytes() == damaged  # nothing spent, nothing released


def test_fedshield_audit_site_checks_the_books_are_whole(tmp_path, capsys):
    from fedshield.privacy.cli import audit_main

    ledger = _books(tmp_path)
    state = tmp_path / "site"
    assert audit_main(["--site", str(state), "--out", str(tmp_path / "audit")]) == 0
    assert "is whole from seq 0" in capsys.readouterr().out
    _rewrite(ledger, lambda lines: lines.pop())  # cut the last spend: a chain alone still verifies
    assert audit_main([str(state), "--out", str(tmp_path / "audit2")]) == 0  # the plain audit cannot see it
    assert audit_main(["--site", str(state), "--out", str(tmp_path / "audit3")]) == 1
    assert "its last entries were cut off" in capsys.readouterr().err
    assert audit_main(["--site", str(state), str(state)]) == 2


def test_a_site_prepares_the_next_rounds_budget_check_and_the_check_itself_is_unchanged(tmp_path):
    """`prepare_next_check` (a batched worker's wait between rounds) computes the ε that the
    last budget check would compute for the same spend on today's history: next round's
    check finds it in the accountant's cache. A plan that changed computes its own, with
    the same decision as a site that prepared nothing."""
    from fedshield.privacy import accountant

    spend = Spend(1.3, 0.3, 7)
    state = SiteState(tmp_path / "site", "clinic")
    state.prepare_next_check()  # no check yet: nothing to prepare
    budget = 50.0
    assert state.check_budget(spend, budget, 1e-5, "pld").ok
    _spend_rounds(state, spend, range(1, 2))
    before = accountant._dp_pld_cached.cache_info()
    state.prepare_next_check()
    prepared = accountant._dp_pld_cached.cache_info()
    assert prepared.misses == before.misses + 1
    state.prepare_next_check()  # once per history
    assert accountant._dp_pld_cached.cache_info().misses == prepared.misses
    decision = state.check_budget(spend, budget, 1e-5, "pld")
    after = accountant._dp_pld_cached.cache_info()
    assert after.misses == prepared.misses and after.hits > prepared.hits
    assert decision.epsilon_after == epsilon([spend] * 2, 1e-5, "pld")
    changed = Spend(0.9, 0.3, 7)
    fresh = SiteState(tmp_path / "site", "clinic")
    assert state.check_budget(changed, budget, 1e-5, "pld") == fresh.check_budget(changed, budget, 1e-5, "pld")


def test_a_sites_books_keep_its_spends_grouped_as_the_accountants_read_them(tmp_path):
    """A site's ε, its budget checks and each entry's recorded ε read its spends as the
    accountants group them, kept up to date as entries are appended or read (client/site.py
    `SiteState._tally`, privacy/ledger.py `Ledger._chain_totals`): over runs of different σ,
    a restart, and an entry another process appended, they are exactly what the history
    gives counted afresh, in all and per run."""
    from fedshield.privacy.ledger import chain_epsilon

    a, b, c = Spend(1.1, 0.25, 4), Spend(2.5, 0.5, 2), Spend(0.9, 1.0, 1)
    state = SiteState(tmp_path / "site", "st-marys")
    for r, (run, spend) in enumerate([("run-1", c), ("run-1", a), ("run-1", a), ("run-2", b), ("run-2", a)]):
        state.record_spend(_entry(state.site, run, r, spend, 0.0))

    def afresh(s: SiteState) -> None:
        history = s.history()
        for accountant in ("rdp", "pld"):
            assert s.epsilon(1e-5, accountant) == epsilon(history, 1e-5, accountant)
            assert s.epsilon_after(b, 1e-5, accountant) == epsilon([*history, b], 1e-5, accountant)
        for run in ("run-1", "run-2", "run-9"):
            decision = s.check_budget(b, 100.0, 1e-5, "rdp", run_id=run, run_target=1e-3, run_assumed=[c])
            assert not decision.ok and decision.epsilon_after == epsilon([*s.run_history(run), c, b], 1e-5, "rdp")
            assert decision.epsilon_now == epsilon(history, 1e-5, "rdp")
        entries = s.entries()
        for n in range(1, len(entries) + 1):  # each entry's ε: its chain up to it, counted afresh
            assert entries[n - 1]["epsilon"] == chain_epsilon(entries[:n], 1e-5)

    afresh(state)
    restarted = SiteState(tmp_path / "site", "st-marys")  # read from the file: counted as read
    afresh(restarted)
    restarted.record_spend(_entry(state.site, "run-2", 6, b, 0.0))  # another process's append
    state.refresh()
    state.record_spend(_entry(state.site, "run-2", 7, c, 0.0))  # after it: the chain as on file
    afresh(state)
    assert state.entries()[-1]["epsilon"] == chain_epsilon(state.entries(), 1e-5)

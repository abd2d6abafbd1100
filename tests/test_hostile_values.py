"""Issue 21 items 1, 2, 7, 9: no value a site signs can crash or stall the coordinator.

Each value below once crashed or stalled a run (the issue's battery); here each is refused
alone, in one line, at once, by the coordinator's public checks:

    401-digit σ or ε in a signed entry       OverflowError in math.isfinite / float()
    a "late" earlier-round entry, 1e9 steps  it bypassed the plan check (250 GiB in the accountant)
    a count release at σ = 0.001 or 0.05     the accountant's cost grows with ε (7.6 GiB at 0.001)
    σ = 0.01 (152 s), ε in the thousands     refused by a floor / a cheap RDP estimate first
    n = 2^31 - 1                             a plan of 2e8 steps a round: refused at discovery
    a feature sum of 1e300                   finite in float64, inf in the float32 centre
    n = 10^6 and a x1000 update              its FedAvg weight capped, the bound on its share
    a hello without its count release        refused under add-remove
    a name with a trailing newline, ESC      refused / escaped before any terminal or report

tests/test_hostile_values_e2e.py sends the same values from real sites in one simulation.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedshield import protocol
from fedshield.privacy.accountant import Spend, epsilon
from fedshield.privacy.ledger import verify_ledger
from fedshield.privacy.ledger_check import Expected, LedgerCheck, plan_problem
from fedshield.task import centering
from tests.test_ledger_check import DELTA, PLAN, Site, _resigned, books
from tests.test_site_aware import SITES, run, trains

pytestmark = [pytest.mark.timeout(120),  # the attacks below once ran for minutes or ran out of memory
              pytest.mark.usefixtures("flower_task_identity")]  # tests/conftest.py: messages built here

HUGE = 10**400  # 401 digits: valid JSON, an OverflowError for float()


# ------------------------------------------------------------ signed entries (items 1, 2)


@pytest.mark.parametrize("field", ["noise_multiplier", "epsilon", "sample_rate", "max_grad_norm", "delta"])
def test_a_401_digit_number_in_a_signed_entry_is_refused_in_one_line(tmp_path, field):
    site = Site(tmp_path)
    lie = _resigned(site, site.spend(1), **{field: HUGE})
    verdict = books(site).check(site.name, 1, [lie], PLAN)  # raised OverflowError before
    assert verdict.problem is not None and "\n" not in verdict.problem and len(verdict.problem) < 400
    assert not verify_ledger([lie], {site.name: site.public}).ok


def test_a_late_entry_is_held_to_the_plan_of_its_own_round(tmp_path):
    site = Site(tmp_path)
    check = books(site)
    assert check.check(site.name, 1, [site.spend(1)], PLAN).problem is None
    # Round 3's reply carries a "late" round-2 spend of one step more than round 2's plan:
    # an entry of an earlier round was recorded without any check of what it spent.
    late, now = site.spend(2, steps=PLAN.steps + 1), site.spend(3)
    problem = check.check(site.name, 3, [late, now], PLAN).problem
    assert problem is not None and "late ledger entries of round 2" in problem and "asks 4 steps" in problem
    honest = Site(tmp_path, "honest")  # a late spend within its round's plan is recorded
    check = books(honest)
    assert check.check(honest.name, 1, [honest.spend(1)], PLAN).problem is None
    assert check.check(honest.name, 3, [honest.spend(2), honest.spend(3)], PLAN).problem is None


def test_a_late_entry_of_a_billion_steps_is_refused_before_any_accounting(tmp_path):
    site = Site(tmp_path)
    check = books(site)
    first = site.spend(1)
    assert check.check(site.name, 1, [first], PLAN).problem is None
    late = _resigned(site, site.spend(1), steps=10**9)  # 250 GiB in the PLD accountant before
    now = _resigned(site, site.spend(2), prev_hash=late["hash"])
    problem = check.check(site.name, 2, [late, now], PLAN).problem
    assert problem is not None and ("1000000000 steps" in problem or "do not verify" in problem)
    # and the plan of a round-0 release is one full-batch step
    zero = Site(tmp_path, "zero")
    check = books(zero)
    release = zero.spend(0, sigma=10.0, q=1.0, steps=1)
    assert check.check(zero.name, 0, [release], Expected(1.0, 1)).problem is None
    problem = check.check(zero.name, 1, [zero.spend(0, sigma=10.0, q=1.0, steps=2), zero.spend(1)], PLAN).problem
    assert problem is not None and "round 0" in problem


@pytest.mark.parametrize("sigma", [0.001, 0.01, 0.05])
def test_a_noise_multiplier_below_any_honest_plan_is_refused_before_its_cost(tmp_path, sigma):
    site = Site(tmp_path)
    # A count release (q = 1, one step): σ = 0.001 cost 7.6 GiB, σ = 0.01 152 s, 0.05 3 s.
    lie = _resigned(site, site.spend(0, sigma=10.0, q=1.0, steps=1), noise_multiplier=sigma, epsilon=1e9)
    problem = books(site).check(site.name, 0, [lie], Expected(1.0, 1)).problem
    assert problem is not None and f"below the {0.1:g}" in problem


def test_spends_whose_epsilon_is_past_any_meaning_are_refused_by_a_cheap_estimate(tmp_path):
    site = Site(tmp_path)
    plan = Expected(1.0, 200)  # σ = 0.2 at q = 1 for 200 steps: ε in the thousands, a PLD of seconds
    lie = _resigned(site, site.spend(1, sigma=10.0, q=1.0, steps=200), noise_multiplier=0.2, epsilon=1e9)
    problem = books(site).check(site.name, 1, [lie], plan).problem
    assert problem is not None and "(RDP), above the 1000" in problem


def test_whatever_goes_wrong_inside_a_check_refuses_that_site_not_the_run(tmp_path, monkeypatch):

    def out_of_memory(*args, **kwargs):  # what the accountant did with σ = 0.001 (7.6 GiB)
        raise MemoryError

    import fedshield.privacy.ledger_check
    monkeypatch.setattr(fedshield.privacy.ledger_check, "epsilon", out_of_memory)
    site = Site(tmp_path)
    check = books(site)
    assert check.check(site.name, 1, [site.spend(1)], PLAN).problem == \
        "its ledger entries could not be checked (MemoryError)"
    assert check.accepted[site.name] == []


def test_a_declared_count_whose_plan_costs_too_much_to_check_is_refused():
    n = 2**31 - 1
    from fedshield.task.trainer import batches_per_epoch, poisson_rate

    problem = plan_problem(Expected(poisson_rate(n, 128), batches_per_epoch(n, 128)))
    assert problem is not None and "more than the 1000000" in problem
    assert plan_problem(Expected(poisson_rate(100_000, 128), 3 * batches_per_epoch(100_000, 128))) is None


def test_the_runs_epsilon_is_recomputed_from_verified_entries_only(tmp_path):
    site = Site(tmp_path)
    check = books(site)
    over = _resigned(site, site.spend(1), epsilon=1e6)  # a site may over-state its own ε
    assert check.check(site.name, 1, [over], PLAN).problem is None
    assert check.run_epsilon(site.name) == pytest.approx(epsilon([Spend(1.1, 0.25, 4)], DELTA, "rdp"))
    assert check.run_epsilon("nobody") == 0.0


# ------------------------------------------------------------ the record count (item 7)


def _count_release(site, n, run="run-1"):
    return site.ledger.append({"run_id": run, "round": 0, "site": site.name, "noise_multiplier": 10.0,
                               "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0, "delta": DELTA,
                               "accountant": "rdp", "release": "record-count", "released_count": n}, site.key)


def test_a_hello_without_its_count_release_is_refused_under_add_remove(tmp_path):
    from fedshield.server.app import check_released_counts

    bare, honest, later = Site(tmp_path, "bare"), Site(tmp_path, "honest"), Site(tmp_path, "later")
    earlier = _count_release(later, 150, run="run-0")  # released in an earlier run, reused
    check = LedgerCheck("run-1", {s.name: s.public for s in (bare, honest, later)}, dp=True, delta=DELTA,
                        accountant="rdp")
    sites = {1: {"site": "bare", "n": 10**6, "entries": ()},
             2: {"site": "honest", "n": 150, "entries": (_count_release(honest, 150),)},
             3: {"site": "later", "n": 150, "entries": (earlier,)}}
    refused: list[str] = []
    counted, apart = check_released_counts(sites, check, refused)
    assert sorted(sites) == [2, 3]
    assert refused == ["site bare: not joining: its record-count release was refused: its hello carries no "
                       "record-count release: under add-remove a count is usable only with the signed release "
                       "that spent it"]
    assert [site for site, entries in counted if entries] == ["honest"]  # the earlier run's is not this run's
    # An earlier run's release must be the site's own, signed, and say the declared count.
    forged = dict(earlier, released_count=10**6)
    sites = {3: {"site": "later", "n": 10**6, "entries": (forged,)}}
    check_released_counts(sites, check, refused)
    assert sites == {} and "does not verify" in refused[-1]
    # Without DP, or under replace-one, the count is public: no release needed.
    public = LedgerCheck("run-1", {"bare": bare.public}, dp=True, delta=DELTA, accountant="rdp",
                         neighbouring="replace-one")
    sites = {1: {"site": "bare", "n": 150, "entries": ()}}
    check_released_counts(sites, public, [])
    assert 1 in sites


def test_a_huge_declared_count_cannot_take_the_average_nor_pass_the_bound_whole():
    """n = 10^6 with an update of norm 119.99 under update_norm_bound = 120 moved the global
    model by 119.99 in the attacker's direction; capped and bounded on its share, it moves
    it by at most bound / m."""
    sites = {101: "alpha", 202: "bravo", 303: "charlie", 404: "mallory"}
    records = {101: 100, 202: 100, 303: 100, 404: 10**6}
    behaviours = {s: trains(0.0, 100) for s in ("alpha", "bravo", "charlie")}
    behaviours["mallory"] = trains(119.99 / np.sqrt(3), 10**6)
    _, _, reports, result = run(behaviours, rounds=1, sites=sites, records=records, update_norm_bound=120.0)
    step = float(np.linalg.norm(result.arrays["w"].numpy()))
    assert step <= 120.0 / 4 * (1 + 1e-5)  # was 119.99 (float32 weights)
    assert reports[0].clipped() == ["mallory"]
    # Equal weights: nothing changes (each share is 1, the bound is the bound).
    even = {s: trains(1.0) for s in SITES.values()}
    _, _, reports, result = run(even, rounds=1, update_norm_bound=120.0)
    assert np.allclose(result.arrays["w"].numpy(), 1.0) and reports[0].clipped() == []


# ------------------------------------------------------------ feature sums (item 1)


def test_a_feature_sum_no_honest_site_can_send_is_not_used():
    bound = centering.sum_bound(100, 12.6, 4.0 * 12.6, 384)
    honest = np.full(384, 12.6 * 100 / np.sqrt(384))  # 100 features of the clip norm, all aligned
    assert centering.sum_problem(honest + np.random.default_rng(0).normal(0, 4.0 * 12.6, 384), bound) is None
    assert "more than the" in centering.sum_problem(np.full(384, 1e300), bound)  # inf in float32 before
    assert "more than the" in centering.sum_problem(np.full(384, 1e200), bound)  # its norm overflows
    assert "not finite" in centering.sum_problem(np.array([np.nan] * 384), bound)


# ------------------------------------------------------------ output hygiene (item 9)


def _hello(name: str):
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="r", run_dir="", frozen_fingerprint="",
                                class_names=["a"])
    msg = protocol.instruction(protocol.HELLO, plan, 1)
    return protocol.hello_reply(msg, site=name, num_examples=5, ledger_public_key="-----BEGIN PUBLIC KEY-----x")


def test_a_site_name_with_a_trailing_newline_is_refused():
    assert isinstance(protocol.read_hello(_hello("site-1")), protocol.SiteHello)
    for name in ("site-1\n", "site-1\r\n", "\nsite-1"):
        got = protocol.read_hello(_hello(name))
        assert isinstance(got, protocol.Rejected) and "is not valid" in got.reason and "\n" not in got.reason
    assert protocol.SITE_NAME.match("site-1\n") is None


def test_a_decline_cannot_drive_the_operators_terminal():
    reason = "\x1b[2J\x1b[31mall good\x1b[0m\r\u202eevil\x07"
    decline = protocol.decline_reply(protocol.instruction(protocol.HELLO, protocol.plan_record(
        config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"]), 1),
        site="site-1", kind="error", reason="x")
    decline.content[protocol.DECLINE][protocol.REASON] = reason  # what a hostile site sends, unfiltered
    got = protocol.read_hello(decline)
    assert isinstance(got, protocol.Decline)
    assert got.reason.isprintable() and "\\x1b[2J" in got.reason and "\\u202e" in got.reason
    assert protocol.printable("ok: é ü 中") == "ok: é ü 中"  # printable text is left alone

"""Accountants: Opacus and Google's dp-accounting agree where they compute the same thing,
and where they differ (fractional RDP orders) fedshield records the larger."""

from __future__ import annotations

import itertools
import math

import pytest
from opacus.accountants import RDPAccountant

from fedshield.privacy.accountant import (
    OPACUS_RDP_ORDERS,
    Spend,
    calibrate_noise_multiplier,
    epsilon,
    epsilon_dp_accounting_pld,
    epsilon_dp_accounting_rdp,
    epsilon_opacus,
    planned_epsilon,
)
from fedshield.privacy.errors import FedShieldError

DELTA = 1e-5
INTEGER_ORDERS = [float(a) for a in range(2, 64)]
GRID = list(itertools.product((0.5, 1.0, 2.0), (0.01, 0.1, 0.5), (1, 10, 100)))


def _opacus_rdp(history, delta, orders):
    acc = RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    return acc.get_privacy_spent(delta=delta, alphas=orders)[0]


def test_orders_are_opacus_defaults():
    assert OPACUS_RDP_ORDERS == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_opacus_and_dp_accounting_rdp_agree_on_integer_orders(sigma, q, steps):
    h = [Spend(sigma, q, steps)]
    ours = _opacus_rdp(h, DELTA, INTEGER_ORDERS)
    theirs = epsilon_dp_accounting_rdp(h, DELTA, orders=INTEGER_ORDERS)
    assert theirs == pytest.approx(ours, rel=1e-9)


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_dp_accounting_rdp_is_never_below_opacus_and_recorded_is_the_max(sigma, q, steps):
    h = [Spend(sigma, q, steps)]
    o, d = epsilon_opacus(h, DELTA), epsilon_dp_accounting_rdp(h, DELTA)
    # Same conversion; dp-accounting's fractional-order RDP is an upper bound of the exact one.
    assert d >= o * (1 - 1e-12)
    assert epsilon(h, DELTA) == max(o, d)
    # Both are at most what the integer orders alone give (more orders can only help).
    assert d <= epsilon_dp_accounting_rdp(h, DELTA, orders=INTEGER_ORDERS) * (1 + 1e-12)


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 100), (2.0, 0.01, 10), (2.0, 0.1, 1), (1.0, 0.1, 1)])
def test_opacus_and_dp_accounting_rdp_agree_where_optimum_is_integer_or_small_q(sigma, q, steps):
    h = [Spend(sigma, q, steps)]
    assert epsilon_dp_accounting_rdp(h, DELTA) == pytest.approx(epsilon_opacus(h, DELTA), rel=1e-6)


def test_opacus_fractional_rdp_matches_numerical_integration():
    """The reason Opacus is below dp-accounting: Opacus' A_alpha is exact."""
    from opacus.accountants.analysis.rdp import _compute_rdp
    from scipy import integrate

    for sigma, q, a in [(1.0, 0.1, 2.5), (1.0, 0.25, 3.7)]:
        def f(z, sigma=sigma, q=q, a=a):  # the density of this loop's (σ, q, α)
            r = (1 - q) + q * math.exp((2 * z - 1) / (2 * sigma**2))
            return math.exp(-z * z / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2) + a * math.log(r))

        val, _ = integrate.quad(f, -40, 40, epsabs=0, epsrel=1e-12, limit=1000, points=[0, 0.5, 1])
        assert _compute_rdp(q, sigma, a) == pytest.approx(math.log(val) / (a - 1), rel=1e-8)


MULTI = [
    [Spend(1.0, 0.02, 50), Spend(0.8, 0.05, 30), Spend(1.5, 0.01, 200)],
    [Spend(1.1, 0.05, 40)] * 5,
    [Spend(2.0, 0.01, 100), Spend(2.0, 0.01, 100), Spend(1.2, 0.03, 10)],
]


@pytest.mark.parametrize("history", MULTI)
def test_multi_segment_histories(history):
    o = epsilon_opacus(history, DELTA)
    d = epsilon_dp_accounting_rdp(history, DELTA)
    assert d >= o * (1 - 1e-12) and d <= o * 1.01
    assert _opacus_rdp(history, DELTA, INTEGER_ORDERS) == pytest.approx(
        epsilon_dp_accounting_rdp(history, DELTA, orders=INTEGER_ORDERS), rel=1e-9)
    # grouping equal (σ, q) spends is exact composition: same as Opacus on the raw history
    assert o == pytest.approx(_opacus_rdp(history, DELTA, OPACUS_RDP_ORDERS), rel=1e-12)
    pld = epsilon_dp_accounting_pld(history, DELTA)
    assert 0 < pld <= d * 1.001


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 100), (1.0, 0.1, 10), (2.0, 0.1, 100), (1.0, 0.5, 10)])
def test_pld_is_tighter_than_rdp(sigma, q, steps):
    h = [Spend(sigma, q, steps)]
    assert 0 < epsilon_dp_accounting_pld(h, DELTA) <= epsilon_dp_accounting_rdp(h, DELTA) * 1.001


def test_edge_cases():
    assert epsilon_opacus([], DELTA) == 0.0
    assert epsilon_dp_accounting_rdp([], DELTA) == 0.0
    assert epsilon_dp_accounting_pld([], DELTA) == 0.0
    for f in (epsilon_opacus, epsilon_dp_accounting_rdp, epsilon_dp_accounting_pld, epsilon):
        assert f([Spend(0.0, 0.1, 5)], DELTA) == math.inf  # no noise: no privacy
        assert f([Spend(1.0, 0.1, 0)], DELTA) == 0.0
    full = [Spend(1.0, 1.0, 10)]  # q = 1: the plain Gaussian mechanism, in both
    assert epsilon_dp_accounting_rdp(full, DELTA) == pytest.approx(epsilon_opacus(full, DELTA), rel=1e-9)
    with pytest.raises(FedShieldError):
        Spend(-1.0, 0.1, 1)
    with pytest.raises(FedShieldError):
        Spend(1.0, 1.5, 1)
    with pytest.raises(FedShieldError):
        epsilon_opacus([Spend(1.0, 0.1, 1)], 0.0)
    with pytest.raises(FedShieldError):
        epsilon_opacus([Spend(1.0, 0.1, 1)], DELTA, "moments")


def test_monotone_in_steps():
    prev = 0.0
    for steps in (1, 5, 20, 100, 500):
        e = epsilon([Spend(1.0, 0.05, steps)], DELTA)
        assert e > prev
        prev = e


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_hits_target_from_below(accountant):
    target, q, steps = 3.0, 0.05, 100
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant)
    plan = [Spend(sigma, q, steps)]
    assert epsilon_opacus(plan, DELTA, accountant) <= target
    assert epsilon(plan, DELTA, accountant) <= target
    assert epsilon(plan, DELTA, accountant) > target - 0.05  # close: not wastefully noisy
    assert epsilon([Spend(sigma * 0.97, q, steps)], DELTA, accountant) > target


def test_calibration_refuses_impossible():
    with pytest.raises(FedShieldError):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 10)


def test_planned_epsilon_composes():
    h = [Spend(1.0, 0.05, 100)]
    p = Spend(1.0, 0.05, 100)
    assert planned_epsilon(h, p, DELTA) == pytest.approx(epsilon([Spend(1.0, 0.05, 200)], DELTA), rel=1e-12)
    assert planned_epsilon(h, p, DELTA) > epsilon(h, DELTA)


# ------------------------------------------------------------ "pld": the default, the tightest certified


def test_pld_records_dp_accountings_pessimistic_pld_and_calibrates_with_less_noise():
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from fedshield.privacy.accountant import PLD_RECORD_INTERVAL

    history = [Spend(10.0, 1.0, 1), Spend(4.0, 1.0, 1), Spend(2.9, 0.5, 80)]
    acc = PLDAccountant(value_discretization_interval=PLD_RECORD_INTERVAL)
    for s in history:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)),
            s.steps))
    assert epsilon(history, 1e-5, "pld") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # Tighter than the RDP bound of the same history, and within 1e-3 of the finer 1e-4 grid.
    assert epsilon(history, 1e-5, "pld") < 0.95 * epsilon(history, 1e-5, "rdp")
    assert epsilon(history, 1e-5, "pld") == pytest.approx(epsilon_dp_accounting_pld(history, 1e-5), abs=1e-3)
    before = history[:2]
    sigma_pld = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80, "pld", before=before)
    sigma_rdp = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80, "rdp", before=before)
    reached = epsilon([*before, Spend(sigma_pld, 0.5, 80)], 1e-5, "pld")
    assert 7.95 < reached <= 8.0 and sigma_pld < 0.96 * sigma_rdp


@pytest.mark.parametrize("neighbouring", ["add-remove", "replace-one"])
def test_pld_epsilon_is_dp_accountings_pld_accountant_to_the_last_bit(neighbouring, monkeypatch):
    """The recorded PLD ε builds each (σ, q)'s PLD once (privacy/accountant.py _pld_of_step)
    and keeps each PLD's self-convolution bounds' moments (`_kept_bounds`): the very result
    of dp-accounting's own PLDAccountant, run with the library's own bounds, composing the
    same events, not a close one; a run's next rounds (more steps of the same PLDs) too."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant, common

    from fedshield.privacy.accountant import _events, _grouped

    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if neighbouring == "replace-one"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    histories = [[Spend(10.0, 1.0, 1), Spend(4.0, 1.0, 1), Spend(1.13, 128 / 222, 40), Spend(1.13, 128 / 222, 40)],
                 [Spend(0.8, 0.01, 500), Spend(2.0, 0.5, 3)]]
    ours = [epsilon_dp_accounting_pld(h, 1e-5, neighbouring=neighbouring) for h in histories]
    # a run's rounds at the recorded interval: the same PLD self-composed 4, 8, 12 times (kept bounds reused)
    ours += [epsilon([Spend(0.9, 0.25, 4)] * r, 1e-5, "pld", neighbouring) for r in (1, 2, 3)]
    kept = common.compute_self_convolve_bounds
    assert getattr(kept, "_fedshield_kept", False)  # dp-accounting 0.6.0, as pinned: in place
    monkeypatch.setattr(common, "compute_self_convolve_bounds", kept.__wrapped__)  # the library's own
    for history, got in zip(histories, ours, strict=False):
        reference = PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-4)
        for event in _events(_grouped(history)):
            reference.compose(event)
        assert got == reference.get_epsilon(1e-5)
    for rounds, got in zip((1, 2, 3), ours[len(histories):], strict=True):
        reference = PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)
        reference.compose(_events(((0.9, 0.25, 4 * rounds),))[0])
        assert got == reference.get_epsilon(1e-5)


def test_kept_self_convolution_bounds_are_dp_accountings_own():
    """`_kept_bounds`' function gives dp-accounting's bounds for every input and number of
    times, whether the input's moments were kept or not; other arguments go to the library's."""
    import numpy as np
    from dp_accounting.pld import common

    from fedshield.privacy.accountant import _kept_bounds, _pld_of_step

    assert _kept_bounds()
    kept = common.compute_self_convolve_bounds
    original = kept.__wrapped__
    for sigma, q, interval in [(0.5, 0.1, 1e-3), (1.0, 0.25, 1e-3), (2.0, 1.0, 1e-4), (0.8, 0.01, 1e-3)]:
        pld = _pld_of_step(sigma, q, interval, "add-remove")
        for pmf in (pld._pmf_remove, pld._pmf_add):
            probs = pmf._probs
            for times in (1, 7, 400, 10_000):
                assert kept(probs, times, 1e-15) == original(probs, times, 1e-15)
            assert kept(probs, 41, 1e-10) == original(probs, 41, 1e-10)
            assert kept(probs, 5, 0) == original(probs, 5, 0)
            assert kept(list(probs), 5, 1e-15) == original(list(probs), 5, 1e-15)
            orders = [0.5 / len(probs), -0.5 / len(probs)]
            assert kept(probs, 9, 1e-15, orders) == original(probs, 9, 1e-15, orders)
    noise = np.random.default_rng(0).random(300)
    noise /= noise.sum()
    assert kept(noise, 12, 1e-15) == original(noise, 12, 1e-15)
    assert kept(noise[::2], 12, 1e-15) == original(noise[::2], 12, 1e-15)  # not contiguous


def test_kept_bounds_stay_out_of_another_dp_accounting(monkeypatch):
    """Written from dp-accounting 0.6.0's source: against any other, the library's own runs."""
    from dp_accounting.pld import common

    from fedshield.privacy import accountant

    library = common.compute_self_convolve_bounds.__wrapped__
    monkeypatch.setattr(common, "compute_self_convolve_bounds", library)
    monkeypatch.setattr(accountant, "_BOUNDS_SOURCE", "0" * 64)
    assert not accountant._kept_bounds()
    assert common.compute_self_convolve_bounds is library


@pytest.mark.parametrize("history", [
    [Spend(10.0, 1.0, 1), Spend(4.0, 1.0, 1), Spend(1.13, 128 / 222, 40), Spend(1.13, 128 / 222, 41)],
    [Spend(0.8, 0.01, 500), Spend(2.0, 0.5, 3), Spend(0.8, 0.01, 7)],
    [Spend(0.5, 0.1, 100)],
])
def test_rdp_epsilon_is_opacus_rdp_accountant_to_the_last_bit(history):
    """The recorded RDP ε scales each (σ, q)'s one-step curve by its steps (privacy/accountant.py
    _rdp_of_step): the very result of Opacus' RDPAccountant on the same history, not a close one."""
    from fedshield.privacy.accountant import _grouped

    reference = RDPAccountant()
    reference.history = list(_grouped(history))
    assert epsilon_opacus(history, DELTA, "rdp") == reference.get_epsilon(DELTA)
    # A history the cache has seen a prefix of (a run's next round): still Opacus' number.
    longer = [*history, Spend(history[0].noise_multiplier, history[0].sample_rate, 3)]
    reference.history = list(_grouped(longer))
    assert epsilon_opacus(longer, DELTA, "rdp") == reference.get_epsilon(DELTA)


@pytest.mark.parametrize("target", [8.0, 1.0])  # σ below 1 (the bracket halves) and above 1 (it climbs)
def test_pld_calibration_is_the_smallest_sigma_to_a_thousandth_without_opacus_search(target, monkeypatch):
    from opacus.accountants import utils as opacus_utils

    from fedshield.privacy.accountant import _calibrate, _calibrate_recorded

    def search(**_):
        raise AssertionError("Opacus' RDP search ran for a PLD calibration")

    monkeypatch.setattr(opacus_utils, "get_noise_multiplier", search)
    _calibrate.cache_clear()  # no RDP σ kept from another test may stand in for the search
    _calibrate_recorded.cache_clear()
    q, steps = 0.1, 40
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, "pld")
    assert (sigma < 1.0) == (target == 8.0)
    assert epsilon([Spend(sigma, q, steps)], DELTA, "pld") <= target
    assert epsilon([Spend(sigma * 0.999, q, steps)], DELTA, "pld") > target  # no more noise than needed


def test_spend_totals_group_a_history_as_the_accountants_do_and_give_the_same_epsilon():
    """`SpendTotals`, kept a spend at a time (the coordinator's books, round after round),
    groups a history exactly as `_grouped` reads a list: (σ, q) merged in first-seen order,
    free spends (0 steps, q = 0) left out, σ = 0 making ε infinite whatever comes after; and
    every accountant gives the very same ε for it as for the list. A copy grows apart."""
    from fedshield.privacy.accountant import SpendTotals, _grouped

    history = [Spend(1.1, 0.25, 4), Spend(2.0, 0.5, 1), Spend(1.1, 0.25, 0), Spend(0.0, 0.0, 3),
               Spend(1.1, 0.25, 4), (2.0, 0.5, 2), Spend(1.3, 1.0, 1)]
    totals = SpendTotals()
    for n, spend in enumerate(history, start=1):
        totals.add(spend)
        assert totals.grouped() == _grouped(history[:n]) == SpendTotals(history[:n]).grouped()
    assert totals.grouped() == ((1.1, 0.25, 8), (2.0, 0.5, 3), (1.3, 1.0, 1))
    for accountant in ("rdp", "prv", "pld"):
        assert epsilon(totals, 1e-5, accountant) == epsilon(history, 1e-5, accountant)
    assert epsilon(totals, 1e-5, "pld", "replace-one") == epsilon(history, 1e-5, "pld", "replace-one")
    twin = totals.copy()
    twin.add(Spend(0.0, 0.5, 1))  # not private at all: ε is infinite, the original untouched
    assert twin.grouped() is None and _grouped([*history, Spend(0.0, 0.5, 1)]) is None
    assert epsilon(twin, 1e-5, "pld") == math.inf and epsilon(totals, 1e-5, "pld") < math.inf
    twin.add(Spend(1.1, 0.25, 4))
    assert twin.grouped() is None
    assert SpendTotals().grouped() == () and epsilon(SpendTotals(), 1e-5, "rdp") == 0.0

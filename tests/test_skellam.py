"""The Skellam accountant (privacy/skellam.py): its RDP bound is an upper bound on the true
Rényi divergence of shifted Skellam distributions, tends to the Gaussian one, composes,
calibrates tightly, agrees with Google's reference code, and the sampler's noise adds up."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy import stats
from scipy.special import logsumexp

from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.skellam import (
    DEFAULT_ORDERS,
    calibrate_skellam_variance,
    integer_sensitivities,
    sample_skellam,
    skellam_epsilon,
    skellam_rdp,
)

DELTA = 1e-5
ORDERS_CHECKED = (2, 3, 8, 32)


def _log_terms(order: int, variance: float, shift: int) -> np.ndarray:
    """log of P(k)^α Q(k)^(1-α) with P = shift + Sk(μ), Q = Sk(μ), Sk(μ) = scipy's skellam(μ/2, μ/2),
    on a window wide enough that its edges carry nothing (checked by the caller)."""
    window = int(math.ceil(12 * math.sqrt(variance) + 60))
    k = np.arange(-window, window + 1)
    log_p = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    assert np.all(np.isfinite(log_p)) and np.all(np.isfinite(log_q))
    return order * log_p + (1 - order) * log_q


def true_renyi(order: int, variance: float, shift: int) -> float:
    """D_α(shift + Sk(μ) || Sk(μ)), summed numerically from scipy's pmf."""
    terms = _log_terms(order, variance, shift)
    total = logsumexp(terms)
    # The truncated tails are negligible: the window's edge terms are < e^-40 of the sum.
    assert max(terms[:5].max(), terms[-5:].max()) - total < -40
    return float(total / (order - 1))


@pytest.mark.parametrize("variance", [0.5, 2.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_bound_is_above_the_true_renyi_divergence(variance, shift):
    bound = skellam_rdp(ORDERS_CHECKED, variance, l1=shift, l2=shift)
    for order, b in zip(ORDERS_CHECKED, bound, strict=True):
        true = true_renyi(order, variance, shift)
        assert true > 0
        assert b >= true, (order, variance, shift, b, true)


@pytest.mark.parametrize("shift", [(1, 1), (2, 1), (3, -2)])
@pytest.mark.parametrize("variance", [1.0, 30.0])
def test_bound_is_above_the_true_divergence_in_two_dimensions(shift, variance):
    # Independent coordinates: the divergence of the product is the sum of the coordinates'.
    l1 = float(sum(abs(s) for s in shift))
    l2 = math.sqrt(sum(s * s for s in shift))
    bound = skellam_rdp(ORDERS_CHECKED, variance, l1, l2)
    for order, b in zip(ORDERS_CHECKED, bound, strict=True):
        true = sum(true_renyi(order, variance, abs(s)) for s in shift)  # symmetric: D(−s) = D(s)
        assert b >= true, (order, shift, b, true)


def test_the_upper_bound_check_can_fail():
    # The classic slip, accounting Poisson(μ)−Poisson(μ) (variance 2μ) for noise of variance μ,
    # halves the bound; the numerical divergence catches it at large variance.
    variance = 100.0
    wrong = skellam_rdp([2], 2 * variance, 1, 1)[0]
    assert wrong < true_renyi(2, variance, 1) <= skellam_rdp([2], variance, 1, 1)[0]


def test_hand_computed_values_exercise_both_branches_of_the_min():
    # α Δ2²/(2μ) + min(((2α−1)Δ2² + 6Δ1)/(4μ²), 3Δ1/(2μ)), worked by hand.
    assert skellam_rdp([2], 1.0, 1, 1)[0] == pytest.approx(1.0 + 1.5)  # min = 3/2 (second branch)
    assert skellam_rdp([10], 10.0, 1, 1)[0] == pytest.approx(0.5 + 25 / 400)  # min = 25/400 (first branch)
    assert skellam_rdp([3], 2.0, 3, 3)[0] == pytest.approx(27 / 4 + 9 / 4)  # min(63/16, 9/4)


@pytest.mark.parametrize("l1,l2", [(1.0, 1.0), tuple(integer_sensitivities(clip_norm=1.0, scale=64.0, dim=1000))])
def test_bound_tends_to_the_gaussian_rdp(l1, l2):
    orders = np.array([2, 8, 32, 128])
    ratios = []
    for variance in (1.0, 1e2, 1e4, 1e6, 1e8):
        gaussian = orders * l2**2 / (2 * variance)
        ratios.append(skellam_rdp(orders, variance, l1, l2) / gaussian)
    ratios_arr = np.array(ratios)
    assert np.all(ratios_arr >= 1.0)
    assert np.all(np.diff(ratios_arr, axis=0) <= 0)  # never further from it as the variance grows
    assert np.all(ratios_arr[-1] < 1 + 1e-6)
    assert np.all(ratios_arr[0] > 1 + 1e-3)  # and not already Gaussian at small variance


# Google's reference implementation, transcribed (google-research/federated,
# distributed_dp/accounting_utils.py at commit 5e27a86323a35c2018fb97fbbe755c7ade9370ab:
# `_skellam_rdp`, `rounded_l2_norm_bound` with beta = 0, `rounded_l1_norm_bound`, and the
# q == 1 branch of `skellam_epsilon`). It works in the UNSCALED domain: sensitivities divided by
# the scale s, central_var = central_stddev² = (integer-domain variance) / s². The repository
# publishes no accounting test values, so the comparison is against the transcribed code.
REFERENCE_RDP_ORDERS = tuple(range(2, 129)) + (256,)


def _reference_skellam_rdp(l1_sens, l2_sens, central_var, scale, order):
    a, s, mu = order, scale, central_var
    rdp = a / (2 * mu) * l2_sens**2
    rdp += min(((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2), 3 * l1_sens / (2 * s * mu))
    return rdp


def _reference_rdp(scale, central_stddev, l2_sens, dim, steps, orders):
    l2_sens = (l2_sens * scale + np.sqrt(dim)) / scale  # rounded_l2_norm_bound(l2 * s, beta=0, dim) / s
    l1_sens = (l2_sens * scale) * min(np.sqrt(dim), l2_sens * scale) / scale  # rounded_l1_norm_bound(...) / s
    central_var = central_stddev**2
    return np.array([_reference_skellam_rdp(l1_sens, l2_sens, central_var, scale, a) for a in orders]) * steps


@pytest.mark.parametrize(
    "scale,central_stddev,clip,dim,steps",
    [(50.0, 1.2, 1.0, 2**16, 1), (4.0, 0.8, 0.5, 1000, 30), (1000.0, 3.0, 2.0, 10, 200)],
)
def test_agrees_with_the_reference_implementation(scale, central_stddev, clip, dim, steps):
    expected = _reference_rdp(scale, central_stddev, clip, dim, steps, REFERENCE_RDP_ORDERS)
    l1, l2 = integer_sensitivities(clip, scale, dim)
    ours = skellam_rdp(REFERENCE_RDP_ORDERS, (central_stddev * scale) ** 2, l1, l2) * steps
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    eps, order = skellam_epsilon((central_stddev * scale) ** 2, l1, l2, steps, DELTA, REFERENCE_RDP_ORDERS)
    ref_eps, ref_order = compute_epsilon(list(REFERENCE_RDP_ORDERS), list(expected), DELTA)
    assert (eps, order) == pytest.approx((ref_eps, ref_order), rel=1e-12)


def test_rounds_compose_by_adding_rdp():
    l1, l2 = integer_sensitivities(1.0, 16.0, 500)
    variance = 3.0 * l2**2
    one = skellam_rdp(DEFAULT_ORDERS, variance, l1, l2)
    for k in (1, 7, 100):
        expected = compute_epsilon(list(DEFAULT_ORDERS), list(k * one), DELTA)
        assert skellam_epsilon(variance, l1, l2, k, DELTA) == pytest.approx(expected, rel=1e-12)
    assert skellam_epsilon(variance, l1, l2, 7, DELTA)[0] > skellam_epsilon(variance, l1, l2, 1, DELTA)[0]
    assert skellam_epsilon(variance, l1, l2, 0, DELTA)[0] == 0.0


def test_epsilon_decreases_in_variance():
    l1, l2 = integer_sensitivities(1.0, 16.0, 500)
    epsilons = [skellam_epsilon(v * l2**2, l1, l2, 20, DELTA)[0] for v in np.geomspace(0.5, 500, 25)]
    assert all(b < a for a, b in zip(epsilons, epsilons[1:], strict=False))
    order = skellam_epsilon(l2**2, l1, l2, 20, DELTA)[1]
    assert isinstance(order, float) and order in DEFAULT_ORDERS


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 50])
def test_calibration_hits_the_target_from_below_and_is_tight(target, rounds):
    l1, l2 = integer_sensitivities(1.0, 32.0, 1000)
    variance = calibrate_skellam_variance(target, DELTA, l1, l2, rounds)
    eps = skellam_epsilon(variance, l1, l2, rounds, DELTA)[0]
    assert eps <= target
    assert eps == pytest.approx(target, rel=1e-6)
    assert skellam_epsilon(0.99 * variance, l1, l2, rounds, DELTA)[0] > target


@pytest.mark.parametrize(
    "args",
    [
        (0.0, DELTA, 10.0, 2.0, 5),  # target 0
        (-1.0, DELTA, 10.0, 2.0, 5),
        (math.inf, DELTA, 10.0, 2.0, 5),
        (1.0, 0.0, 10.0, 2.0, 5),  # δ outside (0, 1)
        (1.0, 1.5, 10.0, 2.0, 5),
        (1.0, DELTA, 10.0, 2.0, 0),  # nothing to spend
        (1.0, DELTA, 0.0, 0.0, 5),
        (1.0, DELTA, -1.0, 2.0, 5),
        (1.0, DELTA, 10.0, 2.0, 2.5),
    ],
)
def test_impossible_calibration_is_one_clear_line(args):
    with pytest.raises(ValueError) as info:
        calibrate_skellam_variance(*args)
    assert isinstance(info.value, FedShieldError)
    assert "\n" not in str(info.value) and str(info.value).startswith("skellam: ")


@pytest.mark.parametrize("orders", [[2.5], [1], [0, 2], [float("nan")], []])
def test_only_integer_orders_from_two_are_accepted(orders):
    with pytest.raises(ValueError, match="skellam: "):
        skellam_rdp(orders, 10.0, 1.0, 1.0)


def test_integral_float_orders_are_accepted():
    assert skellam_rdp([2.0, 3.0], 10.0, 1.0, 1.0) == pytest.approx(skellam_rdp([2, 3], 10.0, 1.0, 1.0))


def test_sensitivities_formula():
    assert integer_sensitivities(1.0, 10.0, 100) == pytest.approx((200.0, 20.0))  # l2 = 10 + 10, l1 = 20·10
    assert integer_sensitivities(0.3, 1.0, 1) == pytest.approx((1.3, 1.3))  # l1 = l2·min(l2, 1)
    sens = integer_sensitivities(0.0, 1.0, 4)
    assert (sens.l1, sens.l2) == pytest.approx((4.0, 2.0))


def _stochastic_round(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    low = np.floor(v)
    return (low + (rng.random(v.shape) < v - low)).astype(np.int64)


@pytest.mark.parametrize("clip,scale,dim", [(1.0, 3.3, 50), (0.2, 1.0, 8), (5.0, 40.0, 3)])
def test_sensitivities_bound_rounded_updates(clip, scale, dim):
    rng = np.random.default_rng(7)
    l1, l2 = integer_sensitivities(clip, scale, dim)
    for _ in range(200):
        u = rng.normal(size=dim)
        u *= clip / np.linalg.norm(u)  # on the clipping sphere
        for x in (_stochastic_round(rng, scale * u), np.sign(u) * np.ceil(np.abs(scale * u))):  # away from 0
            assert np.linalg.norm(x, 2) <= l2
            assert np.linalg.norm(x, 1) <= l1


def test_a_sum_of_site_noises_is_integer_skellam_of_the_summed_variance():
    rng = np.random.default_rng(20211011)
    sites, per_site, n = 10, 2.5, 100_000
    shares = [sample_skellam(rng, per_site, n) for _ in range(sites)]
    assert all(s.dtype == np.int64 and s.shape == (n,) for s in shares)
    assert np.var(shares[0]) == pytest.approx(per_site, rel=0.03)  # Poisson(v/2) − Poisson(v/2), not v − v
    total = np.sum(shares, axis=0)
    assert total.dtype == np.int64
    assert abs(np.mean(total)) < 0.05
    assert np.var(total) == pytest.approx(sites * per_site, rel=0.03)
    values, counts = np.unique(total, return_counts=True)
    expected = stats.skellam.pmf(values, sites * per_site / 2, sites * per_site / 2)
    assert np.max(np.abs(counts / n - expected)) < 0.005


def test_sampler_shape_and_zero_variance():
    rng = np.random.default_rng(0)
    assert sample_skellam(rng, 4.0, (3, 5)).shape == (3, 5)
    assert not np.any(sample_skellam(rng, 0.0, 100))
    with pytest.raises(ValueError, match="skellam: variance"):
        sample_skellam(rng, -1.0, 3)

"""Privacy accounting for distributed Skellam noise under secure aggregation.

The mechanism (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021, arXiv:2110.04995): each site clips its update to L2 norm
C, multiplies it by the quantization scale s (levels per unit), rounds every coordinate
stochastically to an integer, and adds its own share of symmetric Skellam noise before
SecAgg+ masks it. The coordinator only ever sees the integer sum.

Parameterisation (the paper's, and the one used everywhere in this module): `variance` is
μ, the per-coordinate variance of the symmetric Skellam noise in the INTEGER domain.
Sk(μ) = Poisson(μ/2) - Poisson(μ/2), pmf P(k) = e^{-μ} I_|k|(μ) (I the modified Bessel
function of the first kind), variance μ; scipy's `skellam(mu1=μ/2, mu2=μ/2)`. Beware the
other convention Sk(λ, λ) = Poisson(λ) - Poisson(λ), whose variance is 2λ: mixing the two
changes ε by about a factor of 2, in the unsafe direction when the accountant is given
twice the variance that is actually sampled. Independent Skellams add: m sites that each
add variance μ_site give a sum with Skellam noise of variance exactly m·μ_site; `variance`
here is always that TOTAL.

The bound (the paper's RDP theorem for the multi-dimensional Skellam mechanism; other
implementations cite it as Theorem 3.5: that number was not checked against the paper's
PDF here, the formula was): for an integer-valued query with L1 sensitivity Δ1 and L2
sensitivity Δ2 and every INTEGER order α >= 2,

    ε(α) <= α Δ2² / (2μ) + min( ((2α - 1) Δ2² + 6 Δ1) / (4μ²),  3 Δ1 / (2μ) ).

Verified against Google's reference implementation, google-research/federated,
distributed_dp/accounting_utils.py (`_skellam_rdp`, commit 5e27a86323a3): it works in the
unscaled domain with scale s, `a/(2 mu) l2² + min(((2a-1) s l2² + 6 l1) / (4 s³ mu²),
3 l1 / (2 s mu))` with l2 = Δ2/s, l1 = Δ1/s and mu = μ/s², which is the line above term for
term (tests/test_skellam.py checks the two agree). The first term is the Gaussian
mechanism's RDP α Δ2²/(2μ); the min is the discretisation surcharge, O(1/μ) relative to it,
so the bound tends to the Gaussian one as μ grows. Only integer orders α >= 2 are used,
as in the reference code (which casts its orders with int() and asserts α > 1);
non-integer orders are refused here, not rounded. The shift between neighbouring outputs must
be an integer vector (a non-integer shift makes the supports disjoint: ε = inf), which is
why sites round to integers before adding noise.

Composition and conversion: `rounds` releases add their RDP (no amplification by sampling
is claimed, on purpose: the coordinator selects the sites and runs SecAgg+ with exactly
them, so the sample is not secret from the adversary it would have to be secret from; the
result over-counts whenever the real analysis could amplify). RDP -> (ε, δ) is
dp-accounting's own `compute_epsilon` (Balle et al. 2020 / Canonne-Kamath-Steinke 2020;
the conversion privacy/accountant.py relies on; the reference code calls
tensorflow_privacy's `get_privacy_spent` instead).

Who adds the noise (the caller's job, stated here so that it is not forgotten): the total
variance must count only noise the adversary does not know. Sites that drop out before
masking add none, and a site colluding with the coordinator can subtract its own share, so
calibrate the TOTAL for the number of honest surviving sites the protocol guarantees
(e.g. its reconstruction threshold minus the tolerated colluders) and split it per site as
total / that number; never divide by the number of sites selected.

dp-accounting has no Skellam mechanism: this accountant is fedshield's own code, and an
audit of a Skellam spend recomputes it with this formula, not with an independent library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from fedshield.privacy.errors import FedShieldError

# Integer orders only (see the module docstring). A superset of the reference code's
# RDP_ORDERS (2..128 and 256): the larger orders serve small ε over many rounds.
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 768, 1024)

# Calibration searches variances in [_VARIANCE_MIN, _VARIANCE_MAX] and stops when the
# bracket is narrower than this relative width.
_VARIANCE_MIN, _VARIANCE_MAX = 1e-12, 1e200
_RELATIVE_TOLERANCE = 1e-9


class SkellamError(FedShieldError, ValueError):
    """A bad argument to the Skellam accountant (one line; also a ValueError)."""


class IntegerSensitivities(NamedTuple):
    """Sensitivities of a clipped, scaled, stochastically rounded site update (integer domain),
    in the argument order of `skellam_rdp` and `skellam_epsilon`."""

    l1: float
    l2: float


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_nonnegative(name: str, value: float) -> float:
    if not (_real(value) and math.isfinite(value) and value >= 0):
        raise SkellamError(f"skellam: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if not (_real(value) and math.isfinite(value) and value > 0):
        raise SkellamError(f"skellam: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SkellamError(f"skellam: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_delta(delta: float) -> float:
    if not (_real(delta) and 0 < delta < 1):
        raise SkellamError(f"skellam: delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_orders(orders: Sequence[float] | npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    values = np.asarray(orders, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise SkellamError("skellam: orders must not be empty")
    bad = values[~(np.isfinite(values) & (values >= 2) & (values == np.floor(values)))]
    if bad.size:
        raise SkellamError(f"skellam: RDP orders must be integers >= 2 (the theorem's), got {bad[0]!r}")
    return values


def skellam_rdp(
    orders: Sequence[float] | npt.NDArray[np.generic], variance: float, l1: float, l2: float
) -> npt.NDArray[np.float64]:
    """RDP upper bound ε(α) of the multi-dimensional symmetric Skellam mechanism, one release.

    Parameters
    ----------
    orders
        Integer Rényi orders α >= 2 (non-integers are refused).
    variance
        μ: per-coordinate variance of the Skellam noise in the integer domain,
        Sk(μ) = Poisson(μ/2) - Poisson(μ/2) (for distributed noise, the total m·μ_site).
    l1, l2
        L1 and L2 sensitivity of the integer-valued query (upper bounds are fine: the bound
        increases in both).

    Returns
    -------
    numpy.ndarray
        ε(α) for each order, in the order given:
        α Δ2²/(2μ) + min(((2α-1) Δ2² + 6 Δ1)/(4μ²), 3 Δ1/(2μ)).
    """
    alphas = _check_orders(orders)
    mu = _check_positive("variance", variance)
    d1 = _check_nonnegative("l1", l1)
    d2sq = _check_nonnegative("l2", l2) ** 2
    gaussian = alphas * d2sq / (2.0 * mu)
    surcharge = np.minimum(((2.0 * alphas - 1.0) * d2sq + 6.0 * d1) / (4.0 * mu * mu), 3.0 * d1 / (2.0 * mu))
    result: npt.NDArray[np.float64] = gaussian + surcharge
    return result


def _compute_epsilon(orders: list[float], rdp: list[float], delta: float) -> tuple[float, float]:
    """dp-accounting's RDP-to-(ε, δ) conversion, imported on first use: dp-accounting pulls
    in scipy (~0.9 s), and every process that reads a ledger imports this module, among
    them each deployed ClientApp message, most of which never convert anything."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    eps, order = compute_epsilon(orders, rdp, delta)
    return float(eps), float(order)


def skellam_epsilon(
    variance: float, l1: float, l2: float, rounds: int, delta: float,
    orders: Sequence[float] | npt.NDArray[np.generic] = DEFAULT_ORDERS,
) -> tuple[float, float]:
    """(ε, best order) of `rounds` Skellam releases of total variance `variance` at δ.

    RDP composes by addition over the rounds, with no amplification by sampling (an
    over-count on purpose: the coordinator knows who took part). The conversion is
    dp-accounting's `compute_epsilon`. Zero rounds or zero sensitivity spend nothing (ε = 0).
    """
    n = _check_count("rounds", rounds, 0)
    d = _check_delta(delta)
    alphas = _check_orders(orders)
    rdp = skellam_rdp(alphas, variance, l1, l2) * n
    eps, order = _compute_epsilon(alphas.tolist(), rdp.tolist(), d)
    return float(eps), float(order)


def calibrate_skellam_variance(target_epsilon: float, delta: float, l1: float, l2: float, rounds: int) -> float:
    """The smallest total variance μ (to a relative 1e-9) whose `skellam_epsilon` is <= target.

    Bisection in log space on ε(μ), which decreases in μ (every order's RDP does, and the
    conversion is monotone in RDP). The result is checked: ε(result) <= target_epsilon.
    Per site, add result / (number of honest survivors the protocol guarantees).
    """
    target = float(_check_positive("target_epsilon", target_epsilon))
    d = _check_delta(delta)
    d1 = _check_nonnegative("l1", l1)
    d2 = _check_nonnegative("l2", l2)
    n = _check_count("rounds", rounds, 0)
    if n == 0 or (d1 == 0 and d2 == 0):
        raise SkellamError(f"skellam: cannot calibrate noise for {n} rounds at sensitivity (l1={d1:g}, l2={d2:g}): "
                           "nothing to spend")

    def eps_of(variance: float) -> float:
        return skellam_epsilon(variance, d1, d2, n, d)[0]

    hi = 1.0
    while eps_of(hi) > target:
        hi *= 16.0
        if hi > _VARIANCE_MAX:
            raise SkellamError(f"skellam: no variance up to {_VARIANCE_MAX:g} reaches ε={target:g} at δ={d:g} "
                               f"over {n} rounds (l1={d1:g}, l2={d2:g})")
    lo = hi
    while eps_of(lo) <= target:
        lo /= 16.0
        if lo < _VARIANCE_MIN:
            raise SkellamError(f"skellam: even variance {_VARIANCE_MIN:g} stays within ε={target:g}: "
                               "the sensitivities are too small to calibrate")
    # Invariant: eps_of(lo) > target >= eps_of(hi).
    while hi > lo * (1.0 + _RELATIVE_TOLERANCE):
        mid = math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:
            break
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    if eps_of(hi) > target:  # cannot happen with the invariant; checked all the same
        raise SkellamError(f"skellam: calibration failed: variance {hi!r} exceeds ε={target:g}")
    return hi


def integer_sensitivities(clip_norm: float, scale: float, dim: int) -> IntegerSensitivities:
    """Sound (L1, L2) sensitivities, in the integer domain, of one site's contribution.

    The site's update u (‖u‖₂ <= clip_norm, dim coordinates) is multiplied by `scale` and
    rounded stochastically coordinate-wise to the integer vector x; the neighbouring sum
    lacks x (add/remove, or zero-out, of one site's contribution; for replace-one, where x
    becomes another site's x', double both bounds by the triangle inequality).
    """
    c = _check_nonnegative("clip_norm", clip_norm)
    s = _check_positive("scale", scale)
    d = _check_count("dim", dim, 1)
    # L2: stochastic rounding moves every coordinate by less than 1 (to the floor or the
    # ceiling of s·u_i), so the rounding error e = x - s·u has ‖e‖₂ < sqrt(dim) and
    # ‖x‖₂ <= ‖s·u‖₂ + ‖e‖₂ < clip_norm·scale + sqrt(dim) (the reference code's
    # rounded_l2_norm_bound with beta = 0: no conditional re-rounding is assumed).
    # The bound holds for every outcome of the rounding coins, hence for the mixture over
    # them: exp((α-1)·D_α) is jointly convex, so the mixture's divergence is at most the
    # largest one of its components (the other sites' coins coupled identically).
    l2 = c * s + math.sqrt(d)
    # L1: for an integer vector every nonzero |x_i| >= 1, so |x_i| <= x_i² and
    # ‖x‖₁ <= ‖x‖₂²; Cauchy-Schwarz gives ‖x‖₁ <= sqrt(dim)·‖x‖₂. Take the smaller
    # (the reference code's rounded_l1_norm_bound). With the L2 bound above, l2 >= sqrt(dim),
    # so it is the sqrt(dim) branch that binds: l1 = sqrt(dim)·clip_norm·scale + dim.
    l1 = l2 * min(l2, math.sqrt(d))
    return IntegerSensitivities(l1=l1, l2=l2)


def sample_skellam(
    rng: np.random.Generator, variance: float, shape: int | tuple[int, ...]
) -> npt.NDArray[np.int64]:
    """Symmetric Skellam noise of the given per-coordinate variance: Poisson(v/2) - Poisson(v/2).

    A site adds `sample_skellam(rng, total_variance / honest_survivors, update.shape)` to its
    integer update; in deployment `rng` must be seeded from the operating system's entropy
    (e.g. `np.random.default_rng(secrets.randbits(128))`), never from a shared or logged seed.
    numpy's Poisson sampler works in floating point (products of uniforms for small means,
    transformed rejection for large ones), so its output only approximates the exact Poisson
    law the theorem assumes: the same kind of caveat as floating-point Gaussian noise
    (Mironov 2012), not removed here.
    """
    v = _check_nonnegative("variance", variance)
    half = v / 2.0
    first = rng.poisson(half, size=shape).astype(np.int64)
    second = rng.poisson(half, size=shape).astype(np.int64)
    result: npt.NDArray[np.int64] = first - second
    return result


def skellam_history_epsilon(
    spends: Sequence[tuple[float, float, float]], delta: float,
    orders: Sequence[float] | npt.NDArray[np.generic] = DEFAULT_ORDERS,
) -> float:
    """ε at δ of a history of Skellam releases, each (total variance, l1, l2) as it really
    ran (rounds may differ in the noise their survivors put in): their RDP adds up, then
    dp-accounting's `compute_epsilon`. An empty history spends nothing."""
    d = _check_delta(delta)
    if not spends:
        return 0.0
    alphas = _check_orders(orders)
    rdp = np.zeros(len(alphas))
    for variance, l1, l2 in spends:
        rdp = rdp + skellam_rdp(alphas, variance, l1, l2)
    eps, _ = _compute_epsilon(alphas.tolist(), rdp.tolist(), d)
    return float(eps)

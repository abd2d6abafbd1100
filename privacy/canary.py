"""One-run empirical privacy audit: Steinke, Nasr and Jagielski (NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", arXiv:2305.08846.

Setting. m canaries; each is included in the training data independently with
probability 1/2 (S_i = +1 in, -1 out). After training, the auditor scores every canary
(here: minus the final model's loss on it; higher = "looks included"), guesses "in" for
the k+ highest scores, "out" for the k- lowest, and abstains on the rest. With
r = k+ + k- guesses, W = the number of correct guesses.

The bound (their Theorem 5.2, the (ε, δ) form of the main Theorem 3.1; Appendix D gives
the same computation as code). If the training algorithm is (ε, δ)-DP with respect to
each canary, then for every v

    P[W >= v] <= f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(v) := P[Binomial(r, q) >= v],   q = e^ε / (1 + e^ε),

i.e. W is stochastically dominated, up to the δ term, by the number of heads of r coins
that each come up "correct" with the accuracy q of ε-randomized response. The δ term is
exactly the paper's (not an approximation); it makes the p-value larger, so the lower
bound smaller, and it is the only place where m (not r) enters.

The lower bound. p(ε) above is increasing in ε. At confidence 1 - β we reject "the
algorithm is (ε, δ)-DP" when p(ε) < β; the reported ε_lb is the supremum of rejected ε,
found by bisection and returned from the rejected side (never rounded upwards).

Choosing k+ and k-. The paper reports the best bound over a few choices of guess counts.
Taking a maximum over several tests is itself a multiple test: here every choice in the
grid is tested at β / len(grid) (a union bound), so the reported maximum holds at
confidence 1 - β overall.

Pure math: numpy and scipy only, nothing else of ours but privacy.errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from fedshield.privacy.errors import FedShieldError

BETA = 0.05
_EPS_CEILING = 100.0  # no finite audit of a few thousand canaries certifies more than this
_BISECTION_STEPS = 60


class CanaryError(FedShieldError):
    """Audit inputs that cannot be used (sizes, labels, grid)."""


@dataclass(frozen=True)
class CanaryResult:
    epsilon_lb: float  # lower bound on ε at confidence 1 - β (grid split included)
    guesses: int  # r = k_plus + k_minus of the best grid point
    correct: int  # v: correct guesses there
    k_plus: int
    k_minus: int
    m: int
    beta: float = BETA
    delta: float = 0.0
    grid_size: int = 1


def _q(epsilon: float) -> float:
    """Accuracy of ε-randomized response, e^ε / (1 + e^ε), computed without overflow."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= correct] for an (ε, δ)-DP algorithm (Theorem 5.2)."""
    r, v = int(guesses), int(correct)
    if not (0 <= v <= r <= m):
        raise CanaryError(f"need 0 <= correct <= guesses <= m; got correct={v}, guesses={r}, m={m}")
    if v == 0:
        return 1.0
    q = _q(epsilon)
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Bin(r, q) >= v]
    if delta <= 0:
        return min(tail, 1.0)
    # max over i in 1..v of P[v - i <= Bin(r, q) < v] / i, accumulating the pmf downwards.
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(correct: int, guesses: int, delta: float, beta: float = BETA, m: int | None = None) -> float:
    """The largest ε rejected at level β: had the algorithm been (ε, δ)-DP with ε below
    the returned value, `correct` or more right guesses out of `guesses` would have had
    probability < β. `m` (total canaries, for the δ term) defaults to `guesses`, which is
    the smallest m and so the least conservative: pass the real m when guesses < m."""
    m = guesses if m is None else int(m)
    if not 0 < beta < 1:
        raise CanaryError(f"beta={beta!r}: must be in (0, 1)")
    if not 0 <= delta < 1:
        raise CanaryError(f"delta={delta!r}: must be in [0, 1)")
    if p_value(m, guesses, correct, 0.0, delta) >= beta:
        return 0.0  # not even ε = 0 is rejected
    lo, hi = 0.0, 1.0  # invariant: p(lo) < β; p(hi) >= β once hi is found
    while p_value(m, guesses, correct, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CEILING:
            return lo
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(m, guesses, correct, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def perfect_attack_bound(guesses: int, beta: float = BETA) -> float:
    """The most that `guesses` all-correct guesses can certify (pure ε, no δ term):
    the ε with q(ε)^r = β. No audit with r guesses reports more."""
    if guesses <= 0:
        return 0.0
    q = beta ** (1.0 / guesses)
    return math.log(q / (1.0 - q))


def default_grid(m: int) -> list[tuple[int, int]]:
    """A few (k+, k-) choices: symmetric guessing on 10% ... 100% of the canaries, and
    "in"-only guessing on the top 10% and 25% (the paper varies both)."""
    grid: list[tuple[int, int]] = []
    for frac in (0.1, 0.2, 0.4, 0.7, 1.0):
        r = max(2, int(round(frac * m)))
        pair = (r // 2, r - r // 2)
        if pair[0] + pair[1] <= m and pair not in grid:
            grid.append(pair)
    for frac in (0.1, 0.25):
        pair = (max(1, int(round(frac * m))), 0)
        if pair not in grid:
            grid.append(pair)
    return grid


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    beta: float = BETA,
    guess_grid: list[tuple[int, int]] | list[int] | None = None,
) -> CanaryResult:
    """The best ε lower bound over `guess_grid` (each point tested at β / len(grid)).

    scores: one per canary, higher = "looks included"; included: booleans, the coin flips.
    guess_grid: (k_plus, k_minus) pairs, or ints r meaning (r // 2, r - r // 2); default
    `default_grid(m)`. Ties in the scores are broken by canary index (stable sort), which
    does not depend on the coin flips, so the guesses stay a function of the output only.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    m = len(scores)
    if m == 0 or len(included) != m:
        raise CanaryError(f"need one inclusion flag per score; got {m} scores and {len(included)} flags")
    if not np.all(np.isfinite(scores)):
        raise CanaryError("canary scores must be finite")
    grid = default_grid(m) if guess_grid is None else [
        (int(g[0]), int(g[1])) if isinstance(g, (tuple, list)) else (int(g) // 2, int(g) - int(g) // 2)
        for g in guess_grid
    ]
    if not grid:
        raise CanaryError("guess_grid is empty")
    for kp, km in grid:
        if kp < 0 or km < 0 or kp + km == 0 or kp + km > m:
            raise CanaryError(f"guess_grid point (k+={kp}, k-={km}): need k+, k- >= 0 and 0 < k+ + k- <= m={m}")
    order = np.argsort(-scores, kind="stable")  # highest first
    level = beta / len(grid)
    best: CanaryResult | None = None
    for kp, km in grid:
        correct = int(included[order[:kp]].sum()) + int((~included[order[m - km:]]).sum() if km else 0)
        eps = epsilon_lower_bound(correct, kp + km, delta, level, m=m)
        result = CanaryResult(eps, kp + km, correct, kp, km, m, beta, delta, len(grid))
        if best is None or eps > best.epsilon_lb:
            best = result
    assert best is not None
    return best

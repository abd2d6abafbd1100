"""The one-run canary audit: the bound of Steinke, Nasr and Jagielski (2023), and end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from fedshield.privacy.canary import (
    CanaryError,
    audit_scores,
    default_grid,
    epsilon_lower_bound,
    p_value,
    perfect_attack_bound,
)


def _q(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


# ----------------------------------------------------------------------------- the bound


def test_monotone_in_correct_guesses():
    bounds = [epsilon_lower_bound(v, 100, 1e-5, m=200) for v in range(0, 101, 5)]
    assert all(a <= b + 1e-12 for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0 and bounds[-1] > 3  # 100/100 right certifies a lot
    assert len(set(bounds)) > 5  # and strictly grows past chance


def test_about_zero_at_chance():
    assert epsilon_lower_bound(50, 100, 1e-5, m=200) == 0.0
    assert epsilon_lower_bound(52, 100, 1e-5, m=200) == 0.0  # within noise of a coin
    assert epsilon_lower_bound(0, 100, 1e-5, m=200) == 0.0
    assert epsilon_lower_bound(500, 1000, 0.0) == 0.0


@pytest.mark.parametrize("v, r", [(80, 100), (30, 40), (180, 200)])
def test_pure_epsilon_bound_is_where_the_binomial_tail_crosses_beta(v, r):
    """δ = 0: ε_lb is the root of P[Bin(r, q(ε)) >= v] = β, checked from the pmf directly."""
    eps = epsilon_lower_bound(v, r, 0.0, beta=0.05)
    assert eps > 0

    def tail(e):  # brute force: sum of the pmf, no survival function
        q = _q(e)
        return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))

    assert tail(eps) == pytest.approx(0.05, rel=1e-6)
    assert tail(eps - 1e-6) < 0.05  # rejected just below the bound ...
    assert tail(eps + 1e-6) > 0.05  # ... and not beyond it
    assert tail(eps * 0.99) < 0.05


def test_delta_term_matches_the_theorem_by_brute_force():
    """p = f(v) + 2mδ max_i (f(v-i) - f(v))/i with f the binomial tail (Theorem 5.2)."""
    m, r, v, eps, delta = 300, 60, 50, 1.2, 1e-4
    q = _q(eps)
    f = lambda x: float(binom.sf(x - 1, r, q))  # noqa: E731
    expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    # δ only makes the bound smaller, and more so with more canaries.
    assert epsilon_lower_bound(v, r, delta, m=m) < epsilon_lower_bound(v, r, 0.0, m=m)
    assert epsilon_lower_bound(v, r, delta, m=10 * m) < epsilon_lower_bound(v, r, delta, m=m)


@pytest.mark.parametrize("r", [5, 20, 100, 400])
def test_never_above_what_a_perfect_attack_certifies(r):
    cap = perfect_attack_bound(r, 0.05)
    assert cap == pytest.approx(math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r))))
    for v in range(0, r + 1, max(1, r // 10)):
        assert epsilon_lower_bound(v, r, 1e-5, m=2 * r) <= cap + 1e-9
    assert epsilon_lower_bound(r, r, 0.0) == pytest.approx(cap, abs=1e-6)


def test_audit_splits_confidence_across_the_grid():
    rng = np.random.default_rng(0)
    m = 200
    included = rng.random(m) < 0.5
    scores = included + rng.normal(0, 1e-3, m)  # a perfect attack
    one = audit_scores(scores, included, 1e-5, guess_grid=[(20, 20)])
    assert (one.correct, one.guesses, one.grid_size) == (40, 40, 1)
    assert one.epsilon_lb == pytest.approx(epsilon_lower_bound(40, 40, 1e-5, 0.05, m=m))
    many = audit_scores(scores, included, 1e-5, guess_grid=[(20, 20), (10, 10), (5, 5), (30, 0)])
    assert many.grid_size == 4
    # The same (20, 20) point tested at β/4 certifies less than at β.
    assert epsilon_lower_bound(40, 40, 1e-5, 0.05 / 4, m=m) < one.epsilon_lb
    assert many.epsilon_lb == pytest.approx(epsilon_lower_bound(many.correct, many.guesses, 1e-5, 0.05 / 4, m=m))
    best = audit_scores(scores, included, 1e-5)
    assert best.grid_size == len(default_grid(m)) and best.epsilon_lb > 2
    assert best.correct == best.guesses


def test_random_scores_certify_nothing():
    rng = np.random.default_rng(1)
    hits = [audit_scores(rng.normal(size=200), rng.random(200) < 0.5, 1e-5).epsilon_lb for _ in range(20)]
    assert sum(h > 0 for h in hits) <= 3  # each audit is wrong with probability <= 5%


def test_guesses_use_both_ends():
    included = np.array([True, True, False, False, True, False])
    scores = np.array([5.0, 4.0, -3.0, -4.0, 0.0, 0.1])
    r = audit_scores(scores, included, 0.0, guess_grid=[(2, 2)])
    assert (r.k_plus, r.k_minus, r.correct) == (2, 2, 4)
    r = audit_scores(scores, included, 0.0, guess_grid=[(3, 0)])
    assert r.correct == 2  # top 3: two included, then 0.1 (out)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(CanaryError, match="one inclusion flag per score"):
        audit_scores(np.zeros(3), np.zeros(2, bool), 1e-5)
    with pytest.raises(CanaryError, match="k\\+ \\+ k- <= m"):
        audit_scores(np.zeros(3), np.zeros(3, bool), 1e-5, guess_grid=[(2, 2)])
    with pytest.raises(CanaryError, match="correct <= guesses"):
        epsilon_lower_bound(5, 4, 1e-5)


# ----------------------------------------------------------------------------- end to end


def _audit(tiny_bert, tmp_path, name: str, **extra) -> dict:
    from fedshield.simulations.empirical import empirical_main

    base = {
        "task.model": str(tiny_bert), "task.max_length": 16,
        "federation.num_sites": 2, "federation.rounds": 2, "federation.seed": 7,
        "training.trainable": "all", "training.optimizer": "adamw", "training.learning_rate": 0.01,
        "training.batch_size": 32, "training.local_epochs": 15,
        "privacy.delta": 1e-5, "simulation.client_cpus": 1,
    }
    base.update(extra)
    out = tmp_path / name
    code = empirical_main(["--canaries", "200", "--seed", "3", "--base-rows", "60", "--test-rows", "40",
                           "--out", str(out), *[f"{k}={v}" for k, v in base.items()]])
    record = json.loads((out / "empirical_audit.json").read_text())
    record["exit_code"] = code
    assert "leaks more than it claims" in (out / "empirical_audit.md").read_text()
    return record


@pytest.mark.e2e
def test_memorizing_task_without_dp_gives_a_lower_bound_clearly_above_one(tiny_bert, tmp_path):
    # Without DP the site still clips the batch gradient at privacy.max_grad_norm (a fair
    # baseline for DP runs); here we want a model free to memorize, so the norm is lifted.
    # Five local epochs, not fifteen: trained longer, the tiny model grows so confident on
    # every unseen canary that an excluded canary whose random label matches its guess
    # scores like a memorized one (measured: bound 0.08 at 15 epochs, 2.74 at 5, seeds 3 and 4).
    r = _audit(tiny_bert, tmp_path, "no-dp", privacy="none",
               **{"privacy.max_grad_norm": 1e6, "training.local_epochs": 5})
    print("\nno DP:", {k: r[k] for k in ("epsilon_lower_bound", "guesses", "correct", "canary_losses")})
    assert r["m"] == 200 and r["privacy"] == "none" and r["accounted_epsilon"] is None
    assert r["epsilon_lower_bound"] > 1.5
    assert r["exit_code"] == 0


@pytest.mark.e2e
def test_with_dp_the_lower_bound_is_at_or_below_the_accounted_epsilon(tiny_bert, tmp_path):
    # Per-sample gradients of every weight (embeddings included) cost ~8x a plain step on
    # 2 CPU cores: one round of few local epochs keeps this run short; ε is calibrated to it.
    r = _audit(tiny_bert, tmp_path, "dp", privacy="dp-sgd", **{"privacy.target_epsilon": 4,
                                                               "privacy.max_grad_norm": 1.0,
                                                               "training.local_epochs": 3,
                                                               "federation.rounds": 1})
    shown = ("epsilon_lower_bound", "accounted_epsilon", "guesses", "correct", "canary_losses")
    print("\nDP:", {k: r[k] for k in shown})
    assert 0 < r["accounted_epsilon"] <= 4 + 1e-6
    assert r["epsilon_lower_bound"] <= r["accounted_epsilon"]
    assert not r["leaks_more_than_claimed"] and r["exit_code"] == 0

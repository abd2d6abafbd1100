"""fedshield/rules.py: each rule that the config's validation and the coordinator share,
written once. The config's own error lines for them are in test_config / test_poisoning /
test_secagg / test_site_dp; here each rule alone, and that both sides reach the one rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedshield import conf, rules


def test_each_robust_rules_minimum():
    f = 2
    assert [rules.min_sites(r, f, 0.25) for r in rules.ROBUST_RULES] == [5, 8, 7, 7, 11]
    assert rules.min_sites("fedtrimmedavg", 1, 0.2) == 5  # floor(0.2 * 5) = 1
    assert rules.min_sites("fedtrimmedavg", 1, 0.0) == rules.UNREACHABLE  # trims nothing: withstands nobody
    assert rules.min_sites("fedtrimmedavg", 0, 0.0) == 1  # withstands nobody, asked to withstand nobody
    assert rules.min_sites("multikrum", 1, krum_select=6) == 7  # a fixed m keeps at most n - f
    assert rules.min_sites("multikrum", 1, krum_select=0) == 5
    for plain in rules.PLAIN_RULES:
        assert rules.min_sites(plain, 3) == 1


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.2, 0.25, 1 / 3, 0.3, 0.49])
@pytest.mark.parametrize("f", [1, 2, 3, 7])
def test_the_trimmed_means_minimum_is_the_smallest_n_that_trims_f(beta, f):
    """The definition, by brute force: the smallest n with floor(beta n) >= f (float
    rounding at the boundary included, e.g. 0.1 * 30)."""
    n = rules.min_sites("fedtrimmedavg", f, beta)
    assert math.floor(beta * n) >= f
    assert all(math.floor(beta * m) < f for m in range(1, n))


def test_sites_per_round():
    assert rules.sites_per_round(1.0, 8) == 8
    assert rules.sites_per_round(0.5, 8) == 4
    assert rules.sites_per_round(0.01, 8) == 1  # at least one
    assert rules.sites_per_round(0.67, 3) == 2
    assert rules.sites_per_round(0.5, 5) == 2  # Python's round: half to even, as the sampler always did
    assert rules.sites_per_round(1.0, 0) == 0  # never more than there are


def test_lifetime_budget_is_the_target_when_unset():
    assert rules.lifetime_budget(None, 8.0) == 8.0
    assert rules.lifetime_budget(3.0, 8.0) == 3.0
    assert rules.lifetime_budget(20.0, 8.0) == 20.0  # a budget above the run's target is the site's to set


def test_what_site_level_dp_runs_with():
    assert rules.site_dp_problem("fedavg", None) is None
    for rule in ("fedprox", "fedadam", *rules.ROBUST_RULES):
        problem = rules.site_dp_problem(rule, None)
        assert problem is not None and problem.startswith(f"privacy.unit=site with federation.strategy={rule}:")
    assert "site_clip_norm already bounds" in str(rules.site_dp_problem("fedavg", 2.0))


def test_what_secure_aggregation_runs_with():
    assert rules.secagg_problem("fedavg", None) is None and rules.secagg_problem("fedprox", None) is None
    assert "fedavg or fedprox" in str(rules.secagg_problem("krum", None))
    assert "FedAdam" in str(rules.secagg_problem("fedadam", None))
    assert "update_norm_bound" in str(rules.secagg_problem("fedavg", 1.0))
    assert rules.secagg_sites_problem(3) is None
    assert "with 2 site(s) per round: needs at least 3" in str(rules.secagg_sites_problem(2))


@pytest.mark.parametrize("settings, words", [
    ((1.0, 20, None, 0.3, None), None),
    ((1.0, 20, 0, 0.3, 0.6), None),
    ((0.0, 20, None, 0.3, None), "secagg_clip_range=0.0"),
    ((math.inf, 20, None, 0.3, None), "secagg_clip_range=inf"),
    ((1.0, 1, None, 0.3, None), "secagg_bits=1: must be between 2 and 30"),
    ((1.0, 31, None, 0.3, None), "secagg_bits=31"),
    ((1.0, 20, 2, 0.3, None), "secagg_neighbours=2"),
    ((1.0, 20, 5, 0.3, None), "secagg_neighbours=5"),
    ((1.0, 20, None, 0.5, None), "must be in [0, 0.5)"),
    ((1.0, 20, None, 0.3, 0.5), "must be in (0.5, 1]"),
    ((1.0, 20, None, 0.3, 0.9), "lower one of them"),
])
def test_secagg_settings_in_range(settings, words):
    from fedshield.privacy.secure_sum import SecAggSettings

    problem = rules.secagg_settings_problem(*settings)
    assert (problem is None) if words is None else (words in str(problem))
    assert SecAggSettings(*settings).problem() == problem  # the arithmetic's own check is this one


def test_both_sides_apply_the_one_rule():
    """The config refuses what the coordinator's strategy refuses, with the rule's one line."""
    from fedshield.privacy import accountant
    from fedshield.strategies import flower
    from fedshield.strategies.site_dp import SiteLevelDP
    from fedshield.strategies.stack import SiteLevel, build_stack

    assert flower.STRATEGIES == conf.schema.STRATEGIES == rules.RULES  # one tuple, named where it is used
    assert rules.RULES == (*rules.PLAIN_RULES, *rules.ROBUST_RULES) and "bulyan" in rules.ROBUST_RULES
    assert conf.schema.ACCOUNTANTS == accountant.ACCOUNTANTS == ("pld", "rdp", "prv")
    assert conf.schema.NEIGHBOURING == accountant.NEIGHBOURING == (accountant.ADD_REMOVE, accountant.REPLACE_ONE)
    line = rules.site_dp_problem("krum", None)
    with pytest.raises(conf.ConfigError) as refused:
        conf.load_config(["privacy.unit=site", "training.center_features=false", "federation.strategy=krum"])
    assert str(refused.value) == f"config: {line}"
    dp = SiteLevelDP(clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, planned_sites=2)
    class Books:  # the stack refuses before any spend
        def record_round(self, server_round):
            raise AssertionError("no round runs")

        def record_skellam_round(self, server_round, variance):
            raise AssertionError("no round runs")

    with pytest.raises(ValueError) as built:
        build_stack(flower.flower_strategy("krum"), {1: "a", 2: "b"}, fraction_train=1.0, seed=1,
                    expected_arrays={"w": ((3,), np.dtype(np.float32))}, site_level=SiteLevel(dp, Books()))
    assert str(built.value) == line
    for name in rules.RULES:
        assert flower.min_replies(flower.flower_strategy(name, num_malicious=1)) == rules.min_sites(name, 1)

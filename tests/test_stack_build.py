"""strategies/stack.py: what `build_stack` composes for each mode, and the combinations it
refuses (each by the wrapper that cannot honour it)."""

from __future__ import annotations

import pytest

from fedshield.strategies.flower import flower_strategy
from fedshield.strategies.norm_bound import NormBound
from fedshield.strategies.reply_gate import ReplyGate
from fedshield.strategies.robust_guard import RobustGuard
from fedshield.strategies.selection import SiteSelection
from fedshield.strategies.site_dp_fedavg import SiteDPFedAvg
from fedshield.strategies.stack import SiteLevel, build_stack
from fedshield.strategies.wrapper import wrapped
from tests.test_site_aware import EXPECTED, SITES
from tests.test_site_dp import Spends
from tests.test_stack_aggregation import mechanism


def kinds(strategy) -> list[type]:
    return [type(s) for s in wrapped(strategy)]


def build(rule: str = "fedavg", **kwargs):
    return build_stack(flower_strategy(rule), SITES, fraction_train=1.0, seed=1, expected_arrays=EXPECTED, **kwargs)


def test_the_plain_stack_and_the_site_level_dp_stack():
    rule = flower_strategy("krum")
    plain = build_stack(rule, SITES, fraction_train=1.0, seed=1, expected_arrays=EXPECTED)
    assert kinds(plain) == [SiteSelection, ReplyGate, NormBound, RobustGuard, type(rule)]
    assert wrapped(plain)[-1] is rule  # Flower's own strategy aggregates, untouched
    assert plain.excluded is plain.strategy.excluded  # the gate excludes, the selection reads: one mapping
    site = build(site_level=SiteLevel(mechanism(sample_rate=0.5), Spends([])))
    assert kinds(site)[:3] == [SiteSelection, ReplyGate, SiteDPFedAvg]
    assert site.poisson is not None  # sites sampled by the mechanism's Poisson sampler


def test_build_stack_refuses_what_no_wrapper_can_honour():
    books = Spends([])
    with pytest.raises(ValueError, match="distributed site-level noise needs secure aggregation"):
        build(site_level=SiteLevel(mechanism(distributed=True), books))
    with pytest.raises(ValueError, match="SiteDPFedAvg replaces the aggregation"):
        build(site_level=SiteLevel(mechanism(), books), update_norm_bound=3.0)
    with pytest.raises(ValueError, match="privacy.unit=site with federation.strategy=fedmedian"):
        build("fedmedian", site_level=SiteLevel(mechanism(), books))

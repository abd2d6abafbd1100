"""server/settings.py: the coordinator's typed settings, resolved once from the validated config."""

from __future__ import annotations

import dataclasses

import pytest

from fedshield import conf, rules
from fedshield.conf.config import Config
from fedshield.privacy.secure_sum import settings_of
from fedshield.server.settings import CoordinatorSettings


def test_the_defaults_typed():
    s = CoordinatorSettings.from_config(Config.load([]))
    assert (s.rounds, s.seed, s.unit, s.site_level, s.secagg) == (40, 42, "record", None, None)
    assert s.accounting.dp and s.accounting.accountant == "pld" and s.accounting.neighbouring == "add-remove"
    assert s.accounting.budget == 8.0 and isinstance(s.accounting.budget, float)
    assert s.rule.strategy == "fedavg" and not s.rule.robust and s.rule.min_sites == 1
    assert s.sites.expected == 8 and s.sites.per_round == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rounds = 3  # type: ignore[misc]


def test_each_default_by_its_one_rule():
    cfg = Config.load(["privacy.budget_epsilon=3", "federation.num_sites=10", "federation.fraction_train=0.5",
                            "federation.strategy=krum"])
    s = CoordinatorSettings.from_config(cfg)
    assert s.accounting.budget == rules.lifetime_budget(3.0, 8.0) == 3.0
    assert s.sites.per_round == rules.sites_per_round(0.5, 10) == 5
    assert s.rule.robust and s.rule.min_sites == rules.min_sites("krum", 1) == 5


def test_site_level_dp_and_secure_aggregation():
    cfg = Config.load(["privacy.unit=site", "training.center_features=false",
                            "federation.secure_aggregation=secaggplus", "privacy.site_noise_multiplier=2",
                            "federation.secagg_neighbours=4", "federation.secagg_timeout_s=30"])
    s = CoordinatorSettings.from_config(cfg)
    assert s.unit == "site" and s.site_level is not None and s.secagg is not None
    assert (s.site_level.clip_norm, s.site_level.noise_multiplier, s.site_level.delta) == (1.0, 2.0, 1e-5)
    assert s.secagg.settings == settings_of(cfg.federation) and s.secagg.settings.neighbours == 4
    assert s.secagg.timeout_s == 30.0


@pytest.mark.parametrize("overrides", [
    ["privacy.unit=site", "training.center_features=false", "federation.strategy=krum"],
    ["federation.secure_aggregation=secaggplus", "federation.num_sites=2"],
    ["federation.strategy=bulyan", "federation.num_malicious=2"],
    ["privacy.unit=sites"],
    ["privacy.accountant=gdp"],
])
def test_a_config_cannot_be_changed_past_its_checks(overrides):
    """The settings take a Config, which exists only valid: a program that changes one
    (`with_values`, the only way) gets the line that loading the same values gives, and
    the settings never see an unchecked combination."""
    with pytest.raises(conf.ConfigError) as at_load:
        Config.load(overrides)
    values = dict(conf.parse_override(item) for item in overrides)
    with pytest.raises(conf.ConfigError) as changed:
        Config.load([]).with_values(values)
    assert str(changed.value) == str(at_load.value) and "\n" not in str(at_load.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config.load([]).privacy.unit = "site"  # type: ignore[misc]

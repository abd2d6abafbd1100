"""The coordinator's settings, typed and frozen, resolved once at the edge.

`CoordinatorSettings.from_config(config)` reads the validated, immutable Config
(conf/config.py) once, at the start of `run_federation`; the coordinator's helpers (RoundLog,
the federation's books, secure aggregation, the report) take these objects, so that a mode
is one of its Literal values, a number is a number, and a default (the lifetime budget,
sites per round) is resolved by its one rule (fedshield.rules). What travels to the sites
is the protocol's plan (protocol.plan_record), as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast, get_args

from fedshield import conf, rules
from fedshield.conf.config import Config
from fedshield.privacy.secure_sum import SecAggSettings
from fedshield.rules import Accountant, Neighbouring, NormAction, PrivacyMode, PrivacyUnit, RuleName
from fedshield.server import tracking


def _choice(key: str, value: object, kind: object) -> str:
    """`value` as one of the Literal `kind`'s strings; a value outside it is a config error."""
    allowed = cast(tuple[str, ...], get_args(kind))
    if value not in allowed:
        raise conf.ConfigError(f"config: {key}={value!r}: must be one of {', '.join(allowed)}")
    return str(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class AccountingPolicy:
    """Record-level DP as every site accounts it (privacy.*): the run's terms, not a site's own."""

    mode: PrivacyMode
    delta: float
    accountant: Accountant
    neighbouring: Neighbouring
    target_epsilon: float
    budget_epsilon: float | None  # None: the target (rules.lifetime_budget)
    max_grad_norm: float
    count_noise_multiplier: float  # add-remove: the noise on each site's released record count
    center_noise_multiplier: float  # feature centering's one release per site

    @property
    def dp(self) -> bool:
        return self.mode == "dp-sgd"

    @property
    def budget(self) -> float:
        """Each site's lifetime ε for its dataset."""
        return rules.lifetime_budget(self.budget_epsilon, self.target_epsilon)


@dataclass(frozen=True)
class SiteLevelPolicy:
    """Site-level DP (privacy.unit=site, DP-FedAvg): the federation's own budget."""

    clip_norm: float
    noise_multiplier: float | None  # None: calibrated to target_epsilon
    target_epsilon: float
    delta: float


@dataclass(frozen=True)
class SecAggPolicy:
    """Secure aggregation (federation.secure_aggregation=secaggplus)."""

    settings: SecAggSettings  # the arithmetic's parameters (privacy/secure_sum.py)
    timeout_s: float  # each key-exchange stage


@dataclass(frozen=True)
class RulePolicy:
    """The aggregation rule and the coordinator-side defences (federation.*)."""

    strategy: RuleName
    num_malicious: int
    trim_fraction: float
    krum_select: int
    update_norm_bound: float | None
    update_norm_action: NormAction
    proximal_mu: float  # fedprox
    server_learning_rate: float  # fedadam

    @property
    def robust(self) -> bool:
        return self.strategy in rules.ROBUST_RULES

    @property
    def min_sites(self) -> int:
        """Usable updates a round needs for the rule's guarantee (rules.min_sites)."""
        return rules.min_sites(self.strategy, self.num_malicious, self.trim_fraction, self.krum_select)


@dataclass(frozen=True)
class SiteRegistry:
    """Which sites the run waits for and asks (federation.*)."""

    expected: int  # federation.num_sites
    min_sites: int  # fewer that can join stop the run
    fraction_train: float
    round_timeout_s: float

    @property
    def per_round(self) -> int:
        """Sites a round asks when all expected sites joined (rules.sites_per_round)."""
        return rules.sites_per_round(self.fraction_train, self.expected)


@dataclass(frozen=True)
class CoordinatorSettings:
    """Everything the coordinator's own code reads of the config, typed."""

    task: str  # task.name (the report's first line; the task itself is built from the config)
    partition: str
    rounds: int
    seed: int
    max_empty_rounds: int
    batch_size: int  # with local_epochs: what each site's round must spend (privacy.ledger_check)
    local_epochs: int
    device: str
    save_model: bool
    sites: SiteRegistry
    rule: RulePolicy
    accounting: AccountingPolicy
    site_level: SiteLevelPolicy | None  # None: privacy.unit=record
    secagg: SecAggPolicy | None  # None: federation.secure_aggregation=off
    tracking: tracking.TrackingKind = "none"  # output.tracking (server/tracking.py)

    @property
    def unit(self) -> PrivacyUnit:
        return "site" if self.site_level is not None else "record"

    @classmethod
    def from_config(cls, cfg: Config) -> CoordinatorSettings:
        """The settings of a Config (valid by construction: every Config went through the
        schema's checks, and none can change afterwards)."""
        t, f, tr, p, o = cfg.task, cfg.federation, cfg.training, cfg.privacy, cfg.output
        unit = _choice("privacy.unit", p.unit, PrivacyUnit)
        secure = _choice("federation.secure_aggregation", f.secure_aggregation, rules.SecureAggregation)
        kind = cast(tracking.TrackingKind, _choice("output.tracking", o.tracking, tracking.TrackingKind))
        tracking.require(kind)  # its package, before a run directory is made
        threshold = _float_or_none(f.secagg_reconstruction_threshold)
        neighbours = None if f.secagg_neighbours is None else int(f.secagg_neighbours)
        return cls(
            task=t.name, partition=f.partition, rounds=f.rounds, seed=f.seed,
            max_empty_rounds=f.max_empty_rounds, batch_size=tr.batch_size,
            local_epochs=tr.local_epochs, device=tr.device, save_model=o.save_model,
            sites=SiteRegistry(expected=f.num_sites, min_sites=f.min_sites,
                               fraction_train=f.fraction_train, round_timeout_s=f.round_timeout_s),
            rule=RulePolicy(
                strategy=cast(RuleName, _choice("federation.strategy", f.strategy, RuleName)),
                num_malicious=f.num_malicious, trim_fraction=f.trim_fraction,
                krum_select=f.krum_select, update_norm_bound=_float_or_none(f.update_norm_bound),
                update_norm_action=cast(NormAction, _choice("federation.update_norm_action",
                                                            f.update_norm_action, NormAction)),
                proximal_mu=f.proximal_mu, server_learning_rate=f.server_learning_rate),
            accounting=AccountingPolicy(
                mode=cast(PrivacyMode, _choice("privacy.mode", p.mode, PrivacyMode)), delta=p.delta,
                accountant=cast(Accountant, _choice("privacy.accountant", p.accountant, Accountant)),
                neighbouring=cast(Neighbouring, _choice("privacy.neighbouring", p.neighbouring, Neighbouring)),
                target_epsilon=p.target_epsilon, budget_epsilon=_float_or_none(p.budget_epsilon),
                max_grad_norm=p.max_grad_norm, count_noise_multiplier=p.count_noise_multiplier,
                center_noise_multiplier=p.center_noise_multiplier),
            site_level=SiteLevelPolicy(
                clip_norm=p.site_clip_norm, noise_multiplier=_float_or_none(p.site_noise_multiplier),
                target_epsilon=p.site_target_epsilon, delta=p.site_delta) if unit == "site" else None,
            secagg=SecAggPolicy(
                SecAggSettings(f.secagg_clip_range, f.secagg_bits, neighbours,
                               f.secagg_max_dropout_fraction, threshold),
                timeout_s=f.secagg_timeout_s) if secure == "secaggplus" else None,
            tracking=kind,
        )

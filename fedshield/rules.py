"""One home for each rule that the config's validation (conf/) and the coordinator
(strategies/, server/) both apply: written once here, called from both sides.

- `min_sites`: the usable updates per round a robust rule needs to withstand f poisoned ones.
- `sites_per_round`: how many sites a round asks, from federation.fraction_train and the count.
- `lifetime_budget`: a site's lifetime ε (privacy.budget_epsilon, or target_epsilon if unset).
- `site_dp_problem`, `secagg_problem`, `secagg_sites_problem`, `secagg_settings_problem`: the
  combinations that site-level DP or secure aggregation cannot make honest, as one line
  naming the config keys (None: no problem).

The ground floor: this module imports nothing of ours, and every room may import it.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

# The string modes of the config, once: the Literal types the coordinator's typed settings
# use (server/settings.py) and the tuples the config's validation allows (conf/schema.py).
PlainRule = Literal["fedavg", "fedprox", "fedadam"]
RobustRule = Literal["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
RuleName = Literal[PlainRule, RobustRule]  # federation.strategy
NormAction = Literal["clip", "reject"]  # federation.update_norm_action
SecureAggregation = Literal["off", "secaggplus"]  # federation.secure_aggregation
PrivacyMode = Literal["none", "dp-sgd"]  # privacy.mode
PrivacyUnit = Literal["record", "site"]  # privacy.unit
Accountant = Literal["pld", "rdp", "prv"]  # privacy.accountant (privacy/accountant.py's)
Neighbouring = Literal["add-remove", "replace-one"]  # privacy.neighbouring (privacy/accountant.py's)

PLAIN_RULES: tuple[str, ...] = get_args(PlainRule)
ROBUST_RULES: tuple[str, ...] = get_args(RobustRule)
RULES: tuple[str, ...] = get_args(RuleName)
NORM_ACTIONS: tuple[str, ...] = get_args(NormAction)
SECURE_AGGREGATION: tuple[str, ...] = get_args(SecureAggregation)
PRIVACY_MODES: tuple[str, ...] = get_args(PrivacyMode)
PRIVACY_UNITS: tuple[str, ...] = get_args(PrivacyUnit)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
NEIGHBOURING: tuple[str, ...] = get_args(Neighbouring)
# What runs on a masked sum (secure aggregation): FedAvg and FedProx aggregate by the
# weighted mean alone; FedAdam keeps a server optimizer fedshield does not run on the sum.
SUM_RULES = ("fedavg", "fedprox")
# What DP-FedAvg (privacy.unit=site) replaces: the plain weighted mean.
SITE_DP_RULES = ("fedavg",)
# No count of sites lets the rule withstand f (fedtrimmedavg with trim_fraction 0 trims nothing).
UNREACHABLE = 2**31

# SecAgg+ quantization (privacy/secure_sum.py): Flower's quantizer rounds into int32.
SECAGG_MIN_BITS = 2
SECAGG_MAX_BITS = 30
# With 2 sites a round the threshold is both of them: one dropout leaves one update.
SECAGG_MIN_SITES = 3

# The formula each robust rule's minimum follows, as the config's error line states it.
MIN_SITES_RULE = {
    "fedmedian": "2 * num_malicious + 1",
    "fedtrimmedavg": "floor(federation.trim_fraction * n) >= num_malicious",
    "krum": "2 * num_malicious + 3",
    "multikrum": "max(2 * num_malicious + 3, federation.krum_select + num_malicious)",
    "bulyan": "4 * num_malicious + 3",
}


def min_sites(rule: str, num_malicious: int, trim_fraction: float = 0.2, krum_select: int = 0) -> int:
    """The fewest usable updates with which `rule` withstands `num_malicious` poisoned ones
    (strategies/flower.py's table: fedmedian 2f+1, fedtrimmedavg floor(beta n) >= f, krum and
    multikrum 2f+3, bulyan 4f+3); 1 for the plain averages; UNREACHABLE if no count suffices."""
    f = int(num_malicious)
    if rule == "fedmedian":
        return 2 * f + 1
    if rule == "fedtrimmedavg":
        if f == 0:
            return 1
        if not trim_fraction > 0:
            return UNREACHABLE
        n = max(1, math.ceil(f / trim_fraction))
        while math.floor(trim_fraction * n) < f:  # float rounding at the boundary
            n += 1
        return n
    if rule == "krum":
        return 2 * f + 3
    if rule == "multikrum":  # with a fixed m, Multi-Krum must also keep at most n - f updates
        return max(2 * f + 3, int(krum_select) + f)
    if rule == "bulyan":
        return 4 * f + 3
    return 1


def sites_per_round(fraction_train: float, num_sites: int) -> int:
    """Sites a round asks (without site-level DP's Poisson sampling): round(fraction x sites),
    at least 1 and at most all of them."""
    return min(max(1, round(fraction_train * num_sites)), num_sites)


def lifetime_budget(budget_epsilon: float | None, target_epsilon: float) -> float:
    """A site's lifetime budget for its dataset: privacy.budget_epsilon, or the run's target
    ε when it is not set (null)."""
    return budget_epsilon if budget_epsilon is not None else target_epsilon


def site_dp_problem(rule: str, update_norm_bound: float | None) -> str | None:
    """Why site-level DP (DP-FedAvg, privacy.unit=site) cannot run with this aggregation
    rule and coordinator-side norm bound, in one line; None if it can."""
    if rule not in SITE_DP_RULES:
        return (f"privacy.unit=site with federation.strategy={rule}: DP-FedAvg aggregates by its own "
                "clipped, noised sum of the sites' updates (federation.strategy=fedavg); a robust rule picks "
                "individual updates and FedAdam/FedProx keep state the noise analysis does not cover")
    if update_norm_bound is not None:
        return ("privacy.unit=site with federation.update_norm_bound: privacy.site_clip_norm already bounds "
                "every update (leave update_norm_bound null)")
    return None


def secagg_problem(rule: str, update_norm_bound: float | None) -> str | None:
    """Why secure aggregation (the coordinator sees only the sum) cannot run with this rule
    and norm bound, in one line; None if it can."""
    if rule not in SUM_RULES:
        return (f"federation.secure_aggregation=secaggplus with federation.strategy={rule}: the coordinator "
                "sees only the sum, so a robust rule (which compares individual updates) or FedAdam (a server "
                "optimizer fedshield does not run on a masked sum) cannot run; use fedavg or fedprox")
    if update_norm_bound is not None:
        return ("federation.secure_aggregation=secaggplus with federation.update_norm_bound: the coordinator never "
                "sees one update, so it cannot bound one; leave update_norm_bound null (privacy.unit=site clips "
                "each update at its site)")
    return None


def secagg_sites_problem(per_round: int) -> str | None:
    """Why secure aggregation cannot hide one update among `per_round` sites; None if it can."""
    if per_round < SECAGG_MIN_SITES:
        return (f"federation.secure_aggregation=secaggplus with {per_round} site(s) per round: needs at least "
                f"{SECAGG_MIN_SITES} (with 2, the threshold is both of them and a single dropout leaves one update, "
                "nothing to hide in)")
    return None


def secagg_settings_problem(clip_range: float, bits: int, neighbours: int | None, max_dropout_fraction: float,
                            reconstruction_threshold: float | None) -> str | None:
    """The SecAgg+ setting (federation.secagg_*) that is out of range, in one line; or None."""
    if not (math.isfinite(clip_range) and clip_range > 0):
        return f"federation.secagg_clip_range={clip_range}: must be a finite number > 0"
    if not SECAGG_MIN_BITS <= bits <= SECAGG_MAX_BITS:
        return f"federation.secagg_bits={bits}: must be between {SECAGG_MIN_BITS} and {SECAGG_MAX_BITS}"
    if neighbours is not None and (neighbours < 0 or neighbours % 2 or neighbours == 2):
        return (f"federation.secagg_neighbours={neighbours}: must be null (auto), 0 (every sampled site) "
                "or an even number >= 4 (the neighbourhood is a ring, k/2 on each side)")
    if not 0 <= max_dropout_fraction < 0.5:
        return (f"federation.secagg_max_dropout_fraction={max_dropout_fraction}: must be in [0, 0.5): "
                "the reconstruction threshold stays a strict majority of each neighbourhood")
    t = reconstruction_threshold
    if t is not None and not (math.isfinite(t) and 0.5 < t <= 1):
        return (f"federation.secagg_reconstruction_threshold={t}: must be in (0.5, 1] (a strict majority of a "
                "neighbourhood) or null")
    if t is not None and t > 1 - max_dropout_fraction + 1e-9:
        left = 1 - max_dropout_fraction
        return (f"federation.secagg_reconstruction_threshold={t:g} with federation.secagg_max_dropout_fraction="
                f"{max_dropout_fraction:g}: after the tolerated dropouts only {left:g} of a neighbourhood "
                "is left to rebuild a secret; lower one of them")
    return None

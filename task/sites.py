"""Virtual sites and the one δ < 1/n rule.

`virtual_sites(cfg)` is the simulation's federation: the task's training pool split by
`federation.partition` (task.partition), one named share per virtual site, the same on the
coordinator and in every simulation worker (it depends on the config alone).

`check_delta` is the one place δ < 1/n is enforced. A δ of 1/n or more allows a mechanism
that publishes one record in the clear with probability δ and still "satisfies" (ε, δ)-DP,
so every site must have δ well below 1/n for its n records.
"""

from __future__ import annotations

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.task.data import LabeledData
from fedshield.task.partition import partition, site_names
from fedshield.task.pipeline import TaskSpec, pool_and_test


def virtual_sites(cfg: Config) -> list[tuple[str, LabeledData]]:
    """(name, records) for every virtual site, in partition order (partition-id = index)."""
    fed = cfg.federation
    key = (TaskSpec.of(cfg.task), fed.num_sites, fed.partition, fed.seed,
           fed.dirichlet_alpha)
    if key not in _SPLITS:  # computed once per process: every worker message needs it
        pool, _ = pool_and_test(cfg)
        parts = partition(pool.labels, fed.num_sites, fed.partition, seed=fed.seed,
                          alpha=fed.dirichlet_alpha, groups=pool.groups)
        names = site_names(fed.partition, fed.num_sites, pool.groups)
        if len(_SPLITS) >= 4:
            _SPLITS.clear()
        _SPLITS[key] = tuple((name, pool.subset(idx)) for name, idx in zip(names, parts, strict=True))
    return list(_SPLITS[key])


_SPLITS: dict[tuple[object, ...], tuple[tuple[str, LabeledData], ...]] = {}


def check_delta(cfg: Config, site: str, n: int) -> None:
    """Refuse a δ that is not below 1/n for a site with n records (DP runs only)."""
    if cfg.privacy.mode == "none":
        return
    delta = cfg.privacy.delta
    if delta >= 1.0 / max(n, 1):
        raise conf.ConfigError(
            f"privacy.delta={delta:g}: must be below 1/n = {1.0 / max(n, 1):.3g} for site {site} with n={n} records"
        )

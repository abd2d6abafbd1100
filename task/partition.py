"""How a pooled dataset is split across virtual sites.

Simulations need non-IID sites that are reproducible from the seed alone: `iid` (a
shuffle), `dirichlet` (label skew, the Dir(alpha) scheme of Hsu et al. 2019 / NIID-Bench)
and `natural` (one site per real group, e.g. the four heart-disease hospitals).
Depends on numpy only, so the site and the coordinator compute the same split.
"""

from __future__ import annotations

import numpy as np

from fedshield.privacy.errors import FedShieldError

METHODS = ("iid", "dirichlet", "natural")
DIRICHLET_ATTEMPTS = 200


class PartitionError(FedShieldError, ValueError):
    """The data cannot be split across the sites as asked."""


def _group_names(groups: np.ndarray | None, num_sites: int) -> list[str]:
    if groups is None:
        raise PartitionError(
            "partition 'natural' needs a site for every record (task.site_column, or a task with natural sites)"
        )
    names = sorted(set(np.asarray(groups).astype(str).tolist()))
    if len(names) != num_sites:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise PartitionError(
            f"partition 'natural': num_sites={num_sites} but the data has {len(names)} sites ({shown}); "
            f"set federation.num_sites={len(names)}"
        )
    return names


def site_names(method: str, num_sites: int, groups: np.ndarray | None) -> list[str]:
    """Names of the sites, in partition order: the group names for `natural`."""
    if method == "natural":
        return _group_names(groups, num_sites)
    return [f"site-{i}" for i in range(num_sites)]


def partition(
    labels: np.ndarray,
    num_sites: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    groups: np.ndarray | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """One sorted int64 index array per site; every record belongs to exactly one site."""
    labels = np.asarray(labels)
    n = len(labels)
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; allowed: {', '.join(METHODS)}")
    if num_sites < 1:
        raise PartitionError(f"num_sites={num_sites}: need at least 1 site")
    if num_sites > n:
        raise PartitionError(f"num_sites={num_sites}: more sites than the {n} records to split")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_sites, alpha, min_size, rng)
    else:
        names = _group_names(groups, num_sites)
        site_of = np.asarray(groups).astype(str)
        if len(site_of) != n:
            raise PartitionError(f"partition 'natural': {len(site_of)} site entries for {n} records")
        parts = [np.flatnonzero(site_of == name) for name in names]
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, num_sites: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, proportions ~ Dir(alpha) over sites; redrawn until every site has
    `min_size` records (a site with fewer cannot train or meet δ < 1/n)."""
    n = len(labels)
    if alpha <= 0:
        raise PartitionError(f"dirichlet alpha={alpha}: must be > 0")
    advice = "use a larger federation.dirichlet_alpha or fewer sites"
    if num_sites * min_size > n:
        raise PartitionError(
            f"dirichlet: {n} records cannot give each of {num_sites} sites {min_size} records; {advice}"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * len(idx)).astype(np.int64)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sites = [np.concatenate(p) for p in parts]
        if min(len(s) for s in sites) >= min_size:
            return sites
    raise PartitionError(
        f"dirichlet alpha={alpha} is too small for {num_sites} sites: after {DIRICHLET_ATTEMPTS} draws "
        f"some site still had fewer than {min_size} of the {n} records; {advice}"
    )

"""Who is asked to train, by site, reproducibly: the outermost wrapper of the stack.

Flower's node ids are random per run, site names are not: each round samples
`round(fraction_train * number of sites)` sites from a `random.Random(seed, round)`, so a
seed fixes who trains when (with site-level DP the mechanism's Poisson sampler decides
instead: `poisson`). A site in `excluded` (declined for budget or books, books that failed,
revoked; the reply gate and the server add to it) is never asked again. The wrapped
strategy then sees only the selection: a Grid whose `get_node_ids` is the chosen nodes
(Flower's own sampling, at fraction 1, takes them all).

It also numbers the rounds: Flower's `Strategy.start` always counts from 1, a resumed run
continues at `first_round`; everything under this wrapper sees the run's round.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import rules
from fedshield.strategies.wrapper import Wrapper, log


class PoissonSampler(Protocol):
    def sample(self, eligible: Sequence[int], server_round: int) -> list[int]:
        """Each eligible node independently with the mechanism's rate (strategies/site_dp.py)."""


class Selected:
    """The part of a Grid that Flower's node sampling reads, limited to the selection."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:  # anything else a strategy asks of the grid
        return getattr(self._grid, name)


class SiteSelection(Wrapper):
    """Ask the sites of each round's sample, never an excluded one.

    Parameters
    ----------
    strategy : Strategy
        What runs the round with the selection (the reply gate, in build_stack).
    sites : Mapping[int, str]
        Node id -> site name, from the coordinator's site discovery. Names must be unique.
    fraction_train : float
        Fraction of the sites asked each round, in (0, 1] (the Poisson rate with `poisson`).
    seed : int
        Fixes which sites are sampled in which round.
    first_round : int
        The run's round that Flower's round 1 is.
    excluded : MutableMapping[str, str], optional
        Sites not to ask any more, and why; shared with whoever excludes (kept, not copied).
    poisson : PoissonSampler, optional
        Site-level DP's sampler: each site independently, so that amplification holds.
    """

    def __init__(self, strategy: Strategy, sites: Mapping[int, str], *, fraction_train: float, seed: int,
                 first_round: int = 1, excluded: MutableMapping[str, str] | None = None,
                 poisson: PoissonSampler | None = None) -> None:
        super().__init__(strategy)
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train={fraction_train}: must be in (0, 1]")
        if not sites:
            raise ValueError("no sites to train with")
        names = list(sites.values())
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise ValueError(f"two nodes share the site name {dup!r}")
        if first_round < 1:
            raise ValueError(f"first_round={first_round}: must be >= 1")
        self.sites = dict(sites)
        self.fraction_train = fraction_train
        self.seed = int(seed)
        self.first_round = int(first_round)
        self.excluded: MutableMapping[str, str] = excluded if excluded is not None else {}
        self.poisson = poisson

    def eligible(self) -> list[int]:
        """Node ids still asked to train, in site-name order."""
        return sorted((n for n, s in self.sites.items() if s not in self.excluded), key=self.sites.__getitem__)

    def sample(self, server_round: int) -> list[int]:
        """The node ids asked to train in the run's `server_round`, in site-name order."""
        eligible = self.eligible()
        if self.poisson is not None:
            return sorted(self.poisson.sample(eligible, server_round), key=self.sites.__getitem__)
        k = min(self.per_round(), len(eligible))
        chosen = random.Random(self.seed * 7919 + server_round).sample(eligible, k) if k else []
        return sorted(chosen, key=self.sites.__getitem__)

    def per_round(self) -> int:
        """How many sites each round asks while none is excluded."""
        return rules.sites_per_round(self.fraction_train, len(self.sites))

    def run_round(self, flower_round: int) -> int:
        """The run's round number for Flower's `flower_round` (they differ after a resume)."""
        return flower_round + self.first_round - 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run_round = self.run_round(server_round)
        chosen = self.sample(run_round)
        return self.strategy.configure_train(run_round, arrays, config, Selected(grid, chosen))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(self.run_round(server_round), replies)

    def summary(self) -> None:
        log.info("fedshield stack: %d sites, fraction_train %s, seed %d, around:",
                 len(self.sites), self.fraction_train, self.seed)
        self.strategy.summary()

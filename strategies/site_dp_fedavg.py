"""Site-level DP-FedAvg (strategies/site_dp.py) as a wrapper that owns the federation's books.

Like Flower's `DifferentialPrivacyServerSideFixedClipping`, which owns its accountant, this
wrapper records each round's spend itself, in the federation's signed ledger
(`ReleaseBooks`, server/federation_books.py), before the round's model is returned: one
step of the Poisson-subsampled Gaussian mechanism per round, whatever number of sites
replied, an empty Poisson sample included (it still releases a noised model).

**It replaces the aggregation.** The released model is the round's global weights plus the
noised sum of the clipped updates over the fixed denominator q N: a weighted average by
record count would make each site's influence depend on its count. So the wrapped strategy
must be Flower's FedAvg (its messages are used, its aggregation is not: DP-FedAvg is FedAvg
with clipping, unit weights and a fixed denominator); any other rule is refused here, as
is a norm bound above it (the clip norm S bounds each update). The sampling is the
mechanism's own Poisson sampler (strategies/selection.py, `poisson`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol, rules
from fedshield.strategies import flower
from fedshield.strategies.report import RoundReports
from fedshield.strategies.site_dp import ReleaseBooks, SiteLevelDP
from fedshield.strategies.wrapper import Wrapper, update_of, wrapped


class SiteDPFedAvg(Wrapper):
    """Every usable update clipped to S, Gaussian noise on the sum, over q N; spent, then released."""

    replaces_aggregation = True

    def __init__(self, strategy: Strategy, mechanism: SiteLevelDP, books: ReleaseBooks, reports: RoundReports) -> None:
        super().__init__(strategy)
        problem = rules.site_dp_problem(flower.rule_name(strategy), None)  # the config's own line
        if problem or len(wrapped(strategy)) > 1:
            raise ValueError(problem or "site-level DP aggregates by its own clipped, noised sum: it wraps the "
                             "fedavg rule itself (its clip norm bounds each update; no norm bound between)")
        if mechanism.distributed:
            raise ValueError("distributed site-level noise is the sites' own, under secure aggregation "
                             "(strategies/secagg_aggregation.py): the coordinator adds none")
        self.mechanism, self.books, self.reports = mechanism, books, reports
        self._base: dict[int, dict[str, np.ndarray[Any, Any]]] = {}  # server round -> the weights it sent

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._base[server_round] = protocol.from_array_record(arrays)  # released even if nobody is sampled
        if self.asks_nobody(grid):
            return []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = list(replies)
        base = self._base.pop(server_round, None)
        report = self.reports.get(server_round)
        if base is None:  # nothing was configured this round: no weights to start from (not a DP release)
            report.skipped = "no weights for this round"
            self.reports.publish(server_round)
            return None, None
        updates = [update_of(m)[0] for m in valid]
        new, norms = self.mechanism.aggregate(base, updates, server_round)
        for m, norm in zip(valid, norms, strict=True):
            reply = report.by_node(m.metadata.src_node_id)
            reply.update_norm = norm
            reply.clipped = norm > self.mechanism.clip_norm
        self.reports.publish(server_round)
        self.books.record_round(server_round)  # the spend is on the record before the model leaves
        return protocol.to_array_record(new), None

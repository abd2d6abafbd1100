"""Secure aggregation (SecAgg+, strategies/secagg.py) as an aggregation wrapper.

`configure_train` runs SecAgg+'s key stages (setup, key sharing, the check) with the
round's selection before the TRAIN messages leave, and adds each site's collect fields to
its message; replies carry masked vectors (checked by the reply gate like weights: names,
shapes, uint64) and their signed books in the clear. `aggregate_train` unmasks the sum of
the usable ones, checks that its weights add up to the counts the sites in it declared, and
moves the global model by the weighted mean. The report lists who dropped at which stage.

**It replaces the aggregation.** The coordinator sees only the sum, so the wrapped strategy
must be one whose aggregation is the weighted mean of the updates: Flower's FedAvg or
FedProx (their messages are used; the unmasked mean is exactly their aggregate). A rule
that needs individual updates (median, Krum, ...), a norm bound above this wrapper, or
coordinator-side site-level noise are refused here.

**Site-level DP under secure aggregation** (`mechanism` distributed, with the federation's
`books`): each site clips its update and adds its share of Skellam noise before masking;
each site's weight is 1 and the step is the sum over the fixed q N. This wrapper owns the
federation's books for it, as `SiteDPFedAvg` does without SecAgg+: the noise the sum really
held (Σ μ / t) is recorded before release, and a round that would pass the budget is not
released.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol, rules
from fedshield.privacy.secure_sum import WEIGHT_SLOT
from fedshield.strategies import flower
from fedshield.strategies.report import RoundReports
from fedshield.strategies.secagg import SecAggPlus, Unmasked
from fedshield.strategies.site_dp import ReleaseBooks, SiteLevelDP
from fedshield.strategies.wrapper import Wrapper, log, update_of, wrapped


class SecAggAggregation(Wrapper):
    """Key stages before the round, the unmasked weighted mean (or noisy sum) as its aggregate."""

    replaces_aggregation = True

    def __init__(self, strategy: Strategy, secagg: SecAggPlus, reports: RoundReports, *,
                 mechanism: SiteLevelDP | None = None, books: ReleaseBooks | None = None) -> None:
        super().__init__(strategy)
        problem = rules.secagg_problem(flower.rule_name(strategy), None)  # the config's own line
        if problem or len(wrapped(strategy)) > 1 or (mechanism is not None and not mechanism.distributed):
            raise ValueError(problem or "secure aggregation shows the coordinator only the sum: it wraps the rule "
                             "itself (no norm bound between) and takes no coordinator-side site-level noise")
        if (mechanism is None) != (books is None) or (mechanism is not None and secagg.noise is None):
            raise ValueError("site-level DP under secure aggregation needs its mechanism, the federation's books "
                             "and the noise the sites add, all three")
        self.secagg, self.reports, self.mechanism, self.books = secagg, reports, mechanism, books
        self._base: dict[int, dict[str, np.ndarray[Any, Any]]] = {}  # server round -> the weights it sent
        self._grid: dict[int, Grid] = {}  # server round -> the grid its unmasking stage runs on

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.asks_nobody(grid):
            return []
        self._base[server_round] = protocol.from_array_record(arrays)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._grid[server_round] = grid
        rnd = self.secagg.prepare(server_round, list(grid.get_node_ids()), config, grid)
        out = []
        for msg in messages:
            fields = self.secagg.collect_fields(server_round, msg.metadata.dst_node_id)
            if fields is not None:
                out.append(protocol.with_secagg(msg, fields))
        return out if not rnd.skipped else []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = list(replies)
        base = self._base.pop(server_round, None)
        grid = self._grid.pop(server_round, None)
        report = self.reports.get(server_round)
        state = self.secagg.round_state(server_round)
        if state is None or base is None or grid is None:  # nobody was asked
            report.skipped = "no usable update" if report.sampled else ""
            self.reports.publish(server_round)
            return None, None
        usable = {m.metadata.src_node_id: update_of(m) for m in valid}
        vectors = {n: vector for n, (vector, _) in usable.items()}
        declared = {n: weight for n, (_, weight) in usable.items()}
        outcome = self.secagg.finish(server_round, vectors, grid)
        report.dropped = dict(state.dropped)
        if isinstance(outcome, Unmasked):
            # Site-level DP: each site's weight is 1 (the sum is over a fixed denominator).
            counted = len(outcome.sites) if self.mechanism is not None else sum(
                declared[n] for n in vectors if report.by_node(n).site in outcome.sites)
            if outcome.total_weight != counted:
                report.skipped = (f"secure aggregation: the unmasked weights add up to {outcome.total_weight}, "
                                  f"the {len(outcome.sites)} sites in the sum declared {counted} (a site sent a "
                                  "wrong weight): the round is not released")
        else:
            report.skipped = outcome.skipped or "secure aggregation: nothing to unmask"
        if report.skipped:
            log.info("round %s: nothing aggregated: %s", server_round, report.skipped)
        self.reports.publish(server_round)
        if report.skipped or not isinstance(outcome, Unmasked):
            return None, None
        step = outcome.mean  # FedAvg: the weighted mean of the updates in the sum
        if self.mechanism is not None and self.books is not None and self.secagg.noise is not None:
            # DP-FedAvg: the noisy sum of clipped updates over the fixed q N, spent before it leaves
            scale = outcome.total_weight / self.mechanism.denominator
            step = {k: v * scale for k, v in outcome.mean.items()}
            variance = sum(self.secagg.noise.per_site(t) for t in outcome.thresholds)
            if not self.books.record_skellam_round(server_round, variance):
                self.reports.withheld(server_round)  # it would pass the federation's budget: nothing released
                return None, None
        new = {k: (base[k].astype(np.float64) + step[k]).astype(base[k].dtype) if k in step else base[k]
               for k in base if k != WEIGHT_SLOT}
        return protocol.to_array_record(new), None

"""The robust rule gets what it needs to withstand its f, or nothing.

- **Enough updates or a skip.** A round with fewer usable updates than the wrapped rule
  needs to withstand its f (`strategies.flower.shortfall`; one for the plain averages) is
  skipped with one line and the global model is kept.
- **Unmasked attackers count against f.** A reply refused for a breach (a malformed or
  non-finite field, a count other than declared, books that do not verify) cannot come from
  the stock site, so its sender is one of the f attackers the rule was set to withstand: the
  rule then withstands f minus those among the usable rest (`RoundReport.withstood`). A
  reply refused by the norm bound, a failure or a decline is no proof and leaves f as is.
- **What the selection left out.** For Krum, Multi-Krum and Bulyan the report names the
  updates the rule's selection did not aggregate (`SiteReply.selected`).

The wrapped strategy's own aggregation is used, with its f lowered for the round only
(`strategies.flower.withstanding`). This wrapper commits the round: it publishes the round's
report before it aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield.strategies import flower
from fedshield.strategies.report import RoundReports
from fedshield.strategies.wrapper import Wrapper, log, wrapped


class RobustGuard(Wrapper):
    """Skip a round the wrapped rule cannot withstand; count breaches against its f."""

    def __init__(self, strategy: Strategy, reports: RoundReports) -> None:
        super().__init__(strategy)
        hidden = [s for s in wrapped(strategy)[1:] if flower.rule_name(s) in flower.ROBUST]
        if hidden:  # its f and its selection are the rule's own: the guard must hold the rule itself
            raise ValueError(f"the robust-rule guard must wrap {flower.rule_name(hidden[0])} itself, not "
                             f"{type(strategy).__name__} around it")
        self.reports = reports

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.asks_nobody(grid):
            return []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = list(replies)
        report = self.reports.get(server_round)
        f = flower.num_malicious(self.strategy)
        if flower.rule_name(self.strategy) in flower.ROBUST:
            report.withstood = max(0, f - len(report.breaches()))
            if report.withstood < f:
                log.info("round %s: %d of federation.num_malicious=%d unmasked by a breach (%s): %s withstands %d "
                         "among the %d usable update(s)", server_round, f - report.withstood, f,
                         ", ".join(report.breaches()), report.rule, report.withstood, len(valid))
        withstood = f if report.withstood is None else report.withstood
        with flower.withstanding(self.strategy, withstood):
            if not valid:
                report.skipped = "no usable update" if report.sampled else \
                    "no site left to ask (every site is excluded: out of budget, or its books failed)"
            else:
                report.skipped = flower.shortfall(self.strategy, len(valid), f - withstood) or ""
            if not report.skipped:
                chosen = flower.selection(self.strategy, [m.content for m in valid])
                if chosen is not None:
                    for i, m in enumerate(valid):
                        report.by_node(m.metadata.src_node_id).selected = i in chosen
            if report.skipped:
                log.info("round %s: nothing aggregated: %s", server_round, report.skipped)
            self.reports.publish(server_round)  # every verified spend recorded before the model moves
            if report.skipped:
                return None, None
            return self.strategy.aggregate_train(server_round, valid)

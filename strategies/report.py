"""What the coordinator's strategy stack tells the coordinator about each round.

The reply gate (strategies/reply_gate.py) opens one `RoundReport` per round with every
sampled site's outcome; the wrappers under it add what they decide (norms, clipping, the f
a robust rule withstood, its selection, a skip, SecAgg+ dropouts) to that round's report,
found by round in the shared `RoundReports`; the wrapper that commits the round (aggregates
or releases it) publishes the report first, so every verified spend is recorded before any
model leaves. The report goes to a `RoundSink` given at construction (the server's round
log implements it): nothing in the stack calls back into the code that built it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedshield import protocol

# The one import of the ledger check (privacy/ledger_check.py) in the stack.
from fedshield.privacy.ledger_check import Expected, LedgerCheck, Verdict

__all__ = ["HeadSource", "LedgerChecker", "PlannedCheck", "RoundReport", "RoundReports", "RoundSink", "SiteReply",
           "Verdict"]


@dataclass
class SiteReply:
    site: str
    node_id: int
    status: str  # trained | declined | rejected | failed
    reason: str = ""
    num_examples: int = 0
    ledger_entries: tuple[dict[str, Any], ...] = ()  # signed spends that verified, in order
    decline_kind: str = ""
    rejected_entries: tuple[dict[str, Any], ...] = ()  # entries that did not verify: kept apart
    # L2 norm of (update - the round's global weights), for every reply that passed the checks
    # before the bound (None: not usable, or the round's weights unknown); `clipped`: scaled
    # down to the bound; `selected`: False if Krum/Multi-Krum/Bulyan's selection left it out
    # (None: the rule selects no updates, or the update was not aggregated).
    update_norm: float | None = None
    clipped: bool = False
    selected: bool | None = None
    # True if the reply was refused for something the stock site never sends (a protocol
    # breach, a count other than declared, books that fail): proof its sender attacks.
    breach: bool = False
    late_round: int | None = None  # a late reply: the earlier round it answers (RoundReport.late)


@dataclass
class RoundReport:
    server_round: int
    sampled: list[str]
    replies: list[SiteReply] = field(default_factory=list)
    rule: str = ""  # the aggregation rule (federation.strategy)
    skipped: str = ""  # why nothing was aggregated this round ("" = it was)
    # The f the robust rule withstood among the usable updates (federation.num_malicious
    # less the attackers unmasked by a breach); None for the plain averages.
    withstood: int | None = None
    # Secure aggregation: site -> the stage at which it dropped out of the round (its masks
    # removed from the survivors' shares if it had shared them); None without SecAgg+.
    dropped: dict[str, str] | None = None
    # Replies to earlier rounds that came after those rounds' timeout: their spends are
    # recorded, their updates never used (status trained: books accepted; rejected: not).
    late: list[SiteReply] = field(default_factory=list)
    _index: dict[int, tuple[int, SiteReply]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def empty(self) -> bool:
        """Whether the round trained nothing: sites were asked and no update was aggregated
        (every reply failed, timed out, declined or was refused, or the round was skipped).
        An empty Poisson sample under site-level DP asks nobody and is not empty."""
        return bool(self.skipped) or (bool(self.sampled) and self.count("trained") == 0)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.replies)

    def sites(self, status: str) -> list[str]:
        return [r.site for r in self.replies if r.status == status]

    def clipped(self) -> list[str]:
        return [r.site for r in self.replies if r.clipped]

    def left_out(self) -> list[str]:
        """Usable updates that the rule's selection did not aggregate."""
        return [r.site for r in self.replies if r.selected is False]

    def breaches(self) -> list[str]:
        """Sites whose replies were refused for a breach (proof of an attack)."""
        return [r.site for r in self.replies if r.breach]

    def by_node(self, node_id: int) -> SiteReply:
        """The reply of this round's site with that node id (its usable update's outcome).
        Each wrapper asks it of every usable reply: an index of where each node's reply sits,
        checked on every use and rebuilt if `replies` changed there (a scan per call was
        quadratic: 1,000 replies a round took a tenth of a second in each wrapper)."""
        kept = self._index.get(node_id)
        if kept is not None and kept[0] < len(self.replies) and self.replies[kept[0]] is kept[1] \
                and kept[1].node_id == node_id:
            return kept[1]
        self._index.clear()
        for i, r in enumerate(self.replies):
            self._index.setdefault(r.node_id, (i, r))
        return self._index[node_id][1]


class RoundSink(Protocol):
    """Where the stack's reports go (server/app.py's RoundLog)."""

    def on_round(self, report: RoundReport) -> None:
        """Every sampled site's outcome, before the round's model is aggregated or released."""

    def on_withheld(self, server_round: int) -> None:
        """The round's model is not released: it would pass the federation's privacy budget."""


class HeadSource(Protocol):
    def head_of(self, site: str) -> protocol.BooksHead | None:
        """The newest entry of `site`'s books the coordinator holds (server/site_heads.py)."""


class LedgerChecker(Protocol):
    def check(self, site: str, server_round: int, entries: tuple[dict[str, Any], ...]) -> Verdict:
        """Whether a reply's ledger entries may join the run's ledger (privacy.ledger_check)."""


@dataclass(frozen=True)
class PlannedCheck:
    """The run's `LedgerCheck`, each site's entries held to the spend its plan asks for."""

    books: LedgerCheck
    plans: Mapping[str, Expected]

    def check(self, site: str, server_round: int, entries: tuple[dict[str, Any], ...]) -> Verdict:
        return self.books.check(site, server_round, entries, self.plans[site])

    def prepare(self, sites: Iterable[str]) -> None:
        """LedgerCheck.prepare: the ε these sites' replies will be checked against, computed ahead."""
        self.books.prepare(sites)


class RoundReports:
    """The open report of each round, keyed by round, until it is published to the sink."""

    def __init__(self, sink: RoundSink | None = None) -> None:
        self.sink = sink
        self._open: dict[int, RoundReport] = {}

    def open(self, report: RoundReport) -> RoundReport:
        if report.server_round in self._open:
            raise ValueError(f"round {report.server_round}: its report is open already")
        self._open[report.server_round] = report
        return report

    def get(self, server_round: int) -> RoundReport:
        """The round's open report (a wrapper under the gate adds its part to it)."""
        try:
            return self._open[server_round]
        except KeyError:
            raise LookupError(f"round {server_round}: no open report (is the reply gate above this wrapper?)") from None

    def publish(self, server_round: int) -> None:
        """The report to the sink, once; later calls for the round do nothing."""
        report = self._open.pop(server_round, None)
        if report is not None and self.sink is not None:
            self.sink.on_round(report)

    def withheld(self, server_round: int) -> None:
        if self.sink is not None:
            self.sink.on_withheld(server_round)

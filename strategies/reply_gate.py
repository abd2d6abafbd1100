"""Every reply parsed, checked and accounted for before anything is aggregated.

- **Parsed by the protocol** (`protocol.read_train_reply`): trained / declined / rejected
  (a missing, extra or ill-typed field, a wrong or non-finite tensor) / failed (Flower's
  error). Only trained replies go on, reduced to weights and count (`aggregation_content`).
- **No silent failure.** Flower's own error reply for a node it cannot reach (sent by the
  SuperLink, naming the instruction) is put on the site asked; so is silence until the timeout.
- **Late replies are still books.** Each round first pulls the replies still owed from
  earlier rounds (`Grid.pull_messages`) and checks their entries as spends of their own
  round (`RoundReport.late`); their stale updates are never used. Entries that skip spends
  not received yet are held (`Verdict.held`), not a breach.
- **Declared counts and signed books.** A reply's count must be the one declared at
  discovery and its entries must pass the ledger check; a site whose entries fail is
  rejected, its entries kept apart, and never asked again (`excluded`, shared with the
  selection), nor is one that declines for budget or books.
- **Weights capped** at `MAX_WEIGHT_RATIO` x the lower median of the declared counts (issue
  21); not under secure aggregation (`cap_weights=False`: they are inside the masked sum).
- **Each site's plan carries the head of its books** (`heads`): a site behind it declines.

The round's report is opened here (`RoundReports`) and published by the wrapper that
commits the round, before it does; here at the latest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import replace
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol
from fedshield.strategies import flower
from fedshield.strategies.report import HeadSource, LedgerChecker, RoundReport, RoundReports, SiteReply
from fedshield.strategies.wrapper import Wrapper, log, wrapped

# A site's FedAvg weight is at most this many times the (lower) median declared count.
MAX_WEIGHT_RATIO = 10


class ReplyGate(Wrapper):
    """Hand the wrapped strategy only the replies that passed every check; report on all."""

    def __init__(self, strategy: Strategy, sites: Mapping[int, str], *,
                 expected_arrays: Mapping[str, protocol.ArraySpec], reports: RoundReports,
                 excluded: MutableMapping[str, str] | None = None, records: Mapping[int, int] | None = None,
                 ledger: LedgerChecker | None = None, heads: HeadSource | None = None,
                 cap_weights: bool = True) -> None:
        super().__init__(strategy)
        if not expected_arrays:
            raise ValueError("expected_arrays: no trainable tensors")
        self.sites = dict(sites)
        self.expected_arrays = dict(expected_arrays)
        self.reports = reports
        self.excluded: MutableMapping[str, str] = excluded if excluded is not None else {}
        self.records = dict(records or {})
        self.ledger, self.heads, self.cap_weights = ledger, heads, cap_weights
        chain = wrapped(strategy)  # the rule is the innermost strategy's, named as in federation.strategy
        self.rule = flower.rule_name(chain[-1]) or type(chain[-1]).__name__
        self._asked: dict[int, list[int]] = {}  # server round -> node ids asked
        self._sent: dict[int, list[Any]] = {}  # server round -> the metadata of the instructions sent
        self._owed: dict[str, tuple[int, int]] = {}  # message id of an unanswered instruction -> (round, node)
        self._puller: Grid | None = None  # the grid late replies are pulled from
        self._held: dict[str, set[str]] = {}  # site -> hashes of its entries the books accepted

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._asked[server_round] = list(grid.get_node_ids())
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._asked[server_round]:
            self._puller = grid
        if self.heads is not None:  # each site's plan carries the head of its books (client/site.py)
            messages = [protocol.train_with_books_head(m, self.heads.head_of(self.sites[m.metadata.dst_node_id]))
                        for m in messages]
        # Their metadata, not the messages: the grid sets each message id on it when it pushes,
        # and a reply Flower sends for an unreachable node names only that id.
        self._sent[server_round] = [m.metadata for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report, valid = self.sort_replies(server_round, replies)
        self.reports.open(report)
        try:
            return self.strategy.aggregate_train(server_round, valid)
        finally:
            self.reports.publish(server_round)  # unless the wrapper that committed the round did

    def sort_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[RoundReport, list[Message]]:
        """Every reply parsed and sorted; the trained ones, reduced to what aggregation needs."""
        asked = self._asked.pop(server_round, [])
        report = RoundReport(server_round, [self.sites[n] for n in asked], rule=self.rule)
        report.late = self._late_replies()  # first: the site's chain continues from them
        sent = [(md.message_id, md.dst_node_id) for md in self._sent.pop(server_round, [])]
        by_id = {msg_id: node for msg_id, node in sent if msg_id}
        usable: list[tuple[Message, SiteReply, protocol.TrainReply]] = []
        answered: set[int] = set()
        cap = self._weight_cap()
        prepare = getattr(self.ledger, "prepare", None)  # PlannedCheck's (a checker may have none)
        if prepare is not None and not isinstance(replies, Sequence):
            # A stream (the batched engine's): the sites are training now, and this process
            # would only wait for their first replies. The ε their checks need is computed then.
            prepare([self.sites[n] for n in asked])
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and node not in asked:  # Flower's own reply for an unreachable node
                node = by_id.get(msg.metadata.reply_to_message_id, node)
            if node not in asked or node in answered:  # Flower only returns replies to what was sent; be sure
                log.warning("round %s: a reply from node %s, which was not asked or answered already; ignored",
                            server_round, node)
                continue
            answered.add(node)
            reply, parsed = self._sort(server_round, node, msg)
            if parsed is not None:
                # Reduced as it comes (the batched engine hands replies over while others train).
                msg.content = protocol.aggregation_content(replace(parsed, num_examples=cap(parsed.num_examples)),
                                                           cast(ArrayRecord, msg.content[protocol.ARRAYS]))
                usable.append((msg, reply, parsed))
                self.reply_checked(server_round, msg)  # the wrappers below may measure it now
            report.replies.append(reply)
        for msg_id, node in sent:
            if node in asked and node not in answered:
                answered.add(node)
                report.replies.append(SiteReply(self.sites[node], node, "failed",
                                                "no reply within the round's timeout (federation.round_timeout_s)"))
                if msg_id:  # its reply may still come: pulled next round, for its spend
                    self._owed[msg_id] = (server_round, node)
        # Replies arrive in any order: sorted by site, the report reads the same every run
        # and the aggregate's floating-point sum is reproducible.
        report.replies.sort(key=lambda r: r.site)
        valid = sorted((m for m, _, _ in usable), key=lambda m: self.sites[m.metadata.src_node_id])
        return report, valid

    def _sort(self, server_round: int, node: int, msg: Message) -> tuple[SiteReply, protocol.TrainReply | None]:
        """One reply's outcome; its parsed update if it may be aggregated."""
        name = self.sites[node]
        parsed = protocol.read_train_reply(msg, self.expected_arrays)
        if isinstance(parsed, protocol.Failed):
            return SiteReply(name, node, "failed", parsed.reason), None
        if parsed.site not in (None, name):
            return SiteReply(name, node, "rejected", f"the reply names site {parsed.site!r}, not {name!r}",
                             breach=True), None
        if isinstance(parsed, protocol.Rejected):
            reply = SiteReply(name, node, "rejected", parsed.reason, breach=True)
            self._books(reply, server_round, parsed.ledger_entries)  # spent even if unusable
            return reply, None
        if isinstance(parsed, protocol.Decline):
            if parsed.kind in ("budget", "books"):  # it will say so every round: not asked again
                self.excluded[name] = parsed.reason
            return SiteReply(name, node, "declined", parsed.reason, decline_kind=parsed.kind), None
        reply = SiteReply(name, node, "trained", "", parsed.num_examples)
        declared = self.records.get(node)
        if not self._books(reply, server_round, parsed.ledger_entries):
            reply.status = "rejected"
            return reply, None
        if declared is not None and parsed.num_examples != declared:
            reply.status, reply.breach, reply.reason = "rejected", True, (
                f"claims {parsed.num_examples} records; it declared {declared} at discovery")
            return reply, None
        return reply, parsed

    def _weight_cap(self) -> Callable[[int], int]:
        """A usable reply's FedAvg weight from its count: the count, capped at
        `MAX_WEIGHT_RATIO` x the lower median of the counts all sites declared at discovery
        (the median of a federation whose majority is honest is an honest count)."""
        counts = sorted(self.records.values())
        if not self.cap_weights or not counts:
            return lambda n: n
        cap = MAX_WEIGHT_RATIO * counts[(len(counts) - 1) // 2]
        return lambda n: min(n, cap)

    def _late_replies(self) -> list[SiteReply]:
        """The replies owed from earlier rounds that have reached the SuperLink since, their
        entries checked as spends of their own round (never a breach for being late); a
        failure to pull is a log line, never the run's end."""
        if not self._owed or self._puller is None:
            return []
        try:
            pulled = list(self._puller.pull_messages(list(self._owed)))
        except Exception as exc:  # a late reply is a bonus: the round goes on without it
            log.warning("late replies could not be pulled: %s", exc)
            return []
        late: list[SiteReply] = []
        for msg in pulled:
            owed = self._owed.pop(msg.metadata.reply_to_message_id, None)
            if owed is None or msg.has_error():  # Flower's "unavailable": no reply will come
                continue
            server_round, node = owed
            name = self.sites[node]
            parsed = protocol.read_train_reply(msg, self.expected_arrays)  # only its books are used
            if isinstance(parsed, (protocol.Failed, protocol.Decline)) or parsed.site not in (None, name):
                continue
            # A later reply may have carried these spends already: what the books hold is not checked twice.
            held = self._held.get(name, set())
            entries = tuple(e for e in parsed.ledger_entries if e.get("hash") not in held)
            if not entries:
                continue
            reply = SiteReply(name, node, "trained", "", late_round=server_round)
            if not self._books(reply, server_round, entries):
                reply.status = "rejected"
            late.append(reply)
        return sorted(late, key=lambda r: (r.late_round or 0, r.site))

    def _books(self, reply: SiteReply, server_round: int, entries: tuple[dict[str, Any], ...]) -> bool:
        """Check a reply's ledger entries into `reply`; False (and the site excluded) if they fail:
        a breach, unless what fails is that entries of this run are missing before them."""
        if self.ledger is None:
            reply.ledger_entries = entries
            return True
        verdict = self.ledger.check(reply.site, server_round, entries)
        problem = verdict.problem
        if problem is None:
            reply.ledger_entries = verdict.new_entries  # replayed entries are recorded once
            held = self._held.setdefault(reply.site, set())
            held.update(str(e.get("hash")) for e in (*entries, *verdict.new_entries))
            return True
        reply.rejected_entries = entries
        reply.breach = reply.breach or not verdict.missing
        reply.reason = f"{reply.reason}; {problem}" if reply.reason else problem
        if not verdict.held:  # held entries wait for a late reply: the site is still asked
            self.excluded[reply.site] = problem
        return False

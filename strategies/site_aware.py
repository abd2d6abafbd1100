"""A site-aware wrapper around any Flower Message-API `Strategy`.

Flower's strategies sample nodes by their ids and aggregate every reply that carries
content. A privacy-aware coordinator needs more, and this wrapper adds it in the style of
Flower's own `DifferentialPrivacyFixedClippingBase` (behaviour added by wrapping, the
wrapped strategy untouched, per-round state keyed by round):

- **Selection by site, reproducible.** Flower's node ids are random per run, site names
  are not: each round samples round(fraction_train * number of sites) sites
  (`fedshield.rules.sites_per_round`) from a `random.Random(seed, round)`, so a seed fixes
  who trains when. Flower's own sampling then sees only that selection (its fractions are 1).
- **Budget exclusion.** A site that declined for budget is never asked again in this run.
- **Every reply parsed by the protocol** (`protocol.read_train_reply`): replies are sorted
  into trained / declined / rejected (broke the protocol: a missing, extra or ill-typed
  field, a wrong or non-finite tensor) / failed (Flower reported an error). Only trained
  replies reach the wrapped strategy's aggregation, and only their weights and record
  count (`protocol.aggregation_content`): no field a site adds can reach Flower's code.
- **No silent failure.** Flower answers for a node it cannot reach with an error reply
  that the SuperLink itself sends (`src_node_id` is the SuperLink's, `reply_to_message_id`
  the instruction's: flwr/server/superlink/linkstate/utils.py); it is put on the site the
  instruction went to. A sampled site with no reply at all within the round's timeout is
  failed too. `RoundReport.empty` says a round trained nothing; the coordinator counts
  those (federation.max_empty_rounds, server/app.py).
- **Late replies are still books.** A reply that reaches the SuperLink after the round's
  timeout stays there (Flower keeps an instruction and its reply until both are pulled or
  its TTL passes); each round first pulls the replies still owed from earlier rounds
  (`Grid.pull_messages`) and checks their entries as spends of their own round
  (`RoundReport.late`): the coordinator records them, never uses their stale update, and
  the site's next entries continue its chain. Without it the next reply's entries skip
  the lost ones and an honest site was refused as a breach while its spend went unrecorded.
  Entries that skip spends not received yet are held, not a breach (`Verdict.held`), and
  join the books when the late reply comes; a site whose books stay short is not asked again.
- **Declared counts and signed books.** A reply's record count must be the one the site
  declared at discovery (`records`), and its ledger entries must pass `check_ledger`
  (privacy.ledger_check: chain, signature, the planned spend, ε not under-reported). A
  site whose entries fail is rejected, its entries are kept apart, and it is not asked again.
- **Update norm bound** (`update_norm_bound`, `update_norm_action`): the L2 norm of (update -
  the round's global weights) over all trainable tensors, kept per round from
  `configure_train`, is reported for every usable reply; above the bound the update is
  scaled down to it (`clip`: the site's direction kept, its reach bounded) or the reply is
  refused (`reject`). The bound is on each update's share of the step: an update whose
  FedAvg weight is k > 1 times the round's mean weight is held to bound / k, so a scaled-up
  update moves a weighted average by at most bound / n per site, as at equal weights; it
  cannot stop a sign flip or a label flip of ordinary size (the robust rules,
  strategies.flower, are for those). The bound is coordinator-side post-processing of a
  released update: it changes nothing in any site's privacy account.
- **Weights capped.** A site's FedAvg weight is its declared count, at most
  `MAX_WEIGHT_RATIO` x the lower median of the counts all sites declared (issue 21: a site
  declaring 10^6 records took the whole average). Under secure aggregation the weights are
  inside the masked sum and are not capped.
- **Robust rules get what they need or nothing.** A round with fewer usable updates than
  the wrapped rule needs to withstand its f (`strategies.flower.shortfall`) is skipped with
  one line (the global model is kept); for Krum, Multi-Krum and Bulyan the report names the
  updates the rule's selection left out (`SiteReply.selected`).
- **Unmasked attackers count against f.** A reply refused for breaking the protocol (a
  malformed or non-finite field, a record count other than the one declared, books that do
  not verify) cannot come from the stock site, so its sender is one of the f attackers the
  rule was set to withstand. The rule then withstands f minus those among the usable rest
  (`SiteReply.breach`, `RoundReport.withstood`): two attackers whose counts are refused no
  longer leave Krum with f = 2 among 6 and the round skipped, since neither can reach the
  aggregate. A reply refused by the norm bound, a failure or a decline is not proof of an
  attack (an honest site can be slow, out of budget or unusually far off) and leaves f as is.
- **A report per round** (`RoundReport`) to `on_round`, before aggregation, so that the
  coordinator records every verified spend whether or not the update is used.
- **Site-level DP** (`site_dp`, strategies/site_dp.py): Poisson sampling of sites, each
  usable update clipped to S, Gaussian noise on the sum, a fixed denominator; the wrapped
  strategy's aggregation is not used (it must be FedAvg). `on_release(round)` is called
  before the round's noisy model is returned (the coordinator records the spend there).
- **Secure aggregation** (`secagg`, strategies/secagg.py): `configure_train` runs SecAgg+'s
  key stages before the TRAIN messages leave and adds each site's forwarded shares to its
  message; replies carry masked vectors (checked like weights: names, shapes, uint64) and
  their signed books in the clear; `aggregate_train` unmasks the sum of the usable ones,
  checks that its weights add up to the counts the sites in it declared, and moves the
  global model by the weighted mean. The report lists who dropped at which stage.
- Federated evaluation is off: evaluation is central, on held-out data.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol, rules
from fedshield.privacy.ledger_check import Verdict
from fedshield.privacy.secure_sum import WEIGHT_SLOT
from fedshield.strategies import flower
from fedshield.strategies.secagg import SecAggPlus, Unmasked
from fedshield.strategies.site_dp import SiteLevelDP

log = logging.getLogger("fedshield.strategy")

# A site's FedAvg weight is at most this many times the (lower) median declared count.
MAX_WEIGHT_RATIO = 10

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


class _Selected:
    """The part of a Grid that Flower's node sampling reads, limited to our selection."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str) -> Any:  # anything else a strategy asks of the grid
        return getattr(self._grid, name)


class SiteAwareStrategy(Strategy):
    """Wrap `strategy` with site selection, budget exclusion and protocol checks.

    Parameters
    ----------
    strategy : Strategy
        Any Flower Message-API strategy, built with the protocol's record names
        (`strategies.flower.flower_strategy`).
    sites : Mapping[int, str]
        Node id -> site name, from the coordinator's site discovery. Names must be unique.
    fraction_train : float
        Fraction of the sites asked to train each round, in (0, 1].
    seed : int
        Fixes which sites are sampled in which round.
    expected_arrays : Mapping[str, (shape, dtype)]
        The trainable tensors every update must have, exactly.
    on_round : Callable[[RoundReport], None], optional
        Called once per round with every sampled site's outcome, before aggregation.
    records : Mapping[int, int], optional
        Node id -> the record count the site declared at discovery; a reply must match it.
    check_ledger : Callable[[str, int, entries], Verdict], optional
        (site, server round, ledger entries) -> whether the entries may join the run's
        ledger (privacy.ledger_check.LedgerCheck.check).
    first_round : int
        The run's round that Flower's round 1 is (a resumed run continues at the round
        after its checkpoint; Flower's `Strategy.start` always counts from 1).
    excluded : Mapping[str, str], optional
        Sites not to ask any more, and why (restored from a checkpoint).
    update_norm_bound : float, optional
        Bound on the L2 norm of each update's difference from the round's global weights
        (None: no bound; the norm is still reported).
    update_norm_action : str
        ``clip`` (scale the difference down to the bound) or ``reject`` (refuse the reply).
    books_head : Callable[[str], protocol.BooksHead | None], optional
        Site -> the newest entry of its books the coordinator holds (server/site_heads.py),
        sent in each site's training plan: a site whose books are behind it declines.
    """

    def __init__(
        self,
        strategy: Strategy,
        sites: Mapping[int, str],
        *,
        fraction_train: float,
        seed: int,
        expected_arrays: Mapping[str, protocol.ArraySpec],
        on_round: Callable[[RoundReport], None] | None = None,
        records: Mapping[int, int] | None = None,
        check_ledger: Callable[[str, int, tuple[dict[str, Any], ...]], Verdict] | None = None,
        first_round: int = 1,
        excluded: Mapping[str, str] | None = None,
        update_norm_bound: float | None = None,
        update_norm_action: str = "clip",
        site_dp: SiteLevelDP | None = None,
        on_release: Callable[[int, float | None], bool] | None = None,
        secagg: SecAggPlus | None = None,
        books_head: Callable[[str], protocol.BooksHead | None] | None = None,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train={fraction_train}: must be in (0, 1]")
        if not sites:
            raise ValueError("no sites to train with")
        names = list(sites.values())
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise ValueError(f"two nodes share the site name {dup!r}")
        if not expected_arrays:
            raise ValueError("expected_arrays: no trainable tensors")
        self.strategy = strategy
        self.sites = dict(sites)
        self.fraction_train = fraction_train
        self.seed = int(seed)
        self.expected_arrays = dict(expected_arrays)
        self.on_round = on_round
        self.records = dict(records or {})
        self.check_ledger = check_ledger
        if first_round < 1:
            raise ValueError(f"first_round={first_round}: must be >= 1")
        self.first_round = int(first_round)
        self.excluded: dict[str, str] = dict(excluded or {})  # site -> why it is not asked any more
        self._sampled: dict[int, list[int]] = {}  # server round -> node ids asked
        if update_norm_bound is not None and not (math.isfinite(update_norm_bound) and update_norm_bound > 0):
            raise ValueError(f"update_norm_bound={update_norm_bound}: must be a finite number > 0 or None")
        if update_norm_action not in ("clip", "reject"):
            raise ValueError(f"update_norm_action={update_norm_action!r}: must be clip or reject")
        self.update_norm_bound = None if update_norm_bound is None else float(update_norm_bound)
        self.update_norm_action = update_norm_action
        self.rule = flower.rule_name(strategy) or type(strategy).__name__
        self._global: dict[int, dict[str, np.ndarray[Any, Any]]] = {}  # server round -> the weights sent
        if site_dp is not None and (problem := rules.site_dp_problem(self.rule, update_norm_bound)):
            raise ValueError(problem)
        self.site_dp = site_dp
        self.on_release = on_release
        if secagg is not None and (problem := rules.secagg_problem(self.rule, update_norm_bound)):
            raise ValueError(problem)
        if secagg is not None and site_dp is not None and not site_dp.distributed:
            raise ValueError("secure aggregation shows the coordinator only the sum: it cannot add "
                             "coordinator-side site-level noise")
        if site_dp is not None and site_dp.distributed and secagg is None:
            raise ValueError("distributed site-level noise needs secure aggregation")
        self.secagg = secagg
        self.books_head = books_head
        self._grid: dict[int, Grid] = {}  # server round -> the grid its unmasking stage runs on
        self._sent: dict[int, list[Any]] = {}  # server round -> the metadata of the instructions sent
        # Instructions whose reply did not come in their round: message id -> (round, node id).
        self._owed: dict[str, tuple[int, int]] = {}
        self._puller: Grid | None = None  # the grid late replies are pulled from
        self._held: dict[str, set[str]] = {}  # site -> hashes of its entries the books accepted

    # ------------------------------------------------------------ selection

    def eligible(self) -> list[int]:
        """Node ids still asked to train, in site-name order."""
        return sorted((n for n, s in self.sites.items() if s not in self.excluded), key=self.sites.__getitem__)

    def sample(self, server_round: int) -> list[int]:
        """The node ids asked to train in `server_round` (deterministic in seed and round;
        with site-level DP, Poisson sampling at rate fraction_train)."""
        eligible = self.eligible()
        if self.site_dp is not None:
            return sorted(self.site_dp.sample(eligible, server_round), key=self.sites.__getitem__)
        k = min(rules.sites_per_round(self.fraction_train, len(self.sites)), len(eligible))
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
        server_round = self.run_round(server_round)
        chosen = self.sample(server_round)
        self._sampled[server_round] = chosen
        if not chosen and self.site_dp is None:
            return []
        self._global[server_round] = protocol.from_array_record(arrays)  # what each update is measured from
        if not chosen:
            return []  # site-level DP: an empty Poisson sample still releases a noised model
        messages = list(self.strategy.configure_train(server_round, arrays, config, _Selected(grid, chosen)))  # type: ignore[arg-type]
        self._puller = grid
        if self.books_head is not None:  # each site's plan carries the head of its books (client/site.py)
            head = self.books_head
            messages = [protocol.train_with_books_head(m, head(self.sites[m.metadata.dst_node_id])) for m in messages]
        if self.secagg is None:
            # Their metadata, not the messages: the grid sets each message id on it when it
            # pushes, and a reply Flower sends for an unreachable node names only that id.
            self._sent[server_round] = [m.metadata for m in messages]
            return messages
        self._grid[server_round] = grid
        rnd = self.secagg.prepare(server_round, chosen, config, grid)
        out = []
        for msg in messages:
            fields = self.secagg.collect_fields(server_round, msg.metadata.dst_node_id)
            if fields is not None:
                out.append(protocol.with_secagg(msg, fields))
        out = out if not rnd.skipped else []
        self._sent[server_round] = [m.metadata for m in out]
        return out

    # ------------------------------------------------------------ replies

    def sort_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[RoundReport, list[Message]]:
        """Every reply parsed and sorted; the trained ones, reduced to what aggregation needs
        (with secure aggregation: masked vectors, which no norm bound can measure)."""
        asked = self._sampled.pop(server_round, [])
        base = self._global.pop(server_round, None)
        report = RoundReport(server_round, [self.sites[n] for n in asked], rule=self.rule)
        expected = self.expected_arrays if self.secagg is None else self.secagg.expected(self.expected_arrays)
        if self.secagg is not None:
            base = None  # a masked vector has no norm to bound
        report.late = self._late_replies(expected)  # first: the site's chain continues from them
        sent = [(md.message_id, md.dst_node_id) for md in self._sent.pop(server_round, [])]
        by_id = {msg_id: node for msg_id, node in sent if msg_id}
        valid: list[Message] = []
        usable: list[tuple[Message, SiteReply, protocol.TrainReply]] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and node not in asked:  # Flower's own reply for an unreachable node
                node = by_id.get(msg.metadata.reply_to_message_id, node)
            if node not in asked or node in answered:  # Flower only returns replies to what was sent; be sure
                log.warning("round %s: a reply from node %s, which was not asked or answered already; ignored",
                            server_round, node)
                continue
            answered.add(node)
            name = self.sites[node]
            parsed = protocol.read_train_reply(msg, expected)
            if isinstance(parsed, protocol.Failed):
                report.replies.append(SiteReply(name, node, "failed", parsed.reason))
            elif parsed.site not in (None, name):
                report.replies.append(SiteReply(
                    name, node, "rejected", f"the reply names site {parsed.site!r}, not {name!r}", breach=True))
            elif isinstance(parsed, protocol.Rejected):
                reply = SiteReply(name, node, "rejected", parsed.reason, breach=True)
                self._books(reply, server_round, parsed.ledger_entries)  # spent even if unusable
                report.replies.append(reply)
            elif isinstance(parsed, protocol.Decline):
                if parsed.kind in ("budget", "books"):  # it will say so every round: not asked again
                    self.excluded[name] = parsed.reason
                report.replies.append(SiteReply(name, node, "declined", parsed.reason, decline_kind=parsed.kind))
            else:
                reply = SiteReply(name, node, "trained", "", parsed.num_examples)
                declared = self.records.get(node)
                if not self._books(reply, server_round, parsed.ledger_entries):
                    reply.status = "rejected"
                elif declared is not None and parsed.num_examples != declared:
                    reply.status, reply.breach, reply.reason = "rejected", True, (
                        f"claims {parsed.num_examples} records; it declared {declared} at discovery")
                else:
                    usable.append((msg, reply, parsed))
                report.replies.append(reply)
        weights = self._weights([parsed for _, _, parsed in usable])
        total = sum(weights)
        for (msg, reply, parsed), weight in zip(usable, weights, strict=True):
            # Each update's bound is on its share of the step: (weight / total) x update moves
            # the average no more than an update of the bound at equal weights (bound / m).
            share = 1.0 if total <= 0 else weight * len(usable) / total
            try:
                bounded = self._bound(reply, parsed, base, share)
            except Exception as exc:  # noqa: BLE001  a site's numbers never end the round
                reply.status, reply.reason = "rejected", f"its update could not be measured ({type(exc).__name__})"
                continue
            if bounded is not None:
                msg.content = protocol.aggregation_content(replace(bounded, num_examples=weight))
                valid.append(msg)
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
        valid.sort(key=lambda m: self.sites[m.metadata.src_node_id])
        return report, valid

    def _weights(self, replies: list[protocol.TrainReply]) -> list[int]:
        """The FedAvg weight of each usable reply: its declared count, capped at
        `MAX_WEIGHT_RATIO` x the lower median of the counts all sites declared at discovery
        (the median of a federation whose majority is honest is an honest count), so that one
        site declaring 10^6 records cannot take the whole average. Under secure aggregation
        the weights are inside the masked sum: not capped here (docs/coordinator.md)."""
        counts = sorted(self.records.values())
        if self.secagg is not None or not counts:
            return [r.num_examples for r in replies]
        cap = MAX_WEIGHT_RATIO * counts[(len(counts) - 1) // 2]
        return [min(r.num_examples, cap) for r in replies]

    def _late_replies(self, expected: Mapping[str, protocol.ArraySpec]) -> list[SiteReply]:
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
            parsed = protocol.read_train_reply(msg, expected)  # only its books are used: the update is stale
            if isinstance(parsed, (protocol.Failed, protocol.Decline)) or parsed.site not in (None, name):
                continue
            # A later reply may have carried these spends already (a site that counted them
            # as interrupted): what the books hold is not checked twice.
            held = self._held.get(name, set())
            entries = tuple(e for e in parsed.ledger_entries if e.get("hash") not in held)
            if not entries:
                continue
            reply = SiteReply(name, node, "trained", "", late_round=server_round)
            if not self._books(reply, server_round, entries):
                reply.status = "rejected"
            late.append(reply)
        return sorted(late, key=lambda r: (r.late_round or 0, r.site))

    def _bound(self, reply: SiteReply, parsed: protocol.TrainReply,
               base: Mapping[str, np.ndarray[Any, Any]] | None, share: float = 1.0) -> protocol.TrainReply | None:
        """The update's norm into `reply`; the update as it may be aggregated (clipped to the
        bound), or None if it is refused (`reject`). `share`: the update's weight over the
        mean weight of the round's usable updates; the bound applies to share x norm (a site
        whose weight is k times the mean gets 1/k of the bound), never more than the bound."""
        if base is None:
            return parsed
        deltas = {k: v.astype(np.float64) - base[k] for k, v in parsed.arrays.items()
                  if np.issubdtype(v.dtype, np.floating)}
        norm = math.sqrt(sum(float(np.vdot(d, d)) for d in deltas.values()))
        reply.update_norm = norm
        if self.update_norm_bound is None:
            return parsed
        bound = self.update_norm_bound / max(1.0, share)
        if norm <= bound:
            return parsed
        if self.update_norm_action == "reject":
            reply.status, reply.reason = "rejected", (
                f"update norm {norm:.4g} is above federation.update_norm_bound={self.update_norm_bound:g}"
                + (f" / its weight share {share:.3g}" if share > 1.0 else ""))
            return None
        reply.clipped = True
        scale = bound / norm
        arrays = dict(parsed.arrays)
        for k, d in deltas.items():
            arrays[k] = (base[k] + d * scale).astype(parsed.arrays[k].dtype)
        return replace(parsed, arrays=arrays)

    def _books(self, reply: SiteReply, server_round: int, entries: tuple[dict[str, Any], ...]) -> bool:
        """Check a reply's ledger entries into `reply`; False (and the site excluded) if they fail:
        a breach, unless what fails is that entries of this run are missing before them (a
        reply lost on the way, `Verdict.missing`)."""
        if self.check_ledger is None:
            reply.ledger_entries = entries
            return True
        verdict = self.check_ledger(reply.site, server_round, entries)
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.run_round(server_round)
        if self.secagg is not None:
            return self._secure_round(server_round, replies)
        if self.site_dp is not None:
            return self._site_dp_round(server_round, replies)
        report, valid = self.sort_replies(server_round, replies)
        f = flower.num_malicious(self.strategy)
        if flower.rule_name(self.strategy) in flower.ROBUST:
            report.withstood = max(0, f - len(report.breaches()))
            if report.withstood < f:
                log.info("round %s: %d of federation.num_malicious=%d unmasked by a breach (%s): %s withstands %d "
                         "among the %d usable update(s)", server_round, f - report.withstood, f,
                         ", ".join(report.breaches()), report.rule, report.withstood, len(valid))
        withstood = f if report.withstood is None else report.withstood
        with flower.withstanding(self.strategy, withstood):
            short = flower.shortfall(self.strategy, len(valid), f - withstood) if valid else None
            if not valid:
                report.skipped = "no usable update" if report.sampled else \
                    "no site left to ask (every site is excluded: out of budget, or its books failed)"
            elif short:
                report.skipped = short
            else:
                chosen = flower.selection(self.strategy, [m.content for m in valid])
                if chosen is not None:
                    by_site = {r.site: r for r in report.replies}
                    for i, m in enumerate(valid):
                        by_site[self.sites[m.metadata.src_node_id]].selected = i in chosen
            if report.skipped:
                log.info("round %s: nothing aggregated: %s", server_round, report.skipped)
            if self.on_round is not None:
                self.on_round(report)
            if report.skipped:
                return None, None
            return self.strategy.aggregate_train(server_round, valid)

    def _site_dp_round(self, server_round: int, replies: Iterable[Message]
                       ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg: every usable update clipped, the noised sum over a fixed denominator;
        spent (on_release) before the model is returned, whatever number of sites replied."""
        assert self.site_dp is not None
        base = self._global.get(server_round)
        report, valid = self.sort_replies(server_round, replies)
        if base is None:  # nothing was sent this round: no weights to start from (not a DP release)
            report.skipped = "no weights for this round"
            if self.on_round is not None:
                self.on_round(report)
            return None, None
        updates = [protocol.from_array_record(m.content[protocol.ARRAYS]) for m in valid]
        new, norms = self.site_dp.aggregate(base, updates, server_round)
        by_site = {r.site: r for r in report.replies}
        for m, norm in zip(valid, norms, strict=True):
            reply = by_site[self.sites[m.metadata.src_node_id]]
            reply.update_norm = norm
            reply.clipped = norm > self.site_dp.clip_norm
        if self.on_round is not None:
            self.on_round(report)
        if self.on_release is not None and not self.on_release(server_round, None):  # spend before release
            return None, None
        return protocol.to_array_record(new), None

    def _secure_round(self, server_round: int, replies: Iterable[Message]
                      ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+: unmask the sum of the usable masked vectors; the global model moves by
        their weighted mean (the weights are the counts the sites released)."""
        assert self.secagg is not None
        base = self._global.get(server_round)
        report, valid = self.sort_replies(server_round, replies)
        state = self.secagg.round_state(server_round)
        grid = self._grid.pop(server_round, None)
        if state is None or base is None or grid is None:  # nobody was asked
            report.skipped = "no usable update" if report.sampled else ""
            if self.on_round is not None:
                self.on_round(report)
            return None, None
        vectors = {m.metadata.src_node_id: protocol.from_array_record(m.content[protocol.ARRAYS]) for m in valid}
        declared = {m.metadata.src_node_id: int(m.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for m in valid}
        outcome = self.secagg.finish(server_round, vectors, grid)
        report.dropped = dict(state.dropped)
        if isinstance(outcome, Unmasked):
            # Site-level DP: each site's weight is 1 (the sum is over a fixed denominator).
            counted = len(outcome.sites) if self.site_dp is not None else sum(
                declared[n] for n in vectors if self.sites[n] in outcome.sites)
            if outcome.total_weight != counted:
                report.skipped = (f"secure aggregation: the unmasked weights add up to {outcome.total_weight}, "
                                  f"the {len(outcome.sites)} sites in the sum declared {counted} (a site sent a "
                                  "wrong weight): the round is not released")
        else:
            report.skipped = outcome.skipped or "secure aggregation: nothing to unmask"
        if report.skipped:
            log.info("round %s: nothing aggregated: %s", server_round, report.skipped)
        if self.on_round is not None:
            self.on_round(report)
        if report.skipped or not isinstance(outcome, Unmasked):
            return None, None
        if self.site_dp is None:  # FedAvg: the weighted mean of the updates in the sum
            step = outcome.mean
        else:  # DP-FedAvg: the noisy sum of clipped updates over the fixed q N
            scale = outcome.total_weight / self.site_dp.denominator
            step = {k: v * scale for k, v in outcome.mean.items()}
            variance = sum(self._noise_share(t) for t in outcome.thresholds)
            if self.on_release is not None and not self.on_release(server_round, variance):
                return None, None  # the federation's budget would not allow it: nothing released
        new = {k: (base[k].astype(np.float64) + step[k]).astype(base[k].dtype) if k in step else base[k]
               for k in base if k != WEIGHT_SLOT}
        return protocol.to_array_record(new), None

    def _noise_share(self, threshold: int) -> float:
        assert self.secagg is not None and self.secagg.noise is not None
        return self.secagg.noise.per_site(threshold)

    # ------------------------------------------------------------ no federated evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("fedshield site-aware strategy: %d sites, fraction_train %s, seed %d, around:",
                 len(self.sites), self.fraction_train, self.seed)
        self.strategy.summary()

"""The update norm bound (`federation.update_norm_bound`, `federation.update_norm_action`).

The L2 norm of (update - the round's global weights) over all trainable float tensors,
measured from the weights this round sent (kept per round from `configure_train`), is
reported for every usable reply; above the bound the update is scaled down to it (`clip`:
the site's direction kept, its reach bounded) or the reply is refused (`reject`). The bound
is on each update's share of the step: an update whose FedAvg weight is k > 1 times the
round's mean weight is held to bound / k, so a scaled-up update moves a weighted average by
at most bound / n per site, as at equal weights. It cannot stop a sign flip or a label flip
of ordinary size (the robust rules are for those). It is coordinator-side post-processing
of a released update: it changes nothing in any site's privacy account.

The wrapped strategy aggregates the bounded updates (its own aggregation, untouched). A
wrapper under it that replaces aggregation by a masked sum or by site-level DP is refused:
a masked vector has no norm to bound, and site-level DP's clip norm already bounds each
update.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol
from fedshield.strategies.report import RoundReports, SiteReply
from fedshield.strategies.wrapper import Wrapper, update_of, weight_of, wrapped

Weights = dict[str, np.ndarray[Any, Any]]
_DATA = operator.attrgetter("data")


class NormBound(Wrapper):
    """Measure every usable update from the round's global weights; clip or refuse above `bound`.

    `bound` None: the norms are measured and reported, nothing is bounded."""

    def __init__(self, strategy: Strategy, reports: RoundReports, *, bound: float | None = None,
                 action: str = "clip") -> None:
        super().__init__(strategy)
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"update_norm_bound={bound}: must be a finite number > 0 or None")
        if action not in ("clip", "reject"):
            raise ValueError(f"update_norm_action={action!r}: must be clip or reject")
        replaces = [type(s).__name__ for s in wrapped(strategy) if getattr(s, "replaces_aggregation", False)]
        if replaces:
            raise ValueError(f"a norm bound needs each update in the clear, aggregated by the wrapped rule: "
                             f"{replaces[0]} replaces the aggregation")
        self.reports = reports
        self.bound = None if bound is None else float(bound)
        self.action = action
        self._base: dict[int, Weights] = {}  # server round -> the weights it sent
        self._flat_bases: dict[int, dict[tuple[str, ...], np.ndarray[Any, Any]]] = {}  # round -> its base, flat
        # server round -> id(reply) -> (the reply, its ArrayRecord, `_arrays_of` it, its norm)
        self._measured: dict[int, dict[int, tuple[Message, ArrayRecord, tuple[Any, ...], float]]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._base[server_round] = protocol.from_array_record(arrays)  # what each update is measured from
        for kept in (self._flat_bases, self._measured):  # a round that was never aggregated
            for old in [r for r in kept if r < server_round]:
                del kept[old]
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def reply_checked(self, server_round: int, msg: Message) -> None:
        """Measure the update now, while other sites may still train (the norm is all that
        needs only this reply; the bound's share needs every reply's weight). Used at
        aggregation if the reply still holds the very same arrays; else measured again."""
        base = self._base.get(server_round)
        if base is not None:
            try:
                record = msg.content[protocol.ARRAYS]
                if not isinstance(record, ArrayRecord):
                    raise TypeError("no ArrayRecord")
                update = update_of(msg)[0]
                floats = tuple(k for k, v in update.items() if v.dtype.kind == "f")
                norm = _distance(update, base, floats, self._flat_bases.setdefault(server_round, {}))
                self._measured.setdefault(server_round, {})[id(msg)] = (msg, record, _arrays_of(record), norm)
            except Exception:  # noqa: BLE001  measured (and refused) at aggregation, as any reply
                pass
        super().reply_checked(server_round, msg)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        base = self._base.pop(server_round, None)
        flat_bases = self._flat_bases.pop(server_round, {})  # the round's base, flattened once
        measured = self._measured.pop(server_round, {})
        replies = list(replies)
        if base is None or not replies:
            return self.strategy.aggregate_train(server_round, replies)
        report = self.reports.get(server_round)
        weights = [weight_of(m) for m in replies]
        total = sum(weights)
        kept: list[Message] = []
        for msg, weight in zip(replies, weights, strict=True):
            reply = report.by_node(msg.metadata.src_node_id)
            # Each update's bound is on its share of the step: (weight / total) x update moves
            # the average no more than an update of the bound at equal weights (bound / m).
            share = 1.0 if total <= 0 else weight * len(replies) / total
            try:
                norm = _still_measured(measured.get(id(msg)), msg)
                if norm is not None and (self.bound is None or norm <= self.bound / max(1.0, share)):
                    reply.update_norm = norm  # within the bound: passed on as received
                    kept.append(msg)
                    continue
                update = update_of(msg)[0]
                bounded = self._bound(reply, update, base, share, flat_bases)
            except Exception as exc:  # noqa: BLE001  a site's numbers never end the round
                reply.status, reply.reason = "rejected", f"its update could not be measured ({type(exc).__name__})"
                continue
            if bounded is not None:
                if bounded is not update:  # clipped: the scaled weights go on (else they are as received)
                    msg.content[protocol.ARRAYS] = protocol.to_array_record(bounded)
                kept.append(msg)
        return self.strategy.aggregate_train(server_round, kept)

    def _bound(self, reply: SiteReply, update: Weights, base: Weights, share: float,
               flat_bases: dict[tuple[str, ...], np.ndarray[Any, Any]]) -> Weights | None:
        """The update's norm into `reply`; the update as it may be aggregated (clipped to the
        bound), or None if it is refused (`reject`). `share`: the update's weight over the mean
        weight of the round's usable updates; the bound applies to share x norm."""
        floats = tuple(k for k, v in update.items() if v.dtype.kind == "f")  # np.floating
        norm = _distance(update, base, floats, flat_bases)
        reply.update_norm = norm
        if self.bound is None:
            return update
        bound = self.bound / max(1.0, share)
        if norm <= bound:
            return update
        if self.action == "reject":
            reply.status, reply.reason = "rejected", (
                f"update norm {norm:.4g} is above federation.update_norm_bound={self.bound:g}"
                + (f" / its weight share {share:.3g}" if share > 1.0 else ""))
            return None
        reply.clipped = True
        scale = bound / norm
        out = dict(update)
        for k in floats:
            out[k] = (base[k] + (update[k].astype(np.float64) - base[k]) * scale).astype(update[k].dtype)
        return out


def _arrays_of(record: ArrayRecord) -> tuple[Any, ...]:
    """What tells a reply's arrays from any others: its Array objects, then their data objects
    (kept with the norm, so that no id of them is another object's while it is kept)."""
    arrays = tuple(record.values())
    return (*arrays, *map(_DATA, arrays))


def _still_measured(kept: tuple[Message, ArrayRecord, tuple[Any, ...], float] | None, msg: Message) -> float | None:
    """The norm `reply_checked` measured for `msg`, if it still holds the very arrays measured."""
    if kept is None or kept[0] is not msg:
        return None
    record = msg.content[protocol.ARRAYS] if protocol.ARRAYS in msg.content else None
    if record is not kept[1] or not isinstance(record, ArrayRecord):
        return None
    if tuple(map(id, _arrays_of(record))) != tuple(map(id, kept[2])):
        return None
    return kept[3]


def _distance(update: Weights, base: Weights, names: tuple[str, ...],
              flat_bases: dict[tuple[str, ...], np.ndarray[Any, Any]]) -> float:
    """The L2 distance of `update` from `base` over `names`, in float64, with the update
    flattened into one vector and `base` flattened once a round (`flat_bases`): one
    subtraction and one dot product a reply, not one of each per tensor (at 1,000 replies a
    round the per-tensor form took a quarter of a second after the last reply came)."""
    if not names:
        return 0.0
    if any(update[k].shape != np.shape(base[k]) for k in names):
        raise ValueError("an update's tensor differs in shape from the weights sent")
    flat_base = flat_bases.get(names)
    if flat_base is None:
        flat_base = flat_bases[names] = np.concatenate([np.ravel(base[k]) for k in names], dtype=np.float64)
    delta = np.concatenate([np.ravel(update[k]) for k in names], dtype=np.float64)
    delta -= flat_base
    return math.sqrt(float(np.dot(delta, delta)))

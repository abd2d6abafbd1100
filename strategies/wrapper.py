"""What every wrapper of the coordinator's stack shares, in the style of Flower's
`DifferentialPrivacyFixedClippingBase`: it holds the strategy it wraps (`self.strategy`),
adds one behaviour, and keeps what it needs per round keyed by the round.

Federated evaluation is off in the whole stack: evaluation is central, on held-out data
(metrics computed on a site's private data would leave it without DP)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol

log = logging.getLogger("fedshield.strategy")


def update_of(msg: Message) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """A checked reply as the reply gate hands it on (`protocol.aggregation_content`): its
    weights (or masked vector), read-only, and its FedAvg weight."""
    return protocol.array_values(_record(msg, protocol.ARRAYS, ArrayRecord)), weight_of(msg)


def weight_of(msg: Message) -> int:
    """A checked reply's FedAvg weight (`update_of` without reading its arrays)."""
    return int(cast(int, _record(msg, protocol.METRICS, MetricRecord)[protocol.NUM_EXAMPLES]))


def _record(msg: Message, name: str, kind: type[Any]) -> Any:
    """`msg.content.array_records[name]` (or metric_records) without building that view of
    the whole RecordDict (a typed dict a call, twice a reply in each wrapper)."""
    record = msg.content[name]
    if not isinstance(record, kind):
        raise KeyError(name)
    return record


def wrapped(strategy: Strategy) -> list[Strategy]:
    """`strategy` and every strategy it wraps, outermost first."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)  # type: ignore[attr-defined]
    return chain


class Wrapper(Strategy):
    """A Strategy that adds one behaviour to `strategy`."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @staticmethod
    def asks_nobody(grid: Grid) -> bool:
        """Whether the round's selection is empty: Flower's own strategies would wait for a
        node forever (`sample_nodes`), so a wrapper never hands them an empty grid."""
        return not list(grid.get_node_ids())

    def reply_checked(self, server_round: int, msg: Message) -> None:
        """A reply the reply gate has just checked and will hand on to this round's
        aggregation, as it comes (under the batched engine, while other sites still train):
        a wrapper that has work of its own for each reply may do it now rather than after the
        last reply (`NormBound` measures the update). Passed on down the stack."""
        inner = getattr(self.strategy, "reply_checked", None)
        if inner is not None:
            inner(server_round, msg)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("  %s around:", type(self).__name__)
        self.strategy.summary()

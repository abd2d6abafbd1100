"""Flower's own strategies, configured for fedshield's wire and its stack of wrappers.

The stack (strategies/stack.py; strategies/selection.py) does the sampling, so Flower's strategy sees only the
sites chosen for the round: its fractions are 1 and its minimums 1. Federated evaluation
on the sites' private data is off (metrics computed on private data would leave a site
without DP); evaluation is central, on held-out data.

Robust rules (Flower 1.41's classes, their aggregation untouched) and what each needs to
withstand f poisoned updates among the n it aggregates in a round (`min_replies`; the counts
are fedshield.rules.min_sites, which the config's validation applies too):

=============  ===========================================  =====================  ==================
rule           Flower class, what it aggregates             withstands f if        source
=============  ===========================================  =====================  ==================
fedmedian      FedMedian: coordinate-wise median            n >= 2f + 1            Yin et al. 2018
fedtrimmedavg  FedTrimmedAvg: coordinate-wise mean after    floor(beta n) >= f     Yin et al. 2018
               cutting floor(beta n) values off each tail
krum           Krum: the one update whose n - f - 2         n >= 2f + 3            Blanchard et al.
               nearest updates are closest (n > 2f + 2)                            2017
multikrum      MultiKrum: the mean of the m best by Krum's  n >= 2f + 3            Blanchard et al.
               score (fedshield: m = n - f by default)                             2017
bulyan         Bulyan: Multi-Krum picks n - 2f, then a      n >= 4f + 3            El Mhamdi et al.
               coordinate-wise mean of the n - 4f values                           2018
               nearest the median
=============  ===========================================  =====================  ==================

Below those counts Flower's code either still returns an aggregate that no longer carries
the guarantee (median, trimmed mean, Krum), or logs and returns nothing (Bulyan). The
robust-rule guard (strategies/robust_guard.py) therefore checks `shortfall` before it
hands a round's usable updates to the rule and skips the round with one line instead;
`requirement` refuses a run whose rounds could never reach the count. Weighting: Krum
and MultiKrum average the updates they select weighted by record count (safe: counts must
equal what each site declared at discovery); the median and the trimmed mean are unweighted, coordinate by coordinate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedshield import protocol, rules

STRATEGIES = rules.RULES
ROBUST = rules.ROBUST_RULES


class ReadFedAvg(FedAvg):
    """Flower's FedAvg with its weighted mean of the replies' arrays (`average_arrayrecords`)
    reading each Array with protocol.array_value instead of `Array.numpy()`: np.load
    parsed every array's header with ast.literal_eval, about 1 ms a reply at 1,000 sites a
    round. The arithmetic, and its order, are Flower's own (tests/test_stack_aggregation.py
    checks the two aggregates equal bit for bit)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        # Flower's own checks and metric mean, run on `RecordsRead` views of the replies:
        # the same reads, without Flower's typed views of a RecordDict, which rebuild every
        # record of it at each read (two a reply in the check, one in the mean: a tenth of
        # a second after the last reply at 1,000 replies a round).
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid_replies:
            return None, None
        contents = [msg.content for msg in valid_replies]
        views = [RecordsRead(c) for c in contents]
        validate_message_reply_consistency(views, self.weighted_by_key, check_arrayrecord=True)  # type: ignore[arg-type]
        return (average_arrayrecords(contents, self.weighted_by_key),
                self.train_metrics_aggr_fn(views, self.weighted_by_key))  # type: ignore[arg-type]


class RecordsRead:
    """A RecordDict as Flower's reply checks and metric mean read it (strategy_utils
    `validate_message_reply_consistency`, `aggregate_metricrecords`): its `array_records`
    and `metric_records` (plain dicts of its records of each type, in its order), and its
    records by name. Flower's own properties build a typed view that assigns every record
    back into the RecordDict: the same records, at many times the cost."""

    __slots__ = ("_content", "array_records", "metric_records")

    def __init__(self, content: RecordDict) -> None:
        self._content = content
        self.array_records = {k: v for k, v in content.items() if isinstance(v, ArrayRecord)}
        self.metric_records = {k: v for k, v in content.items() if isinstance(v, MetricRecord)}

    def __getitem__(self, key: str) -> Any:
        return self._content[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._content.get(key, default)


def average_arrayrecords(records: list[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` (Flower 1.41): the same
    products and sums in the same order, bit for bit, its arrays read by protocol.array_value
    (once per Array: the reply gate read them already). Where every record holds the same
    float tensors, each tensor's products are computed in one operation over all records
    (`_weighted_sum`): per record and tensor, a reply's 20 tensors at 1,000 replies a round
    were a quarter of a second after the last reply came."""
    # The records' MetricRecords and ArrayRecords as Flower's `metric_records` and
    # `array_records` list them, without building those views (a typed dict a call).
    weights = [cast(float, _of_kind(r, MetricRecord)[0][weighting_metric_name]) for r in records]
    total_weight = sum(weights)
    weight_factors = [w / total_weight for w in weights]
    values = [{k: protocol.array_value(v) for item in _of_kind(r, ArrayRecord) for k, v in item.items()}
              for r in records]
    aggregated = _weighted_sum(values, weight_factors)
    if aggregated is None:
        aggregated = {}
        for value, weight in zip(values, weight_factors, strict=True):
            for key, array in value.items():
                if key not in aggregated:
                    aggregated[key] = array * weight
                else:
                    aggregated[key] += array * weight
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in aggregated.items()})


def _of_kind(content: RecordDict, kind: type[Any]) -> list[Any]:
    """The records of `content` of type `kind`, in its order (RecordDict.array_records and
    metric_records, as a list)."""
    return [record for record in content.values() if isinstance(record, kind)]


def _weighted_sum(values: list[dict[str, np.ndarray[Any, Any]]],
                  factors: list[float]) -> dict[str, np.ndarray[Any, Any]] | None:
    """Flower's `x_0 * w_0 + x_1 * w_1 + ...`, summed left to right in place, for records that
    hold the same float tensors (names, shapes, dtypes; else None): each product `x * w` (a
    float array times a Python float: computed in the array's dtype, NEP 50) is one row of
    `stack * w` with w cast to that dtype, and the rows are added one by one, in order."""
    first = values[0]
    if any(v.dtype.kind != "f" for v in first.values()):
        return None
    specs = [(k, v.shape, v.dtype) for k, v in first.items()]
    for value in values[1:]:
        if len(value) != len(specs) or any(
                (got := value.get(k)) is None or got.shape != shape or got.dtype != dtype for k, shape, dtype in specs):
            return None
    out: dict[str, np.ndarray[Any, Any]] = {}
    for key, shape, dtype in specs:
        size = max(1, math.prod(shape))
        block = max(1, _STACK_ELEMENTS // size)  # rows stacked at a time: memory stays bounded
        total: np.ndarray[Any, Any] | None = None
        for start in range(0, len(values), block):
            part = values[start:start + block]
            weights = np.asarray(factors[start:start + block], dtype=dtype).reshape((len(part),) + (1,) * len(shape))
            rows = np.stack([value[key] for value in part])
            rows *= weights
            if total is not None:
                rows[0] += total  # total + row: the same bits as row + total (IEEE addition commutes)
            total = _sum_in_order(rows.reshape(len(part), size)).reshape(shape)
        assert total is not None
        out[key] = total
    return out


def _sum_in_order(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """rows[0] + rows[1] + ... left to right, as `total += row` adds them, for an (n, m) array.
    numpy sums pairwise only along the fast axis in memory (np.sum's notes): along axis 0 of
    a C-ordered (n, m >= 2) array it adds row after row, in one call; a one-element tensor
    (m = 1, where axis 0 is the fast one) is added row by row here."""
    if rows.shape[1] >= 2:
        summed: np.ndarray[Any, Any] = np.add.reduce(rows, axis=0)
        return summed
    total: np.ndarray[Any, Any] = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total


_STACK_ELEMENTS = 1 << 22  # elements of one tensor stacked at once by `_weighted_sum` (16 MiB of float32)


class MultiKrumRest(MultiKrum):
    """Flower's MultiKrum averaging the round's n usable updates minus f (`num_nodes_to_select=0`).

    Blanchard et al.'s Multi-Krum with m = n - f: every update that may be honest is kept,
    whatever number of replies a round brings (a fixed m larger than n - f would let a
    poisoned update in when a site drops out). Aggregation is Flower's own."""

    def select_count(self, n: int) -> int:
        return self.num_nodes_to_select or max(1, n - self.num_malicious_nodes)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        chosen = self.num_nodes_to_select
        self.num_nodes_to_select = self.select_count(len(replies))
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.num_nodes_to_select = chosen


def flower_strategy(
    name: str, *, proximal_mu: float = 0.01, server_learning_rate: float = 0.1, num_malicious: int = 1,
    trim_fraction: float = 0.2, krum_select: int = 0,
) -> Strategy:
    """Flower's strategy of that name, speaking the protocol's record names.

    `num_malicious` (f: krum, multikrum, bulyan), `trim_fraction` (beta: fedtrimmedavg) and
    `krum_select` (m: multikrum; 0 = each round's usable updates minus f) are Flower's
    `num_malicious_nodes`, `beta` and `num_nodes_to_select`.
    """
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=1, weighted_by_key=protocol.NUM_EXAMPLES,
        arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.PLAN,
    )
    if num_malicious < 0 or krum_select < 0:
        raise ValueError(f"num_malicious={num_malicious}, krum_select={krum_select}: must be >= 0")
    if name == "fedavg":
        return ReadFedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=server_learning_rate, **common)
    if name == "fedmedian":
        # Flower's median and trimmed mean take no f; it is kept on them, under Krum's
        # attribute name, for `min_replies` (how many updates a round needs).
        strategy: Strategy = FedMedian(**common)
        strategy.num_malicious_nodes = num_malicious  # type: ignore[attr-defined]
        return strategy
    if name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(beta=trim_fraction, **common)
        strategy.num_malicious_nodes = num_malicious  # type: ignore[attr-defined]
        return strategy
    if name == "krum":
        return Krum(num_malicious_nodes=num_malicious, **common)
    if name == "multikrum":
        return MultiKrumRest(num_malicious_nodes=num_malicious, num_nodes_to_select=krum_select, **common)
    if name == "bulyan":
        return Bulyan(num_malicious_nodes=num_malicious, **common)
    raise ValueError(f"federation.strategy={name!r}: must be one of {', '.join(STRATEGIES)}")


def rule_name(strategy: Strategy) -> str:
    """The federation.strategy name of a Flower strategy ("" if it is none of ours)."""
    for name, kind in (("multikrum", MultiKrumRest), ("krum", Krum), ("multikrum", MultiKrum), ("bulyan", Bulyan),
                       ("fedtrimmedavg", FedTrimmedAvg), ("fedmedian", FedMedian), ("fedadam", FedAdam),
                       ("fedprox", FedProx), ("fedavg", FedAvg)):
        if isinstance(strategy, kind):
            return name
    return ""


def min_replies(strategy: Strategy) -> int:
    """The fewest usable updates a round must have for `strategy` to keep its guarantee."""
    name = rule_name(strategy)
    if name not in ROBUST:
        return 1
    f = int(getattr(strategy, "num_malicious_nodes", 0))
    select = int(getattr(strategy, "num_nodes_to_select", 0))
    return rules.min_sites(name, f, float(getattr(strategy, "beta", 0.0)), select)


def num_malicious(strategy: Strategy) -> int:
    """The f that `strategy` is configured to withstand (0 for the plain averages)."""
    return int(getattr(strategy, "num_malicious_nodes", 0)) if rule_name(strategy) in ROBUST else 0


@contextlib.contextmanager
def withstanding(strategy: Strategy, f: int) -> Iterator[None]:
    """`strategy` set to withstand `f` poisoned updates for the duration (its own f restored
    after). Used when a round's refused replies have already unmasked some of the f attackers:
    the rule then needs to withstand only the ones still unaccounted for among the rest."""
    if rule_name(strategy) not in ROBUST:
        yield
        return
    configured = strategy.num_malicious_nodes  # type: ignore[attr-defined]
    strategy.num_malicious_nodes = f  # type: ignore[attr-defined]
    try:
        yield
    finally:
        strategy.num_malicious_nodes = configured  # type: ignore[attr-defined]


def shortfall(strategy: Strategy, n: int, unmasked: int = 0) -> str | None:
    """None if `n` usable updates are enough for `strategy`; else why not, in one line.
    `unmasked`: attackers already refused this round (the strategy is set, by `withstanding`,
    to the f left of federation.num_malicious)."""
    need = min_replies(strategy)
    if n >= need:
        return None
    name = rule_name(strategy)
    f = int(getattr(strategy, "num_malicious_nodes", 0))
    which = (f"the {f} attacker(s) of federation.num_malicious={f + unmasked} not unmasked by a breach"
             if unmasked else f"federation.num_malicious={f}")
    return (f"{n} usable update(s): {name} withstands {which} only with at least {need}"
            + (f" (federation.trim_fraction={getattr(strategy, 'beta', 0.0):g})" if name == "fedtrimmedavg" else ""))


def selection(strategy: Strategy, contents: list[RecordDict]) -> list[int] | None:
    """Indices of the updates in `contents` that a selecting rule will aggregate (Krum,
    MultiKrum: the updates it averages; Bulyan: its Multi-Krum stage), computed with
    Flower's own selection on the same contents, in the same order; None for rules that
    use every update (averages, coordinate-wise median and trimmed mean).

    Costs one more pairwise-distance matrix per round (n^2 d), as much as the rule's own."""
    if not contents:
        return None
    f = int(getattr(strategy, "num_malicious_nodes", 0))
    if isinstance(strategy, MultiKrumRest):
        chosen = select_multikrum(contents, f, strategy.select_count(len(contents)))
    elif isinstance(strategy, MultiKrum):  # Krum too (num_nodes_to_select=1)
        chosen = select_multikrum(contents, f, strategy.num_nodes_to_select)
    elif isinstance(strategy, Bulyan):
        chosen = strategy.selection_rule(contents, f, len(contents) - 2 * f)
    else:
        return None
    ids = [id(c) for c in chosen]
    return [i for i, c in enumerate(contents) if id(c) in ids]

"""The first two wrappers of the coordinator's stack, each alone around a minimal inner
strategy with a fake Grid: the site selection (strategies/selection.py) and the reply gate
(strategies/reply_gate.py). The whole stack: tests/test_site_aware.py."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshield import protocol
from fedshield.privacy.ledger_check import Verdict
from fedshield.strategies.reply_gate import MAX_WEIGHT_RATIO, ReplyGate
from fedshield.strategies.report import RoundReport, RoundReports
from fedshield.strategies.selection import Selected, SiteSelection
from tests.test_site_aware import EXPECTED, SITES, Checks, FakeGrid, Heads, Sink, declines, trains

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

PLAN = protocol.plan_record(config_yaml="x: 1\n", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
ZEROS = protocol.to_array_record({"w": np.zeros(3, np.float32)})


class Minimal(Strategy):
    """The least a strategy does: one TRAIN message per node of the grid it is given, and the
    plain mean of what it is handed. It keeps what it saw, by round."""

    def __init__(self) -> None:
        self.configured: dict[int, list[int]] = {}
        self.aggregated: dict[int, list[Message]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = list(grid.get_node_ids())
        self.configured[server_round] = nodes
        plan = ConfigRecord(dict(config))
        plan[protocol.SERVER_ROUND] = server_round
        content = RecordDict({protocol.ARRAYS: arrays, protocol.PLAN: plan})
        return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = self.aggregated[server_round] = list(replies)
        if not got:
            return None, None
        ws = [protocol.from_array_record(m.content[protocol.ARRAYS])["w"] for m in got]
        return protocol.to_array_record({"w": np.mean(ws, axis=0).astype(np.float32)}), None

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        return None

    def summary(self) -> None:
        pass


# ------------------------------------------------------------ selection


def test_selection_hands_the_inner_strategy_only_the_rounds_sample_under_the_runs_round_number():
    inner = Minimal()
    selection = SiteSelection(inner, SITES, fraction_train=0.5, seed=3, first_round=7)
    grid = FakeGrid({s: trains(1.0) for s in SITES.values()})
    first = list(selection.configure_train(1, ZEROS, PLAN, grid))
    second = list(selection.configure_train(2, ZEROS, PLAN, grid))
    assert sorted(inner.configured) == [7, 8]  # the run's rounds, resumed at 7
    assert inner.configured[7] == selection.sample(7) and inner.configured[8] == selection.sample(8)
    assert len(inner.configured[7]) == selection.per_round() == 2
    assert inner.configured[7] != inner.configured[8]
    # Round 8's replies come back first: each round reaches the inner strategy under its own number.
    selection.aggregate_train(2, grid.send_and_receive(second))
    selection.aggregate_train(1, grid.send_and_receive(first))
    assert [m.metadata.src_node_id for m in inner.aggregated[7]] == inner.configured[7]
    assert [m.metadata.src_node_id for m in inner.aggregated[8]] == inner.configured[8]


def test_selection_never_asks_an_excluded_site_and_asks_nobody_when_every_site_is():
    inner = Minimal()
    excluded = {"alpha": "out of budget"}
    selection = SiteSelection(inner, SITES, fraction_train=1.0, seed=1, excluded=excluded)
    list(selection.configure_train(1, ZEROS, PLAN, FakeGrid({})))
    assert [SITES[n] for n in inner.configured[1]] == ["bravo", "charlie", "delta"]
    excluded.update(dict.fromkeys(("bravo", "charlie", "delta"), "revoked"))  # shared, not copied
    assert list(selection.configure_train(2, ZEROS, PLAN, FakeGrid({}))) == [] and inner.configured[2] == []


def test_selection_samples_with_the_poisson_sampler_it_is_given():
    class Every:
        def sample(self, eligible, server_round):
            return list(eligible) if server_round % 2 else []

    selection = SiteSelection(Minimal(), SITES, fraction_train=0.1, seed=1, poisson=Every())
    assert [SITES[n] for n in selection.sample(1)] == sorted(SITES.values()) and selection.sample(2) == []


def test_selection_checks_its_arguments():
    for kwargs, says in (({"fraction_train": 0.0}, "fraction_train"), ({"first_round": 0}, "first_round")):
        with pytest.raises(ValueError, match=says):
            SiteSelection(Minimal(), SITES, **{"fraction_train": 1.0, "seed": 1, **kwargs})
    with pytest.raises(ValueError, match="share the site name 'alpha'"):
        SiteSelection(Minimal(), {1: "alpha", 2: "alpha"}, fraction_train=1.0, seed=1)
    with pytest.raises(ValueError, match="no sites"):
        SiteSelection(Minimal(), {}, fraction_train=1.0, seed=1)


# ------------------------------------------------------------ reply gate


def gate(inner: Strategy | None = None, sink: Sink | None = None, **kwargs) -> ReplyGate:
    return ReplyGate(inner or Minimal(), SITES, expected_arrays=EXPECTED, reports=RoundReports(sink), **kwargs)


def test_the_gate_hands_on_only_checked_replies_and_publishes_one_report_per_round_keyed_by_round():
    inner, sink = Minimal(), Sink()
    g = gate(inner, sink, records=dict.fromkeys(SITES, 10))
    grid = FakeGrid({"alpha": trains(1.0), "bravo": declines("budget"), "charlie": trains(5.0, n=11),
                     "delta": trains(3.0)})
    first = list(g.configure_train(1, ZEROS, PLAN, Selected(grid, [101, 202, 303])))
    second = list(g.configure_train(2, ZEROS, PLAN, Selected(grid, [404])))
    g.aggregate_train(2, grid.send_and_receive(second))
    g.aggregate_train(1, grid.send_and_receive(first))
    two, one = sink.reports
    assert (two.server_round, two.sampled, two.sites("trained")) == (2, ["delta"], ["delta"])
    assert (one.server_round, one.sampled) == (1, ["alpha", "bravo", "charlie"])
    assert one.sites("trained") == ["alpha"] and one.sites("declined") == ["bravo"]
    assert one.sites("rejected") == ["charlie"] and one.breaches() == ["charlie"]  # 11 records, 10 declared
    assert g.excluded == {"bravo": "budget says no"}
    assert [m.metadata.src_node_id for m in inner.aggregated[1]] == [101]
    assert set(inner.aggregated[1][0].content.keys()) == {protocol.ARRAYS, protocol.METRICS}  # nothing else
    assert np.allclose(protocol.from_array_record(inner.aggregated[1][0].content[protocol.ARRAYS])["w"], 1.0)
    assert rule_named(inner) == "Minimal"


def rule_named(inner: Strategy) -> str:
    sink = Sink()
    g = gate(inner, sink)
    g.aggregate_train(9, [])
    return sink.reports[0].rule


def test_the_gate_keeps_books_that_fail_apart_and_caps_a_weight_far_above_the_median():
    inner, sink = Minimal(), Sink()

    def check(site, server_round, entries):
        return Verdict("its ledger entries do not verify: forged") if site == "bravo" else Verdict(None, entries)

    records = {101: 10, 202: 10, 303: 10, 404: 10_000}
    g = gate(inner, sink, records=records, ledger=Checks(check),
             heads=Heads({"alpha": protocol.BooksHead(2, "a" * 64)}))
    grid = FakeGrid({"alpha": trains(1.0), "bravo": trains(1.0), "charlie": trains(1.0), "delta": trains(9.0, 10_000)})
    sent = list(g.configure_train(1, ZEROS, PLAN, Selected(grid, list(SITES))))
    heads = {SITES[m.metadata.dst_node_id]: protocol.read_plan(m).books_head for m in sent}
    assert heads == {"alpha": protocol.BooksHead(2, "a" * 64), "bravo": None, "charlie": None, "delta": None}
    g.aggregate_train(1, grid.send_and_receive(sent))
    report: RoundReport = sink.reports[0]
    by_site = {r.site: r for r in report.replies}
    assert by_site["bravo"].status == "rejected" and by_site["bravo"].rejected_entries and "bravo" in g.excluded
    weights = {SITES[m.metadata.src_node_id]: m.content[protocol.METRICS][protocol.NUM_EXAMPLES]
               for m in inner.aggregated[1]}
    assert weights == {"alpha": 10, "charlie": 10, "delta": MAX_WEIGHT_RATIO * 10}
    # Under secure aggregation the weights are inside the masked sum: not capped here.
    g2 = gate(Minimal(), records=records, cap_weights=False)
    assert g2._weight_cap()(10_000) == 10_000


def test_the_gate_publishes_the_report_even_if_the_wrapped_aggregation_fails():
    class Fails(Minimal):
        def aggregate_train(self, server_round, replies):
            raise RuntimeError("boom")

    sink = Sink()
    g = gate(Fails(), sink)
    grid = FakeGrid({s: trains(1.0) for s in SITES.values()})
    sent = list(g.configure_train(1, ZEROS, PLAN, Selected(grid, [101])))
    with pytest.raises(RuntimeError):
        g.aggregate_train(1, grid.send_and_receive(sent))
    assert [r.sites("trained") for r in sink.reports] == [["alpha"]]  # its spend is recorded all the same


def test_the_gate_checks_its_arguments():
    with pytest.raises(ValueError, match="expected_arrays"):
        ReplyGate(Minimal(), SITES, expected_arrays={}, reports=RoundReports())
    reports = RoundReports()
    reports.open(RoundReport(1, []))
    with pytest.raises(ValueError, match="round 1: its report is open already"):
        reports.open(RoundReport(1, []))
    with pytest.raises(LookupError, match="round 2: no open report"):
        reports.get(2)

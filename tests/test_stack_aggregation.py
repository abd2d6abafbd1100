"""The wrappers under the reply gate, each alone with a fake Grid: the norm bound
(strategies/norm_bound.py), the robust-rule guard (strategies/robust_guard.py), site-level
DP-FedAvg (strategies/site_dp_fedavg.py) and SecAgg+ aggregation
(strategies/secagg_aggregation.py). Each gets the round's report from an open
`RoundReports`, as the gate leaves it; each refuses in __init__ what it cannot honour."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from fedshield import protocol
from fedshield.strategies.flower import flower_strategy
from fedshield.strategies.norm_bound import NormBound
from fedshield.strategies.report import RoundReport, RoundReports, SiteReply
from fedshield.strategies.robust_guard import RobustGuard
from fedshield.strategies.selection import Selected
from fedshield.strategies.site_dp import SiteLevelDP
from fedshield.strategies.site_dp_fedavg import SiteDPFedAvg
from tests.test_site_aware import EIGHT, STEP, FakeGrid, Sink, moves
from tests.test_site_dp import Spends
from tests.test_stack_selection import PLAN, Minimal

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

BEHAVIOURS = {name: moves(i, "scaled" if i == 2 else "") for i, name in enumerate(EIGHT.values())}


def start(server_round: float) -> protocol.ArrayRecord:
    return protocol.to_array_record({"w": np.full(3, server_round, np.float32)})


def open_round(reports: RoundReports, server_round: int, replies) -> RoundReport:
    """The round's report as the reply gate opens it: every reply trained."""
    report = RoundReport(server_round, sorted(EIGHT.values()), rule="fedavg")
    report.replies = [SiteReply(EIGHT[m.metadata.src_node_id], m.metadata.src_node_id, "trained", num_examples=10)
                      for m in replies]
    return reports.open(report)


def one_round(wrapper, reports: RoundReports, server_round: int, base: float = 0.0):
    """Configure `server_round` from weights `base`, have every site reply: the replies."""
    grid = FakeGrid(BEHAVIOURS, EIGHT)
    sent = list(wrapper.configure_train(server_round, start(base), PLAN, Selected(grid, list(EIGHT))))
    replies = list(grid.send_and_receive(sent))
    open_round(reports, server_round, replies)
    return replies


# ------------------------------------------------------------ norm bound


def test_the_norm_bound_measures_from_each_rounds_own_weights_and_clips_for_the_wrapped_rule():
    inner, reports, sink = Minimal(), None, Sink()
    reports = RoundReports(sink)
    bound = 2.0 * float(np.linalg.norm(STEP))
    wrapper = NormBound(inner, reports, bound=bound)
    r1 = one_round(wrapper, reports, 1, base=0.0)
    r2 = one_round(wrapper, reports, 2, base=100.0)  # configured before round 1 is aggregated
    for server_round, replies, base in ((2, r2, 100.0), (1, r1, 0.0)):
        wrapper.aggregate_train(server_round, replies)
        report = reports.get(server_round)
        assert report.clipped() == ["site-2"] and all(x.update_norm is not None for x in report.replies)
        got = {EIGHT[m.metadata.src_node_id]: protocol.from_array_record(m.content[protocol.ARRAYS])["w"]
               for m in inner.aggregated[server_round]}
        assert len(got) == 8 and np.linalg.norm(got["site-2"] - base) == pytest.approx(bound, rel=1e-4)
    assert wrapper._base == {}


def test_the_norm_bound_rejects_above_the_bound_and_refuses_a_replaced_aggregation():
    inner, reports = Minimal(), RoundReports()
    wrapper = NormBound(inner, reports, bound=2.0 * float(np.linalg.norm(STEP)), action="reject")
    wrapper.aggregate_train(1, one_round(wrapper, reports, 1))
    assert reports.get(1).sites("rejected") == ["site-2"] and len(inner.aggregated[1]) == 7
    assert not reports.get(1).breaches()  # a norm is no proof of an attack
    dp = SiteDPFedAvg(flower_strategy("fedavg"), mechanism(), Spends([]), reports)
    with pytest.raises(ValueError, match="SiteDPFedAvg replaces the aggregation"):
        NormBound(dp, reports, bound=1.0)
    with pytest.raises(ValueError, match="update_norm_action"):
        NormBound(Minimal(), reports, action="drop")


def test_the_norm_bound_measures_replies_as_they_come_and_again_any_whose_arrays_changed():
    """The reply gate hands each checked reply to `reply_checked` as it comes (under the
    batched engine, while others train): the norm bound measures it then, and at aggregation
    uses that norm only for the very arrays it measured. The same norms, clips and aggregate
    as measuring at the end; a reply whose arrays were swapped since is measured afresh."""
    bound = 2.0 * float(np.linalg.norm(STEP))
    outcomes = []
    for streamed in (False, True):
        inner, reports = Minimal(), RoundReports()
        wrapper = NormBound(inner, reports, bound=bound)
        replies = one_round(wrapper, reports, 1)
        if streamed:
            for msg in replies:
                wrapper.reply_checked(1, msg)
            assert len(wrapper._measured[1]) == 8
            honest = next(m for m in replies if EIGHT[m.metadata.src_node_id] == "site-5")
            arrays = protocol.from_array_record(honest.content[protocol.ARRAYS])
            honest.content[protocol.ARRAYS] = protocol.to_array_record({k: v * 50 for k, v in arrays.items()})
        wrapper.aggregate_train(1, replies)
        report = reports.get(1)
        got = {EIGHT[m.metadata.src_node_id]: protocol.from_array_record(m.content[protocol.ARRAYS])["w"]
               for m in inner.aggregated[1]}
        outcomes.append(({r.site: r.update_norm for r in report.replies}, report.clipped(), got))
        assert wrapper._measured == {} and wrapper._flat_bases == {}
    (norms, clipped, got), (norms_s, clipped_s, got_s) = outcomes
    assert clipped == ["site-2"] and clipped_s == ["site-2", "site-5"]  # the swapped arrays, measured again
    assert norms_s["site-5"] > bound and np.linalg.norm(got_s["site-5"]) == pytest.approx(bound, rel=1e-4)
    for site in set(norms) - {"site-5"}:
        assert norms_s[site] == norms[site]
        assert np.array_equal(got_s[site], got[site])


# ------------------------------------------------------------ robust-rule guard


def test_the_guard_counts_breaches_against_f_and_uses_the_rules_own_aggregation():
    rule = flower_strategy("krum", num_malicious=2)
    reports, sink = RoundReports(Sink()), None
    sink = reports.sink
    guard = RobustGuard(rule, reports)
    replies = one_round(guard, reports, 1)
    report = reports.get(1)
    for r in report.replies[:2]:  # two attackers refused by the gate for a breach
        r.status, r.breach = "rejected", True
    usable = [m for m in replies if m.metadata.src_node_id not in (100, 101)]
    arrays, _ = guard.aggregate_train(1, usable)
    assert sink.reports == [report] and report.withstood == 0 and not report.skipped
    assert len(report.left_out()) == 5  # Krum keeps one of the 6 usable updates
    assert rule.num_malicious_nodes == 2 and arrays is not None  # f restored after the round


def test_the_guard_skips_a_round_the_rule_cannot_withstand_and_keys_it_by_round():
    rule = flower_strategy("bulyan", num_malicious=1)
    reports = RoundReports(Sink())
    guard = RobustGuard(rule, reports)
    r1 = one_round(guard, reports, 1)
    one_round(guard, reports, 2)
    assert guard.aggregate_train(2, []) == (None, None)
    assert guard.aggregate_train(1, r1[:6]) == (None, None)
    two, one = reports.sink.reports
    assert two.server_round == 2 and two.skipped == "no usable update"
    assert one.skipped == "6 usable update(s): bulyan withstands federation.num_malicious=1 only with at least 7"
    assert list(guard.configure_train(3, start(0), PLAN, Selected(FakeGrid({}), []))) == []  # nobody asked
    with pytest.raises(ValueError, match="must wrap krum itself"):
        RobustGuard(NormBound(flower_strategy("krum"), reports), reports)


# ------------------------------------------------------------ site-level DP-FedAvg


def mechanism(**kwargs) -> SiteLevelDP:
    return SiteLevelDP(**{"clip_norm": 10.0, "noise_multiplier": 1e-9, "sample_rate": 1.0, "planned_sites": 8,
                          "seed": 1, **kwargs})


def test_site_dp_records_the_spend_in_its_books_before_the_model_is_released_every_round():
    spent: list[int] = []
    reports = RoundReports(Sink())
    order: list[str] = []
    reports.sink.also = lambda report: order.append(f"report {report.server_round}")

    class Books(Spends):
        def record_round(self, server_round):
            order.append(f"spend {server_round}")
            return super().record_round(server_round)

    dp = SiteDPFedAvg(flower_strategy("fedavg"), mechanism(clip_norm=2.0), Books(spent), reports)
    r1 = one_round(dp, reports, 1)
    r2 = one_round(dp, reports, 2, base=100.0)
    new2, _ = dp.aggregate_train(2, r2)
    new1, _ = dp.aggregate_train(1, r1)
    assert spent == [2, 1] and order == ["report 2", "spend 2", "report 1", "spend 1"]
    one = reports.sink.reports[1]
    assert one.clipped() == ["site-2"]  # 50 x the honest step, clipped to S = 2
    # Eight updates, each clipped to S at most, over q N = 8: about 7 steps and one of norm S, / 8.
    moved = protocol.from_array_record(new1)["w"]
    assert np.linalg.norm(moved - (7 * STEP + 2.0 * STEP / np.linalg.norm(STEP)) / 8) < 0.1
    assert np.abs(protocol.from_array_record(new2)["w"] - 100.0 - moved).max() < 0.1  # from round 2's own weights
    # An empty Poisson sample still releases (noise only), and is spent.
    list(dp.configure_train(3, start(0), PLAN, Selected(FakeGrid({}), [])))
    reports.open(RoundReport(3, []))
    assert dp.aggregate_train(3, [])[0] is not None and spent[-1] == 3


def test_site_dp_refuses_a_rule_it_would_bypass_and_noise_that_is_not_its_own():
    reports = RoundReports()
    for rule in ("krum", "fedprox", "fedadam"):
        with pytest.raises(ValueError, match=f"privacy.unit=site with federation.strategy={rule}: DP-FedAvg"):
            SiteDPFedAvg(flower_strategy(rule), mechanism(), Spends([]), reports)
    with pytest.raises(ValueError, match="distributed site-level noise"):
        SiteDPFedAvg(FedAvg(), mechanism(distributed=True), Spends([]), reports)


# ------------------------------------------------------------ SecAgg+ aggregation


def test_secure_aggregation_unmasks_the_rounds_sum_as_the_aggregate_and_reports_who_dropped():
    from fedshield.client import secagg as site_side
    from fedshield.strategies.secagg_aggregation import SecAggAggregation
    from tests.test_secagg import PLAN as SECAGG_PLAN
    from tests.test_secagg import RUN, Federation, step_size

    fed = Federation(5, vanish={("site-4", "collect")})
    reports = RoundReports(Sink())
    wrapper = SecAggAggregation(flower_strategy("fedavg"), fed.coordinator(), reports)
    base = protocol.to_array_record(fed.base)
    sent = list(wrapper.configure_train(1, base, SECAGG_PLAN, Selected(fed, list(fed.names))))
    assert len(sent) == 5 and all(protocol.read_secagg(m) is not None for m in sent)  # key stages ran first
    replies = []
    for msg in sent:
        nid = msg.metadata.dst_node_id
        if fed.names[nid] == "site-4":
            continue  # vanished after sharing its keys
        state = site_side.begin_collect(fed.contexts[nid], protocol.read_secagg(msg), RUN)
        vector = site_side.masked(fed.contexts[nid], state, fed.updates[nid], fed.base, fed.weights[nid], fed.cfg)
        replies.append(protocol.train_reply(msg, site=fed.names[nid], arrays=vector, num_examples=fed.weights[nid],
                                            ledger_entries=[]))
    report = reports.open(RoundReport(1, sorted(fed.names.values())))
    report.replies = [SiteReply(fed.names[m.metadata.src_node_id], m.metadata.src_node_id, "trained")
                      for m in replies]
    for m in replies:  # as the gate hands them on: the masked vector and the declared count
        m.content = protocol.aggregation_content(protocol.TrainReply(
            "", int(m.content[protocol.METRICS][protocol.NUM_EXAMPLES]),
            protocol.from_array_record(m.content[protocol.ARRAYS]), ()))
    new, _ = wrapper.aggregate_train(1, replies)
    assert reports.sink.reports == [report] and report.dropped == {"site-4": "collect"} and not report.skipped
    expected = fed.plain_mean([f"site-{i}" for i in range(4)])
    got = protocol.from_array_record(new)
    assert set(got) == set(fed.base)  # the weight slot is not part of the model
    for k in expected:
        assert np.abs(got[k] - expected[k]).max() <= 4 * step_size()


def test_secure_aggregation_wrapper_checks():
    from fedshield.strategies.secagg_aggregation import SecAggAggregation

    class Stages:  # what the wrapper asks of SecAggPlus before any round
        noise = None

    reports = RoundReports()
    for rule in ("krum", "fedmedian", "fedadam"):
        with pytest.raises(ValueError, match=f"secaggplus with federation.strategy={rule}: the coordinator sees only"):
            SecAggAggregation(flower_strategy(rule), Stages(), reports)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coordinator-side site-level noise"):
        SecAggAggregation(flower_strategy("fedavg"), Stages(), reports, mechanism=mechanism(),  # type: ignore[arg-type]
                          books=Spends([]))
    with pytest.raises(ValueError, match="all three"):
        SecAggAggregation(flower_strategy("fedavg"), Stages(), reports,  # type: ignore[arg-type]
                          mechanism=mechanism(distributed=True), books=Spends([]))
    assert SecAggAggregation(flower_strategy("fedprox"), Stages(), reports).replaces_aggregation  # type: ignore[arg-type]


def test_fedshields_fedavg_reads_the_arrays_faster_and_aggregates_as_flowers_own_bit_for_bit():
    """ReadFedAvg (the fedavg rule) reads each Array with protocol.decode_array; its mean is
    Flower's aggregate_arrayrecords to the last bit (the same products and sums, in the same
    order), for odd weights, float32 and float64, and an Array np.save wrote itself."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedshield.strategies.flower import ReadFedAvg, average_arrayrecords

    rng = np.random.default_rng(7)
    contents = []
    for i, weight in enumerate([3, 17, 1, 250, 9]):
        arrays = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(7,)),
                  "c": rng.normal(size=(2, 3, 2)).astype(np.float32)}
        record = {k: protocol.encode_array(v) for k, v in arrays.items()}
        if i == 2:
            record["b"] = Array(np.asfortranarray(arrays["b"]))  # np.save's own bytes
        contents.append(RecordDict({protocol.ARRAYS: ArrayRecord(record),
                                    protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: weight})}))
    ours = average_arrayrecords(contents, protocol.NUM_EXAMPLES)
    flowers = aggregate_arrayrecords(contents, protocol.NUM_EXAMPLES)
    assert list(ours) == list(flowers)
    for k in flowers:
        assert ours[k].numpy().dtype == flowers[k].numpy().dtype
        assert ours[k].numpy().tobytes() == flowers[k].numpy().tobytes()
    rule = flower_strategy("fedavg")
    assert isinstance(rule, ReadFedAvg) and isinstance(rule, FedAvg)
    replies = [Message(c, dst_node_id=n + 1, message_type="train") for n, c in enumerate(contents)]
    for n, m in enumerate(replies):
        m.metadata.__dict__["_src_node_id"] = n + 1
    got, _ = rule.aggregate_train(1, replies)
    assert got is not None and all(got[k].numpy().tobytes() == flowers[k].numpy().tobytes() for k in flowers)


def test_fedshields_fedavg_checks_the_replies_and_averages_their_metrics_as_flowers_own():
    """ReadFedAvg runs Flower's reply checks and metric mean on RecordsRead views: the same
    metrics as Flower's FedAvg for consistent replies (the weighting key left out, a list
    metric averaged item by item), and the same refusal for each inconsistency Flower's
    check names (a second record of a kind, a missing key, a list as the weight)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.exception import InconsistentMessageReplies

    from fedshield.strategies.flower import RecordsRead

    rng = np.random.default_rng(3)

    def reply(n: int, metrics: dict, arrays: dict | None = None, **extra) -> Message:
        arrays = arrays if arrays is not None else {"a": rng.normal(size=(3,)).astype(np.float32)}
        content = RecordDict({protocol.ARRAYS: protocol.to_array_record(arrays),
                              protocol.METRICS: MetricRecord(metrics), **extra})
        msg = Message(content, dst_node_id=n + 1, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = n + 1
        return msg

    def metrics(w: int) -> dict:
        return {protocol.NUM_EXAMPLES: w, "loss": float(w) / 7, "curve": [1.0, float(w)]}

    good = [reply(n, metrics(w)) for n, w in enumerate([3, 11, 5])]
    ours = flower_strategy("fedavg")
    flowers = FedAvg(fraction_evaluate=0.0, weighted_by_key=protocol.NUM_EXAMPLES, arrayrecord_key=protocol.ARRAYS)
    got, want = ours.aggregate_train(1, good)[1], flowers.aggregate_train(1, good)[1]
    assert got is not None and want is not None and dict(got) == dict(want) and protocol.NUM_EXAMPLES not in got
    view = RecordsRead(good[0].content)
    assert list(view.array_records) == list(good[0].content.array_records) == [protocol.ARRAYS]
    assert list(view.metric_records) == list(good[0].content.metric_records) == [protocol.METRICS]

    # Each odd reply fails one of Flower's checks only (the others it passes), as the last of three.
    weight_list = {**metrics(2), protocol.NUM_EXAMPLES: [2, 3]}
    odd = {
        "a second MetricRecord": [reply(9, metrics(2), extra=MetricRecord({"x": 1}))],
        "a second ArrayRecord": [reply(9, metrics(2), more=ArrayRecord())],
        "other tensors": [reply(9, metrics(2), {"b": np.zeros(3, np.float32)})],
        "other metrics": [reply(9, {**metrics(2), "acc": 0.5})],
        "a list as the weight": [reply(n, weight_list) for n in range(3)],  # every reply so: one key set
    }
    for replies in odd.values():  # keyed by the check each fails
        replies = replies if len(replies) == 3 else [*good[:2], *replies]
        for rule in (ours, flowers):
            with pytest.raises(InconsistentMessageReplies):
                rule.aggregate_train(1, replies)


@pytest.mark.parametrize("stacked", [64, 1 << 22])
@pytest.mark.parametrize("replies", [2, 3, 300])
def test_the_stacked_weighted_sum_is_flowers_own_to_the_last_bit(replies, stacked, monkeypatch):
    """Where every reply holds the same float tensors, average_arrayrecords stacks each
    tensor's products (in blocks, made smaller than the replies here, or all at once) and
    sums each block's rows in one call (np.add.reduce along axis 0); its mean is
    still Flower's left-to-right sum to the last bit, for 0-d, one-element, odd-sized and
    float16/32/64 tensors and integer weights whose factors are not exact in float32. Records
    that differ (a missing tensor, an integer tensor) take Flower's own loop."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedshield.strategies import flower as flower_module
    from fedshield.strategies.flower import average_arrayrecords

    monkeypatch.setattr(flower_module, "_STACK_ELEMENTS", stacked)
    rng = np.random.default_rng(replies)
    shapes = {"scalar": (), "one": (1,), "odd": (7, 3), "wide": (1, 65), "half": (5,), "double": (2, 2)}
    dtypes = {"half": np.float16, "double": np.float64}

    def contents(extra: dict[str, np.ndarray] | None = None) -> list[RecordDict]:
        out = []
        for i in range(replies):
            arrays = {k: (rng.normal(size=shape) * 10 ** rng.uniform(-3, 3)).astype(dtypes.get(k, np.float32))
                      for k, shape in shapes.items()}
            if extra is not None and i == replies - 1:
                arrays.update(extra)
            out.append(RecordDict({protocol.ARRAYS: protocol.to_array_record(arrays),
                                   protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: int(rng.integers(1, 997))})}))
        return out

    for records in (contents(), contents({"counts": np.arange(3)})):
        ours = average_arrayrecords(records, protocol.NUM_EXAMPLES)
        flowers = aggregate_arrayrecords(records, protocol.NUM_EXAMPLES)
        assert list(ours) == list(flowers)
        for k in flowers:
            assert ours[k].numpy().dtype == flowers[k].numpy().dtype
            assert ours[k].numpy().tobytes() == flowers[k].numpy().tobytes(), k
    f32, i64 = np.float32, np.int64
    differing = ([{"a": np.ones(2, f32)}, {"b": np.ones(2, f32)}], [{"a": np.ones(2, f32)}, {"a": np.ones(3, f32)}],
                 [{"a": np.ones(2, i64)}, {"a": np.ones(2, i64)}])
    assert all(flower_module._weighted_sum(values, [0.5, 0.5]) is None for values in differing)


def test_the_aggregation_content_hands_on_the_replys_own_arrays_of_the_checked_names_only():
    from flwr.app import ArrayRecord

    arrays = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    source = ArrayRecord({**{k: protocol.encode_array(v) for k, v in arrays.items()},
                          "extra": protocol.encode_array(np.ones(1))})
    content = protocol.aggregation_content(protocol.TrainReply("alpha", 5, arrays, ()), source)
    record = content.array_records[protocol.ARRAYS]
    assert list(record) == ["w", "b"] and all(record[k].data is source[k].data for k in arrays)  # not re-encoded
    assert content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] == 5
    rebuilt = protocol.aggregation_content(protocol.TrainReply("alpha", 5, arrays, ()))
    assert all(rebuilt.array_records[protocol.ARRAYS][k].data == source[k].data for k in arrays)
    del source["extra"]  # exactly the checked names: the reply's own record goes on, nothing added
    same = protocol.aggregation_content(protocol.TrainReply("alpha", 5, arrays, ()), source)
    assert same.array_records[protocol.ARRAYS] is source and list(source) == ["w", "b"]


def test_a_reports_reply_by_node_follows_every_change_to_its_replies():
    """RoundReport.by_node keeps an index of where each node's reply sits, checked on every
    use: a sort, a replaced or an added reply is found as a scan would find it."""
    report = RoundReport(1, ["a", "b", "c"], [SiteReply("c", 3, "trained"), SiteReply("a", 1, "trained")])
    assert report.by_node(3).site == "c" and report.by_node(1).site == "a"
    report.replies.sort(key=lambda r: r.site)
    assert report.by_node(3).site == "c" and report.by_node(1).site == "a"
    report.replies[1] = SiteReply("c", 3, "rejected")
    assert report.by_node(3).status == "rejected"
    report.replies.append(SiteReply("b", 2, "failed"))
    assert report.by_node(2).status == "failed"
    with pytest.raises(KeyError):
        report.by_node(4)


def test_the_norm_of_an_update_is_its_distance_from_the_weights_sent_over_all_float_tensors():
    """One flat vector a reply (strategies/norm_bound.py `_distance`): the L2 distance over
    every float tensor, float64; a tensor whose shape differs from the one sent is refused
    even where its size is the same (the reply is then reported as not measurable)."""
    from fedshield.strategies.norm_bound import _distance

    base = {"w": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    update = {"w": np.full((2, 3), 2.0, np.float32), "b": np.ones(4, np.float32) * 3}
    flat: dict = {}
    assert _distance(update, base, ("w", "b"), flat) == pytest.approx(np.sqrt(6 * 4 + 4 * 4))
    assert _distance(update, base, ("w",), flat) == pytest.approx(np.sqrt(6 * 4))
    assert set(flat) == {("w", "b"), ("w",)}  # the base flattened once per set of names
    assert _distance(update, base, (), flat) == 0.0
    with pytest.raises(ValueError, match="shape"):
        _distance({"w": np.zeros((3, 2), np.float32), "b": update["b"]}, base, ("w", "b"), flat)

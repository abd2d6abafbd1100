"""The coordinator's whole strategy stack (strategies/stack.py: `build_stack`) around Flower's
own strategies, driven through Flower's round loop (`Strategy.start`) with a fake Grid:
sampling determinism, budget exclusion, rejected and failed replies, per-round state keyed
by round, the update norm bound, and Flower's robust rules against a poisoned update. Each
wrapper alone: tests/test_stack_*.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.serverapp.strategy import FedAvg

from fedshield import protocol
from fedshield.conf.config import Config
from fedshield.privacy.ledger_check import Verdict
from fedshield.strategies import flower
from fedshield.strategies.flower import flower_strategy
from fedshield.strategies.reply_gate import ReplyGate
from fedshield.strategies.report import RoundReport
from fedshield.strategies.selection import SiteSelection
from fedshield.strategies.stack import build_stack

EXPECTED = {"w": ((3,), np.dtype(np.float32))}
SITES = {101: "alpha", 202: "bravo", 303: "charlie", 404: "delta"}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


Behaviour = Callable[[Message, str, int], Message]


class Sink:
    """A RoundSink that keeps every report (and hands it on to `also`)."""

    def __init__(self, reports: list[RoundReport] | None = None, also: Callable[[RoundReport], None] | None = None):
        self.reports = reports if reports is not None else []
        self.also = also
        self.withheld: list[int] = []

    def on_round(self, report: RoundReport) -> None:
        self.reports.append(report)
        if self.also is not None:
            self.also(report)

    def on_withheld(self, server_round: int) -> None:
        self.withheld.append(server_round)


class Checks:
    """A LedgerChecker from a function (site, round, entries) -> Verdict."""

    def __init__(self, check: Callable[[str, int, tuple], Verdict]) -> None:
        self.check = check


class Heads:
    """A HeadSource from a mapping site -> head."""

    def __init__(self, heads: dict) -> None:
        self.head_of = heads.get


def gate_of(strategy: SiteSelection) -> ReplyGate:
    assert isinstance(strategy.strategy, ReplyGate)
    return strategy.strategy


def trains(value: float, n: int = 10) -> Behaviour:
    def reply(msg: Message, site: str, server_round: int) -> Message:
        return protocol.train_reply(msg, site=site, arrays={"w": np.full(3, value, np.float32)}, num_examples=n,
                                    ledger_entries=[{"site": site, "round": server_round}])
    return reply


def declines(kind: str) -> Behaviour:
    return lambda msg, site, r: protocol.decline_reply(msg, site=site, kind=kind, reason=f"{kind} says no")


class FakeGrid:
    """Answers every message by calling the named site's behaviour; records what was sent."""

    def __init__(self, behaviours: dict[str, Behaviour], sites: dict[int, str] | None = None) -> None:
        self.behaviours = behaviours
        self.site_names = dict(sites or SITES)
        self.sent: list[tuple[int, str]] = []  # (server round, site)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.site_names)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            site = self.site_names[msg.metadata.dst_node_id]
            server_round = int(msg.content[protocol.PLAN][protocol.SERVER_ROUND])
            self.sent.append((server_round, site))
            reply = self.behaviours[site](msg, site, server_round)
            replies.append(reply)
        return replies


def run(behaviours: dict[str, Behaviour], rounds: int = 3, fraction: float = 1.0, seed: int = 1,
        inner=None, sites: dict[int, str] | None = None,
        **wrapper: object) -> tuple[SiteSelection, FakeGrid, list[RoundReport], object]:
    grid = FakeGrid(behaviours, sites)
    reports: list[RoundReport] = []
    strategy = build_stack(inner or flower_strategy("fedavg"), sites or SITES, fraction_train=fraction,
                           seed=seed, expected_arrays=EXPECTED, sink=Sink(reports),
                           **wrapper)  # type: ignore[arg-type]
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    result = strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                            num_rounds=rounds, timeout=5, train_config=plan)
    return strategy, grid, reports, result


def test_every_round_aggregates_only_the_checked_weights_weighted_by_records():
    behaviours = {"alpha": trains(1.0, 10), "bravo": trains(3.0, 30), "charlie": trains(0.0, 10),
                  "delta": trains(0.0, 10)}
    _, grid, reports, result = run(behaviours, rounds=2)
    assert [r.server_round for r in reports] == [1, 2]
    assert all(r.count("trained") == 4 for r in reports)
    expected = (1.0 * 10 + 3.0 * 30) / 60
    assert np.allclose(result.arrays["w"].numpy(), expected)
    assert {s for _, s in grid.sent} == set(SITES.values())
    assert reports[0].replies[0].ledger_entries == ({"site": "alpha", "round": 1},)


def test_sampling_is_deterministic_in_seed_and_round_and_differs_across_rounds():
    behaviours = {s: trains(1.0) for s in SITES.values()}
    a, b, c = (sorted(run(behaviours, rounds=4, fraction=0.5, seed=seed)[1].sent) for seed in (3, 3, 4))
    assert a == b and a != c
    per_round = {r: [s for rr, s in a if rr == r] for r in range(1, 5)}
    assert all(len(v) == 2 for v in per_round.values())
    assert len({tuple(v) for v in per_round.values()}) > 1  # not the same two sites every round
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=0.5, seed=3, expected_arrays=EXPECTED)
    assert [strategy.sites[n] for n in strategy.sample(1)] == per_round[1]


def test_a_site_that_declines_for_budget_is_never_asked_again():
    behaviours = {"alpha": declines("budget"), "bravo": declines("error"), "charlie": trains(2.0), "delta": trains(2.0)}
    strategy, grid, reports, result = run(behaviours, rounds=3)
    assert [s for r, s in grid.sent if s == "alpha"] == ["alpha"]  # round 1 only
    assert [r for r, s in grid.sent if s == "bravo"] == [1, 2, 3]  # an error is not a budget
    assert strategy.excluded == {"alpha": "budget says no"}
    assert reports[0].sites("declined") == ["alpha", "bravo"] and reports[1].sampled == ["bravo", "charlie", "delta"]
    assert np.allclose(result.arrays["w"].numpy(), 2.0)


def test_hostile_replies_are_rejected_and_never_reach_the_aggregate():
    def huge_count(msg, site, r):
        reply = trains(1000.0)(msg, site, r)
        reply.content[protocol.METRICS][protocol.NUM_EXAMPLES] = 1e9
        return reply

    def extra_metric(msg, site, r):
        reply = trains(1000.0)(msg, site, r)
        reply.content[protocol.METRICS]["accuracy"] = 1.0
        return reply

    def impostor(msg, site, r):
        return trains(1000.0)(msg, "charlie", r)

    behaviours = {"alpha": huge_count, "bravo": extra_metric, "charlie": trains(1.0), "delta": impostor}
    _, _, reports, result = run(behaviours, rounds=2)
    by_site = {x.site: x for x in reports[0].replies}
    assert by_site["alpha"].status == "rejected" and "expected an integer" in by_site["alpha"].reason
    assert by_site["bravo"].status == "rejected" and "unexpected key 'accuracy'" in by_site["bravo"].reason
    assert by_site["delta"].status == "rejected" and "names site 'charlie', not 'delta'" in by_site["delta"].reason
    assert by_site["charlie"].status == "trained"
    assert np.allclose(result.arrays["w"].numpy(), 1.0)  # only the honest site's weights


def test_a_failed_site_is_reported_and_a_round_with_nothing_valid_keeps_the_model():
    def crashes(msg, site, r):
        return Message(Error(code=1, reason="Traceback ...\nRuntimeError: out of memory"), reply_to=msg)

    def nan(msg, site, r):
        return trains(float("nan"))(msg, site, r)

    _, _, reports, result = run({"alpha": crashes, "bravo": nan, "charlie": crashes, "delta": nan}, rounds=1)
    assert reports[0].count("failed") == 2 and reports[0].count("rejected") == 2
    assert reports[0].replies[0].reason == "RuntimeError: out of memory"
    assert not result.arrays  # no round aggregated anything: the caller keeps its initial model


def test_per_round_state_is_keyed_by_round():
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=0.5, seed=9, expected_arrays=EXPECTED)
    grid = FakeGrid({s: trains(1.0) for s in SITES.values()})
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    arrays = protocol.to_array_record({"w": np.zeros(3, np.float32)})
    m1 = list(strategy.configure_train(1, arrays, ConfigRecord(dict(plan)), grid))
    m2 = list(strategy.configure_train(2, arrays, ConfigRecord(dict(plan)), grid))
    # Round 2 was configured before round 1's replies came back: each round keeps its own selection.
    gate = gate_of(strategy)
    report2, valid2 = gate.sort_replies(2, grid.send_and_receive(m2))
    report1, valid1 = gate.sort_replies(1, grid.send_and_receive(m1))
    assert report1.sampled == sorted(SITES[m.metadata.dst_node_id] for m in m1)
    assert report2.sampled == sorted(SITES[m.metadata.dst_node_id] for m in m2)
    assert len(valid1) == len(m1) and len(valid2) == len(m2)
    # A reply for a round that asked nobody (or from a node not asked) is ignored.
    assert gate.sort_replies(3, grid.send_and_receive(m1))[1] == []


def test_wraps_any_flower_strategy_and_checks_its_arguments():
    for name in ("fedavg", "fedprox", "fedadam"):
        _, _, reports, result = run({s: trains(1.0) for s in SITES.values()}, rounds=1, inner=flower_strategy(name))
        assert reports[0].count("trained") == 4 and result.arrays is not None
    assert run({s: trains(1.0) for s in SITES.values()}, rounds=1, inner=FedAvg(min_available_nodes=1))[3].arrays
    with pytest.raises(ValueError, match="fraction_train"):
        build_stack(FedAvg(), SITES, fraction_train=0.0, seed=1, expected_arrays=EXPECTED)
    with pytest.raises(ValueError, match="share the site name 'alpha'"):
        build_stack(FedAvg(), {1: "alpha", 2: "alpha"}, fraction_train=1.0, seed=1, expected_arrays=EXPECTED)
    with pytest.raises(ValueError, match="federation.strategy='fedsgd'"):
        flower_strategy("fedsgd")


def test_declared_counts_and_signed_books_gate_the_aggregate():
    """A reply must carry the record count declared at discovery, and its ledger entries must
    pass the coordinator's check; a site whose books fail is kept apart and not asked again."""
    seen: list[tuple[str, int]] = []

    def check_ledger(site, server_round, entries):
        seen.append((site, server_round))
        return Verdict("its ledger entries do not verify: forged") if site == "charlie" else Verdict(None, entries)

    grid = FakeGrid({"alpha": trains(1.0, 10), "bravo": trains(1000.0, 999), "charlie": trains(1000.0, 10),
                     "delta": trains(1.0, 10)})
    reports: list[RoundReport] = []
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                           sink=Sink(reports), records=dict.fromkeys(SITES, 10), ledger=Checks(check_ledger))
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    result = strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                            num_rounds=2, timeout=5, train_config=plan)
    first = {r.site: r for r in reports[0].replies}
    assert first["bravo"].status == "rejected" and "claims 999 records; it declared 10" in first["bravo"].reason
    assert first["bravo"].ledger_entries  # its spend verified: it is recorded, the update is not used
    assert first["charlie"].status == "rejected" and "do not verify" in first["charlie"].reason
    assert first["charlie"].rejected_entries and not first["charlie"].ledger_entries
    assert "charlie" in strategy.excluded and ("charlie", 2) not in seen  # never asked again
    assert reports[1].sampled == ["alpha", "bravo", "delta"]
    assert np.allclose(result.arrays["w"].numpy(), 1.0)


# ------------------------------------------------------------ poisoning defences

EIGHT = {100 + i: f"site-{i}" for i in range(8)}
STEP = np.array([1.0, -0.5, 0.25])  # what every honest site moves the model by, each round


def moves(site_index: int, attack: str = "") -> Behaviour:
    """An honest site moves the global weights by STEP plus its own small offset; an attacker
    sends the honest move scaled x50 or sign-flipped."""
    jitter = np.random.default_rng(site_index).normal(0.0, 0.05, 3)

    def reply(msg: Message, site: str, server_round: int) -> Message:
        start = protocol.train_weights(msg)["w"].astype(np.float64)
        delta = STEP + jitter
        delta = {"": delta, "scaled": 50.0 * delta, "sign-flip": -delta}[attack]
        return protocol.train_reply(msg, site=site, arrays={"w": (start + delta).astype(np.float32)}, num_examples=10,
                                    ledger_entries=[])
    return reply


def federation(attacks: dict[int, str], n: int = 8) -> tuple[dict[int, str], dict[str, Behaviour]]:
    sites = dict(list(EIGHT.items())[:n])
    return sites, {name: moves(i, attacks.get(i, "")) for i, name in enumerate(sites.values())}


ROUNDS = 3
HONEST = ROUNDS * STEP  # where honest sites alone take the model (up to their small offsets)


@pytest.mark.parametrize("attack", ["scaled", "sign-flip"])
@pytest.mark.parametrize("rule", flower.ROBUST)
def test_each_robust_rule_withstands_one_poisoned_update_of_eight(rule, attack):
    sites, behaviours = federation({3: attack})
    _, _, reports, result = run(behaviours, rounds=ROUNDS, sites=sites, inner=flower_strategy(rule, num_malicious=1))
    final = result.arrays["w"].numpy()
    assert np.abs(final - HONEST).max() < 0.3 * np.abs(STEP).max(), (rule, final)
    assert all(r.count("trained") == 8 and not r.skipped and r.rule == rule for r in reports)
    if rule in ("krum", "multikrum", "bulyan"):  # the rules that select updates name the one they left out
        assert all("site-3" in r.left_out() for r in reports)
        assert all(x.selected is not None for r in reports for x in r.replies)
    else:
        assert all(x.selected is None for r in reports for x in r.replies)
    # Plain FedAvg on the same replies is pulled far off (the attack is real).
    _, _, _, plain = run(behaviours, rounds=ROUNDS, sites=sites)
    assert np.abs(plain.arrays["w"].numpy() - HONEST).max() > 0.4 * np.abs(STEP).max()


def test_multikrum_averages_all_but_f_of_each_rounds_updates_and_krum_one():
    sites, behaviours = federation({0: "scaled", 5: "sign-flip"})
    for rule, kept in (("multikrum", 6), ("krum", 1)):
        _, _, reports, result = run(behaviours, rounds=2, sites=sites, inner=flower_strategy(rule, num_malicious=2))
        assert all(len(r.left_out()) == 8 - kept and {"site-0", "site-5"} <= set(r.left_out()) for r in reports)
        assert np.abs(result.arrays["w"].numpy() - 2 * STEP).max() < 0.3
    fixed = flower_strategy("multikrum", num_malicious=2, krum_select=3)
    _, _, reports, _ = run(behaviours, rounds=1, sites=sites, inner=fixed)
    assert len(reports[0].left_out()) == 5


def test_the_norm_bound_clips_an_update_to_the_bound_and_reports_every_norm():
    sites, behaviours = federation({2: "scaled"})
    bound = 2.0 * float(np.linalg.norm(STEP))
    _, _, reports, result = run(behaviours, rounds=ROUNDS, sites=sites, update_norm_bound=bound)
    for r in reports:
        by_site = {x.site: x for x in r.replies}
        assert r.clipped() == ["site-2"] and by_site["site-2"].status == "trained"
        assert by_site["site-2"].update_norm == pytest.approx(50 * np.linalg.norm(STEP), rel=0.1)
        # Every usable update's norm is measured from that round's global weights, not from 0.
        assert all(x.update_norm == pytest.approx(np.linalg.norm(STEP), rel=0.15) for x in r.replies if not x.clipped)
    final = result.arrays["w"].numpy()
    # The clipped update keeps its direction at norm `bound`: the average moves by (7 + 2) / 8 steps a round.
    assert np.abs(final - HONEST * 9 / 8).max() < 0.1
    _, _, _, unbounded = run(behaviours, rounds=ROUNDS, sites=sites)
    assert np.abs(unbounded.arrays["w"].numpy() - HONEST).max() > 5


def test_the_norm_bound_rejects_with_one_line_and_the_others_carry_on():
    sites, behaviours = federation({2: "scaled", 6: "scaled"})
    bound = 2.0 * float(np.linalg.norm(STEP))
    strategy, grid, reports, result = run(behaviours, rounds=2, sites=sites, update_norm_bound=bound,
                                          update_norm_action="reject")
    for r in reports:
        assert r.sites("rejected") == ["site-2", "site-6"] and r.count("trained") == 6 and not r.clipped()
        reason = {x.site: x.reason for x in r.replies}["site-2"]
        assert reason.startswith("update norm ") and f"above federation.update_norm_bound={bound:g}" in reason
        assert "\n" not in reason
    assert not strategy.excluded and [s for rr, s in grid.sent if s == "site-2"] == ["site-2", "site-2"]
    assert np.abs(result.arrays["w"].numpy() - 2 * STEP).max() < 0.1
    with pytest.raises(ValueError, match="update_norm_bound"):
        build_stack(FedAvg(), SITES, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                    update_norm_bound=float("nan"))
    with pytest.raises(ValueError, match="update_norm_action"):
        build_stack(FedAvg(), SITES, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                    update_norm_action="drop")


def test_norms_are_measured_from_each_rounds_own_weights_keyed_by_the_runs_round():
    sites, behaviours = federation({})
    grid = FakeGrid(behaviours, sites)
    rule, aggregated = recording(flower_strategy("fedavg"))
    reports: list[RoundReport] = []
    strategy = build_stack(rule, sites, fraction_train=1.0, seed=1, expected_arrays=EXPECTED, sink=Sink(reports),
                           first_round=5, update_norm_bound=1e-6)
    bound = strategy.strategy.strategy
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    far = protocol.to_array_record({"w": np.full(3, 100.0, np.float32)})
    m1 = list(strategy.configure_train(1, protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                                       ConfigRecord(dict(plan)), grid))
    m2 = list(strategy.configure_train(2, far, ConfigRecord(dict(plan)), grid))
    assert sorted(bound._base) == [5, 6]  # the run's rounds (resumed at 5), not Flower's
    strategy.aggregate_train(2, grid.send_and_receive(m2))
    strategy.aggregate_train(1, grid.send_and_receive(m1))
    report6, report5 = reports
    for report, valid, start in ((report5, aggregated[5], 0.0), (report6, aggregated[6], 100.0)):
        assert all(x.clipped and x.update_norm == pytest.approx(np.linalg.norm(STEP), rel=0.15) for x in report.replies)
        got = [protocol.from_array_record(m.content[protocol.ARRAYS])["w"] for m in valid]
        assert len(got) == 8 and all(np.linalg.norm(w - start) == pytest.approx(1e-6, rel=0.5, abs=1e-5) for w in got)
    assert bound._base == {}


def recording(rule):
    """`rule`, keeping what its aggregation was handed each round (run round -> messages)."""
    aggregated: dict[int, list[Message]] = {}
    own = rule.aggregate_train

    def aggregate_train(server_round, replies):
        aggregated[server_round] = list(replies)
        return own(server_round, aggregated[server_round])

    rule.aggregate_train = aggregate_train
    return rule, aggregated


def claims_more(honest: Behaviour) -> Behaviour:
    """A reply that claims one record more than the site declared at discovery (a breach)."""
    def reply(msg, site, r):
        out = honest(msg, site, r)
        out.content[protocol.METRICS][protocol.NUM_EXAMPLES] = 11
        return out
    return reply


def run_declared(behaviours: dict[str, Behaviour], sites: dict[int, str], inner, rounds: int = 2):
    grid = FakeGrid(behaviours, sites)
    reports: list[RoundReport] = []
    strategy = build_stack(inner, sites, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                           sink=Sink(reports), records=dict.fromkeys(sites, 10))
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    result = strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                            num_rounds=rounds, timeout=5, train_config=plan)
    return strategy, reports, result


def test_a_round_with_too_few_usable_updates_for_the_rule_is_skipped_with_one_line():
    # Bulyan with f=1 needs 7 updates; 8 sites, 2 of them fail (not proof of an attack: f stays 1).
    sites, behaviours = federation({})
    behaviours = {**behaviours, "site-1": declines("error"), "site-4": declines("error")}
    rule = flower_strategy("bulyan", num_malicious=1)
    strategy, reports, result = run_declared(behaviours, sites, rule)
    assert not result.arrays  # nothing aggregated: the caller keeps its model
    for r in reports:
        assert r.count("trained") == 6 and r.count("declined") == 2 and r.withstood == 1
        assert r.skipped == "6 usable update(s): bulyan withstands federation.num_malicious=1 only with at least 7"
    assert rule.num_malicious_nodes == 1
    # With enough sites the same rule aggregates; with no usable update the round says so.
    assert run(federation({})[1], rounds=1, sites=sites, inner=flower_strategy("bulyan"))[3].arrays
    _, _, reports, _ = run({s: declines("error") for s in SITES.values()}, rounds=1)
    assert reports[0].skipped == "no usable update"


@pytest.mark.parametrize("rule", ["krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg"])
def test_attackers_unmasked_by_a_breach_count_against_f_and_the_round_still_aggregates(rule):
    # f = 2 and both attackers send a count other than declared: 6 usable updates, all honest.
    # Krum needs 2f + 3 = 7 for f = 2, but only f = 0 is left to withstand among the 6.
    sites, behaviours = federation({})
    behaviours = {**behaviours, "site-0": claims_more(behaviours["site-0"]),
                  "site-5": claims_more(behaviours["site-5"])}
    inner = flower_strategy(rule, num_malicious=2, trim_fraction=0.34)
    strategy, reports, result = run_declared(behaviours, sites, inner)
    assert result.arrays and np.abs(result.arrays["w"].numpy() - 2 * STEP).max() < 0.3
    for r in reports:
        assert not r.skipped and r.breaches() == ["site-0", "site-5"] and r.withstood == 0
        assert r.count("trained") == 6 and r.count("rejected") == 2
    assert inner.num_malicious_nodes == 2  # the configured f is restored after each round
    # One breach, one honest failure: f = 1 is left (Krum needs 5 of the 6 usable updates).
    if rule == "krum":
        behaviours["site-5"] = declines("error")
        _, reports, result = run_declared(behaviours, sites, flower_strategy("krum", num_malicious=2))
        assert result.arrays and all(r.withstood == 1 and not r.skipped for r in reports)
        assert all(len(r.left_out()) == 5 for r in reports)  # Krum keeps one of the 6
        # Krum short even so: a breach and four failures leave 3 updates, f = 1 needs 5.
        for s in ("site-1", "site-2", "site-3"):
            behaviours[s] = declines("error")
        _, reports, _ = run_declared(behaviours, sites, flower_strategy("krum", num_malicious=2), rounds=1)
        assert reports[0].skipped == ("3 usable update(s): krum withstands the 1 attacker(s) of "
                                      "federation.num_malicious=2 not unmasked by a breach only with at least 5")


def test_a_norm_rejection_is_not_proof_of_an_attack():
    sites, behaviours = federation({2: "scaled", 6: "scaled"})
    bound = 2.0 * float(np.linalg.norm(STEP))
    _, _, reports, _ = run(behaviours, rounds=1, sites=sites, inner=flower_strategy("krum", num_malicious=2),
                           update_norm_bound=bound, update_norm_action="reject")
    assert reports[0].sites("rejected") == ["site-2", "site-6"] and reports[0].breaches() == []
    assert reports[0].withstood == 2 and reports[0].skipped.startswith("6 usable update(s): krum withstands")


def test_each_rules_minimum_and_what_flower_builds():
    from fedshield import rules

    f = 2
    for name in flower.STRATEGIES:  # the minimums themselves: tests/test_rules.py
        built = flower_strategy(name, num_malicious=f, trim_fraction=0.25)
        assert flower.rule_name(built) == name
        assert flower.min_replies(built) == rules.min_sites(name, f, 0.25)
        assert built.arrayrecord_key == protocol.ARRAYS and built.weighted_by_key == protocol.NUM_EXAMPLES
    assert flower_strategy("fedtrimmedavg", trim_fraction=0.3).beta == 0.3
    assert flower_strategy("bulyan", num_malicious=3).num_malicious_nodes == 3
    with pytest.raises(ValueError, match="beta"):
        flower_strategy("fedtrimmedavg", trim_fraction=0.5)


# ------------------------------------------------------------ no silent round, no unrecorded spend


class LinkGrid(FakeGrid):
    """FakeGrid that behaves as a SuperLink does when replies do not come in time: each
    message gets its id when pushed (as Flower's grids set it); for a site in `unavailable`
    the SuperLink itself answers (Flower's own node-unavailable reply); a reply to a round
    in `late[site]` reaches the SuperLink after that round's timeout (and after the first
    `delay` pulls) and is handed over only when pulled (`pull_messages`); one in `lost[site]`
    never arrives."""

    def __init__(self, behaviours, unavailable=(), late=None, lost=None, delay: int = 0) -> None:
        super().__init__(behaviours)
        self.unavailable = set(unavailable)
        self.late, self.lost = dict(late or {}), dict(lost or {})
        self.delay, self.pulls = delay, 0
        self.kept: dict[str, Message] = {}  # instruction id -> its reply, at the SuperLink after the timeout

    def send_and_receive(self, messages, *, timeout=None):
        from uuid import uuid4

        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as InMemoryGrid.push_messages does
            site = self.site_names[msg.metadata.dst_node_id]
            server_round = int(msg.content[protocol.PLAN][protocol.SERVER_ROUND])
            if site in self.unavailable:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
                continue
            reply = self.behaviours[site](msg, site, server_round)
            if server_round in self.late.get(site, ()):
                self.kept[msg.metadata.message_id] = reply
            elif server_round not in self.lost.get(site, ()):
                replies.append(reply)
        return replies

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls <= self.delay:
            return []
        return [self.kept.pop(i) for i in list(message_ids) if i in self.kept]


def test_flowers_own_error_replies_and_silence_are_failures_of_the_site_asked():
    behaviours = {s: trains(1.0) for s in SITES.values()}
    grid = LinkGrid(behaviours, unavailable={"alpha", "bravo"}, lost={"charlie": {1}})
    reports: list[RoundReport] = []
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=1.0, seed=1,
                           expected_arrays=EXPECTED, sink=Sink(reports))
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                   num_rounds=2, timeout=5, train_config=plan)
    first = {r.site: r for r in reports[0].replies}
    assert sorted(first) == ["alpha", "bravo", "charlie", "delta"]  # every site asked has its outcome
    assert first["alpha"].status == first["bravo"].status == "failed"
    assert "Node Unavailable" in first["alpha"].reason
    assert first["charlie"].status == "failed" and "no reply within" in first["charlie"].reason
    assert first["delta"].status == "trained" and not reports[0].empty()


def test_a_round_in_which_every_site_is_unreachable_trained_nothing():
    grid = LinkGrid({s: trains(1.0) for s in SITES.values()}, unavailable=set(SITES.values()))
    reports: list[RoundReport] = []
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=1.0, seed=1,
                           expected_arrays=EXPECTED, sink=Sink(reports))
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    result = strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                            num_rounds=1, timeout=5, train_config=plan)
    assert reports[0].count("failed") == 4 and reports[0].empty() and reports[0].skipped == "no usable update"
    assert not result.arrays


def signs(site, carries_lost: bool = False) -> Behaviour:
    """The stock site's books: each round it spends (its own signed ledger, tests/test_ledger_check.py)
    and replies with that round's entry; with `carries_lost`, with every spend of the run not
    yet in a reply that arrived (as a site does with spends a crash interrupted)."""
    sent: list[dict] = []

    def reply(msg: Message, name: str, server_round: int) -> Message:
        entry = site.spend(server_round)
        entries = [e for e in site.ledger.read().entries if e["hash"] not in {s["hash"] for s in sent}] \
            if carries_lost else [entry]
        sent.extend(entries if server_round != 1 else [])  # round 1's reply does not arrive
        return protocol.train_reply(msg, site=name, arrays={"w": np.full(3, 1.0, np.float32)}, num_examples=10,
                                    ledger_entries=entries)
    return reply


@pytest.mark.parametrize("how", ["arrives late", "arrives two rounds late", "lost, carried by the next reply"])
def test_a_reply_that_misses_its_round_is_still_recorded_and_the_run_books_equal_the_sites(tmp_path, how):
    from fedshield.privacy import signing
    from fedshield.privacy.audit import audit
    from fedshield.privacy.ledger_check import LedgerCheck
    from fedshield.server.app import RoundLog
    from fedshield.server.settings import CoordinatorSettings
    from tests.test_ledger_check import DELTA, PLAN, Site

    sites = {101: "alpha", 202: "bravo"}
    books = {name: Site(tmp_path, name) for name in sites.values()}
    check = LedgerCheck("run-1", {n: s.public for n, s in books.items()}, dp=True, delta=DELTA, accountant="rdp")
    run_dir = tmp_path / "run"
    (run_dir / "privacy" / "keys").mkdir(parents=True)
    for name, s in books.items():
        (run_dir / "privacy" / "keys" / f"{name}.pub").write_bytes(signing.public_key_pem(s.public))
    log = RoundLog(run_dir, CoordinatorSettings.from_config(Config.load()),
                   {n: {"site": name} for n, name in sites.items()})
    late = how.startswith("arrives")
    grid = LinkGrid({"alpha": signs(books["alpha"], carries_lost=not late), "bravo": signs(books["bravo"])},
                    late={"alpha": {1}} if late else None, lost=None if late else {"alpha": {1}},
                    delay=1 if how == "arrives two rounds late" else 0)
    reports: list[RoundReport] = []

    strategy = build_stack(flower_strategy("fedavg"), sites, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                           sink=Sink(reports, also=log.on_round),
                           ledger=Checks(lambda s, r, e: check.check(s, r, e, PLAN)))
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="run-1", run_dir="", frozen_fingerprint="",
                                class_names=["a"])
    strategy.start(grid=grid, initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                   num_rounds=3, timeout=5, train_config=plan)
    assert [r.status for r in reports[0].replies] == ["failed", "trained"]  # alpha's round-1 reply missed it
    assert "alpha" not in strategy.excluded and not any(r.breach for rep in reports for r in rep.replies)
    assert [r.status for r in reports[2].replies] == ["trained", "trained"]  # and alpha is still asked
    if how == "arrives late":
        assert [(r.site, r.late_round) for r in reports[1].late] == [("alpha", 1)]
    if how == "arrives two rounds late":  # round 2's entries wait for round 1's, then both join the books
        alpha = reports[1].replies[0]
        assert alpha.status == "rejected" and "held until it does" in alpha.reason and not alpha.breach
        assert [(r.site, r.late_round, len(r.ledger_entries)) for r in reports[2].late] == [("alpha", 1, 2)]
    own = books["alpha"].ledger.read().entries
    recorded = [e for e in (run_dir / "privacy" / "ledger.jsonl").read_text().splitlines()
                if '"site": "alpha"' in e]
    assert len(recorded) == len(own) == 3 and log.epsilon["alpha"] == own[-1]["epsilon"]
    result = audit(run_dir / "privacy" / "ledger.jsonl", run_dir / "privacy" / "keys", None, None)
    assert result.ok and result.sites["alpha"].recorded_epsilon == own[-1]["epsilon"]
    assert result.sites["alpha"].rdp_epsilon == pytest.approx(own[-1]["epsilon"], rel=1e-3)


def test_rounds_that_trained_nothing_are_reported_and_counted_in_a_row(tmp_path, capsys):
    from fedshield.server.app import RoundLog, empty_rounds_line
    from fedshield.server.report import write_report
    from fedshield.server.run_dir import read_jsonl
    from fedshield.server.settings import CoordinatorSettings
    from fedshield.strategies.report import SiteReply

    cfg = Config.load(["privacy=none", f"output.dir={tmp_path}"])
    settings = CoordinatorSettings.from_config(cfg)
    log = RoundLog(tmp_path, settings, {1: {"site": "alpha", "n": 5}, 2: {"site": "bravo", "n": 5}})
    metrics = {"accuracy": 0.5, "macro_f1": 0.5, "per_class": {}}
    log.on_evaluated(0, metrics)
    log.on_round(RoundReport(1, ["alpha", "bravo"], [SiteReply("alpha", 1, "trained", num_examples=5),
                                                      SiteReply("bravo", 2, "failed", "no reply")]))
    log.on_evaluated(1, metrics)
    for r in (2, 3):
        log.on_round(RoundReport(r, ["alpha", "bravo"], [
            SiteReply("alpha", 1, "failed", "Error: Node Unavailable - The destination node is currently unavailable"),
            SiteReply("bravo", 2, "declined", "bravo says no")], skipped="no usable update"))
        log.on_evaluated(r, metrics)
    assert [row["empty"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [False, False, True, True]
    assert log.empty_streak() == 2 and capsys.readouterr().out.count("TRAINED NOTHING") == 2
    line = empty_rounds_line(log, 3, 2, 2)
    assert line.startswith("rounds 2-3 trained nothing (2 in a row; federation.max_empty_rounds=2); in round 3: "
                           "alpha: failed: Error: Node Unavailable") and "bravo: declined: bravo says no" in line
    assert "\n" not in line
    write_report(tmp_path, settings, log.rows, {"alpha": {}, "bravo": {}})
    assert "Rounds that aggregated nothing (the global model was kept): 2-3." in (tmp_path / "report.md").read_text()


def test_a_resumed_sites_epsilon_is_its_newest_entry_in_the_runs_ledger_even_past_the_checkpoint(tmp_path):
    """The coordinator recorded round 3's spends in the run's ledger and died before its
    checkpoint of round 3: resumed from round 2's checkpoint, a site's ε is that of its
    newest entry (round 3's, which the replayed round brings again and adds nothing new),
    not the checkpoint's; a site the ledger holds nothing newer for keeps the checkpoint's."""
    from fedshield.conf.config import Config
    from fedshield.server.app import RoundLog
    from fedshield.server.checkpoint import Checkpoint
    from fedshield.server.settings import CoordinatorSettings

    log = RoundLog(tmp_path, CoordinatorSettings.from_config(Config.load()),
                   {1: {"site": "alpha"}, 2: {"site": "bravo"}, 3: {"site": "charlie"}})
    ckpt = Checkpoint("run", "sha", 2, {}, epsilon={"alpha": 4.33, "bravo": 4.4, "charlie": 1.0})
    ledger = {"alpha": [{"round": 2, "epsilon": 4.33}, {"round": 3, "epsilon": 5.22}],
              "bravo": [{"round": 2, "epsilon": 4.4}], "charlie": []}
    log.restore(ckpt, ledger)
    assert log.epsilon == {"alpha": 5.22, "bravo": 4.4, "charlie": 1.0}

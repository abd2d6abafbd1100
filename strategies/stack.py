"""The coordinator's strategy: single-purpose wrappers around one Flower strategy.

`build_stack` composes them from typed arguments (docs/coordinator.md draws the stack):

    SiteSelection            who is asked: by seed, or Poisson under site-level DP; exclusions; run rounds
     └ ReplyGate             parse, declared counts, signed books, late replies, weight cap: the round's report
        ├ NormBound          measure every update from the round's weights; clip or refuse   (plain)
        │  └ RobustGuard     f less the breaches; skip a round the rule cannot withstand     (plain)
        │     └ rule         Flower's FedAvg, FedProx, FedAdam, FedMedian, Krum, ... aggregates
        ├ SiteDPFedAvg       clip, noise, fixed denominator; records the spend      (privacy.unit=site)
        │  └ FedAvg          its messages only
        └ SecAggAggregation  key stages, unmasking (and the distributed noise's spend) (secaggplus)
           └ FedAvg/FedProx  their messages only

Reports reach the coordinator through `sink` (a `RoundSink`: the server's round log), the
site-level spends through `books` (a `ReleaseBooks`: the federation's ledger): no wrapper
calls back into the code that built it.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from flwr.serverapp.strategy import Strategy

from fedshield import protocol
from fedshield.strategies.norm_bound import NormBound
from fedshield.strategies.reply_gate import ReplyGate
from fedshield.strategies.report import HeadSource, LedgerChecker, RoundReports, RoundSink
from fedshield.strategies.robust_guard import RobustGuard
from fedshield.strategies.secagg import SecAggPlus
from fedshield.strategies.secagg_aggregation import SecAggAggregation
from fedshield.strategies.selection import SiteSelection
from fedshield.strategies.site_dp import ReleaseBooks, SiteLevelDP
from fedshield.strategies.site_dp_fedavg import SiteDPFedAvg

# The modules of the stack (tests/test_code_gates.py holds each to STACK_MAX_LINES).
STACK_MODULES = ("report", "wrapper", "selection", "reply_gate", "norm_bound", "robust_guard", "site_dp_fedavg",
                 "secagg_aggregation", "stack")
STACK_MAX_LINES = 250


@dataclass(frozen=True)
class SiteLevel:
    """Site-level DP (privacy.unit=site): the mechanism and the books its rounds are spent in."""

    mechanism: SiteLevelDP
    books: ReleaseBooks


def build_stack(
    rule: Strategy, sites: Mapping[int, str], *, fraction_train: float, seed: int,
    expected_arrays: Mapping[str, protocol.ArraySpec], sink: RoundSink | None = None,
    records: Mapping[int, int] | None = None, ledger: LedgerChecker | None = None, heads: HeadSource | None = None,
    first_round: int = 1, excluded: MutableMapping[str, str] | None = None,
    update_norm_bound: float | None = None, update_norm_action: str = "clip",
    site_level: SiteLevel | None = None, secagg: SecAggPlus | None = None,
) -> SiteSelection:
    """The stack around `rule` (strategies.flower.flower_strategy); its top is the
    selection, whose `excluded` is the run's (shared by the gate, kept in checkpoints).

    Each wrapper checks in its own __init__ that it can honour what it wraps; here only the
    combinations that no single wrapper sees are refused."""
    reports = RoundReports(sink)
    excluded = excluded if excluded is not None else {}
    mechanism = site_level.mechanism if site_level is not None else None
    if mechanism is not None and mechanism.distributed and secagg is None:
        raise ValueError("distributed site-level noise needs secure aggregation")
    aggregation: Strategy
    if secagg is not None:
        aggregation = SecAggAggregation(rule, secagg, reports, mechanism=mechanism,
                                        books=site_level.books if site_level is not None else None)
        expected = secagg.expected(expected_arrays)  # masked vectors: uint64, and the weight
    elif site_level is not None:
        aggregation = SiteDPFedAvg(rule, site_level.mechanism, site_level.books, reports)
        expected = dict(expected_arrays)
    else:
        aggregation = RobustGuard(rule, reports)
        expected = dict(expected_arrays)
    if (secagg is None and site_level is None) or update_norm_bound is not None:
        # measures every update in the clear; refuses (with its reason) to sit above a replaced aggregation
        aggregation = NormBound(aggregation, reports, bound=update_norm_bound, action=update_norm_action)
    gate = ReplyGate(aggregation, sites, expected_arrays=expected, reports=reports, excluded=excluded,
                     records=records, ledger=ledger, heads=heads, cap_weights=secagg is None)
    return SiteSelection(gate, sites, fraction_train=fraction_train, seed=seed, first_round=first_round,
                         excluded=excluded, poisson=mechanism)

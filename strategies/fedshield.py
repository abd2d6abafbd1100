"""fedshield's aggregation: Flower's Message-API strategies plus what a privacy-aware
coordinator needs around them.

`make_strategy("fedavg" | "fedprox" | "fedadam", ...)` returns Flower's own strategy class
with `SiteAwareMixin` in front of it. The mixin
- samples sites deterministically by name with a seeded RNG (Flower's node ids are random
  per run, site names are not), skipping sites that declined for budget: a site that
  said no for budget is never asked again in this run;
- sorts replies into trained / declined / rejected (invalid update) / failed, reports
  them, and hands only the valid ones to Flower's aggregation.
The round loop itself is Flower's `Strategy.start`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from strategies.validation import ledger_entries, update_problem


@dataclass
class SiteReply:
    site: str
    node_id: int
    status: str  # trained | declined | rejected | failed
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    ledger_entries: list[dict] = field(default_factory=list)  # signed spends, in order


@dataclass
class RoundReport:
    server_round: int
    sampled: list[str]
    replies: list[SiteReply]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.replies)


class _Selected:
    """The part of a Grid that Flower's node sampling reads, limited to our selection."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


class SiteAwareMixin:
    def setup_sites(
        self,
        sites: dict[int, str],
        fraction: float,
        seed: int,
        expected_arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
        on_round: Callable[[RoundReport], None],
    ) -> None:
        self.sites = dict(sites)  # node id -> site name
        self.site_fraction = fraction
        self.seed = seed
        self.expected_arrays = expected_arrays
        self.on_round = on_round
        self.excluded: dict[str, str] = {}  # site -> reason (budget)
        self._sampled: list[str] = []

    def eligible(self) -> list[int]:
        return sorted(
            (nid for nid, name in self.sites.items() if name not in self.excluded),
            key=lambda nid: self.sites[nid],
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        eligible = self.eligible()
        k = max(1, round(self.site_fraction * len(self.sites)))
        k = min(k, len(eligible))
        chosen = random.Random(self.seed * 7919 + server_round).sample(eligible, k) if k else []
        chosen.sort(key=lambda nid: self.sites[nid])
        self._sampled = [self.sites[n] for n in chosen]
        if not chosen:
            return []
        return super().configure_train(server_round, arrays, config, _Selected(chosen))  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = RoundReport(server_round, self._sampled, [])
        valid: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            name = self.sites.get(node, f"node-{node}")
            if msg.has_error():
                report.replies.append(SiteReply(name, node, "failed", msg.error.reason.strip().splitlines()[-1]))
                continue
            metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
            site_rec = dict(msg.content["site"]) if "site" in msg.content else {}
            if int(metrics.get("declined", 0)):
                reason = str(site_rec.get("reason", "declined"))
                if site_rec.get("kind") == "budget":
                    self.excluded[name] = reason
                report.replies.append(SiteReply(name, node, "declined", reason, metrics))
                continue
            problem = None
            if "arrays" not in msg.content:
                problem = "no weights in the reply"
            else:
                update = {k: v.numpy() for k, v in msg.content["arrays"].items()}
                problem = update_problem(update, self.expected_arrays)
            try:
                entries = ledger_entries(site_rec)
            except ValueError as exc:
                entries, problem = [], str(exc)
            if problem:
                report.replies.append(SiteReply(name, node, "rejected", problem, metrics, entries))
                continue
            report.replies.append(SiteReply(name, node, "trained", "", metrics, entries))
            valid.append(msg)
        self.on_round(report)
        if not valid:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        return arrays, metrics


class FedShieldFedAvg(SiteAwareMixin, FedAvg):
    pass


class FedShieldFedProx(SiteAwareMixin, FedProx):
    pass


class FedShieldFedAdam(SiteAwareMixin, FedAdam):
    pass


def make_strategy(name: str, *, proximal_mu: float = 0.01, server_learning_rate: float = 0.1):
    """Flower's strategy of that name, behind fedshield's site selection and checks.

    Flower's own sampling sees only our selection, so its fractions are 1 and its
    minimums 1; federated evaluation on sites' private data is off (metrics computed on
    private data would leave the site without DP): evaluation is central, on held-out data.
    """
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                  min_evaluate_nodes=0, min_available_nodes=1)
    if name == "fedprox":
        return FedShieldFedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedShieldFedAdam(eta=server_learning_rate, **common)
    return FedShieldFedAvg(**common)

"""Flower's own strategies, configured for fedshield's wire and its site-aware wrapper.

The wrapper (strategies.site_aware) does the sampling, so Flower's strategy sees only the
sites chosen for the round: its fractions are 1 and its minimums 1. Federated evaluation
on the sites' private data is off (metrics computed on private data would leave a site
without DP); evaluation is central, on held-out data.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

import protocol

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def flower_strategy(name: str, *, proximal_mu: float = 0.01, server_learning_rate: float = 0.1) -> Strategy:
    """Flower's strategy of that name, speaking the protocol's record names."""
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=1, weighted_by_key=protocol.NUM_EXAMPLES,
        arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.PLAN,
    )
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=server_learning_rate, **common)
    raise ValueError(f"federation.strategy={name!r}: must be one of {', '.join(STRATEGIES)}")

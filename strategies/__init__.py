"""fedshield's aggregation: any Flower Message-API strategy inside a stack of wrappers.

`flower_strategy(name, ...)` builds Flower's own strategy (FedAvg, FedProx, FedAdam, the
robust rules) with the protocol's record names; `build_stack(strategy, sites, ...)`
(strategies/stack.py) wraps it with the selection, reply checks, defences, site-level DP
and secure aggregation a privacy-aware coordinator needs, one wrapper each
(docs/coordinator.md).
"""

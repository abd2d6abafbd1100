"""fedshield's aggregation: any Flower Message-API strategy behind a site-aware wrapper.

`flower_strategy(name, ...)` builds Flower's own strategy (FedAvg, FedProx, FedAdam) with
the protocol's record names; `SiteAwareStrategy(strategy, sites, ...)` wraps it with the
selection and checks a privacy-aware coordinator needs (strategies/site_aware.py).
"""

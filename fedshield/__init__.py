"""fedshield: privacy-preserving federated fine-tuning (Flower + Opacus + transformers).

The rooms of the product live at the repository root (server/, client/, strategies/,
privacy/, simulations/, conf/, task/, deploy/, protocol.py, as the product card lays them
out); in the source tree fedshield/<room> is a link to each, and the wheel holds them as
fedshield.<room>. Everything imports as `fedshield.<room>`.

The typed Python API (docs/api.md) is named here and loaded on first use, so that
`import fedshield` stays light:

    import fedshield
    result = fedshield.simulate(fedshield.Config.load(["task=heart-disease", "federation.rounds=3"]))
    result.epsilon                      # per site, from its signed ledger
    fedshield.audit(result.run_dir).ok  # recomputed independently
"""

from __future__ import annotations

# First, before anything imports Flower, Ray or transformers: nothing phones home
# (deploy/offline.py). Every `import fedshield.…` passes through here.
from fedshield.deploy import offline as _offline  # noqa: F401

# isort: split

from typing import TYPE_CHECKING, Any

from fedshield._version import __version__

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ below loads fedshield.api
    from fedshield.api import (
        AuditResult,
        Config,
        ConfigError,
        FedShieldError,
        RoundMetrics,
        RunPaths,
        RunResult,
        SiteAgent,
        SiteAudit,
        SiteCheck,
        SiteResult,
        audit,
        simulate,
    )

__all__ = [
    "AuditResult", "Config", "ConfigError", "FedShieldError", "RoundMetrics", "RunPaths", "RunResult", "SiteAgent",
    "SiteAudit", "SiteCheck", "SiteResult", "__version__", "audit", "simulate",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        value = getattr(importlib.import_module("fedshield.api"), name)
        globals()[name] = value  # once: later look-ups do not come here
        return value
    raise AttributeError(f"module 'fedshield' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

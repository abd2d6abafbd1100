"""The typed Python API of fedshield (docs/api.md); `import fedshield` names all of it.

    import fedshield

    config = fedshield.Config.load(["task=heart-disease", "federation.rounds=3"])
    result = fedshield.simulate(config)            # a RunResult: rounds, ε per site, paths
    report = fedshield.audit(result.run_dir)       # an AuditResult: ε recomputed, verified or not
    agent = fedshield.SiteAgent(server=..., ca=..., connection_key=..., data=...)   # a site, embedded

Each object lives in the room whose rule it is, and the `fedshield` command is a thin layer
over the very same objects: `Config` (conf/config.py: `fedshield simulate`'s config),
`simulate` and `RunResult` (simulations/), `audit` and `AuditResult` (privacy/audit.py:
`fedshield audit`), `SiteAgent` (client/cli.py: `fedshield client`). This module sits above
every room (nothing in them may import it: pyproject's import contracts) and adds only what
a Python caller needs on top: keyword arguments, `str | Path`, and a one-line error for a
value of the wrong kind.

Errors: everything a caller can get wrong raises `FedShieldError` (bad config keys and
values: its subclass `ConfigError`) with the same one line the command prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedshield.client.cli import SiteAgent, SiteCheck
from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.privacy.errors import FedShieldError
from fedshield.simulations.result import RoundMetrics, RunPaths, RunResult, SiteResult

if TYPE_CHECKING:
    from fedshield.privacy.audit import AuditResult, SiteAudit

__all__ = [
    "AuditResult", "Config", "ConfigError", "FedShieldError", "RoundMetrics", "RunPaths", "RunResult", "SiteAgent",
    "SiteAudit", "SiteCheck", "SiteResult", "audit", "simulate",
]


def simulate(config: Config, *, resume: bool = False, verbose: bool = False) -> RunResult:
    """Run a simulated federation (Flower's simulation runtime) and read what it left behind.

    The same run as `fedshield simulate`: every virtual site's data and δ are checked before
    Ray starts, and the run directory is `config.output.dir/<run_name>`. `resume=True`
    continues the run `config` names from its last completed round; pass that run's own
    config (`Config.from_run(run_dir)` or a RunResult's `.config`): any other is refused.
    `verbose` shows Flower's and Ray's logs. A run that stops early raises `FedShieldError`.
    """
    if not isinstance(config, Config):
        raise ConfigError(f"simulate: expected a fedshield.Config (Config.load([...])), not {type(config).__name__}")
    from fedshield.simulations.simulate import simulate as run  # Flower, Ray, torch: loaded when a run starts

    return run(config, resume=resume, verbose=verbose)


def audit(path: str | Path, *, ledger_keys: str | Path | None = None, budgets: Mapping[str, float] | None = None,
          max_epsilon: float | None = None, site_books: bool = False, report_dir: str | Path | None = None,
          write_report: bool = True) -> AuditResult:
    """Verify a privacy ledger and recompute every site's ε independently (`fedshield audit`).

    `path`: a run directory, a site's state folder or a ledger file. `ledger_keys`: a folder
    of the sites' ledger signing public keys (`<site>.pub`) obtained from the sites; without
    it the run directory's copies are used, and the result says how far they can be trusted.
    `budgets`: ε per site to hold the ledger to (default: the budgets the sites signed).
    `max_epsilon`: flag any site above it. `site_books`: `path` is a site's state folder and
    its books are checked whole first (`--site`). The report (Markdown + HTML) goes to
    `report_dir` (default `<run_dir>/audit/`) unless `write_report=False`.

    A ledger that does not verify is not an exception: `result.ok` is False and
    `result.flags` says why, the first problem first. Input that cannot be audited (no
    ledger there, unreadable keys) raises `FedShieldError`.
    """
    for site, eps in (budgets or {}).items():
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < math.inf):
            raise FedShieldError(f"audit: budgets[{site!r}]={eps!r}: expected a finite number > 0")
    if max_epsilon is not None and (isinstance(max_epsilon, bool) or not isinstance(max_epsilon, (int, float))
                                    or not 0 < max_epsilon < math.inf):
        raise FedShieldError(f"audit: max_epsilon={max_epsilon!r}: expected a finite number > 0")
    from fedshield.privacy.audit import audit_and_report

    return audit_and_report(
        Path(path), None if ledger_keys is None else Path(ledger_keys),
        {str(k): float(v) for k, v in budgets.items()} if budgets else None,
        None if max_epsilon is None else float(max_epsilon),
        site_books=site_books, report_dir=None if report_dir is None else Path(report_dir),
        write_report=write_report)


def __getattr__(name: str) -> Any:
    # The audit's types load dp-accounting and SciPy (seconds): only when asked for.
    if name in ("AuditResult", "SiteAudit"):
        from fedshield.privacy import audit as audit_module

        return getattr(audit_module, name)
    raise AttributeError(f"module 'fedshield.api' has no attribute {name!r}")

"""`RunResult`: a finished run directory read into typed, immutable values (the Python API's
`fedshield.simulate` returns one; `RunResult.read(run_dir)` reads any run directory,
simulated or deployed).

Every number comes from the files the run left behind (README, "What a run leaves
behind"): the rounds from metrics.jsonl, ε per site from privacy/sites.json, which the
coordinator writes from the same signed ledger entries as privacy/ledger.jsonl (each site's
ε is its newest entry's). Nothing is recomputed here; `fedshield.audit` recomputes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedshield.conf.config import Config
from fedshield.privacy.errors import FedShieldError
from fedshield.server.run_dir import LEDGER_KEYS, read_jsonl


def _frozen_map(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: _frozen_map(v) if isinstance(v, Mapping) else v for k, v in d.items()})


@dataclass(frozen=True)
class RoundMetrics:
    """One line of metrics.jsonl: round 0 is the initial model, before any training."""

    round: int
    accuracy: float
    macro_f1: float
    epsilon: Mapping[str, float]  # per site: its cumulative ε after this round (recorded in its ledger)
    epsilon_max: float
    epsilon_mean: float
    trained: int
    declined: int
    rejected: int
    failed: int
    empty: bool  # no sampled site's update was aggregated
    elapsed_s: float
    per_class: Mapping[str, Mapping[str, float]]  # class -> precision, recall, f1, support
    row: Mapping[str, Any]  # the whole line: declined_sites, update_norms, site_level_epsilon, ...
    # text-generation (task.causal_lm): held-out perplexity and mean token loss; accuracy and
    # macro_f1 are then NaN (a causal LM has no classes). None for classification runs.
    perplexity: float | None = None
    loss: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RoundMetrics:
        return cls(
            round=int(row["round"]), accuracy=float(row.get("accuracy", math.nan) if "perplexity" in row
                                                     else row["accuracy"]),
            macro_f1=float(row.get("macro_f1", math.nan) if "perplexity" in row else row["macro_f1"]),
            perplexity=None if row.get("perplexity") is None else float(row["perplexity"]),
            loss=None if row.get("loss") is None else float(row["loss"]),
            epsilon=_frozen_map({str(k): float(v) for k, v in (row.get("epsilon") or {}).items()}),
            epsilon_max=float(row["epsilon_max"]), epsilon_mean=float(row["epsilon_mean"]),
            trained=int(row.get("trained", 0)), declined=int(row.get("declined", 0)),
            rejected=int(row.get("rejected", 0)), failed=int(row.get("failed", 0)),
            empty=bool(row.get("empty", False)), elapsed_s=float(row.get("elapsed_s", 0.0)),
            per_class=_frozen_map(row.get("per_class") or {}), row=_frozen_map(row),
        )


@dataclass(frozen=True)
class SiteResult:
    """One site's line of privacy/sites.json."""

    site: str
    epsilon: float  # the site's cumulative ε at `delta`: its newest ledger entry's
    delta: float
    budget: float | None  # None: privacy.mode=none
    records: int | None  # the count the site released (add-remove: its noisy count); None: did not rejoin
    accountant: str
    neighbouring: str | None
    not_trained: tuple[str, ...]  # "round N: declined: why", one per round it did not train

    @classmethod
    def from_json(cls, site: str, s: Mapping[str, Any]) -> SiteResult:
        return cls(
            site=site, epsilon=float(s["epsilon"]), delta=float(s["delta"]),
            budget=None if s.get("budget") is None else float(s["budget"]),
            records=None if s.get("records") is None else int(s["records"]),
            accountant=str(s.get("accountant", "")), neighbouring=s.get("neighbouring"),
            not_trained=tuple(str(x) for x in s.get("not_trained") or ()),
        )


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs are (README, "What a run leaves behind")."""

    run_dir: Path
    config: Path  # config.yaml: the resolved config
    metrics: Path  # metrics.jsonl
    ledger: Path  # privacy/ledger.jsonl: every site's signed spends (`fedshield.audit` reads it)
    ledger_keys: Path  # privacy/ledger-keys/: the sites' ledger signing public keys
    sites: Path  # privacy/sites.json
    report: Path  # report.md
    plots: Path  # plots/: accuracy.png, epsilon.png
    model: Path | None  # model/: the final model; None when output.save_model=false

    @classmethod
    def of(cls, run_dir: Path) -> RunPaths:
        model = run_dir / "model"
        return cls(run_dir=run_dir, config=run_dir / "config.yaml", metrics=run_dir / "metrics.jsonl",
                   ledger=run_dir / "privacy" / "ledger.jsonl", ledger_keys=run_dir / "privacy" / LEDGER_KEYS,
                   sites=run_dir / "privacy" / "sites.json", report=run_dir / "report.md",
                   plots=run_dir / "plots", model=model if model.is_dir() else None)


@dataclass(frozen=True)
class RunResult:
    """What a run computed and what it cost, per round and per site."""

    run_dir: Path
    config: Config  # the run's own config (config.yaml), output.* naming run_dir
    rounds: tuple[RoundMetrics, ...]  # round 0 (the initial model) first
    sites: Mapping[str, SiteResult]
    paths: RunPaths

    @property
    def epsilon(self) -> dict[str, float]:
        """Per site, its ε at its δ after the run: the newest entry of its signed ledger."""
        return {name: s.epsilon for name, s in self.sites.items()}

    @property
    def final(self) -> RoundMetrics:
        return self.rounds[-1]

    @property
    def final_accuracy(self) -> float:
        if self.rounds[-1].perplexity is not None:
            raise FedShieldError(f"{self.run_dir}: a text-generation run has no accuracy; read final_perplexity")
        return self.rounds[-1].accuracy

    @property
    def final_perplexity(self) -> float:
        """text-generation runs: the held-out perplexity after the last round."""
        value = self.rounds[-1].perplexity
        if value is None:
            raise FedShieldError(f"{self.run_dir}: a classification run has no perplexity; read final_accuracy")
        return value

    @property
    def site_level_epsilon(self) -> float | None:
        """privacy.unit=site: the federation's site-level ε after the last round (None otherwise)."""
        value = self.rounds[-1].row.get("site_level_epsilon")
        return None if value is None else float(value)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunResult:
        """Read a run directory (a finished or stopped run; `fedshield simulate` or `fedshield server`)."""
        run = Path(run_dir).expanduser().resolve()
        paths = RunPaths.of(run)
        if not paths.config.is_file():
            raise FedShieldError(f"{run}: not a run directory (no config.yaml)")
        config = Config.from_run(run)
        try:
            rounds = tuple(RoundMetrics.from_row(r) for r in read_jsonl(paths.metrics))
        except (KeyError, TypeError, ValueError) as exc:
            raise FedShieldError(f"{paths.metrics}: not a metrics file fedshield wrote ({type(exc).__name__}: "
                                 f"{exc})") from None
        if not rounds:
            raise FedShieldError(f"{run}: no rounds in metrics.jsonl (the run did not start)")
        try:
            summary = json.loads(paths.sites.read_text()) if paths.sites.is_file() else {}
        except ValueError as exc:
            raise FedShieldError(f"{paths.sites}: not readable JSON ({exc})") from None
        try:
            sites = MappingProxyType({name: SiteResult.from_json(name, s) for name, s in sorted(summary.items())})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FedShieldError(f"{paths.sites}: not a site summary fedshield wrote ({type(exc).__name__}: "
                                 f"{exc})") from None
        return cls(run_dir=run, config=config, rounds=rounds, sites=sites, paths=paths)

    def table(self) -> str:
        """The per-round table `fedshield simulate` prints at the end, summarised: the first
        round, every tenth and the last, then where the full table is (report.md)."""
        shown = [r for k, r in enumerate(self.rounds) if k == 0 or r.round % 10 == 0 or k == len(self.rounds) - 1]
        generation = self.rounds[-1].perplexity is not None
        lines = [f"round  {'perplexity      loss' if generation else 'accuracy  macro-F1'}  ε max   ε mean  trained  "
                 "declined  dropped"]
        for r in shown:
            quality = (f"{r.perplexity or math.nan:>10.4f}  {r.loss or math.nan:>8.4f}" if generation
                       else f"{r.accuracy:>8.4f}  {r.macro_f1:>8.4f}")
            lines.append(
                f"{r.round:>5}  {quality}  {r.epsilon_max:>6.3f}  "
                f"{r.epsilon_mean:>6.3f}  {r.trained:>7}  {r.declined:>8}  {r.rejected + r.failed:>7}"
            )
        if len(shown) < len(self.rounds):
            lines.append(f"full table: {self.paths.report} ({len(self.rounds)} rounds)")
        return "\n".join(lines)

"""A run directory, simulated or deployed, finished or still being written, read into one
typed, frozen `RunSummary`: what `fedshield status` prints and `fedshield dashboard` shows.

Pure Python over the files the coordinator writes (server/run_dir.py): config.yaml,
metrics.jsonl (a line per round, written by server/app.py `RoundLog.on_evaluated`),
privacy/ledger.jsonl and privacy/ledger-keys/ (the sites' signed spends and keys),
privacy/sites.json and report.md (written at the end). Nothing is recomputed but the
ledger's verification (hash chains and signatures, fedshield.privacy.ledger.verify_ledger),
which `RunWatcher` caches by the ledger's and the keys' size and mtime so that a poll does
not verify every entry again. Files are read as they are while the run appends to them: a
last line not yet whole is left for the next read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield.conf.config import Config
from fedshield.privacy import signing
from fedshield.privacy.errors import FedShieldError, LedgerError
from fedshield.privacy.ledger import Entry, Ledger, verify_ledger
from fedshield.server.run_dir import LEDGER_KEYS
from fedshield.server.settings import CoordinatorSettings

# What the watcher stats (relative to the run directory); a change in any of them is a new summary.
WATCHED = ("config.yaml", "metrics.jsonl", "privacy/ledger.jsonl", "privacy/sites.json", "report.md",
           f"privacy/{LEDGER_KEYS}")
Signature = tuple[tuple[int, int] | None, ...]


def stat_signature(run_dir: Path, names: tuple[str, ...] = WATCHED) -> Signature:
    """(size, mtime in ns) of each watched path, None where it is missing."""
    out: list[tuple[int, int] | None] = []
    for name in names:
        try:
            st = (run_dir / name).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class RoundView:
    """One line of metrics.jsonl (round 0: the initial model, nobody asked)."""

    round: int
    accuracy: float
    macro_f1: float
    epsilon_max: float  # this run's spends, as the coordinator verified them (metrics.jsonl)
    epsilon_mean: float
    site_epsilon_min: float  # over the sites' cumulative ε as their ledgers state it (what a budget binds)
    site_epsilon_max: float
    site_level_epsilon: float | None  # privacy.unit=site: the federation's ε
    sampled: int
    trained: int
    declined: Mapping[str, str]  # site -> its decline kind (budget, books, ...; "declined" in older runs)
    dropped: Mapping[str, str]  # site -> why its reply was not used (rejected: reason; failed)
    secagg_dropped: Mapping[str, str]  # site -> the SecAgg+ stage it dropped out at
    defence: str  # the poisoning defences' verdict in words ("" when they had nothing to say)
    empty: bool  # nothing aggregated
    elapsed_s: float
    perplexity: float | None = None  # text-generation runs (accuracy, macro_f1 are then NaN)


@dataclass(frozen=True)
class SiteView:
    site: str
    epsilon: float  # cumulative, as its newest ledger entry states it
    budget: float | None  # its lifetime budget (None: no DP)
    sampled: int
    trained: int
    declined: int
    dropped: int
    last_problem: str  # the newest "round N: declined (kind)" / "round N: dropped: why"; "" none


@dataclass(frozen=True)
class AuditView:
    state: str  # verified | unsigned (no keys: chains only) | failed | empty
    entries: int
    sites: int
    detail: str  # one line: what was checked, or the first problem


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    name: str
    task: str
    strategy: str
    privacy_mode: str
    accountant: str
    delta: float
    budget: float | None  # the run's lifetime budget per site (privacy.budget_epsilon or the target)
    unit: str  # record | site
    secure_aggregation: bool
    rounds_planned: int
    sites_expected: int
    connected: int  # sites that joined (their ledger keys are in privacy/ledger-keys/)
    finished: bool  # report.md is written
    rounds: tuple[RoundView, ...]
    sites: tuple[SiteView, ...]
    audit: AuditView
    problems: tuple[str, ...]  # files not (yet) readable as fedshield writes them

    @property
    def last(self) -> RoundView | None:
        return self.rounds[-1] if self.rounds else None

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain

    def text(self) -> str:
        """The terminal block of `fedshield status`."""
        state = "finished" if self.finished else "running (or stopped)"
        dp = (f"{self.privacy_mode} {self.accountant} δ={self.delta:g}" if self.privacy_mode != "none"
              else "no DP")
        lines = [f"run {self.name}: {state} | task {self.task}, {self.strategy}, {dp}"
                 + (", SecAgg+" if self.secure_aggregation else "")]
        done = [r for r in self.rounds if r.round > 0]
        last = self.last
        if last is None:
            lines.append(f"rounds    0 of {self.rounds_planned}: no round evaluated yet")
        else:
            quality = (f"perplexity {last.perplexity:.4f}" if last.perplexity is not None
                       else f"accuracy {last.accuracy:.4f}, macro-F1 {last.macro_f1:.4f}")
            lines.append(f"rounds    {len(done)} of {self.rounds_planned} | last (round {last.round}): {quality}")
        if self.sites and self.privacy_mode != "none":
            eps = [s.epsilon for s in self.sites]
            budget = f"budget {self.budget:g}" if self.budget is not None else "no budget"
            over = [s.site for s in self.sites if s.budget is not None and s.epsilon > s.budget]
            lines.append(f"ε         max {max(eps):.4f}, mean {sum(eps) / len(eps):.4f} per site, {budget}"
                         + (f"; OVER BUDGET: {', '.join(over)}" if over else ""))
        declined = sum(s.declined for s in self.sites)
        dropped = sum(s.dropped for s in self.sites)
        kinds = sorted({k for r in done for k in r.declined.values()})
        secagg = sum(len(r.secagg_dropped) for r in done)
        lines.append(f"sites     {self.connected} of {self.sites_expected} connected | over the run: "
                     f"{sum(s.trained for s in self.sites)} trained, {declined} declined"
                     + (f" ({', '.join(kinds)})" if kinds else "") + f", {dropped} dropped"
                     + (f", {secagg} SecAgg+ dropouts" if self.secure_aggregation else ""))
        if last is not None and last.round > 0:
            lines.append(f"          last round: {last.sampled} sampled, {last.trained} trained, "
                         f"{len(last.declined)} declined, {len(last.dropped)} dropped"
                         + (f"; {last.defence}" if last.defence else ""))
        lines.append(f"audit     {self.audit.state}: {self.audit.detail}")
        lines += [f"note      {p}" for p in self.problems]
        return "\n".join(lines)


def _plain(obj: Any) -> Any:
    """JSON-ready: mappings as dicts, tuples as lists, non-finite floats as None."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """metrics.jsonl's whole lines (a last line still being written is left for later), and
    what was wrong with it ("" nothing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], ""
    except OSError as exc:
        return [], f"{path}: cannot read ({exc.strerror})"
    rows: list[dict[str, Any]] = []
    for n, raw in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            return rows, f"{path}: line {n} is not JSON; the rounds after it are not shown"
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            return rows, f"{path}: line {n} is not a round fedshield wrote; the rounds after it are not shown"
        rows.append(row)
    return rows, ""


def _num(x: Any, default: float = math.nan) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else default


def _names(x: Any) -> list[str]:
    return [str(s) for s in x] if isinstance(x, list) else []


def _str_map(x: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in x.items()} if isinstance(x, dict) else {}


def defence_verdict(row: Mapping[str, Any], strategy: str) -> str:
    """The poisoning defences' outcome of one round in words (norm bound, robust rule, breaches)."""
    parts = []
    if clipped := _names(row.get("clipped_sites")):
        parts.append(f"{len(clipped)} update(s) clipped to the norm bound ({', '.join(clipped)})")
    if left_out := _names(row.get("left_out_sites")):
        parts.append(f"{strategy} left out {', '.join(left_out)}")
    if breaches := _names(row.get("breach_sites")):
        parts.append(f"attacker(s) unmasked by a breach: {', '.join(breaches)}")
    if isinstance(row.get("withstood"), int):
        parts.append(f"{strategy} withstood f={row['withstood']}")
    if row.get("skipped"):
        parts.append(f"nothing aggregated: {row['skipped']}")
    return "; ".join(parts)


def round_view(row: Mapping[str, Any], strategy: str) -> RoundView:
    kinds = _str_map(row.get("decline_kinds"))
    dropped = {site: f"rejected: {why}" for site, why in _str_map(row.get("rejected_reasons")).items()}
    dropped.update({site: "failed" for site in _names(row.get("failed_sites"))})
    eps = [_num(v) for v in (row.get("epsilon") or {}).values()] if isinstance(row.get("epsilon"), dict) else []
    site_level = row.get("site_level_epsilon")
    return RoundView(
        round=int(row["round"]), accuracy=_num(row.get("accuracy")), macro_f1=_num(row.get("macro_f1")),
        epsilon_max=_num(row.get("epsilon_max"), 0.0), epsilon_mean=_num(row.get("epsilon_mean"), 0.0),
        site_epsilon_min=min(eps, default=0.0), site_epsilon_max=max(eps, default=0.0),
        site_level_epsilon=None if site_level is None else _num(site_level),
        sampled=len(_names(row.get("sampled"))), trained=int(_num(row.get("trained"), 0)),
        declined={site: kinds.get(site, "declined") for site in _names(row.get("declined_sites"))},
        dropped=dropped, secagg_dropped=_str_map(row.get("secagg_dropped")),
        defence=defence_verdict(row, strategy), empty=bool(row.get("empty")),
        elapsed_s=_num(row.get("elapsed_s"), 0.0),
        perplexity=None if row.get("perplexity") is None else _num(row.get("perplexity")),
    )


def _load_keys(keys_dir: Path) -> dict[str, signing.PublicKey]:
    keys = {}
    for pub in sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []:
        try:
            keys[pub.stem] = signing.load_public_key(pub.read_bytes())
        except (FedShieldError, ValueError, OSError):
            continue  # verify_ledger then fails that site's entries: no key
    return keys


def audit_view(run_dir: Path) -> tuple[AuditView, dict[str, float], dict[str, float]]:
    """The ledger's verification (chains, signatures under privacy/ledger-keys/), and each
    site's newest signed ε and budget (entry `budget_epsilon`)."""
    try:
        read = Ledger(run_dir / "privacy" / "ledger.jsonl").read()
    except LedgerError as exc:
        return AuditView("failed", 0, 0, str(exc)), {}, {}
    entries: list[Entry] = read.entries
    if not entries:
        return AuditView("empty", 0, 0, "no ledger entries yet"), {}, {}
    epsilon: dict[str, float] = {}
    budgets: dict[str, float] = {}
    for e in entries:
        site = str(e.get("site"))
        if (eps := _num(e.get("epsilon"))) == eps:
            epsilon[site] = eps
        if (b := _num(e.get("budget_epsilon"))) > 0:
            budgets[site] = b
    keys = _load_keys(run_dir / "privacy" / LEDGER_KEYS)
    res = verify_ledger(entries, keys or None)
    n, sites = len(entries), len(epsilon)
    if not res.ok:
        first = res.problems[0][1] if res.problems else res.reason
        return AuditView("failed", n, sites, f"{len(res.problems)} problem(s); first: {first}"), epsilon, budgets
    if not res.signatures_checked:
        return AuditView("unsigned", n, sites, f"{n} entries of {sites} sites: hash chains intact; no ledger keys, "
                         "so signatures were not checked"), epsilon, budgets
    tail = "; the last line is still being written" if read.truncated_bytes else ""
    return AuditView("verified", n, sites, f"{n} entries of {sites} sites: hash chains and signatures verify "
                     f"(keys from the run directory; `fedshield audit` recomputes ε){tail}"), epsilon, budgets


class RunWatcher:
    """A run directory's summary, rebuilt only when a watched file changed, with the ledger's
    verification redone only when the ledger or its keys changed."""

    def __init__(self, run_dir: str | Path) -> None:
        run = Path(run_dir).expanduser().resolve()
        if not run.is_dir():
            raise FedShieldError(f"{run}: no such run directory")
        if not (run / "config.yaml").is_file():
            raise FedShieldError(f"{run}: not a run directory (no config.yaml; `fedshield simulate` and "
                                 "`fedshield server` write one)")
        self.run_dir = run
        self._settings: tuple[Signature, CoordinatorSettings] | None = None
        self._audit: tuple[Signature, tuple[AuditView, dict[str, float], dict[str, float]]] | None = None
        self._summary: tuple[Signature, RunSummary] | None = None

    def signature(self) -> Signature:
        return stat_signature(self.run_dir)

    def settings(self) -> CoordinatorSettings:
        sig = stat_signature(self.run_dir, ("config.yaml",))
        if self._settings is None or self._settings[0] != sig:
            try:
                cfg = Config.from_run(self.run_dir)
            except FedShieldError as exc:
                why = " ".join(str(exc).split())  # one line, also for a YAML parser's multi-line message
                raise FedShieldError(f"{self.run_dir / 'config.yaml'}: not a config fedshield wrote ({why})") from None
            self._settings = (sig, CoordinatorSettings.from_config(cfg))
        return self._settings[1]

    def _audited(self) -> tuple[AuditView, dict[str, float], dict[str, float]]:
        sig = stat_signature(self.run_dir, ("privacy/ledger.jsonl", f"privacy/{LEDGER_KEYS}"))
        if self._audit is None or self._audit[0] != sig:
            self._audit = (sig, audit_view(self.run_dir))
        return self._audit[1]

    def summary(self) -> RunSummary:
        sig = self.signature()
        if self._summary is None or self._summary[0] != sig:
            self._summary = (sig, self._build())
        return self._summary[1]

    def _build(self) -> RunSummary:
        settings = self.settings()
        run, strategy = self.run_dir, settings.rule.strategy
        problems = []
        rows, problem = read_rows(run / "metrics.jsonl")
        if problem:
            problems.append(problem)
        rounds = tuple(round_view(r, strategy) for r in rows)
        audit, ledger_eps, signed_budgets = self._audited()
        final: dict[str, Any] = {}
        if (run / "privacy" / "sites.json").is_file():
            try:
                loaded = json.loads((run / "privacy" / "sites.json").read_text())
                final = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                problems.append(f"{run / 'privacy' / 'sites.json'}: not readable JSON yet")
        keys_dir = run / "privacy" / LEDGER_KEYS
        joined = sorted(p.stem for p in keys_dir.glob("*.pub")) if keys_dir.is_dir() else []
        dp = settings.accounting.mode != "none"
        budget = settings.accounting.budget if dp else None
        names = sorted(set(joined) | set(ledger_eps) | set(final)
                       | {str(s) for r in rows for s in (r.get("epsilon") or {})})
        sites = tuple(_site_view(name, rows, rounds, final.get(name), ledger_eps, signed_budgets, budget)
                      for name in names)
        return RunSummary(
            run_dir=str(run), name=run.name, task=settings.task, strategy=strategy,
            privacy_mode=settings.accounting.mode, accountant=settings.accounting.accountant,
            delta=settings.accounting.delta, budget=budget, unit=settings.unit,
            secure_aggregation=settings.secagg is not None, rounds_planned=settings.rounds,
            sites_expected=settings.sites.expected, connected=len(joined), finished=(run / "report.md").is_file(),
            rounds=rounds, sites=sites, audit=audit, problems=tuple(problems),
        )


def _site_view(name: str, rows: list[dict[str, Any]], rounds: tuple[RoundView, ...], final: Any,
               ledger_eps: Mapping[str, float], signed_budgets: Mapping[str, float],
               budget: float | None) -> SiteView:
    final = final if isinstance(final, dict) else {}
    eps = _num(final.get("epsilon"), math.nan)
    if eps != eps:
        eps = ledger_eps.get(name, math.nan)
    if eps != eps:  # no entry of its own yet: the newest round's figure, or nothing spent
        eps = next((_num(r["epsilon"][name], 0.0) for r in reversed(rows)
                    if isinstance(r.get("epsilon"), dict) and name in r["epsilon"]), 0.0)
    site_budget = budget if budget is None else _num(final.get("budget"), signed_budgets.get(name, budget))
    last_problem = ""
    for r in rounds:
        if name in r.declined:
            last_problem = f"round {r.round}: declined ({r.declined[name]})"
        elif name in r.dropped:
            last_problem = f"round {r.round}: dropped: {r.dropped[name]}"
    return SiteView(
        site=name, epsilon=eps, budget=site_budget,
        sampled=sum(name in _names(row.get("sampled")) for row in rows),
        # trained: asked and replied with an update that passed the checks (a round skipped
        # after that still counts: the site spent and trained)
        trained=sum(name in _names(row.get("sampled")) and name not in r.declined and name not in r.dropped
                    and name not in r.secagg_dropped for row, r in zip(rows, rounds, strict=True)),
        declined=sum(name in r.declined for r in rounds), dropped=sum(name in r.dropped for r in rounds),
        last_problem=last_problem,
    )


def read_summary(run_dir: str | Path) -> RunSummary:
    """The summary of a run directory now (`fedshield status`)."""
    return RunWatcher(run_dir).summary()

"""`fedshield audit`: verify a privacy ledger and recompute every site's ε independently.

Input: a run directory (`<run>/privacy/ledger.jsonl`), a site state folder
(`<state>/ledger.jsonl` + `site.pub`), or a ledger file.

1. Verify (privacy.ledger.verify_ledger): per-site hash chains, site signatures, rounds
   forward, cumulative ε never down.
2. Recompute, from the recorded (noise_multiplier, sample_rate, steps) only and never from
   the recorded ε, each site's cumulative ε after every entry with Google's dp-accounting:
   RDP (Opacus' orders) and, per site at the end (and per entry for "prv" entries), PLD.
   An interrupted spend in `<ledger>.pending` (a crash between its signing and its line
   reaching the ledger) is counted as the site counts it, once it verifies as its site's
   next entry (privacy.ledger `Ledger.pending_entry`); one that does not is a failure.
3. Flag every entry whose recorded ε is below the recomputation of its accountant
   ("rdp": dp-accounting RDP; "prv" and "pld": dp-accounting PLD) under its neighbouring relation
   (add-remove; replace-one: dp-accounting PLD with REPLACE_ONE, the only analysis of
   the Poisson-subsampled Gaussian under that relation) by more than `TOLERANCE` relative.
4. The verdict on each site's ε (its budget, `--max-epsilon`, the weak-guarantee note) uses
   the ledger's own accountant, the one the site recorded in its newest entry: the larger
   of its recorded ε and the recomputation with that accountant (when unsure, over-count).
   The other accountant's recomputation is shown beside it as an opinion, never judged
   (RDP's conversion to (ε, δ) is looser than PLD's: a PLD ledger at ε 7.99 has an RDP
   opinion above 8).

Keys: the public halves of the sites' ledger signing keys (P-256, `<state-dir>/site.pub`;
not their connection keys): `--ledger-keys DIR` (`DIR/<site>.pub`), the ones an auditor got
from the sites themselves. Otherwise the run directory's `privacy/ledger-keys/<site>.pub`
(`privacy/site-keys/` in run directories written before the rename), or a state folder's
`site.pub`, is used, and the report says that such keys are only as trustworthy as the run
directory. Without any key, signatures are not checked and the audit does not pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, TypeGuard

from fedshield.privacy import signing
from fedshield.privacy.accountant import (
    PLD_DISCRETIZATION,
    PLD_RECORD_INTERVAL,
    REPLACE_ONE,
    Spend,
    epsilon_dp_accounting_pld,
    epsilon_dp_accounting_rdp,
    pld_words,
    rdp_orders_words,
)
from fedshield.privacy.errors import FedShieldError, LedgerError
from fedshield.privacy.events import LedgerEntry, neighbouring_of
from fedshield.privacy.ledger import (
    SKELLAM_MECHANISM,
    Entry,
    Ledger,
    VerifyResult,
    verify_ledger,
)
from fedshield.privacy.progress import progress
from fedshield.privacy.skellam import skellam_history_epsilon

TOLERANCE = 1e-6  # relative: recorded ε may not be below the recomputation by more than this
RUN_KEY_DIRS = ("ledger-keys", "site-keys")  # under <run>/privacy/: the current name, then the old one
SKELLAM_RDP = "skellam-rdp"  # the verdict accountant of a Skellam chain (privacy/skellam.py)


def describe_recomputation(accountant: str, neighbouring: str = "add-remove") -> str:
    """What the audit checks an entry of `accountant` against, in words rendered from the
    constants `audit` passes (the report prints this: text and code cannot drift apart)."""
    pld = f"dp-accounting {pld_words(PLD_RECORD_INTERVAL)}"
    if accountant == SKELLAM_RDP:
        return "fedshield's Skellam RDP bound (privacy/skellam.py; dp-accounting has no Skellam mechanism)"
    if neighbouring == REPLACE_ONE:
        return f"{pld}, NeighboringRelation.REPLACE_ONE)"
    if accountant == "pld":
        return f"{pld}): the site's own computation, so an honest entry equals it"
    if accountant == "rdp":
        return f"dp-accounting RDP over Opacus' {rdp_orders_words()}"
    if accountant == "prv":
        return f"dp-accounting {pld_words(PLD_DISCRETIZATION)})"
    return f"nothing: accountant {accountant!r} is not one fedshield knows"


class ParameterRow(TypedDict):
    """One distinct set of a site's mechanism parameters, with the steps spent at it."""

    mechanism: str
    noise_multiplier: float  # σ
    sample_rate: float  # q
    clip: float  # C: the clipping norm (sensitivity; 1 for a count)
    steps: int  # summed over the entries with these parameters
    entries: int
    delta: float
    neighbouring: str


class EntryCheck(TypedDict):
    """The audit of one ledger entry (a row of the report; `AuditResult.to_json()["entries"]`)."""

    index: int
    site: str
    run_id: Any  # run_id, round, accountant and the recorded ε as the entry has them
    round: Any
    accountant: Any
    recorded: Any
    neighbouring: str  # the relation the entry is accounted (and recomputed) under
    mechanism: str | None  # the mechanism it is accounted as (a v1 count: gaussian-count); None: unreadable
    noise_multiplier: float | None  # σ, q, C (clipping norm) and steps of this spend; None: unreadable
    sample_rate: float | None
    clip: float | None
    steps: int | None
    rdp: float | None  # dp-accounting RDP ε after this entry; None: not recomputed (or replace-one)
    pld: float | None  # dp-accounting PLD ε, for "prv" and replace-one entries
    reference: float | None  # the recomputation the recorded ε is checked against
    flag: str


@dataclass(frozen=True)
class SiteAudit:
    """One site's audit: what its ledger holds, and its ε as recorded and as recomputed."""

    site: str
    entries: int
    runs: list[str]
    rounds: int  # distinct (run, round) pairs with a spend
    steps: int
    noise_multipliers: list[float]
    sample_rates: list[float]
    max_grad_norms: list[float]
    deltas: list[float]
    accountants: list[str]
    mechanisms: list[str]  # what its entries are accounted as (privacy/events.py `Mechanism`)
    neighbouring: str  # the relation of the site's chain (one per chain: verify_ledger)
    recorded_epsilon: float
    rdp_epsilon: float  # dp-accounting RDP over the entries in this ledger
    pld_epsilon: float  # dp-accounting PLD over the entries in this ledger
    partial: bool = False  # this ledger does not hold the site's first spends
    budget: float | None = None
    over_budget: bool = False
    key_fingerprint: str = ""
    # The recomputation the site's newest recorded ε is checked against (its accountant's:
    # PLD for "pld", "prv" and replace-one, RDP for "rdp", the Skellam RDP bound); NaN if
    # none of its entries could be recomputed.
    recomputed_epsilon: float = math.nan
    # The accountant of the verdict: the site's own ("pld", "rdp", "prv"; "pld" under
    # replace-one; SKELLAM_RDP), and the ε judged against budgets and --max-epsilon: the
    # larger of the recorded and the recomputed.
    verdict_accountant: str = ""
    verdict_epsilon: float = math.nan
    opinions: dict[str, float] = field(default_factory=dict)  # other accountants' ε: shown, never judged
    parameters: list[ParameterRow] = field(default_factory=list)


@dataclass(frozen=True)
class AuditResult:
    """What `fedshield audit` decides and prints (`fedshield.audit` returns it)."""

    ok: bool
    ledger_path: Path
    run_dir: Path | None
    verify: VerifyResult
    sites: dict[str, SiteAudit]
    entries: list[EntryCheck]
    flags: list[str] = field(default_factory=list)  # each problem, one line, the first first
    notes: list[str] = field(default_factory=list)
    key_source: str = ""  # "given" | "run directory" | "state folder" | "none"
    key_note: str = ""
    budget_source: str = ""
    torn_message: str = ""
    books_checked: bool = False  # a site's books checked whole, seq 0 to its signed head (`--site`)
    report_markdown: Path | None = None  # the report `audit_and_report` wrote
    report_html: Path | None = None
    max_epsilon: float | None = None  # the --max-epsilon the sites were held to

    @property
    def first_problem(self) -> str:
        return self.flags[0] if self.flags else ""

    @property
    def epsilon(self) -> dict[str, float]:
        """Per site, its ε as this audit recomputed it from the ledger's (σ, q, steps)."""
        return {name: s.recomputed_epsilon for name, s in self.sites.items()}

    def to_json(self) -> dict[str, Any]:
        def clean(x: object) -> object:
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            if isinstance(x, Path):
                return str(x)
            return x

        v = self.verify
        out: dict[str, object] = {
            "ok": self.ok,
            "ledger": self.ledger_path,
            "run_dir": self.run_dir,
            "verification": {
                "ok": v.ok, "first_bad_index": v.first_bad_index, "reason": v.reason,
                "signatures_checked": v.signatures_checked, "checked": v.checked,
                "problems": [p for _, p in v.problems],
            },
            "key_source": self.key_source, "key_note": self.key_note,
            "budget_source": self.budget_source, "max_epsilon": self.max_epsilon,
            "sites": {k: asdict(s) for k, s in self.sites.items()},
            "entries": self.entries,
            "flags": self.flags, "notes": self.notes, "torn": self.torn_message,
        }
        return {k: clean(x) for k, x in out.items()}


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(ledger file, run directory or None, state folder or None)."""
    path = Path(path)
    if path.is_dir():
        if (path / "privacy" / "ledger.jsonl").is_file():
            return path / "privacy" / "ledger.jsonl", path, None
        if (path / "ledger.jsonl").is_file():
            return path / "ledger.jsonl", None, path
        raise FedShieldError(
            f"{path}: no privacy/ledger.jsonl (run directory) or ledger.jsonl (site state folder) in it"
        )
    if path.is_file():
        if path.parent.name == "privacy" and any((path.parent / d).is_dir() for d in RUN_KEY_DIRS):
            return path, path.parent.parent, None
        return path, None, path.parent if (path.parent / "site.pub").is_file() else None
    raise FedShieldError(f"{path}: not found")


def _load_keys(
    sites: list[str], ledger_keys_dir: Path | None, run_dir: Path | None, state_dir: Path | None
) -> tuple[dict[str, signing.PublicKey] | None, str, str]:
    if ledger_keys_dir is not None:
        d = Path(ledger_keys_dir)
        if not d.is_dir():
            raise FedShieldError(f"--ledger-keys {d}: not a folder")
        keys = {s: signing.load_public_key(d / f"{s}.pub") for s in sites if (d / f"{s}.pub").is_file()}
        return keys, "given", f"ledger signing keys (public) from {d} (as given to the auditor)"
    run_keys = [run_dir / "privacy" / n for n in RUN_KEY_DIRS] if run_dir is not None else []
    found = next((k for k in run_keys if k.is_dir()), None)
    if found is not None:
        keys = {s: signing.load_public_key(found / f"{s}.pub") for s in sites if (found / f"{s}.pub").is_file()}
        return keys, "run directory", (
            f"ledger signing keys (public) were taken from the run directory ({found}); they are only as "
            "trustworthy as the run directory itself: for an audit independent of the "
            "coordinator, get each site's ledger public key (<state-dir>/site.pub) from the site "
            "and pass --ledger-keys"
        )
    if state_dir is not None and (state_dir / "site.pub").is_file() and len(sites) == 1:
        keys = {sites[0]: signing.load_public_key(state_dir / "site.pub")}
        return keys, "state folder", (
            f"the ledger signing key (public) was taken from {state_dir / 'site.pub'}, next to the ledger; "
            "it is only as trustworthy as that folder: pass --ledger-keys for an independent check"
        )
    return None, "none", "no ledger signing keys: signatures were NOT checked (pass --ledger-keys DIR)"


def _budgets_from_run(run_dir: Path | None) -> tuple[dict[str, float], dict[str, float]]:
    """Budgets and final ε per site from the run's privacy/sites.json, if there is one."""
    if run_dir is None:
        return {}, {}
    p = run_dir / "privacy" / "sites.json"
    if not p.is_file():
        return {}, {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise FedShieldError(f"{p}: not readable JSON ({exc})") from None
    budgets, eps = {}, {}
    for site, s in data.items() if isinstance(data, dict) else []:
        if isinstance(s, dict):
            if isinstance(s.get("budget"), (int, float)):
                budgets[site] = float(s["budget"])
            if isinstance(s.get("epsilon"), (int, float)):
                eps[site] = float(s["epsilon"])
    return budgets, eps


def _is_number(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


WEAK_EPSILON = 10.0  # above this, the audit says the guarantee is weak (a note, not a failure)


def _signed_budgets(entries: list[Entry]) -> dict[str, float]:
    """Each site's budget as the site itself signed it into its newest entry."""
    out: dict[str, float] = {}
    for e in entries:
        if isinstance(e, dict) and _is_number(e.get("budget_epsilon")) and e["budget_epsilon"] > 0:
            out[str(e.get("site"))] = float(e["budget_epsilon"])
    return out


def audit(path: Path, ledger_keys_dir: Path | None = None, budgets: dict[str, float] | None = None,
          max_epsilon: float | None = None) -> AuditResult:
    ledger_path, run_dir, state_dir = _locate(Path(path))
    read = Ledger(ledger_path).read()  # read only: an auditor does not repair
    entries = read.entries
    if not entries:
        raise FedShieldError(f"ledger {ledger_path}: no entries")
    site_names = sorted({str(e.get("site")) for e in entries if isinstance(e, dict)})
    keys, key_source, key_note = _load_keys(site_names, ledger_keys_dir, run_dir, state_dir)
    # An interrupted spend (`<ledger>.pending`) counts as the site counts it (privacy.ledger
    # `recover`): verified as its chain's next entry first, refused (a flag) otherwise.
    pending_flag, pending_note = "", ""
    try:
        late = Ledger(ledger_path).pending_entry(entries, keys)
    except LedgerError as exc:
        late, pending_flag = None, str(exc)
    if late is not None:
        entries = [*entries, late]
        pending_note = (f"{ledger_path.name}.pending: the interrupted spend of site {late.get('site')!r}, run "
                        f"{late.get('run_id')!r} round {late.get('round')!r} (seq {late.get('seq')}) is counted "
                        "as spent, as the site counts it")
    verify = verify_ledger(entries, keys)

    run_budgets, run_eps = _budgets_from_run(run_dir)
    signed = _signed_budgets(entries)
    if budgets:
        budget_source = "given on the command line"
    elif signed:
        # The site's own word, covered by its signature: the coordinator cannot change it.
        budgets = {**{k: v for k, v in run_budgets.items() if k not in signed}, **signed}
        budget_source = "signed by each site in its entries" + (
            "; for sites whose entries carry none, the run's sites.json (the coordinator's word)"
            if set(budgets) - set(signed) else "")
    elif run_budgets and run_dir is not None:
        budgets, budget_source = run_budgets, (f"the run's {run_dir / 'privacy' / 'sites.json'} (the coordinator's "
                                               "word: its entries carry no signed budget)")
    else:
        budgets, budget_source = {}, "none given"

    flags: list[str] = []
    notes: list[str] = list(verify.notes)
    if not verify.ok:
        flags.append(f"verification failed: {verify.reason}")
        flags += [f"verification failed: {p}" for _, p in verify.problems[1:]]
    if not verify.signatures_checked:
        flags.append("signatures not checked: no ledger signing keys (pass --ledger-keys DIR)")
    if read.truncated_bytes:
        notes.append(read.message + (" (its whole signed copy, the pending line, is counted)" if late is not None
                                     else " (the cut entry is not part of this audit)"))
    if pending_flag:
        flags.append(pending_flag)
    if pending_note:
        notes.append(pending_note)

    # Recompute, site by site, in ledger order, from each entry's event only (σ, q, steps;
    # Skellam: its noise and sensitivities), never from the recorded ε. Each line is parsed
    # once here (privacy/events.py); one that does not parse is flagged, not guessed at.
    per_entry: list[EntryCheck] = []
    parsed: dict[int, LedgerEntry] = {}
    history: dict[str, list[Spend]] = {}
    skellams: dict[str, list[tuple[float, float, float]]] = {}  # site -> (variance, l1, l2) of its Skellam spends
    for i, e in enumerate(progress(entries, "recomputing ε", total=len(entries), unit="entry")):
        site = str(e.get("site"))
        row: EntryCheck = {"index": i, "site": site, "run_id": e.get("run_id"), "round": e.get("round"),
               "accountant": e.get("accountant"), "recorded": e.get("epsilon"),
               "neighbouring": neighbouring_of(e), "mechanism": None, "noise_multiplier": None,
               "sample_rate": None, "clip": None, "steps": None, "rdp": None, "pld": None, "reference": None,
               "flag": ""}
        per_entry.append(row)
        try:
            entry = parsed[i] = LedgerEntry.from_dict(e)
        except LedgerError as exc:
            row["flag"] = f"cannot recompute: {exc}"
            flags.append(f"entry {i} (round {e.get('round')!r}, site {site!r}): {row['flag']}")
            continue
        event, delta, rec = entry.event, entry.delta, entry.epsilon
        row["mechanism"] = event.mechanism.value
        row["noise_multiplier"], row["sample_rate"] = event.noise_multiplier, event.sample_rate
        row["clip"], row["steps"] = event.sensitivity, event.steps
        if event.skellam is not None:  # SecAgg+ with distributed noise: privacy/skellam.py
            sk = skellams.setdefault(site, [])
            sk.append((event.skellam.variance, event.skellam.l1, event.skellam.l2))
            try:
                ref = row["rdp"] = row["reference"] = skellam_history_epsilon(sk, delta)
            except FedShieldError as exc:
                row["flag"] = f"cannot recompute the Skellam bound: {exc}"
                flags.append(f"entry {i} (round {e.get('round')!r}, site {site!r}): {row['flag']}")
                continue
            if rec is None or rec < ref * (1 - TOLERANCE):
                row["flag"] = "under-reported ε"
                flags.append(f"entry {i} (round {e.get('round')!r}, site {site!r}): recorded ε={rec!r} is below "
                             f"the recomputed Skellam RDP ε={ref:.6g}")
            continue
        spend = event.spend()
        h = history.setdefault(site, [])
        h.append(spend)
        relation = event.relation.value
        if relation == REPLACE_ONE:
            ref = row["pld"] = epsilon_dp_accounting_pld(h, delta, PLD_RECORD_INTERVAL, neighbouring=REPLACE_ONE)
        elif entry.accountant == "pld":  # exactly the site's computation: dp-accounting is the reference
            ref = row["pld"] = epsilon_dp_accounting_pld(h, delta, PLD_RECORD_INTERVAL)
            row["rdp"] = None
        else:
            rdp = row["rdp"] = epsilon_dp_accounting_rdp(h, delta)
            ref = rdp
            if entry.accountant == "prv":
                ref = row["pld"] = epsilon_dp_accounting_pld(h, delta, PLD_DISCRETIZATION)
        row["reference"] = ref
        if rec is None or (math.isfinite(ref) and rec < ref * (1 - TOLERANCE)) or (
            not math.isfinite(ref) and rec != math.inf
        ):
            row["flag"] = "under-reported ε"
            flags.append(
                f"entry {i} (round {e.get('round')!r}, site {site!r}): recorded ε={rec!r} is below the "
                f"recomputed {'RDP' if row['rdp'] is not None and row['pld'] is None else 'PLD'} ε={ref:.6g} "
                f"({relation}, {event.mechanism.value}, "
                f"σ={spend.noise_multiplier:g}, q={spend.sample_rate:g}, {spend.steps} steps so far)"
            )

    sites: dict[str, SiteAudit] = {}
    for site in site_names:
        mine = [e for e in entries if isinstance(e, dict) and str(e.get("site")) == site]
        rows = [r for r in per_entry if r["site"] == site and r["reference"] is not None]
        h = history.get(site, [])
        last = mine[-1]
        relation = neighbouring_of(last)
        last_delta = last.get("delta")
        site_delta = float(last_delta) if _is_number(last_delta) and 0 < last_delta < 1 else None
        pld = epsilon_dp_accounting_pld(h, site_delta, PLD_RECORD_INTERVAL, neighbouring=relation) \
            if (h and site_delta) else 0.0
        if site in skellams:  # the Skellam bound is an RDP one; dp-accounting has no PLD of it
            rdp, pld = float(rows[-1]["rdp"] or 0.0) if rows else 0.0, math.nan
            notes.append(f"site {site}: {SKELLAM_MECHANISM} (secure aggregation with the sites' Skellam noise): ε "
                         "recomputed with fedshield's own Skellam RDP bound (privacy/skellam.py, Agarwal et al. "
                         "2021), not an independent library (dp-accounting has no Skellam mechanism)")
        elif relation == REPLACE_ONE:
            rdp = math.nan  # no RDP analysis of the subsampled Gaussian under replace-one
        elif rows and rows[-1]["rdp"] is not None:
            rdp = rows[-1]["rdp"]
        else:  # "pld" entries: RDP once per site, as a second, looser opinion
            rdp = epsilon_dp_accounting_rdp(h, site_delta) if (h and site_delta) else 0.0
        last_epsilon = last.get("epsilon")
        recorded = float(last_epsilon) if _is_number(last_epsilon) else math.nan
        last_reference = rows[-1]["reference"] if rows else None
        own = (SKELLAM_RDP if site in skellams else "pld" if relation == REPLACE_ONE
               else str(last.get("accountant")))
        opinions = {"pld": {"rdp": rdp}, "prv": {"rdp": rdp}, "rdp": {"pld": pld}}.get(own, {})
        # The verdict: the site's own accountant, the larger of recorded and recomputed (a
        # site none of whose entries could be recomputed, already flagged, is held to its word).
        spent = max((x for x in (recorded, last_reference) if _is_number(x) and not math.isnan(x)), default=0.0)
        at = f" (δ={site_delta:g}, {own})" if site_delta is not None else f" ({own})"
        budget = (budgets or {}).get(site)
        over_budget = False
        if budget is not None and spent > float(budget):
            over_budget = True
            flags.append(f"site {site}: ε={spent:.6g} is past its budget {float(budget):g}{at}")
        s = SiteAudit(
            site=site, entries=len(mine),
            runs=sorted({str(e.get("run_id")) for e in mine}),
            rounds=len({(e.get("run_id"), e.get("round")) for e in mine}),
            steps=sum(sp.steps for sp in h) + len(skellams.get(site, [])),
            noise_multipliers=sorted({float(sp.noise_multiplier) for sp in h}),
            sample_rates=sorted({float(sp.sample_rate) for sp in h}),
            max_grad_norms=sorted({e["max_grad_norm"] for e in mine if _is_number(e.get("max_grad_norm"))}),
            deltas=sorted({e["delta"] for e in mine if _is_number(e.get("delta"))}),
            accountants=sorted({str(e.get("accountant")) for e in mine}),
            mechanisms=sorted({p.mechanism.value for i, p in parsed.items() if p.provenance.site == site}),
            neighbouring=relation,
            recorded_epsilon=recorded, rdp_epsilon=rdp, pld_epsilon=pld,
            partial=site in verify.partial_sites,
            budget=None if budget is None else float(budget), over_budget=over_budget,
            key_fingerprint=str(last.get("key_fingerprint", "")),
            recomputed_epsilon=math.nan if last_reference is None else float(last_reference),
            verdict_accountant=own, verdict_epsilon=spent,
            opinions={k: float(v) for k, v in opinions.items() if _is_number(v) and not math.isnan(v)},
            parameters=_parameters([p for p in parsed.values() if p.provenance.site == site]),
        )
        if max_epsilon is not None and spent > max_epsilon:
            flags.append(f"site {site}: ε={spent:.6g}{at} is above --max-epsilon {max_epsilon:g}")
        if spent > WEAK_EPSILON:
            notes.append(f"warning: site {site}: ε={spent:.4g} ({own}) is above {WEAK_EPSILON:g}: a weak guarantee")
        if site in run_eps and _is_number(recorded) and run_eps[site] > recorded * (1 + TOLERANCE) + 1e-12:
            flags.append(
                f"site {site}: the run summary reports ε={run_eps[site]:.6g} but the ledger's last entry "
                f"says {recorded:.6g}: entries are missing at the end of the ledger"
            )
        sites[site] = s
    if budgets:
        for site in sorted(set(budgets) - set(sites)):
            notes.append(f"budget given for site {site}, which has no entries in this ledger")

    federation = run_dir / "privacy" / "federation-ledger.jsonl" if run_dir is not None else None
    if federation is not None and federation.is_file() and ledger_path != federation:
        notes.append(f"this run also has a site-level DP ledger (the coordinator's): audit it with "
                     f"`fedshield audit {federation}`")
    ok = not flags
    return AuditResult(
        ok=ok, ledger_path=ledger_path, run_dir=run_dir, verify=verify, sites=sites,
        entries=per_entry, flags=flags, notes=notes, key_source=key_source, key_note=key_note,
        budget_source=budget_source, torn_message=read.message if read.truncated_bytes else "",
        max_epsilon=max_epsilon,
    )


def _parameters(entries: list[LedgerEntry]) -> list[ParameterRow]:
    """A site's entries grouped by (mechanism, σ, q, C, δ, relation), steps summed, in first-seen order."""
    rows: dict[tuple[str, float, float, float, float, str], ParameterRow] = {}
    for p in entries:
        ev = p.event
        key = (ev.mechanism.value, float(ev.noise_multiplier), float(ev.sample_rate), float(ev.sensitivity),
               float(p.delta), ev.relation.value)
        row = rows.setdefault(key, {"mechanism": key[0], "noise_multiplier": key[1], "sample_rate": key[2],
                                    "clip": key[3], "steps": 0, "entries": 0, "delta": key[4],
                                    "neighbouring": key[5]})
        row["steps"] += int(ev.steps)
        row["entries"] += 1
    return list(rows.values())


def site_books_problem(state: Path) -> str:
    """'' if a site's own ledger (`<state>/ledger.jsonl`) is whole, from seq 0 to the head
    its signed head record names, and signed by its `site.pub`; else the first problem.
    An interrupted spend (`ledger.jsonl.pending`) counts, as at the site."""
    if not (state / "ledger.jsonl").is_file():
        raise FedShieldError(f"--site {state}: no ledger.jsonl (is it a site's state folder?)")
    key = signing.load_public_key(state / "site.pub")
    ledger = Ledger(state / "ledger.jsonl")
    entries = ledger.read().entries
    try:
        late = ledger.pending_entry(entries, key)
        if late is not None:
            entries.append(late)
        for site in sorted({str(e.get("site")) for e in entries}):
            ledger.check_own(site, key, entries)
    except LedgerError as exc:
        return str(exc)
    return ""


def audit_and_report(path: Path, ledger_keys_dir: Path | None = None, budgets: dict[str, float] | None = None,
                     max_epsilon: float | None = None, *, site_books: bool = False, report_dir: Path | None = None,
                     write_report: bool = True) -> AuditResult:
    """Everything `fedshield audit` does (`fedshield.audit` is this, typed): with
    `site_books`, `path` is a site's state folder whose books are checked whole first (a
    problem there is the result's first flag); then `audit`; then the Markdown and HTML
    report, in `report_dir` (default `<run_dir>/audit/`, else beside the ledger)."""
    books = site_books_problem(Path(path)) if site_books else ""
    result = audit(Path(path), ledger_keys_dir, budgets, max_epsilon)
    if books:
        result = replace(result, ok=False, flags=[f"site books: {books}", *result.flags])
    result = replace(result, books_checked=site_books)
    if write_report:
        from fedshield.privacy.report import write_report as write

        if report_dir is None:
            report_dir = (result.run_dir if result.run_dir is not None else result.ledger_path.parent) / "audit"
        md, html = write(result, Path(report_dir))
        result = replace(result, report_markdown=md, report_html=html)
    return result

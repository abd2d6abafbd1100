"""<run>/report.md and <run>/privacy/sites.json: what a run did and what it cost, for
the coordinator operator and the auditor, from typed inputs (server/settings.py) and the
run's own records (metrics rows, the round log's books, the federation ledger)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedshield._version import __version__
from fedshield.privacy.accountant import describe_recorded
from fedshield.privacy.events import Mechanism, mechanism_of
from fedshield.server.federation_books import LEDGER_FILE as FEDERATION_LEDGER
from fedshield.server.federation_books import flower_epsilon_no_amplification
from fedshield.server.settings import AccountingPolicy, CoordinatorSettings, RulePolicy


def summarize(run_dir: Path, accounting: AccountingPolicy, sites: Mapping[int, Mapping[str, Any]],
              epsilon: Mapping[str, float], declines: Mapping[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Each site's privacy outcome (privacy/sites.json, and the report's table): `sites` the
    sites of the run (node -> its "site" name and "n" records), `epsilon` and `declines` the
    run's books (RoundLog's), which also hold sites that did not rejoin a resumed run."""
    summary = {
        s["site"]: {
            "records": s["n"], "epsilon": epsilon[s["site"]], "delta": accounting.delta,
            "budget": accounting.budget if accounting.mode != "none" else None,
            "accountant": accounting.accountant, "privacy_unit": "record",
            # records: the count the site released (add-remove: its noisy count, in its ledger)
            "neighbouring": accounting.neighbouring if accounting.mode != "none" else None,
            "mechanism": "DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)"
            if accounting.mode != "none" else "none",
            "not_trained": declines.get(s["site"], []),
        }
        for s in sites.values()
    }
    for site in sorted(set(epsilon) - set(summary)):  # did not rejoin a resumed run: still in its books
        summary[site] = {**next(iter(summary.values())), "records": None, "epsilon": epsilon[site],
                         "not_trained": declines.get(site, [])}
    (run_dir / "privacy" / "sites.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


ACCOUNTANT_NAMES = {name: f"{name.upper()}: {describe_recorded(name)}" for name in ("pld", "rdp", "prv")}


def provenance_lines(run_dir: Path) -> list[str]:
    """What made the report: versions, the date (UTC) and the hash of the resolved config as
    written in the run directory (the run's own config.yaml, byte for byte)."""
    config = run_dir / "config.yaml"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "(no config.yaml)"
    try:
        flower = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        flower = "not installed"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return [f"fedshield {__version__}, Flower {flower}; report written {now}; config.yaml sha256 `{digest}`."]


def dp_sgd_parameters(run_dir: Path) -> dict[str, tuple[list[float], list[float], int]]:
    """Per site, from the run's ledger (privacy/ledger.jsonl): its DP-SGD σ and q values
    (distinct, sorted) and its DP-SGD steps in that ledger."""
    path = run_dir / "privacy" / "ledger.jsonl"
    out: dict[str, tuple[list[float], list[float], int]] = {}
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:  # a torn last line: `fedshield audit` reports it; the report shows the rest
            continue
        if not isinstance(e, dict) or mechanism_of(e) != Mechanism.DP_SGD.value:
            continue
        sigmas, rates, steps = out.setdefault(str(e.get("site")), ([], [], 0))
        sigmas.append(float(e["noise_multiplier"]))
        rates.append(float(e["sample_rate"]))
        out[str(e.get("site"))] = (sigmas, rates, steps + int(e["steps"]))
    return {site: (sorted(set(a)), sorted(set(b)), t) for site, (a, b, t) in out.items()}


def _values(xs: list[float]) -> str:
    return ", ".join(f"{x:.6g}" for x in xs) or "-"


def _site_accuracy_lines(last: Mapping[str, Any]) -> list[str]:
    """Each site's accuracy on its own held-out rows, where the test split knows them."""
    per_site = last.get("per_site_accuracy")
    if not per_site:
        return []
    each = ", ".join(f"{site} {acc:.4f}" for site, acc in sorted(per_site.items()))
    return [f"Per site (its own held-out rows): {each}; mean **{last['mean_site_accuracy']:.4f}**.", ""]


def write_report(run_dir: Path, settings: CoordinatorSettings, rows: list[dict[str, Any]],
                 summary: Mapping[str, Mapping[str, Any]], centered: bool = False,
                 refused: list[str] | None = None, batch_norms: int = 0) -> None:
    """<run>/report.md: the run's outcome, its privacy guarantees, its defences, its rounds.
    `rows`: metrics.jsonl's rows; `summary`: `summarize`'s; `centered`: feature centering ran;
    `batch_norms`: BatchNorm layers the model had and trained as GroupNorms (task=image)."""
    last = rows[-1] if rows else {}
    generation = "perplexity" in last  # text-generation (task.causal_lm): perplexity, not accuracy
    p = settings.accounting
    lines = [
        f"# fedshield run {run_dir.name}", "",
        f"Task `{settings.task}`, {len(summary)} sites, {settings.rounds} rounds, "
        f"strategy `{settings.rule.strategy}`, partition `{settings.partition}`, seed {settings.seed}.",
        "",
        (f"Final central perplexity **{last['perplexity']:.4f}** (mean token loss {last['loss']:.4f} nats; round 0: "
         f"{rows[0]['perplexity']:.4f}) on the held-out documents; one record = one document, truncated."
         if generation else
         f"Final central accuracy **{last.get('accuracy', float('nan')):.4f}**, macro-F1 "
         f"**{last.get('macro_f1', float('nan')):.4f}** on the held-out test split."), "",
        *_site_accuracy_lines(last),
        *([f"Model: {batch_norms} BatchNorm layers were replaced by GroupNorm before training (Opacus needs "
           "per-sample gradients, which BatchNorm mixes across a batch; their running statistics are not kept).",
           ""] if batch_norms else []),
        *provenance_lines(run_dir), "",
        "## Privacy", "",
    ]
    if p.mode == "none":
        lines += ["No record-level differential privacy: sites trained without DP; nothing was accounted in "
                  "their ledgers.", ""]
    else:
        lines += [
            "- Privacy unit: one record of a site (sample-level DP, per site).",
            (f"- Neighbouring relation: add-remove (one record added or removed). Each site's record count "
             f"is protected: released once per dataset with Gaussian noise (noise multiplier "
             f"{p.count_noise_multiplier:g}, sensitivity 1), in its ledger as round 0 (`release: record-count`); "
             "the records column below is that noisy count, and every count-dependent figure comes from it."
             if p.neighbouring == "add-remove" else
             "- Neighbouring relation: replace-one (one record replaced by another); the record counts below "
             "are exact and public, and ε is accounted under replace-one (dp-accounting PLD)."),
            "- Mechanism: DP-SGD (Opacus): Poisson sampling at rate q per step, per-sample "
            f"clipping to {p.max_grad_norm}, Gaussian noise.",
            *([f"- Feature centering: before round 1 each site released the sum of its [CLS] features, "
               f"each clipped, plus Gaussian noise (noise multiplier {p.center_noise_multiplier:g}): one "
               "full-batch step of the same mechanism, in its ledger as round 0 (`release: feature-mean`)."]
              if centered else []),
            f"- Accountant: {p.accountant.upper()}: {describe_recorded(p.accountant, p.neighbouring)}, composed "
            "over every spend in "
            f"each site's ledger; δ = {p.delta:g}. Recompute with `fedshield audit {run_dir}`.", "",
            f"| site | records{' (noisy)' if p.neighbouring == 'add-remove' else ''} | σ (DP-SGD noise multiplier) | "
            "q (sample rate) | DP-SGD steps | ε | budget | rounds not trained |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        spent = dp_sgd_parameters(run_dir)
        for name, s in sorted(summary.items()):
            why = "; ".join(s["not_trained"]).replace("|", "\\|")  # a site's words: no forged table cell
            sigmas, rates, steps = spent.get(name, ([], [], 0))
            lines.append(f"| {name} | {'-' if s['records'] is None else s['records']} | {_values(sigmas)} | "
                         f"{_values(rates)} | {steps} | {s['epsilon']:.4f} | {s['budget']} | {why or '-'} |")
    if (site := settings.site_level) is not None:
        fed = [json.loads(x) for x in (run_dir / "privacy" / FEDERATION_LEDGER).read_text().splitlines() if x]
        last_fed = fed[-1] if fed else {}
        secure = settings.secagg is not None
        accounting = ("the Skellam RDP bound, fedshield's own accountant" if secure
                      else ACCOUNTANT_NAMES.get(p.accountant, p.accountant))
        q, planned = settings.sites.fraction_train, settings.sites.expected
        lines += [
            "", "### Site-level DP (DP-FedAvg, McMahan et al. 2018)", "",
            "- Privacy unit: one whole site (user-level DP): the released global models are (ε, δ)-DP with "
            + ("respect to replacing any one site's update (all its records) by another; the coordinator knows "
               "who took part, so participation is not hidden." if secure else
               "respect to adding or removing any one site with all its records."),
            (f"- Mechanism: each round each site is asked with probability q = {q:g}; "
             f"each site clips its own update to S = {site.clip_norm:g}, quantizes it and adds its share of "
             "integer Skellam noise (Agarwal et al. 2021) before SecAgg+ masks it, so the coordinator sees only "
             "the noisy sum (never a noise-free one); each round's entry records the noise the survivors really "
             "put in the sum. Accounted by the Skellam RDP bound composed over rounds without amplification by "
             f"sampling; the sum divided by q x {planned} (fixed)." if secure else
             f"- Mechanism: each round each site is asked with probability q = {q:g} "
            f"(Poisson sampling); each usable update clipped to S = {site.clip_norm:g}; Gaussian noise of "
            f"z = {last_fed.get('noise_multiplier', float('nan')):.4g} x S on the sum; the sum divided by "
            f"q x {planned} (fixed). Added by the coordinator: the guarantee holds against "
            "everyone who sees the models, not against the coordinator (no secure aggregation)."),
            f"- ε = **{float(last_fed.get('epsilon', 0.0)):.4f}** at δ = {site.delta:g} after {len(fed)} "
            f"round(s) ({accounting}), in the coordinator's signed "
            f"ledger: `fedshield audit {run_dir / 'privacy' / FEDERATION_LEDGER}`.",
            "- Both guarantees hold together: record-level at each site (above, against the coordinator too), "
            "site-level for the federation's models.",
        ]
        if fed and not secure:  # what the same noise and rounds are worth without amplification by sampling
            plain = flower_epsilon_no_amplification(fed)
            lines.append(f"- Without amplification by sampling, Flower's own server-side accountant (its RDP "
                         f"accountant with SamplingMethod.NO_AMPLIFICATION, what its fixed-clipping DP wrappers "
                         f"use) states ε = {plain:.4f} for the same noise and rounds.")
    lines += defence_lines(settings.rule, rows, sorted(summary))
    if refused:  # at discovery: a bad name, a name already taken, a broken or declined hello
        lines += ["", "## Sites not admitted", "", *(f"- {why}" for why in refused)]
    lines += ["", "## Rounds", "",
              f"| round | {'perplexity | loss' if generation else 'accuracy | macro-F1'} | ε max | trained | "
              "declined | dropped | clipped | left out | note |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = f"nothing aggregated: {r['skipped']}" if r.get("skipped") else (
            "trained nothing: no sampled site's update was usable" if r.get("empty") else "")
        if r.get("late_sites"):  # replies to earlier rounds: their spends recorded, their updates not used
            late = ", ".join(f"{site} (round {n})" for site, n in sorted(r["late_sites"].items()))
            note = f"{note}; " if note else ""
            note += f"late replies, spends recorded: {late}"
        if r.get("secagg_dropped"):  # secure aggregation: who dropped out, at which stage
            gone = "; ".join(f"{site} at {stage.split(':')[0]}" for site, stage in sorted(r["secagg_dropped"].items()))
            note = f"{note}; " if note else ""
            note += f"{len(r['secagg_dropped'])} dropped out of secure aggregation ({gone})"
        quality = (f"{r['perplexity']:.4f} | {r['loss']:.4f}" if generation
                   else f"{r['accuracy']:.4f} | {r['macro_f1']:.4f}")
        lines.append(f"| {r['round']} | {quality} | {r['epsilon_max']:.3f} | "
                     f"{r['trained']} | {r['declined']} | {r['rejected'] + r['failed']} | {r.get('clipped', 0)} | "
                     f"{len(r.get('left_out_sites', []))} | {note} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def defence_lines(f: RulePolicy, rows: list[dict[str, Any]], sites: list[str]) -> list[str]:
    """The report's poisoning-defence section: the rule and the bound, then per site what
    became of its updates over the run (from the metrics rows, so a resumed run's too)."""
    rule = f"`{f.strategy}`" + (f", withstanding federation.num_malicious={f.num_malicious} poisoned update(s) "
                                "per round" if f.robust else " (no robust rule)")
    if f.strategy == "fedtrimmedavg":
        rule += f", trimming federation.trim_fraction={f.trim_fraction:g} per tail"
    bound = (f"update norm bound {f.update_norm_bound:g} (L2 norm of update - the round's global weights), "
             f"action `{f.update_norm_action}`" if f.update_norm_bound is not None else "no update norm bound")
    lines = ["", "## Poisoning defences", "",
             f"Aggregation {rule}; {bound}. Every reply is parsed strictly and must carry the record count its "
             "site declared at discovery and ledger entries that verify.", "",
             "| site | updates aggregated | clipped | left out by the rule | rejected | failed | declined | "
             "largest update norm | why rejected |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rounds = [r for r in rows if r["round"] > 0]
    for site in sites:
        norms = [r.get("update_norms", {})[site] for r in rounds if site in r.get("update_norms", {})]
        reasons: dict[str, tuple[str, list[int]]] = {}  # reason with its figures masked -> (first, rounds)
        for r in rounds:
            if site in r.get("rejected_reasons", {}):
                reason = r["rejected_reasons"][site]
                reasons.setdefault(re.sub(r"\d[\d.e+-]*", "#", reason), (reason, []))[1].append(r["round"])
        used = sum(site in r.get("update_norms", {}) and site not in r.get("rejected_reasons", {})
                   and site not in r.get("left_out_sites", []) and not r.get("skipped") for r in rounds)
        why = "; ".join(f"{reason} (round{'s' if len(rs) > 1 else ''} {_rounds(rs)})"
                        for reason, rs in reasons.values()).replace("|", "\\|")  # a site's key names are text
        lines.append(
            f"| {site} | {used} | {sum(site in r.get('clipped_sites', []) for r in rounds)} | "
            f"{sum(site in r.get('left_out_sites', []) for r in rounds)} | "
            f"{sum(len(rs) for _, rs in reasons.values())} | "
            f"{sum(site in r.get('failed_sites', []) for r in rounds)} | "
            f"{sum(site in r.get('declined_sites', []) for r in rounds)} | "
            f"{f'{max(norms):.4g}' if norms else '-'} | {why or '-'} |")
    skipped = [r["round"] for r in rounds if r.get("skipped")]
    if skipped:
        lines += ["", f"Rounds that aggregated nothing (the global model was kept): {_rounds(skipped)}."]
    return lines


def _rounds(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)

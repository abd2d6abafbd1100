"""The audit report: Markdown and self-contained HTML (plots embedded as base64 PNG).

It states what an auditor needs (Ponomareva et al. 2023, "How to DP-fy ML", sec. 5.3):
privacy unit, mechanism, accountant (recorded, and the independent recomputation), the
sampling assumption, δ, clipping norm, noise multiplier, steps, rounds, ε per site by RDP
and by PLD, and the verification outcome.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable
from pathlib import Path

from fedshield.privacy.audit import AuditResult

MAX_PLOTTED_SITES = 20


def _f(x: object, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _list(xs: Iterable[object]) -> str:
    return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs) or "-"


def _plot(result: AuditResult) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(result.sites)[:MAX_PLOTTED_SITES]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for k, site in enumerate(names):
        rows = [r for r in result.entries if r["site"] == site and r["rdp"] is not None]
        xs = list(range(1, len(rows) + 1))
        color = f"C{k % 10}"
        rec = [r["recorded"] if isinstance(r["recorded"], (int, float)) else math.nan for r in rows]
        ax.plot(xs, rec, "-o", color=color, ms=3, label=f"{site} recorded")
        rdp = [r["rdp"] for r in rows if r["rdp"] is not None]
        ax.plot(xs, rdp, ":", color=color, label=f"{site} recomputed (RDP)")
        b = result.sites[site].budget
        if b is not None:
            ax.axhline(b, color=color, ls="--", lw=1, label=f"{site} budget {b:g}")
    ax.set_xlabel("spend (ledger entry of the site, in order: rounds over runs)")
    ax.set_ylabel("cumulative ε")
    ax.set_title("ε per site over its spends")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2 if len(names) > 4 else 1)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _sections(result: AuditResult) -> tuple[list[tuple[str, list[str]]], list[str], list[list[str]]]:
    v = result.verify
    status = "PASSED" if result.ok else "FAILED"
    verification = [
        f"Outcome: **{status}**.",
        f"Ledger: `{result.ledger_path}` ({v.checked.get('entries', 0)} entries, {v.checked.get('sites', 0)} sites).",
        f"Hash chain: {v.checked.get('hashes', 0)} hashes recomputed, {v.checked.get('links', 0)} links checked "
        "(one chain per site: each entry's prev_hash is its site's previous entry's hash).",
        (f"Signatures: {v.checked.get('signatures', 0)} of {v.checked.get('entries', 0)} verified "
         "(ECDSA P-256, SHA-256)."
         if v.signatures_checked else "Signatures: **not checked** (no site public keys)."),
        f"Keys: {result.key_note}.",
        f"Budgets: {result.budget_source}.",
    ]
    if result.flags:
        verification.append(f"First problem: {result.flags[0]}")
        verification += [f"Problem: {f}" for f in result.flags[1:]]
    verification += [f"Note: {n}" for n in result.notes]

    deltas = sorted({d for s in result.sites.values() for d in s.deltas})
    accountants = sorted({a for s in result.sites.values() for a in s.accountants})
    relations = sorted({s.neighbouring for s in result.sites.values()})
    model = [
        "Privacy unit: one record (one training example) of a site: sample-level DP, stated per site. "
        "Each site's guarantee covers that site's own records only.",
        "Mechanism: dp-sgd-poisson-gaussian entries are DP-SGD (Opacus): per-sample gradient clipping to the "
        "clipping norm C, Gaussian noise with standard deviation σ·C added to the sum of clipped gradients, every "
        "step. gaussian-feature-sum entries (release=feature-mean, round 0) are the feature-centering release: "
        "the sum of the site's features, each clipped to C, plus Gaussian noise σ·C; gaussian-count entries "
        "(release=record-count) are the record count plus Gaussian noise σ (sensitivity 1): both the Gaussian "
        "mechanism, accounted as one step at q = 1 in the same composition (ledgers of version 1 label them "
        "dp-sgd-poisson-gaussian; they are read by their release field).",
        "Sampling assumption: Poisson sampling: each step includes each record independently with "
        "probability q (the sample rate); the analysis is the Poisson-subsampled Gaussian mechanism under "
        f"the neighbouring relation each site's entries state: {_list(relations)}. add-remove: one record "
        "added or removed; the site's record count is protected (released once, with Gaussian noise, as the "
        "release=record-count entry; q, steps, σ and the FedAvg weight are computed from that noisy count). "
        "replace-one: one record replaced by another; the record count is public.",
        f"δ: {_list(deltas)}.",
        f"Accountant recorded by the sites: {', '.join(a.upper() for a in accountants)} (Opacus; fedshield records "
        "the larger of Opacus and dp-accounting), composed over every spend in the site's ledger, never reset per "
        "round.",
        "Recomputation (independent of the recorded ε): Google dp-accounting, RDP accountant over Opacus' "
        "orders, and PLD accountant (pessimistic discretisation, interval 1e-4), composing "
        "PoissonSampledDpEvent(q, GaussianDpEvent(σ)) self-composed over the recorded steps.",
        "Check: an entry is flagged if its recorded ε is below the recomputed ε of its accountant (RDP, or "
        "PLD for PRV) by more than 1e-6 relative; a site is flagged if its ε is past its budget.",
    ]
    header = ["site", "entries", "runs", "rounds", "steps", "mechanisms", "σ", "q", "C (clip)", "δ", "accountant",
              "ε recorded", "ε RDP (recomputed)", "ε PLD (recomputed)", "budget", "status"]
    rows = []
    for name, s in sorted(result.sites.items()):
        status_s = "over budget" if s.over_budget else "ok"
        if any(r["flag"] for r in result.entries if r["site"] == name):
            status_s = "under-reported ε"
        if s.partial:
            status_s += " (partial history)"
        rows.append([name, str(s.entries), str(len(s.runs)), str(s.rounds), str(s.steps), ", ".join(s.mechanisms),
                     _list(s.noise_multipliers), _list(s.sample_rates), _list(s.max_grad_norms),
                     _list(s.deltas), ", ".join(s.accountants), _f(s.recorded_epsilon), _f(s.rdp_epsilon),
                     _f(s.pld_epsilon), _f(s.budget) if s.budget is not None else "-", status_s])
    return [("Verification", verification), ("Privacy model", model)], header, rows


def write_report(result: AuditResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, header, rows = _sections(result)
    png = _plot(result)
    title = f"fedshield privacy audit: {'PASSED' if result.ok else 'FAILED'}"

    md = [f"# {title}", ""]
    for name, lines in sections:
        md += [f"## {name}", ""] + [f"- {line}" for line in lines] + [""]
    md += ["## ε per site", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Entries", "",
           "| # | site | run | round | mechanism | accountant | ε recorded | ε RDP | ε PLD | flag |",
           "|---:|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in result.entries:
        md.append(f"| {r['index']} | {r['site']} | {r['run_id']} | {r['round']} | {r['mechanism'] or '-'} | "
                  f"{r['accountant']} | "
                  f"{_f(r['recorded'], 6)} | {_f(r['rdp'], 6)} | {_f(r['pld'], 6)} | {r['flag'] or '-'} |")
    if png:
        (out_dir / "epsilon.png").write_bytes(png)
        md += ["", "## ε over spends", "", "![ε per site](epsilon.png)"]
    md_path = out_dir / "audit.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;"
         "font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px}.bad{color:#a00}.ok{color:#070}</style>",
         "</head><body>", f"<h1 class='{'ok' if result.ok else 'bad'}'>{e(title)}</h1>"]
    for name, lines in sections:
        h.append(f"<h2>{e(name)}</h2><ul>")
        h += [f"<li>{e(line).replace('**', '')}</li>" for line in lines]
        h.append("</ul>")
    h.append("<h2>ε per site</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in header) + "</tr>")
    h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    h.append("</table>")
    if png:
        h.append("<h2>ε over spends</h2><img alt='epsilon per site' src='data:image/png;base64,"
                 + base64.b64encode(png).decode("ascii") + "'>")
    h.append("<h2>Entries</h2><table><tr><th>#</th><th>site</th><th>run</th><th>round</th><th>mechanism</th><th>accountant</th>"
             "<th>ε recorded</th><th>ε RDP</th><th>ε PLD</th><th>flag</th></tr>")
    for r in result.entries:
        h.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            r["index"], r["site"], r["run_id"], r["round"], r["mechanism"] or "-", r["accountant"],
            _f(r["recorded"], 6),
            _f(r["rdp"], 6), _f(r["pld"], 6), r["flag"] or "-")) + "</tr>")
    h.append("</table></body></html>")
    html_path = out_dir / "audit.html"
    html_path.write_text("\n".join(h) + "\n", encoding="utf-8")
    return md_path, html_path

"""The audit report: Markdown and self-contained HTML (plots embedded as base64 PNG).

It states what an auditor needs (Ponomareva et al. 2023, "How to DP-fy ML", sec. 5.3):
privacy unit, mechanism, accountant (recorded, and the independent recomputation), the
sampling assumption, δ, and per site and mechanism the clipping norm, noise multiplier,
sample rate and steps in labelled columns; ε per site as recorded, as recomputed with the
ledger's own accountant (the verdict) and by the other accountant (an opinion); the
verification outcome. The accountants are described from the constants the code uses
(privacy.accountant `describe_recorded`, privacy.audit `describe_recomputation`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedshield.privacy.accountant import describe_recorded
from fedshield.privacy.audit import TOLERANCE, AuditResult, describe_recomputation
from fedshield.privacy.errors import FedShieldError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def _curves(result: AuditResult, sites: Iterable[str], *, recorded: bool) -> dict[str, list[tuple[float, float]]]:
    """Per site, (its spend number, ε after it): the recorded ε, or the recomputation with
    the entry's own accountant; a value that is not a number is NaN (left out of the plot)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for site in sites:
        rows = [r for r in result.entries if r["site"] == site]
        values = [r["recorded"] if recorded else r["reference"] for r in rows]
        out[site] = [(float(k), float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
                     for k, v in enumerate(values, start=1)]
    return out


def epsilon_figure(result: AuditResult) -> Figure | None:
    """The ε plot, for every accountant: each site's cumulative ε after each spend as
    recomputed with its own accountant (across sites: min-max band and median), the
    recorded median beside it, a flagged site's recorded ε on its own, the budgets and
    --max-epsilon as horizontal lines. None: no site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedshield.privacy.epsilon_plot import draw_epsilon

    names = sorted(result.sites)
    if not names:
        return None
    accountants = sorted({s.verdict_accountant for s in result.sites.values()})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    budgets = [s.budget for s in result.sites.values() if s.budget is not None]
    draw_epsilon(ax, _curves(result, names, recorded=False), what=f"recomputed ε ({', '.join(accountants)})",
                 budgets=budgets, limit=result.max_epsilon)
    recorded = _curves(result, names, recorded=True)
    if len(names) > 1:  # one site: its recorded ε is the recomputation's line (or flagged, below)
        draw_epsilon(ax, recorded, what="recorded ε", color="C1", markers_only=True)
    flagged = sorted({r["site"] for r in result.entries if r["flag"]})
    for k, site in enumerate(flagged[:MAX_PLOTTED_SITES]):
        ax.plot([x for x, _ in recorded[site]], [y for _, y in recorded[site]], "x--", color=f"C{(k + 3) % 10}",
                ms=5, label=f"{site}: recorded ε (flagged)")
    ax.set_xlabel("spend of the site (its ledger entries in order: rounds over runs)")
    ax.set_ylabel("cumulative ε")
    ax.set_title("ε per site after each spend")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")  # cumulative ε rises to the right: the lower right is empty
    fig.tight_layout()
    return fig


def _plot(result: AuditResult) -> bytes | None:
    import matplotlib.pyplot as plt

    fig = epsilon_figure(result)
    if fig is None:
        return None
    buf = io.BytesIO()
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
    relations = sorted({s.neighbouring for s in result.sites.values()})
    recorded = sorted({(a, s.neighbouring) for s in result.sites.values() for a in s.accountants})
    verdicts = sorted({(s.verdict_accountant, s.neighbouring) for s in result.sites.values()})
    model = [
        "Privacy unit: one record (one training example) of a site: sample-level DP, stated per site. "
        "Each site's guarantee covers that site's own records only.",
        "Mechanism: dp-sgd-poisson-gaussian entries are DP-SGD (Opacus): per-sample gradient clipping to the "
        "clipping norm C, Gaussian noise with standard deviation σ·C added to the sum of clipped gradients, every "
        "step. gaussian-feature-sum entries (release=feature-mean, round 0) are the feature-centering release: "
        "the sum of the site's features, each clipped to C, plus Gaussian noise σ·C; gaussian-count entries "
        "(release=record-count) are the record count plus Gaussian noise σ (sensitivity 1): both the Gaussian "
        "mechanism, accounted as one step at q = 1 in the same composition (ledgers of version 1 label them "
        "dp-sgd-poisson-gaussian; they are read by their release field). The table \"Mechanisms per site\" "
        "lists each one's σ, q, C and steps.",
        "Sampling assumption: Poisson sampling: each step includes each record independently with "
        "probability q (the sample rate); the analysis is the Poisson-subsampled Gaussian mechanism under "
        f"the neighbouring relation each site's entries state: {_list(relations)}. add-remove: one record "
        "added or removed; the site's record count is protected (released once, with Gaussian noise, as the "
        "release=record-count entry; q, steps, σ and the FedAvg weight are computed from that noisy count). "
        "replace-one: one record replaced by another; the record count is public.",
        f"δ: {_list(deltas)}.",
        *(f"Accountant recorded by the sites, {acc} ({rel}): {_recorded(acc, rel)}; composed over every spend in "
          "the site's ledger, never reset per round." for acc, rel in recorded),
        *(f"Recomputation for {acc} ({rel}), independent of the recorded ε: {describe_recomputation(acc, rel)}, "
          "composing PoissonSampledDpEvent(q, GaussianDpEvent(σ)) self-composed over the recorded steps."
          for acc, rel in verdicts),
        f"Check: an entry is flagged if its recorded ε is below the recomputation of its own accountant by more "
        f"than {TOLERANCE:g} relative.",
        "Verdict: each site's ε, held to its budget and to --max-epsilon"
        + (f" ({result.max_epsilon:g})" if result.max_epsilon is not None else "")
        + ", is the larger of its recorded ε and the recomputation with the ledger's own accountant (the one "
        "the site recorded). The other accountant's recomputation is shown beside it as an opinion and never "
        "judged: RDP's conversion to (ε, δ) is looser than PLD's.",
    ]
    header = ["site", "entries", "runs", "rounds", "steps", "relation (neighbouring)", "δ", "accountant",
              "ε recorded", "ε recomputed (own accountant)", "ε verdict", "opinions (not judged)", "budget", "status"]
    rows = []
    for name, s in sorted(result.sites.items()):
        status_s = "over budget" if s.over_budget else "ok"
        if result.max_epsilon is not None and s.verdict_epsilon > result.max_epsilon:
            status_s = f"above --max-epsilon {result.max_epsilon:g}"
        if any(r["flag"] for r in result.entries if r["site"] == name):
            status_s = "under-reported ε"
        if s.partial:
            status_s += " (partial history)"
        rows.append([name, str(s.entries), str(len(s.runs)), str(s.rounds), str(s.steps), s.neighbouring,
                     _list(s.deltas), s.verdict_accountant or ", ".join(s.accountants), _f(s.recorded_epsilon),
                     _f(s.recomputed_epsilon), _f(s.verdict_epsilon), opinions(s.opinions),
                     _f(s.budget) if s.budget is not None else "-", status_s])
    return [("Verification", verification), ("Privacy model", model)], header, rows


def opinions(values: Mapping[str, float]) -> str:
    """{"rdp": 8.718} -> "rdp (opinion): 8.7183"."""
    return "; ".join(f"{k} (opinion): {_f(v)}" for k, v in sorted(values.items())) or "-"


def _recorded(accountant: str, relation: str) -> str:
    try:
        return describe_recorded(accountant, relation)
    except FedShieldError:  # the federation's own chains name theirs; an unknown name is shown as it is
        return f"{accountant!r}, as the entries name it"


PARAMETER_HEADER = ["site", "mechanism", "σ (noise multiplier)", "q (sample rate)", "clip C", "steps", "entries",
                    "δ", "relation (neighbouring)"]
ENTRY_HEADER = ["#", "site", "run", "round", "mechanism", "σ", "q", "clip C", "steps", "accountant", "ε recorded",
                "ε recomputed", "flag"]


def parameter_rows(result: AuditResult) -> list[list[str]]:
    """Per site, each distinct (mechanism, σ, q, C, δ, relation) with its steps: labelled, not a bare list."""
    return [[name, p["mechanism"], f"{p['noise_multiplier']:g}", f"{p['sample_rate']:g}", f"{p['clip']:g}",
             str(p["steps"]), str(p["entries"]), f"{p['delta']:g}", p["neighbouring"]]
            for name, s in sorted(result.sites.items()) for p in s.parameters]


def _entry_rows(result: AuditResult) -> list[list[str]]:
    def g(x: object) -> str:
        return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

    return [[str(r["index"]), r["site"], str(r["run_id"]), str(r["round"]), r["mechanism"] or "-",
             g(r["noise_multiplier"]), g(r["sample_rate"]), g(r["clip"]), g(r["steps"]), str(r["accountant"]),
             _f(r["recorded"], 6), _f(r["reference"], 6), r["flag"] or "-"] for r in result.entries]


def write_report(result: AuditResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, header, rows = _sections(result)
    tables = [("ε per site", header, rows), ("Mechanisms per site", PARAMETER_HEADER, parameter_rows(result))]
    entries = ("Entries", ENTRY_HEADER, _entry_rows(result))
    png = _plot(result)
    title = f"fedshield privacy audit: {'PASSED' if result.ok else 'FAILED'}"

    def md_table(name: str, head: list[str], body: list[list[str]]) -> list[str]:
        def cell(c: str) -> str:
            return c.replace("|", "\\|")  # a site's name or a flag's words: no forged table cell

        return [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(cell(c) for c in r) + " |" for r in body), ""]

    md = [f"# {title}", ""]
    for name, lines in sections:
        md += [f"## {name}", ""] + [f"- {line}" for line in lines] + [""]
    for table in (*tables, entries):
        md += md_table(*table)
    if png:
        (out_dir / "epsilon.png").write_bytes(png)
        md += ["## ε over spends", "", "![ε per site](epsilon.png)"]
    md_path = out_dir / "audit.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    e = html.escape

    def html_table(name: str, head: list[str], body: list[list[str]]) -> list[str]:
        return [f"<h2>{e(name)}</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>",
                *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body), "</table>"]

    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;"
         "font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px}.bad{color:#a00}.ok{color:#070}</style>",
         "</head><body>", f"<h1 class='{'ok' if result.ok else 'bad'}'>{e(title)}</h1>"]
    for name, lines in sections:
        h.append(f"<h2>{e(name)}</h2><ul>")
        h += [f"<li>{e(line).replace('**', '')}</li>" for line in lines]
        h.append("</ul>")
    for table in tables:
        h += html_table(*table)
    if png:
        h.append("<h2>ε over spends</h2><img alt='epsilon per site' src='data:image/png;base64,"
                 + base64.b64encode(png).decode("ascii") + "'>")
    h += html_table(*entries)
    h.append("</body></html>")
    html_path = out_dir / "audit.html"
    html_path.write_text("\n".join(h) + "\n", encoding="utf-8")
    return md_path, html_path

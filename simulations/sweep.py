"""`fedshield sweep`: one simulation per value, a privacy-utility table and plot.

    fedshield sweep privacy.target_epsilon=0.5,1,2,4,8,inf federation.seed=1,2,3 federation.rounds=5
    fedshield sweep preset=cross-device privacy.site_target_epsilon=1,4,8,inf

Any override with comma-separated values is an axis; the grid is their product. ε = inf
means no DP (`privacy.mode=none`), the non-private reference. Every run is a normal run
directory inside the sweep's folder; `results.csv`, `results.md` and
`accuracy_vs_epsilon.png` summarize them (mean and spread over seeds).

Site-level DP (`privacy.unit=site`): `privacy.site_target_epsilon=inf` means no site-level
DP (`privacy.unit=record`), the reference. For every run with site-level DP the table
carries what the coordinator's signed ledger (`privacy/federation-ledger.jsonl` of the run
directory) records: the site-level ε after the last round, δ, the noise multiplier z, the
rounds accounted and the sampling rate q; and the ε that Flower's own server-side
accountant states for the same releases. Flower 1.41's fixed-clipping DP wrappers accept
only `SamplingMethod.NO_AMPLIFICATION` (flwr/serverapp/strategy/dp_fixed_clipping.py),
so its `RdpAccountant` (flwr.supercore.privacy_accounting) composes each round as the
Gaussian mechanism on every site: the figure a Flower user would be told for the same
noise and rounds. The gap is what Poisson sampling of sites, and its accounting, buys.
Neither is recomputed from the config: both come from the ledger's entries.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.server.run_dir import read_jsonl
from fedshield.simulations.simulate import run_simulation

INF = ("inf", "infinity")
# The site-level columns of results.csv (present when some point ran with privacy.unit=site).
SITE_COLUMNS = ["site_epsilon", "flower_epsilon_no_amplification", "site_delta", "site_noise_multiplier",
                "site_rounds", "site_sample_rate"]


def split_axes(overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        if "," in value and not value.strip().startswith("["):
            axes[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            fixed.append(item)
    return axes, fixed


def point_overrides(point: dict[str, str]) -> list[str]:
    out = []
    for key, value in point.items():
        if key == "privacy.target_epsilon" and value.lower() in INF:
            out.append("privacy=none")
        elif key == "privacy.site_target_epsilon" and value.lower() in INF:
            out.append("privacy.unit=record")  # no site-level DP: the reference
        else:
            out.append(f"{key}={value}")
    return out


def site_level_columns(run_dir: Path) -> dict[str, Any]:
    """The site-level columns of a run, from its federation ledger ({} without one)."""
    # Imported here: it brings Flower's accountant, and a sweep's config is checked first.
    from fedshield.server.federation_books import LEDGER_FILE as FEDERATION_LEDGER
    from fedshield.server.federation_books import flower_epsilon_no_amplification

    path = run_dir / "privacy" / FEDERATION_LEDGER
    if not path.is_file():
        return {}
    entries = read_jsonl(path)
    if not entries:
        return {}

    try:
        flower: float | str = flower_epsilon_no_amplification(entries)
    except ValueError as exc:  # e.g. secure aggregation's Skellam noise: Flower has no figure for it
        print(f"sweep: {run_dir.name}: no Flower ε: {exc}", flush=True)
        flower = ""
    # One run's entries share δ, z and q (server/federation_books.py); were they ever to differ,
    # the table shows the one that costs the most: the largest δ and q, the smallest z.
    return {
        "site_epsilon": float(entries[-1]["epsilon"]),  # the ledger's composed ε after its last entry
        "flower_epsilon_no_amplification": flower,
        "site_delta": max(float(e["delta"]) for e in entries),
        "site_noise_multiplier": min(float(e["noise_multiplier"]) for e in entries),
        "site_rounds": len(entries),  # releases accounted (a round redone after a crash counts twice)
        "site_sample_rate": max(float(e["sample_rate"]) for e in entries),
    }


SWEEP_EXAMPLES = """examples:
  fedshield sweep privacy.target_epsilon=1,2,4,8
  fedshield sweep privacy.target_epsilon=0.5,1,2,4,8,inf federation.seed=1,2,3 federation.rounds=5
  fedshield sweep preset=cross-device privacy.site_target_epsilon=1,4,8,inf

KEY=a,b,c (comma-separated values) makes KEY an axis: one simulation per value, and the
grid is the product of all axes. ε=inf is the non-private reference (privacy.mode=none).
Results: <out>/results.csv, results.md, accuracy_vs_epsilon.png.
"""


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedshield sweep", description=__doc__.split("\n\n")[0],
                                     epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default: <output.dir>/sweep-<time>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides; KEY=a,b,c is an axis (one run per value)")
    args = parser.parse_args(argv)
    axes, fixed = split_axes(args.overrides)
    if not axes:
        raise conf.ConfigError("sweep: give at least one key with comma-separated values, "
                               "e.g. privacy.target_epsilon=1,4,8,inf")
    base = Config.load(fixed)
    out = Path(args.out or Path(base.output.dir) / time.strftime("sweep-%Y%m%d-%H%M%S")).resolve()
    points = [dict(zip(axes, values, strict=False)) for values in itertools.product(*axes.values())]
    configs = []
    for point in points:  # validate every point before the first simulation starts
        # One folder name per point (output.run_name allows letters, digits, "-", "_", "."):
        # it starts with a key's name, so with a letter.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()))[:128]
        cfg = Config.load(fixed + point_overrides(point) + [f"output.dir={out}", f"output.run_name={name}"])
        site_eps = point.get("privacy.site_target_epsilon", "inf")
        if site_eps.lower() not in INF and cfg.privacy.unit != "site":
            raise conf.ConfigError(f"sweep: privacy.site_target_epsilon={site_eps} does nothing with "
                                   f"privacy.unit={cfg.privacy.unit}: add privacy.unit=site (or preset=cross-device)")
        if cfg.task.name == "text-generation":  # before any run: its rows hold perplexity, not accuracy
            raise conf.ConfigError("sweep: task.name=text-generation reports perplexity, and the sweep tables "
                                   "accuracy; run `fedshield simulate task=text-generation` per ε instead")
        configs.append((point, cfg))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (point, cfg) in enumerate(configs, 1):
        print(f"\n=== sweep {i}/{len(configs)}: {point}", flush=True)
        run_dir = run_simulation(cfg)
        last = read_jsonl(run_dir / "metrics.jsonl")[-1]
        rows.append({**point, "accuracy": last["accuracy"], "macro_f1": last["macro_f1"],
                     "epsilon_max": last["epsilon_max"], **site_level_columns(run_dir), "run_dir": str(run_dir)})
    write_results(out, rows, list(axes))
    print(f"\nsweep results: {out / 'results.md'}")
    return 0


def write_results(out: Path, rows: list[dict[str, Any]], axes: list[str]) -> None:
    site = any("site_epsilon" in r for r in rows)
    with open(out / "results.csv", "w", newline="") as f:
        fields = [*axes, "accuracy", "macro_f1", "epsilon_max", *(SITE_COLUMNS if site else []), "run_dir"]
        w = csv.DictWriter(f, fieldnames=fields, restval="")  # "": no site-level DP in that run
        w.writeheader()
        w.writerows(rows)
    group_keys = [a for a in axes if a != "federation.seed"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in group_keys)].append(r)
    site_head = (" site-level ε (ledger) | ε Flower's accountant states (no amplification) | z | rounds | q |"
                 if site else "")
    lines = ["| " + " | ".join(group_keys)
             + " | runs | accuracy (mean ± sd) | macro-F1 (mean ± sd) | ε spent (max site) |" + site_head,
             "|" + "---|" * (len(group_keys) + 4 + (5 if site else 0))]
    summary = []
    for key, rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs])
        f1 = np.array([r["macro_f1"] for r in rs])
        eps = max(r["epsilon_max"] for r in rs)
        line = ("| " + " | ".join(key) + f" | {len(rs)} | {acc.mean():.4f} ± {acc.std():.4f} | "
                f"{f1.mean():.4f} ± {f1.std():.4f} | {eps:.3f} |")
        if site:
            line += _site_cells(rs)
        lines.append(line)
        summary.append((dict(zip(group_keys, key, strict=False)), acc, f1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, summary)


def _site_cells(rs: list[dict[str, Any]]) -> str:
    """The site-level cells of one group of runs (over seeds: the largest ε, the smallest z)."""
    if not all("site_epsilon" in r for r in rs):
        return " - | - | - | - | - |"  # no site-level DP (privacy.unit=record)

    def spread(key: str, fmt: str) -> str:
        values = sorted({r[key] for r in rs})
        return format(values[0], fmt) if len(values) == 1 else f"{values[0]:{fmt}}-{values[-1]:{fmt}}"

    flower = [r["flower_epsilon_no_amplification"] for r in rs]
    flower_cell = f"{max(flower):.4f}" if all(isinstance(f, float) for f in flower) else "n/a (not Gaussian)"
    return (f" {max(r['site_epsilon'] for r in rs):.4f} | {flower_cell}"
            f" | {spread('site_noise_multiplier', '.4g')} | {spread('site_rounds', 'd')} | "
            f"{spread('site_sample_rate', 'g')} |")


def _plot(out: Path, summary: list[tuple[dict[str, Any], np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = next((k for k in ("privacy.target_epsilon", "privacy.site_target_epsilon")
                 if any(k in point for point, _, _ in summary)), None)
    if axis is None:
        return
    site = axis == "privacy.site_target_epsilon"
    pts = []
    for point, acc, f1 in summary:
        raw = point.get(axis)
        if raw is None:
            continue
        eps = math.inf if raw.lower() in INF else float(raw)
        pts.append((eps, acc, f1))
    if not pts:
        return
    finite = sorted(p for p in pts if math.isfinite(p[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if finite:
        xs = [p[0] for p in finite]
        for idx, label in ((1, "accuracy"), (2, "macro-F1")):
            ys = np.array([np.asarray(p[idx]).mean() for p in finite])
            sd = np.array([np.asarray(p[idx]).std() for p in finite])
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
    for eps, acc, _f1 in pts:
        if not math.isfinite(eps):
            ax.axhline(acc.mean(), color="gray", linestyle="--",
                       label="accuracy without site-level DP" if site else "accuracy without DP")
    ax.set(xlabel="site-level target ε (one whole site, δ fixed)" if site else "target ε per site (δ fixed)",
           ylabel="final central metric", ylim=(0, 1),
           title="Privacy-utility trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)

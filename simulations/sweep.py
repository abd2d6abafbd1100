"""`fedshield sweep`: one simulation per value, a privacy-utility table and plot.

    fedshield sweep privacy.target_epsilon=0.5,1,2,4,8,inf federation.seed=1,2,3 federation.rounds=5

Any override with comma-separated values is an axis; the grid is their product. ε = inf
means no DP (`privacy.mode=none`), the non-private reference. Every run is a normal run
directory inside the sweep's folder; `results.csv`, `results.md` and
`accuracy_vs_epsilon.png` summarize them (mean and spread over seeds).
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

import numpy as np

import conf
from server.run_dir import read_jsonl
from simulations.simulate import run_simulation


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
        if key == "privacy.target_epsilon" and value.lower() in ("inf", "infinity"):
            out.append("privacy=none")
        else:
            out.append(f"{key}={value}")
    return out


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedshield sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (default: <output.dir>/sweep-<time>)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    axes, fixed = split_axes(args.overrides)
    if not axes:
        raise conf.ConfigError("sweep: give at least one key with comma-separated values, "
                               "e.g. privacy.target_epsilon=1,4,8,inf")
    base = conf.load_config(fixed)
    out = Path(args.out or Path(base.output.dir) / time.strftime("sweep-%Y%m%d-%H%M%S")).resolve()
    points = [dict(zip(axes, values, strict=False)) for values in itertools.product(*axes.values())]
    configs = []
    for point in points:  # validate every point before the first simulation starts
        # One folder name per point (output.run_name allows letters, digits, "-", "_", "."):
        # it starts with a key's name, so with a letter.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()))[:128]
        cfg = conf.load_config(fixed + point_overrides(point) + [f"output.dir={out}", f"output.run_name={name}"])
        configs.append((point, cfg))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (point, cfg) in enumerate(configs, 1):
        print(f"\n=== sweep {i}/{len(configs)}: {point}", flush=True)
        run_dir = run_simulation(cfg)
        last = read_jsonl(run_dir / "metrics.jsonl")[-1]
        rows.append({**point, "accuracy": last["accuracy"], "macro_f1": last["macro_f1"],
                     "epsilon_max": last["epsilon_max"], "run_dir": str(run_dir)})
    write_results(out, rows, list(axes))
    print(f"\nsweep results: {out / 'results.md'}")
    return 0


def write_results(out: Path, rows: list[dict], axes: list[str]) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*axes, "accuracy", "macro_f1", "epsilon_max", "run_dir"])
        w.writeheader()
        w.writerows(rows)
    group_keys = [a for a in axes if a != "federation.seed"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in group_keys)].append(r)
    lines = ["| " + " | ".join(group_keys)
             + " | runs | accuracy (mean ± sd) | macro-F1 (mean ± sd) | ε spent (max site) |",
             "|" + "---|" * (len(group_keys) + 4)]
    summary = []
    for key, rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs])
        f1 = np.array([r["macro_f1"] for r in rs])
        eps = max(r["epsilon_max"] for r in rs)
        lines.append("| " + " | ".join(key) + f" | {len(rs)} | {acc.mean():.4f} ± {acc.std():.4f} | "
                     f"{f1.mean():.4f} ± {f1.std():.4f} | {eps:.3f} |")
        summary.append((dict(zip(group_keys, key, strict=False)), acc, f1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, summary)


def _plot(out: Path, summary: list[tuple[dict, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for point, acc, f1 in summary:
        raw = point.get("privacy.target_epsilon")
        if raw is None:
            continue
        eps = math.inf if raw.lower() in ("inf", "infinity") else float(raw)
        pts.append((eps, acc, f1))
    if not pts:
        return
    finite = sorted(p for p in pts if math.isfinite(p[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if finite:
        xs = [p[0] for p in finite]
        for idx, label in ((1, "accuracy"), (2, "macro-F1")):
            ys = np.array([p[idx].mean() for p in finite])
            sd = np.array([p[idx].std() for p in finite])
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
    for eps, acc, _f1 in pts:
        if not math.isfinite(eps):
            ax.axhline(acc.mean(), color="gray", linestyle="--", label="accuracy without DP")
    ax.set(xlabel="target ε per site (δ fixed)", ylabel="final central metric", ylim=(0, 1),
           title="Privacy-utility trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)

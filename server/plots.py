"""PNG plots of a run: central accuracy / macro-F1 and each site's ε over rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    if not rows:
        return
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="accuracy")
    ax.plot(rounds, [r["macro_f1"] for r in rows], marker="s", label="macro-F1")
    ax.set(xlabel="round", ylabel="central test metric", ylim=(0, 1), title="Global model on held-out data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    sites = sorted(rows[-1]["epsilon"])
    for site in sites:
        ax.plot(rounds, [r["epsilon"].get(site, 0.0) for r in rows], marker=".", label=site)
    budgets = {s["budget"] for s in summary.values() if s.get("budget") is not None}
    for b in budgets:
        ax.axhline(b, color="red", linestyle="--", linewidth=1, label=f"budget {b:g}")
    ax.set(xlabel="round", ylabel="cumulative ε (per site)", title="Privacy spent per site")
    ax.grid(alpha=0.3)
    if len(sites) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "epsilon.png", dpi=120)
    plt.close(fig)

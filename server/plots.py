"""PNG plots of a run: central accuracy / macro-F1, and the sites' ε over rounds (min-max band
across sites, median, budget: privacy/epsilon_plot.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from fedshield.privacy.epsilon_plot import draw_epsilon  # noqa: E402


def plot_run(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    if not rows:
        return
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    if "perplexity" in rows[-1]:  # text-generation: held-out perplexity (lower is better), same file name
        ax.plot(rounds, [r["perplexity"] for r in rows], marker="o", label="perplexity")
        ax.set(xlabel="round", ylabel="held-out perplexity", yscale="log", title="Global model on held-out data")
    else:
        ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", label="accuracy")
        ax.plot(rounds, [r["macro_f1"] for r in rows], marker="s", label="macro-F1")
        ax.set(xlabel="round", ylabel="central test metric", ylim=(0, 1), title="Global model on held-out data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    sites = sorted({site for r in rows for site in r["epsilon"]})
    # A site absent from a round's row (joined late, or gone after a resume) is left out there, not drawn at 0.
    curves = {site: [(float(r["round"]), float(r["epsilon"][site])) for r in rows if site in r["epsilon"]]
              for site in sites}
    budgets = [s["budget"] for s in summary.values() if s.get("budget") is not None]
    draw_epsilon(ax, curves, what="ε", budgets=budgets)
    ax.set(xlabel="round", ylabel="cumulative ε (per site)", title="Privacy spent per site")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")  # ε rises to the right: the lower right is empty
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "epsilon.png", dpi=120)
    plt.close(fig)

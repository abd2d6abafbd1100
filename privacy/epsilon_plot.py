"""The ε-over-time plot, drawn the same way for the audit (privacy/report.py) and a run
(server/plots.py): readable with many sites that spend alike.

Sites of one federation usually spend almost the same ε, so one line per site draws N
lines on top of each other under an N-entry legend. Instead: the min-max band across
sites, the median site, and the budget (and any --max-epsilon) as horizontal lines. One
site is drawn as its own line.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Curve = Sequence[tuple[float, float]]  # (x, cumulative ε after it), x ascending


def across_sites(curves: Mapping[str, Curve]) -> list[tuple[float, float, float, float]]:
    """(x, min, median, max) of the sites' ε at every x some site has, ascending; ε that are
    NaN (not recomputable) are left out, and an x with none left is dropped."""
    at: dict[float, list[float]] = {}
    for curve in curves.values():
        for x, eps in curve:
            if not math.isnan(eps):
                at.setdefault(float(x), []).append(float(eps))
    return [(x, min(v), statistics.median(v), max(v)) for x, v in sorted(at.items())]


def draw_epsilon(ax: Axes, curves: Mapping[str, Curve], *, what: str, color: str = "C0",
                 budgets: Iterable[float] = (), limit: float | None = None, markers_only: bool = False) -> int:
    """Draw the sites' cumulative ε on `ax`: a line for one site; else the min-max band and
    the median (`markers_only`: the median as markers, no band: a second series over the
    first stays visible). `what` names the curves ("recomputed ε"). Budgets (deduplicated)
    and `limit` are horizontal lines. Returns how many points were drawn (0: nothing)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and spends are whole numbers
    points = across_sites(curves)
    xs = [p[0] for p in points]
    if markers_only and points:
        ax.plot(xs, [p[2] for p in points], "o", ms=5, mfc="none", color=color,
                label=f"{what}: median site" if len(curves) > 1 else f"{next(iter(curves))}: {what}")
    elif len(curves) == 1:
        (site,) = curves
        ax.plot(xs, [p[2] for p in points], "-o", ms=3, color=color, label=f"{site}: {what}")
    elif points:
        ax.fill_between(xs, [p[1] for p in points], [p[3] for p in points], color=color, alpha=0.25, lw=0,
                        label=f"{what}: min-max across {len(curves)} sites")
        ax.plot(xs, [p[2] for p in points], "-", color=color, lw=1.8, label=f"{what}: median site")
    for b in sorted({float(b) for b in budgets}):
        ax.axhline(b, color="red", ls="--", lw=1, label=f"budget {b:g}")
    if limit is not None:
        ax.axhline(limit, color="black", ls=":", lw=1, label=f"--max-epsilon {limit:g}")
    return len(points)

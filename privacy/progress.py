"""Progress bars with an ETA for the phases that take more than a few seconds (feature
encoding, centering, σ calibration, audit recomputation), on stderr.

It lives in privacy/ because privacy is the one room every other may import (task,
strategies, client, server): one switch and one look for every bar. A bar shows only when
stderr is a terminal (tqdm's `disable=None`: never in logs, CI or Flower's child processes,
whose output is a pipe) and only once its phase has lasted `delay` seconds, so quick phases
print nothing. FEDSHIELD_PROGRESS=0 turns every bar off; =1 shows them even when stderr
is not a terminal. A bar is removed when its phase ends (the lines that stay are the run's own).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
SWITCH = "FEDSHIELD_PROGRESS"


def _disabled() -> bool | None:
    """tqdm's `disable`: True off, False on, None on only when stderr is a terminal."""
    value = os.environ.get(SWITCH, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return True
    if value in ("1", "true", "yes", "on"):
        return False
    return None


def progress(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
             delay: float = 2.0) -> Iterator[T]:
    """`items`, with a bar on stderr named `desc` (and an ETA when `total` is known)."""
    bar = tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, disable=_disabled(), delay=delay,
               leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        yield from bar
    finally:
        bar.close()


class Counter:
    """A bar for a loop whose length is not known in advance (a bisection): it counts steps
    and shows the time spent; `with Counter("calibrating σ") as step: ... step()`."""

    def __init__(self, desc: str, *, unit: str = "it", delay: float = 2.0) -> None:
        self._bar = tqdm(desc=desc, unit=unit, file=sys.stderr, disable=_disabled(), delay=delay, leave=False,
                         dynamic_ncols=True, mininterval=0.5)

    def __call__(self) -> None:
        self._bar.update(1)

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

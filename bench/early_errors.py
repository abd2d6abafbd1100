"""How long `fedshield` takes to report a user's mistake: wall time of a command that fails,
in a new interpreter each time (what a user at a shell waits), median of N runs.

    .venv/bin/python bench/early_errors.py [--root TREE] [--runs 10]
    .venv/bin/python bench/early_errors.py [--root TREE] --first-lines 3


--root: the source tree to time (default this checkout); point it at an older checkout
(`git archive REV | tar -x -C /tmp/before`) to compare. The checkout's .venv runs both.
Also records which of torch, flwr, transformers and ray each command imported.
--first-lines N: when the first N lines of the default `fedshield simulate` appear (the run
is then stopped, its process group sent SIGTERM, its output folder removed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "transformers", "ray")
CASES = {
    "config typo": ["simulate", "federation.roundz=3"],
    "wrong task.model": ["simulate", "task.model=/nonexistent/model", "federation.rounds=1"],
}


def once(root: Path, argv: list[str], out_dir: str) -> tuple[float, int, list[str]]:
    code = ("import sys\nfrom fedshield.simulations.cli import main\nrc = main(sys.argv[1:])\n"
            f"sys.stdout.write(' '.join(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *argv, f"output.dir={out_dir}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    return time.perf_counter() - t0, r.returncode, r.stdout.strip().splitlines()[-1:] or [""]


def first_lines(root: Path, n: int) -> list[tuple[float, str]]:
    out = tempfile.mkdtemp()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "fedshield", "simulate", f"output.dir={out}"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert p.stdout is not None
    lines = []
    try:
        for _ in range(n):
            text = p.stdout.readline().strip()
            lines.append((time.perf_counter() - t0, text))
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(60)
        shutil.rmtree(out, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--case", choices=list(CASES), action="append")
    parser.add_argument("--first-lines", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.first_lines:
        for t, line in first_lines(args.root.resolve(), args.first_lines):
            print(f"{t:6.2f} s  {line[:110]}")
        return
    print("| tree | case | exit | median s | min s | max s | heavy modules imported |")
    print("|---|---|---:|---:|---:|---:|---|")
    for case in args.case or list(CASES):
        times, rc, heavy = [], 0, [""]
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.runs):
                t, rc, heavy = once(args.root.resolve(), CASES[case], out)
                times.append(t)
            left = sorted(p.name for p in Path(out).iterdir())
        print(f"| {args.root} | {case} | {rc} | {statistics.median(times):.2f} | {min(times):.2f} | "
              f"{max(times):.2f} | {heavy[0] or 'none'}{'; run dirs left: ' + ', '.join(left) if left else ''} |")


if __name__ == "__main__":
    main()

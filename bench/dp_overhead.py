"""DP-SGD overhead per optimizer step on the default model (all-MiniLM-L6-v2), CPU.

    .venv/bin/python bench/dp_overhead.py            # default: 1 warm-up + 3 timed steps
    .venv/bin/python bench/dp_overhead.py --quick    # 1 warm-up + 2 timed steps, no memory
    .venv/bin/python bench/dp_overhead.py --steps 7 --warmup 2 --threads 2   # on a quiet machine

For each trainable mode (all; last_layers k=1 and k=0 on cached prefix states, as a site
trains; lora) and each privacy variant (non-DP; Opacus grad_sample_mode hooks and ghost),
one optimizer step on the same fixed batch of 16 real BBC News articles x 128 tokens.
Every variant is built once in this process and the steps are interleaved round-robin
(variant A step, variant B step, ...) so that the load of this shared machine hits all
variants alike; we report the median step time and ratios measured in the same run.

Peak memory: one subprocess per variant (`--mem-one`), which builds the variant, resets
the kernel's peak-RSS mark (Linux: `5` into /proc/self/clear_refs resets VmHWM), runs 1
step (it allocates the per-sample gradients and optimizer state) and reports VmHWM minus
the RSS before the step: the peak RSS growth of a training step. The subprocess's total
ru_maxrss is shown too (it includes model loading, which peaks higher than a step).
tracemalloc would miss torch's tensor memory (not allocated through Python's allocator).

Update size = the trainable weights a site sends per round (float32), for issue 3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

BATCH = 16
MODES = [("all", 0), ("last_layers", 1), ("last_layers", 0), ("lora", 0)]
PRIV = [None, "hooks", "ghost"]


def mode_name(mode: str, k: int) -> str:
    return f"last_layers k={k}" if mode == "last_layers" else mode


class Variant:
    def __init__(self, mode: str, k: int, gsm: str | None) -> None:
        import numpy as np
        import torch
        from torch import nn
        from torch.utils.data import DataLoader

        from fedshield import conf
        from fedshield.privacy.dpsgd import make_private
        from fedshield.task.pipeline import build_view, encode, pool_and_test

        self.mode, self.k, self.gsm = mode, k, gsm
        self.name = f"{mode_name(mode, k)} / {gsm or 'non-DP'}"
        self.error = ""
        cfg = conf.load_config([f"training.trainable={mode}", f"training.last_layers={k}"])
        view = build_view(cfg, torch.device("cpu"))
        pool, _ = pool_and_test(cfg)
        idx = np.random.default_rng(0).choice(len(pool), BATCH, replace=False)
        t0 = time.perf_counter()
        ds = encode(cfg, view, pool.subset(np.sort(idx)))  # prefix states (last_layers)
        self.encode_s = time.perf_counter() - t0
        *self.inputs, self.labels = ds.tensors
        self.module = view.module
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        trained = set(view.trainable_names)
        self.update_bytes = sum(p.numel() * 4 for n, p in view.model.named_parameters() if n in trained)
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)  # what training.optimizer=sgd trains with
        self.criterion = nn.CrossEntropyLoss()
        self.times: list[float] = []
        if gsm:
            try:
                priv = make_private(
                    self.module, self.optimizer, DataLoader(ds, batch_size=BATCH),
                    noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=gsm,
                )
                self.module, self.optimizer, self.criterion = priv.module, priv.optimizer, priv.criterion
            except Exception as exc:  # reported in one line
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    def step(self) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.module(*self.inputs), self.labels)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - t0

    def safe_step(self) -> None:
        if self.error:
            return
        try:
            self.times.append(self.step())
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mem_one(mode: str, k: int, gsm: str | None, steps: int) -> None:
    v = Variant(mode, k, gsm)
    # Reset the peak RSS (VmHWM) to the current RSS: model loading peaks above training.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(steps):
        v.safe_step()
    after = _status_kb("VmHWM")
    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (after - before) / 1024, "peak_mb": total / 1024, "error": v.error}))


def measure_memory(steps: int, threads: int) -> dict[str, dict]:
    out = {}
    for mode, k in MODES:
        for gsm in PRIV:
            cmd = [sys.executable, __file__, "--mem-one", mode, str(k), gsm or "none",
                   "--steps", str(steps), "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = (r.stdout.strip().splitlines() or ["{}"])[-1]
            try:
                out[(mode, k, gsm)] = json.loads(line)
            except json.JSONDecodeError:
                out[(mode, k, gsm)] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
            print(f"  memory {mode_name(mode, k)} / {gsm or 'non-DP'}: {out[(mode, k, gsm)]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps, no memory subprocesses")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--mem-one", nargs=3, metavar=("MODE", "K", "GSM"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads stall on each other's load)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.mem_one:
        mode, k, gsm = a.mem_one
        mem_one(mode, int(k), None if gsm == "none" else gsm, a.steps or 1)
        return

    steps = a.steps or (2 if a.quick else 3)
    warmup = a.warmup if a.warmup is not None else 1
    print(f"dp_overhead: all-MiniLM-L6-v2, batch {BATCH} x 128 tokens (BBC News), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{warmup} warm-up + {steps} timed steps per variant, interleaved", flush=True)
    t_start = time.time()
    variants = []
    for mode, k in MODES:
        for gsm in PRIV:
            v = Variant(mode, k, gsm)
            variants.append(v)
            if v.error:
                print(f"  {v.name}: setup failed: {v.error}", flush=True)
    for r in range(warmup + steps):
        for v in variants:
            v.safe_step()
        if r + 1 == warmup:
            for v in variants:
                v.times.clear()
        print(f"  round {r + 1}/{warmup + steps} done ({time.time() - t_start:.0f} s)", flush=True)

    mem = {} if (a.no_memory or a.quick) else measure_memory(1, a.threads)
    med = {(v.mode, v.k, v.gsm): (statistics.median(v.times) * 1e3 if v.times and not v.error else None)
           for v in variants}
    base_all = med[("all", 0, None)]

    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    print()
    print("| mode | grad_sample_mode | trainable params | update MB | ms/step non-DP | ms/step DP | DP/non-DP "
          "| non-DP vs all non-DP | DP vs all non-DP | step peak RSS growth MB (non-DP / DP) "
          "| process ru_maxrss MB (DP) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for mode, k in MODES:
        base = med[(mode, k, None)]
        vb = next(v for v in variants if (v.mode, v.k, v.gsm) == (mode, k, None))
        for gsm in ("hooks", "ghost"):
            v = next(v for v in variants if (v.mode, v.k, v.gsm) == (mode, k, gsm))
            dp = med[(mode, k, gsm)]
            if v.error:
                errors.append(f"{mode_name(mode, k)} / {gsm}: {v.error}")
            m0, m1 = mem.get((mode, k, None), {}), mem.get((mode, k, gsm), {})
            print(
                f"| {mode_name(mode, k)} | {gsm} | {vb.trainable:,} | {vb.update_bytes / 2**20:.2f} | "
                f"{fmt(base, '.1f')} | "
                f"{fmt(dp, '.1f') if not v.error else 'fails'} | {fmt(dp / base if dp and base else None, '.2f')} | "
                f"{fmt(base / base_all if base and base_all else None, '.3f')} | "
                f"{fmt(dp / base_all if dp and base_all else None, '.3f')} | "
                f"{fmt(m0.get('delta_mb'))} / {fmt(m1.get('delta_mb'))} | {fmt(m1.get('peak_mb'))} |"
            )
    print()
    for v in variants:
        if v.mode == "last_layers" and v.gsm is None:
            print(f"one-time prefix cache for {mode_name(v.mode, v.k)}: {v.encode_s * 1e3 / BATCH:.1f} ms/record "
                  f"(forward through the frozen layers, done once per site per run)")
    for e in errors:
        print(f"FAILS: {e}")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()

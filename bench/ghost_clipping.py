"""DP clipping of BERT layers in the cohort trainer: ghost norms against per-sample gradients.

    .venv/bin/python bench/ghost_clipping.py                  # 1 and 2 layers, 128 sites
    .venv/bin/python bench/ghost_clipping.py --layers 1 --sites 256 --repeat 8

Work: `train_cohort` on a last_layers view of a 32-wide BERT built in code (random weights,
dropout off: sim_scale.py's model), `--sites` sites of 8 records of 16 tokens each (cached
prefix states, a third of the records padded past 8 tokens), DP-SGD at sigma 0.8, batch 8,
one epoch. The two sides differ in one thing: task/cohort.py's ghost norms
(`_Chunk._ghost_sums`), or the per-sample vmap (`_ghost_clippable` turned off). Interleaved,
`--repeat` times each, medians reported with the ratio, and the largest difference between
the two sides' trained weights. One thread, as a batched-engine worker trains. Not a timed
test: a benchmark (DESIGN.md, conventions).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fedshield.task import cohort  # noqa: E402
from fedshield.task.model import make_train_view  # noqa: E402
from fedshield.task.trainer import LocalPlan  # noqa: E402

WIDTH, TOKENS, RECORDS, CLASSES = 32, 16, 8, 2
CPU = torch.device("cpu")
PLAN = LocalPlan(epochs=1, batch_size=8, max_physical_batch_size=8, learning_rate=0.5, optimizer="sgd",
                 dp=True, noise_multiplier=0.8, max_grad_norm=1.0)


def view(layers: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * WIDTH, max_position_embeddings=32, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return make_train_view(BertForSequenceClassification(config), "last_layers", layers, 8, 16).module


def jobs_for(module: nn.Module, n_sites: int) -> list[cohort.CohortJob]:
    g = torch.Generator().manual_seed(n_sites)
    start = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g)
             for n, p in module.named_parameters() if p.requires_grad}
    jobs = []
    for i in range(n_sites):
        attention = torch.ones(RECORDS, TOKENS, dtype=torch.long)
        attention[::3, TOKENS // 2:] = 0
        data = TensorDataset(torch.randn(RECORDS, TOKENS, WIDTH, generator=g), attention,
                             torch.randint(0, CLASSES, (RECORDS,), generator=g))
        jobs.append(cohort.CohortJob(start, data, PLAN, seed=1000 + i))
    return jobs


def timed(module: nn.Module, jobs: list[cohort.CohortJob], ghost: bool) -> tuple[float, list[cohort.CohortResult]]:
    real = cohort._ghost_clippable
    if not ghost:
        cohort._ghost_clippable = lambda *_: False
    try:
        t0 = time.perf_counter()
        out = cohort.train_cohort(module, jobs, CPU)
        return time.perf_counter() - t0, out
    finally:
        cohort._ghost_clippable = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sites", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"ghost_clipping: {a.sites} sites x {RECORDS} records x {TOKENS} tokens, {WIDTH}-wide BERT, "
          f"DP-SGD, 1 thread, {a.repeat} interleaved repetitions")
    print("| trained BERT layers | ghost ms | per-sample ms | ratio | max weight difference |")
    print("|---:|---:|---:|---:|---:|")
    for layers in a.layers:
        module = view(layers)
        jobs = jobs_for(module, a.sites)
        times: dict[bool, list[float]] = {True: [], False: []}
        outs: dict[bool, list[cohort.CohortResult]] = {}
        timed(module, jobs, True)  # warm-up (first-call costs of both paths' kernels)
        for _ in range(a.repeat):
            for ghost in (True, False):
                elapsed, outs[ghost] = timed(module, jobs, ghost)
                times[ghost].append(elapsed)
        gap = max(float((x.params[n] - y.params[n]).abs().max())
                  for x, y in zip(outs[True], outs[False], strict=True) for n in x.params)
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {layers} | {fast * 1e3:.0f} | {slow * 1e3:.0f} | {slow / fast:.2f}x | {gap:.1e} |")


if __name__ == "__main__":
    main()

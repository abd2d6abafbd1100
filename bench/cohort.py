"""The cohort trainer against a loop of train_local: site updates per second, side by side.

    .venv/bin/python bench/cohort.py                 # 8, 100 and 1,000 sites, DP and not
    .venv/bin/python bench/cohort.py --sites 8 100   # some sizes only
    .venv/bin/python bench/cohort.py --loop-sample 100   # at 1,000 sites time the loop on 100

Work: the default view (training.trainable=last_layers, last_layers=0: BERT's pooler +
classifier on cached [CLS] features) of a BERT-ish model 384 wide with 5 classes (the
bundled all-MiniLM-L6-v2's head shape: 149,765 trainable weights), random weights built in
code, dropout off. Each site holds 8 to 200 records (uniform, seeded) of random 384-wide
features. DP: the default training settings (1 epoch, batch 128, physical batch 64, SGD at
lr 4, C = 0.1, sigma = 1). Without DP: the cross-device preset's (5 epochs, batch 16, SGD lr 1).

Both sides do the same local work for every site (task.trainer.train_local's): the loop
copies the module (a fresh view per site, as a site builds it), loads the site's start
weights, seeds and calls train_local; the cohort side calls task.cohort.train_cohort once for
all sites. The two are interleaved (cohort, loop, per setting, --repeat times) and the
median of each is reported, with the ratio. At large N the loop can be timed on a sample
of the sites (--loop-sample K: the first K of the same sites, scaled by N / K; printed).
Not a timed test: a benchmark (DESIGN.md, conventions).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fedshield.task.cohort import CohortJob, train_cohort  # noqa: E402
from fedshield.task.model import make_train_view  # noqa: E402
from fedshield.task.trainer import LocalPlan, train_local  # noqa: E402

WIDTH, CLASSES = 384, 5
CPU = torch.device("cpu")
PLANS = {
    "dp": LocalPlan(epochs=1, batch_size=128, max_physical_batch_size=64, learning_rate=4.0, optimizer="sgd",
                    dp=True, noise_multiplier=1.0, max_grad_norm=0.1),
    "no-dp": LocalPlan(epochs=5, batch_size=16, max_physical_batch_size=16, learning_rate=1.0, optimizer="sgd",
                       dp=False, max_grad_norm=0.1),
}


def default_view() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=6,
                        intermediate_size=4 * WIDTH, max_position_embeddings=16, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return make_train_view(BertForSequenceClassification(config), "last_layers", 0, 8, 16).module


def jobs_for(module: nn.Module, n_sites: int, plan: LocalPlan) -> list[CohortJob]:
    g = torch.Generator().manual_seed(n_sites)
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    jobs = []
    for i in range(n_sites):
        n = int(torch.randint(8, 201, (1,), generator=g))
        data = TensorDataset(torch.randn(n, 1, WIDTH, generator=g), torch.ones(n, 1, dtype=torch.long),
                             torch.randint(0, CLASSES, (n,), generator=g))
        jobs.append(CohortJob(start, data, plan, seed=1000 + i))
    return jobs


def run_loop(module: nn.Module, jobs: list[CohortJob]) -> float:
    t0 = time.perf_counter()
    for job in jobs:
        site = copy.deepcopy(module)
        with torch.no_grad():
            for n, p in site.named_parameters():
                if n in job.start:
                    p.copy_(job.start[n])
        torch.manual_seed(job.seed)
        train_local(site, job.dataset, job.plan, device=CPU, generator=torch.Generator().manual_seed(job.seed + 1))
    return time.perf_counter() - t0


def run_cohort(module: nn.Module, jobs: list[CohortJob]) -> float:
    t0 = time.perf_counter()
    out = train_cohort(module, jobs, CPU)
    elapsed = time.perf_counter() - t0
    failed = [r.error for r in out if r.error is not None]
    if failed:
        raise SystemExit(f"cohort: {len(failed)} sites failed: {failed[0]}")
    return elapsed


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # Opacus' secure-RNG and empty-batch notices
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[8, 100, 1000])
    ap.add_argument("--modes", nargs="+", default=["dp", "no-dp"], choices=sorted(PLANS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--loop-sample", type=int, default=100,
                    help="time the loop on at most this many of the sites and scale by N / K")
    args = ap.parse_args()
    module = default_view()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"default view, {WIDTH} wide, {CLASSES} classes: {trainable:,} trainable weights; "
          f"torch threads {torch.get_num_threads()}")
    print("| sites | mode | records | cohort s | loop s | cohort updates/s | loop updates/s | ratio |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n_sites in args.sites:
        for mode in args.modes:
            jobs = jobs_for(module, n_sites, PLANS[mode])
            sample = jobs[: min(len(jobs), args.loop_sample)]
            cohort_times, loop_times = [], []
            for _ in range(args.repeat):
                cohort_times.append(run_cohort(module, jobs))
                loop_times.append(run_loop(module, sample) * len(jobs) / len(sample))
            c, lp = statistics.median(cohort_times), statistics.median(loop_times)
            records = sum(len(j.dataset) for j in jobs)
            note = "" if len(sample) == len(jobs) else f" (loop timed on {len(sample)}, scaled)"
            print(f"| {n_sites} | {mode} | {records:,} | {c:.2f} | {lp:.2f}{note} | {n_sites / c:.0f} | "
                  f"{n_sites / lp:.0f} | {lp / c:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

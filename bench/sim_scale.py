"""Simulation scale: client updates per second and peak memory, fedshield vs plain Flower.

    .venv/bin/python bench/sim_scale.py            # 10 and 100 sites per round, 2 rounds
    .venv/bin/python bench/sim_scale.py --quick    # 10 sites only
    .venv/bin/python bench/sim_scale.py --full     # 10, 100 and 1,000 sites (long on 2 cores)

Task: a tiny text classifier, the bring-your-own-data task (text-file) on a synthetic CSV
(two topics that share no words, as tests/conftest.py), 8 training records per site, and a
2-layer 32-wide random-weight BERT built in code (tests' `tiny_bert`), max_length 16,
trainable=last_layers k=1 (the frozen prefix cached on the site's disk, as a site trains),
privacy=none, fraction_train=1 so all N sites train every round, 2 rounds.

Both apps run on Flower's simulation runtime (Ray backend) with the same backend config
(2 CPUs, 1 CPU per virtual site) and do the same local work per update: the site's share
of the same pool (task.partition), task.pipeline.build_view + encode (prefix cached on disk)
+ task.trainer.train_local (non-DP) and reply with the trainable weights. The plain app
is flwr.serverapp.strategy.FedAvg + a minimal ClientApp; fedshield adds its site query
round, site state (signing key, ledger), frozen-weight fingerprint, per-round central
evaluation, run directory, plots and model export.

Each (app, N) runs in its own subprocess (a clean Ray); the variants are interleaved
(fedshield N, plain N, ...), `--repeat R` repeats the sequence and medians are reported.
Updates/s (headline) = N / duration of the last round (warm workers). Over both rounds it
is shown too: there the plain app's round 1 pays the Ray workers' cold start (imports,
model load) that fedshield pays in its site-discovery query before round 1. The total
wall time (Ray start-up, discovery, export) is shown too. Peak memory = the largest sum of RSS over the subprocess and
all its descendants (the Ray GCS, raylet and worker processes), sampled every 0.2 s with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROUNDS = 2
PER_SITE = 8
TEST_FRACTION = 0.2


def make_assets(work: Path, n_sites: int) -> tuple[Path, Path]:
    """The tiny BERT (once) and a CSV with PER_SITE training rows per site."""
    model = work / "tiny-bert"
    if not (model / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        from fedshield.task.model import bundled_model_path

        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2)
        BertForSequenceClassification(config).save_pretrained(model)
        AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(model)
    from tests.conftest import synthetic_rows, write_csv

    rows = int(round(PER_SITE * n_sites / (1 - TEST_FRACTION)))
    data = write_csv(work / f"topics-{n_sites}.csv", synthetic_rows(rows, seed=1))
    return model, data


def overrides(model: Path, data: Path, work: Path, n_sites: int, tag: str) -> list[str]:
    return [
        "task=text-file", f"task.data_path={data}", f"task.model={model}", "task.max_length=16",
        f"task.test_fraction={TEST_FRACTION}", "privacy=none",
        f"federation.num_sites={n_sites}", f"federation.rounds={ROUNDS}", "federation.fraction_train=1.0",
        f"federation.min_sites={n_sites}", "federation.partition=iid",
        "training.trainable=last_layers", "training.last_layers=1", "training.optimizer=sgd",
        "training.batch_size=8", "training.local_epochs=1", "training.learning_rate=0.5",
        "simulation.client_cpus=1", f"output.dir={work / 'runs' / tag}",
    ]


# ------------------------------------------------------------------ the plain Flower app

def plain_client_app():
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fedshield import conf
        from fedshield.protocol import from_array_record as from_arrays
        from fedshield.protocol import to_array_record as to_arrays
        from fedshield.task.partition import partition
        from fedshield.task.pipeline import build_view, encode, pool_and_test
        from fedshield.task.trainer import LocalPlan, train_local

        cfg = conf.from_yaml(str(msg.content["config"]["cfg"]))
        pid = int(context.node_config["partition-id"])
        pool, _ = pool_and_test(cfg)
        fed = cfg.federation
        parts = partition(pool.labels, fed.num_sites, fed.partition, seed=fed.seed,
                          alpha=fed.dirichlet_alpha, groups=pool.groups)
        data = pool.subset(parts[pid])
        view = build_view(cfg)
        view.load_trainable(from_arrays(msg.content["arrays"]))
        cache = Path(str(msg.content["config"]["work"])) / f"site-{pid}" / "cache"
        ds = encode(cfg, view, data, cache_dir=cache)
        tr = cfg.training
        plan = LocalPlan(epochs=tr.local_epochs, batch_size=tr.batch_size,
                         max_physical_batch_size=tr.max_physical_batch_size,
                         learning_rate=tr.learning_rate, optimizer=tr.optimizer, dp=False)
        res = train_local(view.module, ds, plan, device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(pid))
        content = RecordDict({
            "arrays": to_arrays(view.trainable_state()),
            "metrics": MetricRecord({"num-examples": len(ds), "train-loss": res.mean_loss}),
        })
        return Message(content=content, reply_to=msg)

    return app


def run_plain(cfg, work: Path) -> dict:
    from flwr.app import ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedshield import conf
    from fedshield.protocol import to_array_record as to_arrays
    from fedshield.simulations.simulate import backend_config
    from fedshield.task.pipeline import build_view

    n = int(cfg.federation.num_sites)
    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        view = build_view(cfg)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                          min_available_nodes=n)

        def evaluate(server_round: int, arrays) -> MetricRecord:
            stamps.append(time.time())
            return MetricRecord({})

        strategy.start(grid=grid, initial_arrays=to_arrays(view.trainable_state()),
                       num_rounds=ROUNDS, timeout=3600.0,
                       train_config=ConfigRecord({"cfg": conf.to_yaml(cfg), "work": str(work / "plain-sites")}),
                       evaluate_fn=evaluate)

    config = backend_config(cfg)
    config["init_args"].pop("num_gpus", None)
    run_simulation(server_app=server, client_app=plain_client_app(), num_supernodes=n,
                   backend_config=config, verbose_logging=False)
    return {"rounds_s": stamps[-1] - stamps[0], "last_round_s": stamps[-1] - stamps[-2],
            "rounds_seen": len(stamps) - 1}


def run_fedshield(cfg) -> dict:
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    return {"rounds_s": rows[-1]["elapsed_s"] - rows[0]["elapsed_s"],
            "last_round_s": rows[-1]["elapsed_s"] - rows[-2]["elapsed_s"], "rounds_seen": len(rows) - 1,
            "accuracy": rows[-1]["accuracy"]}


def one(app: str, n_sites: int, work: Path) -> None:
    """Child process: one run; prints a JSON line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from fedshield import conf

    model, data = make_assets(work, n_sites)
    tag = f"{app}-{n_sites}-{time.time_ns()}"
    cfg = conf.load_config(overrides(model, data, work, n_sites, tag))
    t0 = time.time()
    out = run_fedshield(cfg) if app == "fedshield" else run_plain(cfg, work / tag)
    out["wall_s"] = time.time() - t0
    print("RESULT " + json.dumps(out), flush=True)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(app: str, n_sites: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", app, str(n_sites), "--work", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    lines = proc.stdout.read().splitlines()
    proc.wait()
    done.set()
    th.join()
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if result is None:
        tail = " | ".join(lines[-5:])
        return {"error": f"rc={proc.returncode}: {tail[-400:]}"}
    result["peak_mb"] = peak[0] / 2**20
    result["updates_per_s"] = n_sites / result["last_round_s"]
    result["updates_per_s_all"] = n_sites * ROUNDS / result["rounds_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 sites per round only")
    ap.add_argument("--full", action="store_true", help="also 1,000 sites per round")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sites", type=int, nargs="*", help="override the list of N")
    ap.add_argument("--one", nargs=2, metavar=("APP", "N"))
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    if a.one:
        one(a.one[0], int(a.one[1]), a.work)
        return
    sizes = a.sites or ([10] if a.quick else [10, 100, 1000] if a.full else [10, 100])
    work = Path(tempfile.mkdtemp(prefix="fedshield-sim-scale-"))
    print(f"sim_scale: tiny BERT (2x32), text-file task, {PER_SITE} records/site, last_layers k=1, "
          f"privacy=none, {ROUNDS} rounds, all N sites train each round; {os.cpu_count()} CPUs; "
          f"sizes {sizes}, repeat {a.repeat}; work dir {work}", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    t_start = time.time()
    for rep in range(a.repeat):
        for n in sizes:
            order = ("fedshield", "plain") if rep % 2 == 0 else ("plain", "fedshield")
            for app in order:
                r = measure(app, n, work)
                results.setdefault((app, n), []).append(r)
                print(f"  rep {rep + 1} N={n} {app}: {r} ({time.time() - t_start:.0f} s)", flush=True)

    def med(app, n, key):
        vals = [r[key] for r in results[(app, n)] if key in r]
        return statistics.median(vals) if vals else float("nan")

    print()
    print("| sites/round | fedshield updates/s (last round) | plain Flower updates/s (last round) | fedshield/plain | "
          "fedshield/plain (both rounds) | fedshield peak MB | plain peak MB | fedshield/plain (memory) "
          "| fedshield wall s | plain wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        fu, pu = med("fedshield", n, "updates_per_s"), med("plain", n, "updates_per_s")
        fm, pm = med("fedshield", n, "peak_mb"), med("plain", n, "peak_mb")
        fa, pa = med("fedshield", n, "updates_per_s_all"), med("plain", n, "updates_per_s_all")
        print(f"| {n:,} | {fu:.2f} | {pu:.2f} | {fu / pu:.2f} | {fa / pa:.2f} | {fm:.0f} | {pm:.0f} | {fm / pm:.2f} | "
              f"{med('fedshield', n, 'wall_s'):.0f} | {med('plain', n, 'wall_s'):.0f} |")
    if not a.full and not a.sites:
        print("1,000 sites per round: not run by default (too slow for a ~6 min run on 2 cores); use --full")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()

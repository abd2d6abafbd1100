"""Simulation scale: client updates per second and peak memory, side by side, with and without DP:
the plain Flower app, fedshield on Flower's runtime, fedshield's batched engine, pfl-research.

    .venv/bin/python bench/sim_scale.py --setup-pfl    # once: bench/.venv-pfl (pfl 0.6.0, same CPU torch)
    .venv/bin/python bench/sim_scale.py --quick        # 10 sites per round, every app, with DP
    .venv/bin/python bench/sim_scale.py                # 10 and 100 sites per round
    .venv/bin/python bench/sim_scale.py --full         # 10, 100 and 1,000 sites (long on 2 cores)
    .venv/bin/python bench/sim_scale.py --sites 1000 --dp on --apps plain batched pfl
    .venv/bin/python bench/sim_scale.py --registered 10000 --sites 1000   # 10,000 registered, 1,000 a round

Task: a tiny text classifier, the bring-your-own-data task (text-file) on a synthetic CSV
(two topics that share no words, tests/helpers.py), 8 training records per site, and a
2-layer 32-wide random-weight BERT built in code (tests' `tiny_bert`, dropout off: so that the
batched engine can vectorise its trained layer; every app trains the same model), max_length 16,
trainable=last_layers k=1 (the frozen prefix cached, as a site trains), SGD (momentum 0.9,
lr 0.5), batch 8, 1 local epoch, fraction_train=1 so all N sites train every round, 2 rounds.
DP ("-dp" variants): fedshield `privacy=dp-sgd privacy.noise_multiplier=1.0` (record-level
DP-SGD through Opacus at every site: per-sample clipping to privacy.max_grad_norm, Poisson
sampling, Gaussian noise every step, the site's noisy count, centering release, signed ledger;
target_epsilon raised so that no site declines); the plain app the same Opacus DP-SGD step
(task.trainer.train_local with dp=True at the same σ and clip) without any ledger or count
release; pfl its local GaussianMechanism (see bench/sim_scale_pfl.py: user-level, one clip
and one noise draw per update: less work, not the same guarantee).

The apps:
- plain: a minimal idiomatic Flower app (flwr.serverapp.strategy.FedAvg + a ClientApp) on
  Flower's simulation runtime (Ray): the run's config parsed and the site split computed
  once per worker process (as fedshield does), the model built per message (as Flower's
  templates do and as fedshield's sites do), the same task code (task.pipeline.build_view +
  encode with the prefix cached on disk + task.trainer.train_local), replying with the
  trainable weights;
- fedshield: `fedshield simulate` with simulation.engine=flower (the same runtime), which adds
  its site query round, site state (signing key, ledger), frozen-weight fingerprint, per-round
  central evaluation, run directory, plots and model export;
- batched: the same with simulation.engine=batched (many virtual sites per worker, no Ray);
- pfl: Apple's pfl-research 0.6.0 (bench/sim_scale_pfl.py, in its own venv).

Each (app, N) runs in its own subprocess (a clean Ray); the variants are interleaved, in
reversed order on every other repetition (`--repeat R`), and medians are reported.
Updates/s (headline) = sites trained in the last round / its duration (warm workers): for
fedshield the interval between the coordinator's last two metrics rows, stamped in the
driver process when each row is written (metrics.jsonl's own elapsed_s has 0.1 s
resolution), so it includes the central evaluation of that round; for the plain app the
interval between FedAvg's last two evaluate_fn calls; for pfl between its last two central
iterations. Over both rounds it is shown too, as is the wall time of the whole subprocess.
Peak memory = the largest sum of RSS over the subprocess and all its descendants (Ray
GCS, raylet and workers; the batched engine's worker processes), sampled every 0.2 s with
psutil. `--registered M` registers M virtual sites and trains N of them a round
(fraction_train = N / M). The results and what differs between the apps: bench/RESULTS.md,
section 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROUNDS = 2
PER_SITE = 8
TEST_FRACTION = 0.2
NOISE_MULTIPLIER = 1.0
APPS = ("plain", "fedshield", "batched", "pfl")
PFL_VENV = ROOT / "bench" / ".venv-pfl"
PFL_REQUIREMENTS = ROOT / "bench" / "pfl-requirements.txt"


def make_assets(work: Path, n_sites: int) -> tuple[Path, Path]:
    """The tiny BERT (once) and a CSV with PER_SITE training rows per site."""
    model = work / "tiny-bert-no-dropout"
    if not (model / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        from fedshield.task.model import bundled_model_path

        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        BertForSequenceClassification(config).save_pretrained(model)
        AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(model)
    from tests.helpers import synthetic_rows, write_csv

    rows = int(round(PER_SITE * n_sites / (1 - TEST_FRACTION)))
    data = work / f"topics-{n_sites}.csv"
    if not data.exists():
        write_csv(data, synthetic_rows(rows, seed=1))
    return model, data


def has_engine_key() -> bool:
    """Whether this checkout has simulation.engine (issue 18's batched engine)."""
    import dataclasses

    from fedshield.conf.schema import SimulationConfig

    return any(f.name == "engine" for f in dataclasses.fields(SimulationConfig))


def overrides(model: Path, data: Path, work: Path, n_sites: int, tag: str, *, dp: bool,
              engine: str | None, fraction: float = 1.0) -> list[str]:
    per_round = max(1, round(fraction * n_sites))
    items = [
        "task=text-file", f"task.data_path={data}", f"task.model={model}", "task.max_length=16",
        f"task.test_fraction={TEST_FRACTION}",
        f"federation.num_sites={n_sites}", f"federation.rounds={ROUNDS}", f"federation.fraction_train={fraction}",
        f"federation.min_sites={per_round}", "federation.partition=iid",
        "training.trainable=last_layers", "training.last_layers=1", "training.optimizer=sgd",
        "training.batch_size=8", "training.local_epochs=1", "training.learning_rate=0.5",
        "simulation.client_cpus=1", f"output.dir={work / 'runs' / tag}",
    ]
    if dp:
        # σ fixed (no calibration search), and a budget no site reaches in 2 rounds: the
        # benchmark measures throughput, not what a declined round costs.
        items += ["privacy=dp-sgd", f"privacy.noise_multiplier={NOISE_MULTIPLIER}", "privacy.target_epsilon=1000"]
    else:
        items += ["privacy=none"]
    if engine is not None and has_engine_key():
        items.append(f"simulation.engine={engine}")
    # --extra key=value ... (fedshield's apps only): e.g. simulation.num_cpus=1
    return items + json.loads(os.environ.get("SIM_SCALE_EXTRA", "[]"))


# ------------------------------------------------------------------ the plain Flower app

def plain_client_app():
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import types

        import torch

        from fedshield.conf.config import Config
        from fedshield.protocol import from_array_record as from_arrays
        from fedshield.protocol import to_array_record as to_arrays
        from fedshield.task.pipeline import build_view, encode
        from fedshield.task.sites import virtual_sites
        from fedshield.task.trainer import LocalPlan, poisson_rate, train_local

        # Once per worker process, as an idiomatic app does: the config parsed and the
        # site split computed (virtual_sites caches it per process). This function is
        # pickled by value on every Ray call, so the cache lives in a module in sys.modules.
        cache = sys.modules.setdefault("_sim_scale_plain_cache", types.ModuleType("_sim_scale_plain_cache"))
        text = str(msg.content["config"]["cfg"])
        configs: dict[str, Config] = cache.__dict__.setdefault("configs", {})
        if text not in configs:
            configs[text] = Config.from_text(text)
        cfg = configs[text]
        pid = int(context.node_config["partition-id"])
        _, data = virtual_sites(cfg)[pid]
        view = build_view(cfg)
        view.load_trainable(from_arrays(msg.content["arrays"]))
        site_cache = Path(str(msg.content["config"]["work"])) / f"site-{pid}" / "cache"
        ds = encode(cfg, view, data, cache_dir=site_cache)
        tr, priv = cfg.training, cfg.privacy
        dp = priv.mode != "none"
        plan = LocalPlan(epochs=tr.local_epochs, batch_size=tr.batch_size,
                         max_physical_batch_size=tr.max_physical_batch_size,
                         learning_rate=tr.learning_rate, optimizer=tr.optimizer, dp=dp,
                         noise_multiplier=float(priv.noise_multiplier or 0.0), max_grad_norm=priv.max_grad_norm,
                         grad_sample_mode=tr.grad_sample_mode, accountant=priv.accountant,
                         sample_rate=poisson_rate(len(ds), tr.batch_size) if dp else None)
        res = train_local(view.module, ds, plan, device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(pid))
        content = RecordDict({
            "arrays": to_arrays(view.trainable_state()),
            "metrics": MetricRecord({"num-examples": len(ds), "train-loss": res.mean_loss}),
        })
        return Message(content=content, reply_to=msg)

    return app


def run_plain(cfg: Any, work: Path) -> dict[str, Any]:
    from flwr.app import ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

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

        def evaluate(server_round: int, arrays: Any) -> MetricRecord:
            stamps.append(time.time())
            return MetricRecord({})

        strategy.start(grid=grid, initial_arrays=to_arrays(view.trainable_state()),
                       num_rounds=ROUNDS, timeout=3600.0,
                       train_config=ConfigRecord({"cfg": cfg.to_yaml(), "work": str(work / "plain-sites")}),
                       evaluate_fn=evaluate)

    config = backend_config(cfg)
    config["init_args"].pop("num_gpus", None)
    run_simulation(server_app=server, client_app=plain_client_app(), num_supernodes=n,
                   backend_config=config, verbose_logging=False)
    return {"rounds_s": stamps[-1] - stamps[0], "last_round_s": stamps[-1] - stamps[-2],
            "rounds_seen": len(stamps) - 1, "trained_last": n}


def run_fedshield(cfg: Any) -> dict[str, Any]:
    import fedshield.server.app as server_app
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    # Stamp each metrics row when the coordinator writes it (in this process: Flower's
    # in-process simulation runs the ServerApp in a thread here); elapsed_s is rounded to 0.1 s.
    stamps: list[float] = []
    append = server_app.append_jsonl

    def stamped(path: Path, row: dict[str, Any]) -> None:
        if Path(path).name == "metrics.jsonl":
            stamps.append(time.time())
        append(path, row)

    server_app.append_jsonl = stamped  # type: ignore[assignment]
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    times = stamps if len(stamps) == len(rows) else [float(r["elapsed_s"]) for r in rows]
    out = {"rounds_s": times[-1] - times[0], "last_round_s": times[-1] - times[-2], "rounds_seen": len(rows) - 1,
           "accuracy": rows[-1]["accuracy"], "trained_last": int(rows[-1].get("trained", 0)),
           "declined_last": int(rows[-1].get("declined", 0)), "epsilon_max": rows[-1].get("epsilon_max"),
           "precise_stamps": len(stamps) == len(rows), "run_dir": str(run)}
    return out


def run_pfl(cfg: Any, model: Path, work: Path, dp: bool) -> None:
    """Prepare the sites' data with fedshield's task code, then become pfl's venv python."""
    import torch

    from fedshield.task.partition import partition
    from fedshield.task.pipeline import build_view, encode, pool_and_test

    t0 = time.time()
    view = build_view(cfg)
    # The sites' shares as task.sites.virtual_sites splits the pool, encoded in one pass
    # (padding is to max_length: the same tensors as site by site, in a fraction of the time).
    pool, _ = pool_and_test(cfg)
    fed = cfg.federation
    parts = partition(pool.labels, fed.num_sites, fed.partition, seed=fed.seed, alpha=fed.dirichlet_alpha,
                      groups=pool.groups)
    everything = encode(cfg, view, pool).tensors
    sites = [tuple(t[torch.as_tensor(idx, dtype=torch.long)].clone() for t in everything) for idx in parts]
    tr, priv = cfg.training, cfg.privacy
    work_file = work / f"pfl-{len(sites)}-{'dp' if dp else 'nodp'}-{time.time_ns()}.pt"
    torch.save({"model": str(model), "first_layer": view.prefix_layers, "sites": sites, "dp": dp,
                "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": priv.max_grad_norm, "rounds": ROUNDS,
                "epochs": tr.local_epochs, "batch_size": tr.batch_size, "learning_rate": tr.learning_rate,
                "seed": cfg.federation.seed, "prep_s": time.time() - t0}, work_file)
    python = PFL_VENV / "bin" / "python"
    if not python.exists():
        print(f"RESULT {json.dumps({'error': f'no {python}: run bench/sim_scale.py --setup-pfl'})}", flush=True)
        return
    sys.stdout.flush()
    # Replace this process: the peak memory sampled is pfl's alone, not fedshield's as well.
    os.execv(str(python), [str(python), str(ROOT / "bench" / "sim_scale_pfl.py"), str(work_file)])


def one(app: str, n_sites: int, work: Path, registered: int | None) -> None:
    """Child process: one run; prints a JSON line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from fedshield.conf.config import Config

    base, _, suffix = app.partition("-")
    dp = suffix == "dp"
    total = registered or n_sites
    model, data = make_assets(work, total)
    tag = f"{app}-{n_sites}-{time.time_ns()}"
    engine = {"fedshield": "flower", "batched": "batched"}.get(base)
    cfg = Config.load(overrides(model, data, work, total, tag, dp=dp, engine=engine,
                                fraction=n_sites / total))
    if base == "batched" and not has_engine_key():
        print("RESULT " + json.dumps({"error": "no simulation.engine in this checkout (issue 18's batched engine)"}))
        return
    t0 = time.time()
    if base == "pfl":
        run_pfl(cfg, model, work, dp)
        return
    out = run_plain(cfg, work / tag) if base == "plain" else run_fedshield(cfg)
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


def measure(app: str, n_sites: int, work: Path, registered: int | None = None, threads: int = 0,
            extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", app, str(n_sites), "--work", str(work)]
    env = dict(os.environ, SIM_SCALE_PFL_THREADS=str(threads), SIM_SCALE_EXTRA=json.dumps(extra or []))
    if registered:
        cmd += ["--registered", str(registered)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    assert proc.stdout is not None
    try:
        lines = proc.stdout.read().splitlines()
        proc.wait()
    finally:  # a stopped benchmark (Ctrl-C, `timeout`) takes its run's process group with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        done.set()
        th.join()
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if result is None or "last_round_s" not in result:
        tail = " | ".join(lines[-5:])
        return {"error": (result or {}).get("error") or f"rc={proc.returncode}: {tail[-400:]}",
                "peak_mb": peak[0] / 2**20, "process_wall_s": time.time() - t0}
    result["process_wall_s"] = time.time() - t0
    result["peak_mb"] = peak[0] / 2**20
    trained = int(result.get("trained_last") or n_sites)
    result["updates_per_s"] = trained / result["last_round_s"]
    result["updates_per_s_all"] = n_sites * ROUNDS / result["rounds_s"] if result["rounds_s"] > 0 else float("nan")
    return result


def setup_pfl() -> None:
    """bench/.venv-pfl: pfl 0.6.0 and its dependencies pinned, the same CPU torch 2.13.0
    (the registry's wheel on disk: an exact pin never pulls a CUDA build)."""
    if not (PFL_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PFL_VENV)], check=True)
    subprocess.run([str(PFL_VENV / "bin" / "pip"), "install", "--no-deps", "-r", str(PFL_REQUIREMENTS)], check=True)
    subprocess.run([str(PFL_VENV / "bin" / "python"), "-c", "import pfl, torch; print('pfl', pfl.__version__ "
                    "if hasattr(pfl, '__version__') else '', 'torch', torch.__version__)"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 sites per round, DP only")
    ap.add_argument("--full", action="store_true", help="also 1,000 sites per round")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sites", type=int, nargs="*", help="override the list of N (sites per round)")
    ap.add_argument("--apps", nargs="*", choices=APPS, default=list(APPS))
    ap.add_argument("--dp", choices=("off", "on", "both"), help="default: both (--quick: on)")
    ap.add_argument("--registered", type=int, help="registered virtual sites (fraction_train = N / this)")
    ap.add_argument("--threads", type=int, default=1,
                    help="pfl's torch threads (0: torch's default); each Ray worker of plain/fedshield has one, "
                         "the batched engine sets its workers' own")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for fedshield's runs")
    ap.add_argument("--setup-pfl", action="store_true", help="make bench/.venv-pfl and exit")
    ap.add_argument("--one", nargs=2, metavar=("APP", "N"))
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    if a.setup_pfl:
        setup_pfl()
        return
    if a.one:
        one(a.one[0], int(a.one[1]), a.work, a.registered)
        return
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that measure() stops its child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = a.sites or ([10] if a.quick else [10, 100, 1000] if a.full else [10, 100])
    dps = {"off": [False], "on": [True], "both": [False, True]}[a.dp or ("on" if a.quick else "both")]
    apps = [app + ("-dp" if dp else "") for dp in dps for app in a.apps]
    work = Path(tempfile.mkdtemp(prefix="fedshield-sim-scale-"))
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"sim_scale: tiny BERT (2x32), text-file task, {PER_SITE} records/site, last_layers k=1, {ROUNDS} rounds, "
          f"all N sites train each round{f' of {a.registered:,} registered' if a.registered else ''}; "
          f"{os.cpu_count()} CPUs, load {load[0]:.1f}; sizes {sizes}, apps {apps}, repeat {a.repeat}; "
          f"work dir {work}", flush=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    t_start = time.time()
    for rep in range(a.repeat):
        for n in sizes:
            for app in (apps if rep % 2 == 0 else apps[::-1]):
                r = measure(app, n, work, a.registered, a.threads, a.extra)
                results.setdefault((app, n), []).append(r)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "run_dir"}
                print(f"  rep {rep + 1} N={n} {app}: {shown} (load {os.getloadavg()[0]:.1f}, "
                      f"{time.time() - t_start:.0f} s)", flush=True)

    def med(app: str, n: int, key: str) -> float:
        vals = [r[key] for r in results.get((app, n), []) if key in r]
        return statistics.median(vals) if vals else float("nan")

    print()
    print("| sites/round | DP | app | updates/s (last round) | updates/s (both rounds) | x plain | x pfl | "
          "peak MB | wall s |")
    print("|---:|:--|:--|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for dp in dps:
            sfx = "-dp" if dp else ""
            plain, pfl = med("plain" + sfx, n, "updates_per_s"), med("pfl" + sfx, n, "updates_per_s")
            for app in a.apps:
                name = app + sfx
                u = med(name, n, "updates_per_s")
                errors = [r["error"] for r in results.get((name, n), []) if "error" in r]
                if errors and u != u:
                    print(f"| {n:,} | {'yes' if dp else 'no'} | {app} | error: {errors[0][:120]} | | | | | |")
                    continue
                both = med(name, n, "updates_per_s_all")
                print(f"| {n:,} | {'yes' if dp else 'no'} | {app} | {u:.1f} | {both:.1f} | "
                      f"{u / plain:.2f} | {u / pfl:.2f} | {med(name, n, 'peak_mb'):.0f} | "
                      f"{med(name, n, 'process_wall_s'):.0f} |")
    print(f"total {time.time() - t_start:.0f} s, load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

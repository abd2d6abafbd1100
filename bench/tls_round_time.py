"""Round time with TLS vs without on loopback: plaintext Flower, TLS Flower, `fedshield server`.

    .venv/bin/python bench/tls_round_time.py [--repeat 3] [--payload tiny|bundled|both]

`fedshield server` refuses plaintext by design, so "TLS vs no TLS" cannot be measured by
flipping a flag of the product. This script runs the same federated job three ways:

  A  plaintext   `flower-superlink --insecure` on 127.0.0.1 + N `flower-supernode --insecure`.
  B  tls-direct  `flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` with a
                 loopback PKI (deploy.pki.init_pki, "localhost" + 127.0.0.1) + N
                 `flower-supernode --root-certificates ca.crt`.
  C  fedshield   the product path: `fedshield server` (TLS SuperLink on loopback, SuperNode
                 authentication with registered connection keys, and the Fleet-only TLS
                 front `deploy.front.FleetFront` that the sites connect to) + N
                 `fedshield client`, launched as tests/test_deployment.py launches them.

A and B are assembled from the product's own pieces (server/cli.py's resolve_config, write_app,
write_flower_config, Children, wait_tls; deploy/processes.py's flower_env, flwr_bin) and submit the same
generated fedshield app with `flwr run APP fedshield --stream`; their SuperNodes get the
node config that `fedshield client` passes (client.cli.node_config: site-name, data-path,
state-dir) and the same --max-wait-time. So A vs B differs only by TLS on the Fleet,
Control and Runtime APIs, and B vs C only by fedshield's front (a second TLS hop, every
request re-buffered in Python) and SuperNode authentication (signed requests, key
registration before the run).

The job: privacy.mode=none (no calibration, no noise), 3 sites, text-file task on the
synthetic two-topic CSV of tests/conftest.py, training.trainable=all so that every weight
travels both ways every round:
  tiny     the 2-layer 32-wide random BERT of tests' `tiny_bert` (~4 MB per site per round
           each way), 60 records per site, 5 rounds;
  bundled  the bundled all-MiniLM-L6-v2 (~91 MB per site per round each way), 16 records per
           site and one local step, 4 rounds: transfer and (de)serialisation dominate.

Per-round time: `metrics.jsonl` has `elapsed_s` (since the ServerApp's round loop began)
after each round's central evaluation; the differences between consecutive rows are round
durations. Round 1 (warm-up: the first train message, first model transfer, cold file
caches) is dropped and the median of the other rounds, pooled over repetitions, is the
headline. (Flower 1.41 starts a fresh `flwr-clientapp` process for every message, so every
round pays Python/torch start-up and a model load at each site.) Wall time = first
process started to the run's report.md written (includes start-up, site admission and export).
Variants are interleaved (A B C A B C ...) so that the shared machine's load drifts hit all
three alike. Note that Flower 1.41 polls: the ServerApp pulls replies every 3 s and an idle
SuperNode pulls every 3 s, so round times move in ~3 s steps and small differences hide
inside that granularity; the mean is shown too.

Every child runs in its own process group and is killed at the end, on error or Ctrl-C too
(and any process they started, found with psutil). Work files live in one tempfile folder,
removed at the end unless --keep or a failure (then its path is in the error line).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before anything imports flwr

import argparse
import contextlib
import io
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One environment for every process of every variant (the fedshield processes inherit it as
# tests/test_deployment.py's env() sets it; flower_env adds FLWR_HOME and the offline flags).
os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

import psutil  # noqa: E402

from fedshield.client.cli import node_config  # noqa: E402
from fedshield.deploy.processes import flower_env, flwr_bin, free_port, last_error  # noqa: E402
from fedshield.privacy.errors import FedShieldError  # noqa: E402
from fedshield.server.cli import (  # noqa: E402
    CONNECTION,
    Children,
    resolve_config,
    wait_tls,
    write_app,
    write_flower_config,
)

SITES = ("st-marys", "st-johns", "city-bank")
RECONNECT_S = 5  # --max-wait-time of every SuperNode (what test_deployment gives fedshield client)
VARIANTS = {"A": "plaintext", "B": "tls-direct", "C": "fedshield"}


@dataclass
class Payload:
    name: str
    rounds: int
    per_site: int
    extra: dict  # config overrides on top of the common ones
    timeout_s: float
    mb: float = 0.0  # float32 MB of the trainable weights (one way, one site, one round)


PAYLOADS = {
    "tiny": Payload("tiny", rounds=5, per_site=60, timeout_s=600, extra={
        "training.batch_size": 32, "training.local_epochs": 1, "training.learning_rate": 0.1}),
    "bundled": Payload("bundled", rounds=4, per_site=16, timeout_s=1200, extra={
        "training.batch_size": 16, "training.max_physical_batch_size": 16, "training.local_epochs": 1,
        "training.learning_rate": 0.01}),
}


class BenchError(Exception):
    pass


@dataclass
class Result:
    variant: str
    payload: str
    rep: int
    rounds_s: list[float]  # round durations, round 1 included
    wall_s: float
    load1: float
    extra: dict = field(default_factory=dict)

    @property
    def measured(self) -> list[float]:
        return self.rounds_s[1:]


# ------------------------------------------------------------------ processes


class Procs(Children):
    """server.cli.Children (process groups, SIGTERM then SIGKILL) + a sweep of descendants.

    `fedshield server/client` start their SuperLink/SuperNode in new sessions, so killing
    their group is not enough: snapshot every descendant before stopping, kill survivors after.
    """

    def stop(self) -> None:
        seen: dict[int, psutil.Process] = {}
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                for d in psutil.Process(p.pid).children(recursive=True):
                    seen[d.pid] = d
        super().stop()
        for d in seen.values():
            with contextlib.suppress(psutil.Error):
                d.kill()
        psutil.wait_procs(list(seen.values()), timeout=5)
        self.procs.clear()


ALL: list[Procs] = []  # every job's processes, for the signal handler


def log_file(path: Path):
    return open(path, "ab")


def wait_tcp(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Plaintext twin of server.cli.wait_tls: the port accepts TCP."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the SuperLink stopped at start (exit {proc.returncode}): {last_error(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise BenchError(f"the SuperLink did not come up in {timeout:.0f}s ({log})")


def write_plain_flower_config(home: Path, port: int) -> None:
    """server.cli.write_flower_config without root-certificates: flwr 1.41 reads `insecure = true`
    (flwr/cli/flower_config.py; root-certificates together with insecure is an error)."""
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def finished(run_dir: Path) -> bool:
    report = run_dir / "report.md"  # the last file run_federation writes (server.cli._finished)
    return report.is_file() and report.stat().st_size > 0


def wait_run(run_dir: Path, watched: dict[str, tuple[subprocess.Popen, Path]], timeout: float) -> float:
    """Until report.md is written; any watched process that ends before is a failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if finished(run_dir):
            return time.time()
        for what, (p, log) in watched.items():
            if p.poll() is not None and not finished(run_dir):
                raise BenchError(f"{what} ended (exit {p.returncode}) before the run completed: "
                                 f"{last_error(log)} ({log})")
        time.sleep(0.2)
    raise BenchError(f"no report.md after {timeout:.0f}s ({run_dir})")


# ------------------------------------------------------------------ assets


@dataclass
class Assets:
    work: Path
    server_csv: Path
    site_csv: dict[str, dict[str, Path]]  # payload -> site -> csv
    tiny_model: Path | None
    direct_pki: Path
    product_pki: Path


def make_assets(work: Path, payloads: list[str]) -> Assets:
    from fedshield.deploy import pki
    from tests.conftest import synthetic_rows, write_csv

    tiny = None
    if "tiny" in payloads:  # tests/conftest.py's tiny_bert, written to the work folder
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        from fedshield.task.model import bundled_model_path

        tiny = work / "tiny-bert"
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2)).save_pretrained(tiny)
        AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(tiny)
    # The coordinator's file only feeds central evaluation (test_fraction of it): keep it small.
    server_csv = write_csv(work / "server.csv", synthetic_rows(40, seed=7))
    site_csv = {p: {s: write_csv(work / f"{p}-{s}.csv", synthetic_rows(PAYLOADS[p].per_site, seed=10 + i))
                    for i, s in enumerate(SITES)} for p in payloads}
    direct = work / "pki-direct"
    pki.init_pki(direct, "localhost", ["127.0.0.1"], days=30, ca_days=30)
    product = work / "pki-product"  # `fedshield certs init|site`, as test_deployment's pki_dir
    with contextlib.redirect_stdout(io.StringIO()):
        if pki.certs_main(["init", "--out", str(product), "--server-name", "fl.example.org",
                           "--san", "127.0.0.1"]) != 0:
            raise BenchError("fedshield certs init failed")
        for s in SITES:
            if pki.certs_main(["site", s, "--out", str(product)]) != 0:
                raise BenchError(f"fedshield certs site {s} failed")
    return Assets(work, server_csv, site_csv, tiny, direct, product)


def overrides(payload: Payload, assets: Assets, out_dir: Path, run_name: str) -> list[str]:
    """One job's config, identical for the three variants but for output.dir/run_name."""
    over = {
        "task": "text-file",
        "task.data_path": str(assets.server_csv),
        "task.model": str(assets.tiny_model) if payload.name == "tiny" else "",  # "" = bundled MiniLM
        "task.max_length": 16,
        "task.test_fraction": 0.25,
        "federation.num_sites": len(SITES),
        "federation.rounds": payload.rounds,
        "federation.round_timeout_s": payload.timeout_s,
        "training.trainable": "all",
        "training.optimizer": "sgd",
        "privacy.mode": "none",
        "privacy.delta": 1e-3,
        "privacy.max_grad_norm": 1.0,
        **payload.extra,
        "output.dir": str(out_dir),
        "output.run_name": run_name,
    }
    return [f"{k}={v}" for k, v in over.items()]


def payload_mb(payload: Payload, assets: Assets) -> float:
    """float32 MB of what travels: the trainable state the ServerApp sends (server.app)."""
    from fedshield import conf
    from fedshield.task.pipeline import build_view

    cfg = conf.load_config(overrides(payload, assets, assets.work / "unused", "x"))
    state = build_view(cfg).trainable_state()
    return sum(v.nbytes for v in state.values()) / 1e6


# ------------------------------------------------------------------ the three variants


def run_flower(variant: str, payload: Payload, assets: Assets, job: Path, procs: Procs) -> tuple[Path, float]:
    """A (plaintext) or B (TLS direct): server.cli's pieces without the front and node auth."""
    cfg, run_dir = resolve_config(argparse.Namespace(
        config=None, overrides=overrides(payload, assets, job / "runs", variant)))
    home = job / ".flower"
    home.mkdir(parents=True)
    os.chmod(home, 0o700)
    write_app(home / "app", cfg)
    port = free_port()
    ca = assets.direct_pki / "ca.crt"
    tls = variant == "B"
    if tls:
        write_flower_config(home, port, ca)
        security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(assets.direct_pki / "server.crt"),
                    "--ssl-keyfile", str(assets.direct_pki / "server.key")]
    else:
        write_plain_flower_config(home, port)
        security = ["--insecure"]
    env = flower_env(home)
    t0 = time.time()
    log = home / "superlink.log"
    with log_file(log) as f:
        link = procs.start([flwr_bin("flower-superlink"), *security, "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)],
                           env, stdout=f, stderr=subprocess.STDOUT, cwd=str(home))
    if tls:
        try:
            wait_tls(port, ca, link, log)
        except FedShieldError as exc:
            raise BenchError(str(exc)) from None
    else:
        wait_tcp(port, link, log)
    watched = {"SuperLink": (link, log)}
    for site in SITES:
        state = job / f"state-{site}"
        (state / ".flower").mkdir(parents=True)
        os.chmod(state / ".flower", 0o700)
        slog = state / "supernode.log"
        with log_file(slog) as f:
            watched[f"SuperNode {site}"] = (procs.start([
                flwr_bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                *(["--root-certificates", str(ca)] if tls else ["--insecure"]),
                "--node-config", node_config(site, assets.site_csv[payload.name][site], state, {}),
                "--host", "127.0.0.1", "--port", str(free_port()), "--max-wait-time", str(RECONNECT_S),
            ], flower_env(state / ".flower"), stdout=f, stderr=subprocess.STDOUT, cwd=str(state)), slog)
    rlog = home / "flwr-run.log"
    with log_file(rlog) as f:
        watched["flwr run"] = (procs.start([flwr_bin("flwr"), "run", str(home / "app"), CONNECTION, "--stream"],
                                           env, stdout=f, stderr=subprocess.STDOUT), rlog)
    t1 = wait_run(run_dir, watched, payload.timeout_s)
    return run_dir, t1 - t0


def run_fedshield(payload: Payload, assets: Assets, job: Path, procs: Procs) -> tuple[Path, float]:
    """C: `fedshield server` + `fedshield client` x N, as tests/test_deployment.py starts them."""
    job.mkdir(parents=True)
    pki_dir = assets.product_pki
    port = free_port()
    fedshield = [sys.executable, "-m", "fedshield.simulations.cli"]
    t0 = time.time()
    slog = job / "server.log"
    with log_file(slog) as f:
        server = procs.start([*fedshield, "server", "--pki", str(pki_dir),
                              "--connection-keys", *(str(pki_dir / f"{s}.pub") for s in SITES),
                              "--address", f"127.0.0.1:{port}",
                              *overrides(payload, assets, job / "runs", "C")],
                             dict(os.environ), stdout=f, stderr=subprocess.STDOUT, cwd=str(job))
    watched = {"fedshield server": (server, slog)}
    for site in SITES:
        clog = job / f"client-{site}.log"
        with log_file(clog) as f:
            watched[f"fedshield client {site}"] = (procs.start([
                *fedshield, "client", "--server", f"127.0.0.1:{port}", "--ca", str(pki_dir / "ca.crt"),
                "--connection-key", str(pki_dir / f"{site}.key"), "--data", str(assets.site_csv[payload.name][site]),
                "--state-dir", str(job / f"state-{site}"), "--connect-timeout", "60",
                "--reconnect-s", str(RECONNECT_S),
            ], dict(os.environ), stdout=f, stderr=subprocess.STDOUT, cwd=str(job)), clog)
    run_dir = job / "runs" / "C"
    t1 = wait_run(run_dir, watched, payload.timeout_s)
    return run_dir, t1 - t0


def round_durations(run_dir: Path, expected_rounds: int) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    by_round = {int(r["round"]): r for r in rows}
    missing = [r for r in range(expected_rounds + 1) if r not in by_round]
    if missing:
        raise BenchError(f"metrics.jsonl lacks round(s) {missing} ({run_dir})")
    short = [r for r in range(1, expected_rounds + 1) if by_round[r]["trained"] != len(SITES)]
    if short:  # a round with a missing site is another workload: not comparable
        raise BenchError(f"round(s) {short} did not train all {len(SITES)} sites ({run_dir})")
    e = [float(by_round[r]["elapsed_s"]) for r in range(expected_rounds + 1)]
    return [round(e[r] - e[r - 1], 1) for r in range(1, expected_rounds + 1)]


def run_job(variant: str, payload: Payload, assets: Assets, rep: int) -> Result:
    job = assets.work / f"{payload.name}-{variant}-{rep}"
    procs = Procs()
    ALL.append(procs)
    load1 = os.getloadavg()[0]
    try:
        if variant == "C":
            run_dir, wall = run_fedshield(payload, assets, job, procs)
        else:
            run_dir, wall = run_flower(variant, payload, assets, job, procs)
    except (BenchError, FedShieldError) as exc:
        raise BenchError(f"{variant} {VARIANTS[variant]} / {payload.name} rep {rep}: {exc}") from None
    finally:
        procs.stop()
        ALL.remove(procs)
    try:
        rounds = round_durations(run_dir, payload.rounds)
    except BenchError as exc:
        raise BenchError(f"{variant} {VARIANTS[variant]} / {payload.name} rep {rep}: {exc}") from None
    return Result(variant, payload.name, rep, rounds, wall, load1)


# ------------------------------------------------------------------ report


def table(results: list[Result], payloads: list[str], load_start, load_end, repeat: int) -> str:
    med = statistics.median
    out = ["| variant | payload | MB/site/round each way | median s/round | vs plaintext | mean s/round "
           "| median wall s | wall vs plaintext | rounds measured |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in payloads:
        base_r = base_w = None
        for v, name in VARIANTS.items():
            rs = [r for r in results if r.payload == p and r.variant == v]
            pooled = [x for r in rs for x in r.measured]
            m, w = med(pooled), med(r.wall_s for r in rs)
            if v == "A":
                base_r, base_w = m, w
            ratio = "1.00" if v == "A" else f"{m / base_r:.2f} ({v}/A)"
            wratio = "1.00" if v == "A" else f"{w / base_w:.2f} ({v}/A)"
            out.append(f"| {v} {name} | {p} | {PAYLOADS[p].mb:.1f} | {m:.1f} | {ratio} | "
                       f"{statistics.mean(pooled):.2f} | {w:.0f} | {wratio} | {len(pooled)} |")
    out += ["", "Raw, per repetition (round durations in s, round 1 first and not counted; "
            "load = 1-min load average when the job started):", "",
            "| payload | rep | variant | rounds s | median s/round (rounds 2+) | wall s | load |",
            "|---|---:|---|---|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r.payload} | {r.rep} | {r.variant} {VARIANTS[r.variant]} | "
                   f"{' '.join(f'{x:.1f}' for x in r.rounds_s)} | {med(r.measured):.1f} | {r.wall_s:.0f} "
                   f"| {r.load1:.2f} |")
    la = lambda t: " ".join(f"{x:.2f}" for x in t)  # noqa: E731
    out += ["", f"load average (1/5/15 min): start {la(load_start)}, end {la(load_end)}; "
            f"{os.cpu_count()} CPUs; repeat {repeat}, order A B C per repetition"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="A B C repetitions (interleaved), default 3")
    parser.add_argument("--payload", choices=("tiny", "bundled", "both"), default="tiny",
                        help="tiny (~4 MB/site/round, default), bundled (~91 MB) or both")
    parser.add_argument("--rounds", type=int, help="override the payload's number of rounds (>= 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, run directories)")
    args = parser.parse_args(argv)
    payloads = ["tiny", "bundled"] if args.payload == "both" else [args.payload]
    if args.repeat < 1 or (args.rounds is not None and args.rounds < 3):
        parser.error("--repeat must be >= 1 and --rounds >= 3 (round 1 is dropped)")
    if args.rounds:
        for p in payloads:
            PAYLOADS[p].rounds = args.rounds

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="fedshield-tls-bench-"))
    keep = args.keep
    load_start = os.getloadavg()
    t_start = time.time()
    results: list[Result] = []
    try:
        assets = make_assets(work, payloads)
        for p in payloads:
            PAYLOADS[p].mb = payload_mb(PAYLOADS[p], assets)
        print(f"tls_round_time: {len(SITES)} sites, trainable=all, privacy none; "
              + "; ".join(f"{p}: {PAYLOADS[p].mb:.1f} MB/site/round each way, {PAYLOADS[p].rounds} rounds, "
                          f"{PAYLOADS[p].per_site} records/site" for p in payloads)
              + f"; repeat {args.repeat}; work {work}", flush=True)
        for rep in range(1, args.repeat + 1):
            for p in payloads:
                for v in VARIANTS:
                    t = time.time()
                    r = run_job(v, PAYLOADS[p], assets, rep)
                    results.append(r)
                    print(f"  rep {rep} {p:<7} {v} {VARIANTS[v]:<10} rounds {r.rounds_s} wall {r.wall_s:.0f}s "
                          f"load {r.load1:.2f} ({time.time() - t:.0f}s)", flush=True)
                    time.sleep(2)  # let sockets and exiting processes settle between jobs
    except BenchError as exc:
        keep = True
        print(f"error: tls_round_time: {exc} (work folder kept: {work})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tls_round_time: interrupted; children stopped (work folder: {work})", file=sys.stderr)
        keep = True
        return 130
    except Exception as exc:  # a clear one line, not a traceback, for anything unexpected
        keep = True
        print(f"error: tls_round_time: {type(exc).__name__}: {exc} (work folder kept: {work})", file=sys.stderr)
        return 2
    finally:
        for procs in list(ALL):
            procs.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, payloads, load_start, os.getloadavg(), args.repeat))
    print(f"\ntotal {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SecAgg+ against plain FedAvg: round time and bytes per site per round, side by side.

    .venv/bin/python bench/secagg.py                       # real runs (10 and 50 sites) + micro-benchmark
    .venv/bin/python bench/secagg.py --sizes 10 --repeat 1 # a quick look
    .venv/bin/python bench/secagg.py --micro-only          # only the in-process micro-benchmark
    .venv/bin/python bench/secagg.py --sim-only --sizes 50 --variants plain secagg-ring  # a SecAgg+ ring
    .venv/bin/python bench/secagg.py --sim-only -- training.local_epochs=2   # overrides for every run

On 2 shared cores a 10-site run takes 2-6 min, a 50-site SecAgg+ run (defaults) 10-13 min,
most of a run's start-up being the sites' one-time feature cache; the default (both sizes,
2 repetitions, then the micro-benchmark) took about 1 h under load average 6-21.

**Real rounds.** The default task unchanged but for privacy (news-topics: BBC News, bundled
all-MiniLM-L6-v2, pooler + head on the cached encoder output, 149,765 trainable weights, IID,
fraction_train 1: every site trains every round) with `privacy=none` (the DP-SGD step on
cached features costs milliseconds either way; without DP the plain round is shortest, so
SecAgg+'s share of it is largest), on Flower's simulation runtime (Ray, 2 workers) through
`simulations.simulate.run_simulation`, the real ServerApp and the real ClientApp. Variant
A = `federation.secure_aggregation=off`, B = `secaggplus` with `secagg_neighbours=0` (every
site masks with every other: the product's default when bench/RESULTS.md's figures were taken;
the default is now a ring above 20 sites, the `secagg-ring` variant at 50); `secagg_max_dropout_fraction=0.3`,
whose threshold t = max(majority, floor(0.7 m)) is 7 of 10 and 35 of 50: exactly the 30%
case's survivors, so it is recovered without raising the setting); `secagg-ring` (on request)
= a ring of 2*ceil(log2 n) neighbours with `secagg_max_dropout_fraction=0.4` (t = 7 of 13 at
50 sites: at 0.3, t = 9 of 13, a random 30% breaks some neighbourhood in every round). Every
SecAgg+ run gets `secagg_timeout_s=600` (not 120): on 2 loaded cores 50 sites' share stage
takes tens of seconds, and a timeout would drop sites and measure the timeout.

One run per (variant, N) with 7 rounds and a dropout schedule by round: round 1 is a
warm-up and not counted (Ray workers, first training call), rounds 2-3 lose nobody,
4-5 lose 10% of the sites, 6-7 lose 30% (a seeded set per N and level, the same sites in
A and B). A lost site **vanishes after sharing its keys**: it answers SecAgg+'s setup and
share stages, then raises in the TRAIN (collect) stage, before training, so the coordinator
rebuilds its mask key sk1 from t shares and removes its pairwise masks from the sum; in A
the same sites raise in TRAIN (a plain dropout). A raising ClientApp comes back at once as
Flower's error reply, so the round measures the recovery work, not a timeout. Runs are
interleaved A B, B A, ... per repetition, each in its own subprocess (a clean Ray), and
each pair of same-position rounds (same N, level, repetition) gives one B/A ratio; the
table shows the median of those ratios and of the round times.

Round time = the interval between the coordinator's consecutive evaluation rows (the
`elapsed_s` of metrics.jsonl, unrounded): configure (+ SecAgg+ setup and share), training,
aggregation (+ unmasking) and the central evaluation. The coordinator's own stages are
timed by wrapping strategies/secagg.py's `prepare`, `finish` and `_ask` (the Grid round
trips) in the driver process, so `finish` minus its unmask round trip is the coordinator's
unmasking compute; the sites' handlers and `client.secagg.masked` are timed in the wrapping
ClientApp.

**Bytes per site per round**: every message a site receives (down) and sends (up), each
serialized with Flower's own serde (`flwr.common.serde.message_to_proto(msg).ByteSize()`:
content and metadata, before gRPC framing and TLS), counted in the wrapping ClientApp and
averaged over the sites that completed the round; hello, feature-sum and done (once per
run, not per round) are left out.

**Micro-benchmark** (no Ray, no training): the real site-side stage code (client/secagg.py)
and coordinator stages (strategies/secagg.py) on an in-process Grid as in
tests/test_secagg.py, at the real trainable size (the default model's pooler + head
tensors), at 10 and 50 sites, with every site in every neighbourhood (`neighbours=0`) and
with a SecAgg+ ring of 2*ceil(log2 n) neighbours, at 0 / 10 / 30% dropouts after sharing.
The site's cost is its time in the stage functions (per site, as on its own machine); the
coordinator's is the rest of `prepare` and `finish`. The ring runs at max dropout 0.4. Then
Flower's Shamir primitives alone (create / combine for b, for sk1 as Flower serializes it and
for a raw scalar), and how often a random ring (`neighbourhoods`, as a deployed coordinator
draws it) is broken by random 10% / 30% dropouts (`--shamir-only` runs these two alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

ROUNDS = 7
LEVELS = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.1, 5: 0.1, 6: 0.3, 7: 0.3}  # round -> dropout fraction
WARMUP = {1}
PER_ROUND_KINDS = ("secagg_setup", "secagg_share", "secagg_check", "train", "secagg_unmask")


def dropped_sites(n: int, level: float) -> list[int]:
    """The partition ids that vanish at `level` (seeded by N and level; same in both variants)."""
    k = int(round(level * n))
    return sorted(random.Random(f"secagg-bench-{n}-{level}").sample(range(n), k))


def schedule(n: int) -> dict[int, list[int]]:
    return {r: dropped_sites(n, level) for r, level in LEVELS.items()}


# ------------------------------------------------------------------ the wrapping ClientApp

def counting_app(drops: dict[int, list[int]], log_dir: str):
    """client.app's ClientApp (`site_app`) with every handler wrapped: each message and reply
    is measured (Flower's serde) and timed, and the sites in `drops[round]` raise in TRAIN.
    Built in a function so that Ray ships it to its workers by value."""
    import fedshield.client.app as real
    import fedshield.protocol as wire

    def size(message) -> int:
        from flwr.common.serde import message_to_proto

        return message_to_proto(message).ByteSize()

    def note(row: dict) -> None:
        with open(os.path.join(log_dir, f"site-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def patch_masking() -> None:  # time client.secagg's masking inside this worker, once per process
        from fedshield.client import secagg as site_side

        original = site_side.masked
        if getattr(original, "bench_timed", False):  # Ray may unpickle this app once per message
            return

        def masked(context, state, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(context, state, *args, **kwargs)
            note({"kind": "mask", "pid": int(context.node_config["partition-id"]),
                  "round": int(state["round"]), "s": time.perf_counter() - t0})
            return out

        masked.bench_timed = True  # type: ignore[attr-defined]
        site_side.masked = masked

    def server_round(msg) -> int:
        if msg.metadata.message_type == wire.TRAIN:
            return int(msg.content[wire.PLAN][wire.SERVER_ROUND])
        step = wire.read_secagg(msg)
        return step.server_round if step is not None else 0

    def measured(kind: str, handler):
        def run(msg, context):
            patch_masking()
            pid = int(context.node_config["partition-id"])
            rnd = server_round(msg) if kind in PER_ROUND_KINDS else 0
            m0 = time.perf_counter()
            down = size(msg)
            m1 = time.perf_counter()
            if kind == "train" and pid in drops.get(rnd, ()):
                note({"kind": kind, "pid": pid, "round": rnd, "down": down, "up": 0, "s": 0.0, "dropped": True,
                      "measure_s": m1 - m0})
                raise RuntimeError(f"bench: partition {pid} vanishes in round {rnd} after sharing its keys")
            t0 = time.perf_counter()
            reply = handler(msg, context)
            t1 = time.perf_counter()
            up = size(reply)
            note({"kind": kind, "pid": pid, "round": rnd, "down": down, "up": up, "s": t1 - t0,
                  "measure_s": (m1 - m0) + (time.perf_counter() - t1), "declined": wire.DECLINE in reply.content})
            return reply
        return run

    handlers = {"hello": real.hello, "feature_sum": real.feature_sum, "done": real.done, "train": real.train,
                "secagg_setup": real.secagg_setup, "secagg_share": real.secagg_share,
                "secagg_check": real.secagg_check, "secagg_unmask": real.secagg_unmask}
    return real.site_app(**{name: measured(name, handler) for name, handler in handlers.items()})


# ------------------------------------------------------------------ coordinator timers (driver process)

def time_coordinator(events: list[dict]) -> None:
    """Wrap the coordinator's round stages; each call appends {what, round, t0, t1}."""
    import fedshield.server.app as server_app
    from fedshield.strategies.secagg import SecAggPlus
    from fedshield.strategies.selection import SiteSelection

    def wrap(cls, name, what, round_of):
        original = getattr(cls, name)

        def timed(self, *args, **kwargs):
            t0 = time.time()
            try:
                return original(self, *args, **kwargs)
            finally:
                events.append({"what": what(args), "round": round_of(self, args), "t0": t0, "t1": time.time()})
        setattr(cls, name, timed)

    def flower_round(self, args):
        return self.run_round(args[0])

    wrap(SiteSelection, "configure_train", lambda a: "configure", flower_round)
    wrap(SiteSelection, "aggregate_train", lambda a: "aggregate", flower_round)
    wrap(SecAggPlus, "prepare", lambda a: "prepare", lambda s, a: a[0])
    wrap(SecAggPlus, "finish", lambda a: "finish", lambda s, a: a[0])
    wrap(SecAggPlus, "_ask", lambda a: f"ask_{a[2]}", lambda s, a: a[1].server_round)
    wrap(server_app.RoundLog, "on_evaluated", lambda a: "evaluated", lambda s, a: a[0])


# ------------------------------------------------------------------ one real run (child process)

def ring(n: int) -> int:
    """SecAgg+'s neighbourhood for n sites: 2*ceil(log2 n) neighbours."""
    return 2 * math.ceil(math.log2(n))


def variant_overrides(variant: str, n: int) -> list[str]:
    """plain: SecAgg+ off; secagg: every site masks with every other (secagg_neighbours=0, max
    dropout 0.3); secagg-ring: a ring of 2*ceil(log2 n) neighbours, max dropout 0.4.
    The key stages may take 600 s instead of 120 (on 2 shared cores 50 sites' share stage can
    approach 120 s; a timeout would drop sites and measure the timeout, not the protocol)."""
    secure = ["federation.secure_aggregation=secaggplus", "federation.secagg_timeout_s=600"]
    if variant == "plain":
        return []
    if variant == "secagg":  # everyone in every neighbourhood (the default when RESULTS.md was measured)
        return secure + ["federation.secagg_neighbours=0"]
    if variant == "secagg-ring":
        return secure + [f"federation.secagg_neighbours={ring(n)}", "federation.secagg_max_dropout_fraction=0.4"]
    raise ValueError(f"unknown variant {variant!r}")


def overrides(variant: str, n: int, work: Path, tag: str, extra: list[str]) -> list[str]:
    out = ["privacy=none", f"federation.num_sites={n}", f"federation.rounds={ROUNDS}",
           f"output.dir={work / 'runs'}", f"output.run_name={tag}", "output.save_model=false"]
    return out + variant_overrides(variant, n) + list(extra)


def one(variant: str, n: int, work: Path, extra: list[str]) -> None:
    """Child process: one run; prints a RESULT line."""
    import logging

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.getLogger("flwr").setLevel(logging.WARNING)

    import fedshield.client.app
    from fedshield import conf
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    tag = f"{variant}-{n}-{time.time_ns()}"
    log_dir = work / "sitelogs" / tag
    log_dir.mkdir(parents=True)
    cfg = conf.load_config(overrides(variant, n, work, tag, extra))
    drops = schedule(n)
    fedshield.client.app.app = counting_app(drops, str(log_dir))  # what run_simulation starts
    events: list[dict] = []
    time_coordinator(events)
    t0 = time.time()
    run = run_simulation(cfg)
    wall = time.time() - t0
    rows = read_jsonl(run / "metrics.jsonl")
    sites = []
    for path in sorted(log_dir.glob("site-*.jsonl")):
        sites += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evaluated = {e["round"]: e["t1"] for e in events if e["what"] == "evaluated"}
    out = {"variant": variant, "n": n, "wall_s": wall, "run": str(run), "rounds": {}}
    for r in range(1, ROUNDS + 1):
        row = rows[r]
        ev = [e for e in events if e["round"] == r]

        def spent(what: str, ev: list[dict] = ev) -> float:
            return sum(e["t1"] - e["t0"] for e in ev if e["what"] == what)

        conf_end = max((e["t1"] for e in ev if e["what"] == "configure"), default=float("nan"))
        agg_start = min((e["t0"] for e in ev if e["what"] == "aggregate"), default=float("nan"))
        mine = [s for s in sites if s["round"] == r]
        done = {s["pid"] for s in mine if s["kind"] == "train" and not s.get("dropped")}
        per_site = {}
        for pid in done:
            m = [s for s in mine if s["pid"] == pid]
            per_site[pid] = (sum(s["down"] for s in m if s["kind"] in PER_ROUND_KINDS),
                             sum(s["up"] for s in m if s["kind"] in PER_ROUND_KINDS))
        out["rounds"][r] = {
            "round_s": evaluated[r] - evaluated[r - 1],
            "elapsed_diff_s": row["elapsed_s"] - rows[r - 1]["elapsed_s"],
            "dropped_planned": len(drops[r]), "trained": row["trained"], "failed": row["failed"],
            "secagg_dropped": len(row["secagg_dropped"] or {}), "skipped": row["skipped"],
            "accuracy": row["accuracy"],
            "configure_s": spent("configure"), "aggregate_s": spent("aggregate"),
            "train_stage_s": agg_start - conf_end,
            "prepare_s": spent("prepare"), "finish_s": spent("finish"),
            "ask_setup_s": spent("ask_setup"), "ask_share_s": spent("ask_share"), "ask_check_s": spent("ask_check"),
            "ask_unmask_s": spent("ask_unmask"),
            "down_mb": statistics.mean(v[0] for v in per_site.values()) / 1e6 if per_site else float("nan"),
            "up_mb": statistics.mean(v[1] for v in per_site.values()) / 1e6 if per_site else float("nan"),
            "site_s": {k: sum(s["s"] for s in mine if s["kind"] == k) for k in (*PER_ROUND_KINDS, "mask")},
            "measure_s": sum(s.get("measure_s", 0.0) for s in mine),
        }
    print("RESULT " + json.dumps(out), flush=True)


def measure(variant: str, n: int, work: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, str(n), "--work", str(work), "--"] + extra
    log = work / f"log-{variant}-{n}-{time.time_ns()}.txt"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = log.read_text().splitlines()
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if result is None:
        tail = " | ".join(lines[-5:])
        return {"error": f"rc={proc.returncode}: {tail[-600:]} (log {log})"}
    result["rounds"] = {int(k): v for k, v in result["rounds"].items()}
    result["log"] = str(log)
    return result


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ micro-benchmark (in process)

class MicroGrid:
    """Sites that run client/secagg.py's stages behind a Grid, in this process, as
    tests/test_secagg.py's Federation; `vanish` = sites that die after sharing their keys.
    The time spent in the site functions is kept apart from the coordinator's."""

    def __init__(self, n: int, shapes: dict[str, tuple[int, ...]], neighbours: int,
                 max_dropout: float, vanish: set[int]) -> None:
        import numpy as np
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.app import Context, RecordDict

        from fedshield import conf
        from fedshield.privacy import signing

        self.names = {1000 + i: f"site-{i:02d}" for i in range(n)}
        self.keys = {nid: ec.generate_private_key(signing.CURVE()) for nid in self.names}  # ledger signing keys
        self.pems = {nid: signing.public_key_pem(k) for nid, k in self.keys.items()}
        self.contexts = {nid: Context(run_id=7, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in self.names}
        self.cfg = conf.load_config([  # the run's config as the real runs have it, SecAgg+ on
            "privacy=none", f"federation.num_sites={n}", "federation.secure_aggregation=secaggplus",
            f"federation.secagg_neighbours={neighbours}", f"federation.secagg_max_dropout_fraction={max_dropout}"])
        self.vanish = {1000 + i for i in vanish}
        rng = np.random.default_rng(5)
        self.base = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
        self.updates = {nid: {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in self.base.items()}
                        for nid in self.names}
        self.weights = {nid: int(rng.integers(30, 230)) for nid in self.names}
        self.site_s: dict[str, float] = {}  # stage -> seconds summed over sites

    def _timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.site_s[stage] = self.site_s.get(stage, 0.0) + time.perf_counter() - t0

    def get_node_ids(self) -> list[int]:
        return list(self.names)

    def send_and_receive(self, messages, *, timeout=None):
        from fedshield import protocol
        from fedshield.client import secagg as site_side

        run = "bench-run"
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            step = protocol.read_secagg(msg)
            if step.stage == "unmask" and nid in self.vanish:
                continue
            ctx = self.contexts[nid]
            if step.stage == "setup":
                fields = self._timed("setup", site_side.setup, ctx, step, run, self.keys[nid], self.names[nid])
            elif step.stage == "share":
                fields = self._timed("share", site_side.share, ctx, step, run, self.cfg, self.keys[nid], None)
            elif step.stage == "check":
                fields = self._timed("check", site_side.check, ctx, step, run)
            else:
                fields = self._timed("unmask", site_side.unmask, ctx, step, run)
            replies.append(protocol.secagg_reply(msg, site=self.names[nid], stage=step.stage, fields=fields))
        return replies

    def collect(self, coordinator, plan) -> dict:
        from flwr.app import Message, RecordDict

        from fedshield import protocol
        from fedshield.client import secagg as site_side

        vectors = {}
        for nid in self.names:
            fields = coordinator.collect_fields(1, nid)
            if fields is None or nid in self.vanish:
                continue
            msg = Message(RecordDict({protocol.PLAN: plan}), dst_node_id=nid, message_type=protocol.TRAIN)
            step = protocol.read_secagg(protocol.with_secagg(msg, fields))
            state = self._timed("begin_collect", site_side.begin_collect, self.contexts[nid], step, "bench-run")
            vectors[nid] = self._timed("mask", site_side.masked, self.contexts[nid], state, self.updates[nid],
                                       self.base, self.weights[nid], self.cfg)
        return vectors


def micro_cell(n: int, neighbours: int, level: float, shapes: dict, max_dropout: float) -> dict:
    import numpy as np

    from fedshield import protocol
    from fedshield.privacy.secure_sum import settings_of
    from fedshield.strategies.secagg import SecAggPlus, Unmasked

    vanish = set(dropped_sites(n, level))
    grid = MicroGrid(n, shapes, neighbours, max_dropout, vanish)
    plan = protocol.plan_record(config_yaml="x: 1\n", run_id="bench-run", run_dir="", frozen_fingerprint="",
                                class_names=["a"])
    coordinator = SecAggPlus(settings_of(grid.cfg.federation), grid.names, grid.pems, timeout=1.0,
                             rng=random.Random(3))
    t0 = time.perf_counter()
    coordinator.prepare(1, list(grid.names), plan, grid)
    t1 = time.perf_counter()
    vectors = grid.collect(coordinator, plan)
    t2 = time.perf_counter()
    before = dict(grid.site_s)
    out = coordinator.finish(1, vectors, grid)
    t3 = time.perf_counter()
    unmask_sites = grid.site_s.get("unmask", 0.0) - before.get("unmask", 0.0)
    ok = isinstance(out, Unmasked)
    alive = [nid for nid in grid.names if nid not in grid.vanish]
    if ok:  # the sum really is the plaintext weighted mean (within quantization)
        total = sum(grid.weights[nid] for nid in alive)
        err = max(float(np.max(np.abs(out.mean[k] - sum(
            (grid.updates[nid][k].astype(np.float64) - grid.base[k]) * grid.weights[nid] for nid in alive) / total)))
            for k in shapes)
        ok = err <= 2 * coordinator.settings.clip_range / coordinator.settings.levels + 1e-12
    # plaintext FedAvg of the same updates (what the coordinator does without SecAgg+)
    p0 = time.perf_counter()
    total = sum(grid.weights[nid] for nid in alive)
    _ = {k: sum(grid.updates[nid][k].astype(np.float64) * grid.weights[nid] for nid in alive) / total
         for k in shapes}
    plain_s = time.perf_counter() - p0
    site = grid.site_s
    prepare_site = site.get("setup", 0.0) + site.get("share", 0.0) + site.get("check", 0.0)
    hood = coordinator.settings.share_count(n)
    return {
        "n": n, "neighbours": neighbours, "hood": hood, "threshold": coordinator.settings.threshold(hood),
        "dropped": len(vanish), "ok": ok, "skipped": "" if isinstance(out, Unmasked) else out.skipped,
        "coord_prepare_s": (t1 - t0) - prepare_site, "coord_finish_s": (t3 - t2) - unmask_sites,
        "plain_aggregate_s": plain_s,
        "site_setup_ms": 1e3 * site.get("setup", 0.0) / n, "site_share_ms": 1e3 * site.get("share", 0.0) / n,
        "site_receive_ms": 1e3 * (site.get("check", 0.0) + site.get("begin_collect", 0.0)) / max(1, len(vectors)),
        "site_mask_ms": 1e3 * site.get("mask", 0.0) / max(1, len(vectors)),
        "site_unmask_ms": 1e3 * site.get("unmask", 0.0) / max(1, len(alive)),
        "collect_s": t2 - t1,
    }


def real_shapes() -> dict[str, tuple[int, ...]]:
    from fedshield import conf
    from fedshield.task.pipeline import build_view

    view = build_view(conf.load_config(["privacy=none"]))
    return {k: tuple(v.shape) for k, v in view.trainable_state().items()}


def shamir_costs(sizes: list[int], repeat: int) -> None:
    """Flower's Shamir sharing (pycryptodome, GF(2^128), 16-byte chunks) for the two secrets a
    site shares: b (32 bytes: 3 chunks padded) and sk1 as Flower serializes it (PKCS#8 PEM,
    306 bytes: 20 chunks); a raw 48-byte P-384 scalar (4 chunks) for comparison."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    from fedshield.privacy.secure_sum import SecAggSettings

    sk1, _ = generate_key_pairs()
    secrets = {"b (32 B)": os.urandom(32), f"sk1 PEM ({len(private_key_to_bytes(sk1))} B)": private_key_to_bytes(sk1),
               "raw P-384 scalar (48 B)": sk1.private_numbers().private_value.to_bytes(48, "big")}
    print(f"\nFlower's Shamir primitives (median of {repeat}, ms; load {load_avg()}): create_shares(secret, t, m) "
          "at a site, combine_shares at the coordinator from t shares and from all m (what finish does when "
          "all m holders answer)")
    print("| m shares (t) | secret | create ms | combine t ms | combine m ms |")
    print("|---|---|---:|---:|---:|")
    for n in sizes:
        for m in sorted({n, min(n, ring(n) + 1)}, reverse=True):
            t = SecAggSettings().threshold(m)
            for name, secret in secrets.items():
                c, k, km = [], [], []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    shares = create_shares(secret, t, m)
                    t1 = time.perf_counter()
                    assert combine_shares(shares[:t]) == secret
                    t2 = time.perf_counter()
                    assert combine_shares(shares) == secret
                    c.append(t1 - t0)
                    k.append(t2 - t1)
                    km.append(time.perf_counter() - t2)
                print(f"| {m} ({t}) | {name} | {1e3 * statistics.median(c):.1f} | {1e3 * statistics.median(k):.1f} | "
                      f"{1e3 * statistics.median(km):.1f} |", flush=True)
    from fedshield.privacy import shamir

    print(f"\nfedshield's Shamir (privacy/shamir.py: GF(2^31 - 1), numpy over all shares; what the sites and the "
          f"coordinator now use), median of {max(repeat, 20)}, ms")
    print("| m shares (t) | secret | split ms | combine t ms |")
    print("|---|---|---:|---:|")
    for n in sizes:
        for m in sorted({n, min(n, ring(n) + 1)}, reverse=True):
            t = SecAggSettings().threshold(m)
            for name, secret in secrets.items():
                if "PEM" in name:
                    continue
                c, k = [], []
                for _ in range(max(repeat, 20)):
                    t0 = time.perf_counter()
                    shares = shamir.split(secret, t, m)
                    t1 = time.perf_counter()
                    assert shamir.combine(shares[:t]) == secret
                    c.append(t1 - t0)
                    k.append(time.perf_counter() - t1)
                print(f"| {m} ({t}) | {name} | {1e3 * statistics.median(c):.2f} | {1e3 * statistics.median(k):.2f} |",
                      flush=True)


def ring_risk(sizes: list[int], trials: int = 4000) -> None:
    """How often a random SecAgg+ ring (privacy.secure_sum.neighbourhoods, as the coordinator
    draws it outside simulation) leaves some neighbourhood with fewer than t survivors when
    10% or 30% of the sites, drawn at random, vanish after sharing: the round is then skipped."""
    from fedshield.privacy.secure_sum import SecAggSettings, neighbourhoods

    print(f"\nRandom ring vs random dropouts ({trials} trials each): share of rounds skipped")
    print("| sites | neighbours | max dropout fraction (t of the neighbourhood) | lost | rounds skipped |")
    print("|---:|---:|---|---:|---:|")
    rng = random.Random(1)
    for n in sizes:
        k = ring(n)
        if k + 1 >= n:
            continue
        for fraction in (0.3, 0.4):
            settings = SecAggSettings(neighbours=k, max_dropout_fraction=fraction)
            t = settings.threshold(k + 1)
            for level in (0.1, 0.3):
                lost = int(round(level * n))
                skipped = 0
                for _ in range(trials):
                    gone = set(rng.sample(range(n), lost))
                    hoods = neighbourhoods(list(range(n)), settings, rng)
                    skipped += any(sum(x not in gone for x in h) < t for h in hoods.values())
                print(f"| {n} | {k} | {fraction:g} ({t} of {k + 1}) | {lost} | {skipped / trials:.1%} |", flush=True)


def micro(sizes: list[int], repeat: int) -> list[dict]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # as tests/conftest.py
    shapes = real_shapes()
    d = sum(math.prod(s) for s in shapes.values())
    print(f"\nmicro-benchmark: d = {d:,} trainable weights ({', '.join(f'{k} {s}' for k, s in shapes.items())}), "
          f"secagg_bits 20, clip range 1, in process, 1 process; median of {repeat}; load {load_avg()}", flush=True)
    cells = []
    for n in sizes:
        for neighbours in (0, ring(n)):
            for level in (0.0, 0.1, 0.3):
                # the ring's neighbourhoods are small: a random 30% can cost one of them more
                # than 30% of its members, so the ring runs at the highest fraction allowed below 0.5
                max_dropout = 0.3 if neighbours == 0 else 0.4
                runs = [micro_cell(n, neighbours, level, shapes, max_dropout) for _ in range(repeat)]
                cell = {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                        for k in runs[0]}
                cell["ok"] = all(r["ok"] for r in runs)
                cell["max_dropout"] = max_dropout
                cells.append(cell)
                print(f"  n={n} neighbours={neighbours} dropped={cell['dropped']}: ok={cell['ok']} "
                      f"coordinator finish {cell['coord_finish_s']:.3f} s, site mask {cell['site_mask_ms']:.0f} ms"
                      + (f" SKIPPED: {cell['skipped']}" if cell["skipped"] else ""), flush=True)
    print()
    print("| sites | neighbourhood (t) | dropped after sharing | site: setup + share ms | site: check shares + "
          "mask ms | site: unmask ms | site total ms | coordinator: prepare s | coordinator: unmask (finish) s | "
          "plain FedAvg aggregate s | unmasked sum = plaintext mean |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in cells:
        hood = "all" if c["neighbours"] == 0 else f"ring {c['neighbours']}"
        total = c["site_setup_ms"] + c["site_share_ms"] + c["site_receive_ms"] + c["site_mask_ms"] + c["site_unmask_ms"]
        print(f"| {c['n']} | {hood}: {c['hood']} (t {c['threshold']}, f {c['max_dropout']:g}) | {c['dropped']} | "
              f"{c['site_setup_ms'] + c['site_share_ms']:.1f} | {c['site_receive_ms'] + c['site_mask_ms']:.1f} | "
              f"{c['site_unmask_ms']:.1f} | {total:.1f} | {c['coord_prepare_s']:.3f} | {c['coord_finish_s']:.3f} | "
              f"{c['plain_aggregate_s']:.3f} | {'yes' if c['ok'] else 'NO: ' + c['skipped']} |")
    return cells


# ------------------------------------------------------------------ report

def report(results: dict[tuple[str, int], list[dict]], sizes: list[int], variants: list[str], repeat: int) -> None:
    med = statistics.median
    print()
    print("Raw, per run (round s for rounds 1-7; round 1 is the warm-up, not counted):")
    print("| N | rep | variant | rounds s | wall s | load at start | serializing for the byte count |")
    print("|---:|---:|---|---|---:|---|---:|")
    for n in sizes:
        for v in variants:
            for i, res in enumerate(results.get((v, n), [])):
                if "error" in res:
                    print(f"| {n} | {i + 1} | {v} | ERROR {res['error']} | | | |")
                    continue
                rs = " ".join(f"{res['rounds'][r]['round_s']:.1f}" for r in range(1, ROUNDS + 1))
                print(f"| {n} | {i + 1} | {v} | {rs} | {res['wall_s']:.0f} | {res.get('load', '')} | "
                      f"{sum(res['rounds'][r]['measure_s'] for r in res['rounds']):.2f} s |")
    print()
    print("| sites | variant | dropout (sites) | plain s/round | variant s/round | variant/plain (median of pairs) "
          "| pairs (B/A each) | plain MB down / up per site | variant MB down / up per site | up bytes vs plain "
          "| setup + share stages s | unmask stage s (coordinator compute) | rounds unmasked |")
    print("|---:|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|")
    summary = {}
    for n in sizes:
        for v in [x for x in variants if x != "plain"]:
            for level in sorted(set(LEVELS.values())):
                rounds = [r for r, lv in LEVELS.items() if lv == level and r not in WARMUP]
                pairs, a_t, b_t, a_b, b_b, prep, fin, comp = [], [], [], [], [], [], [], []
                recovered = [0, 0]
                for i in range(repeat):
                    try:
                        a, b = results[("plain", n)][i], results[(v, n)][i]
                    except (KeyError, IndexError):
                        continue
                    if "error" in a or "error" in b:
                        continue
                    for r in rounds:
                        ra, rb = a["rounds"][r], b["rounds"][r]
                        pairs.append(rb["round_s"] / ra["round_s"])
                        a_t.append(ra["round_s"])
                        b_t.append(rb["round_s"])
                        a_b.append((ra["down_mb"], ra["up_mb"]))
                        b_b.append((rb["down_mb"], rb["up_mb"]))
                        prep.append(rb["prepare_s"])
                        fin.append(rb["finish_s"])
                        comp.append(rb["finish_s"] - rb["ask_unmask_s"])
                        recovered[1] += 1
                        recovered[0] += int(not rb["skipped"] and rb["trained"] == n - rb["dropped_planned"]
                                            and rb["secagg_dropped"] == rb["dropped_planned"])
                if not pairs:
                    continue
                summary[(n, v, level)] = med(pairs)
                print(f"| {n} | {v} | {level:.0%} ({len(dropped_sites(n, level))}) | {med(a_t):.2f} | {med(b_t):.2f} | "
                      f"**{med(pairs):.2f}** | {' '.join(f'{p:.2f}' for p in pairs)} | "
                      f"{med(x[0] for x in a_b):.3f} / {med(x[1] for x in a_b):.3f} | "
                      f"{med(x[0] for x in b_b):.3f} / {med(x[1] for x in b_b):.3f} | "
                      f"{med(x[1] for x in b_b) / med(x[1] for x in a_b):.2f}x | {med(prep):.2f} | "
                      f"{med(fin):.2f} ({med(comp):.2f}) | {recovered[0]}/{recovered[1]} |")
    print()
    print("Where the time goes, median over the counted rounds (s). Coordinator: configure (with SecAgg+: the "
          "setup and share round trips), the training stage, aggregate (with SecAgg+: the unmask round trip and "
          "the unmasking), the rest (central evaluation, Flower). Sites: handler time summed over all sites "
          "(2 Ray workers run them): setup, share, train (of which masking), unmask.")
    for n in sizes:
        for v in variants:
            rows = [res["rounds"][r] for res in results.get((v, n), []) if "error" not in res
                    for r in res["rounds"] if r not in WARMUP]
            if not rows:
                continue
            s = {k: med(x["site_s"][k] for x in rows) for k in rows[0]["site_s"]}
            rest = med(x["round_s"] - x["configure_s"] - x["train_stage_s"] - x["aggregate_s"] for x in rows)
            print(f"  N={n} {v}: round {med(x['round_s'] for x in rows):.2f} = configure "
                  f"{med(x['configure_s'] for x in rows):.2f} + training stage "
                  f"{med(x['train_stage_s'] for x in rows):.2f}"
                  f" + aggregate {med(x['aggregate_s'] for x in rows):.2f} + rest {rest:.2f} | sites: setup "
                  f"{s['secagg_setup']:.2f}, share {s['secagg_share']:.2f}, check {s['secagg_check']:.2f}, train "
                  f"{s['train']:.2f} (mask "
                  f"{s['mask']:.2f}), unmask {s['secagg_unmask']:.2f}")
    for v in [x for x in variants if x != "plain"]:
        cells = [summary[(50, v, lv)] for lv in sorted(set(LEVELS.values())) if (50, v, lv) in summary]
        if cells:
            print(f"\nbar ({v} at 50 sites <= 2x the plain round time): median ratios "
                  f"{' / '.join(f'{c:.2f}' for c in cells)} at 0/10/30% -> "
                  f"{'holds' if max(cells) <= 2 else 'does NOT hold'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 50])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=["plain", "secagg"],
                    help="plain, secagg (every site masks with every other), secagg-ring")
    ap.add_argument("--micro-repeat", type=int, default=3)
    ap.add_argument("--sim-only", action="store_true")
    ap.add_argument("--micro-only", action="store_true")
    ap.add_argument("--shamir-only", action="store_true",
                    help="only the Shamir primitives' costs and the random ring's risk of a skipped round")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "N"))
    ap.add_argument("--work", type=Path)
    ap.add_argument("extra", nargs="*", help="after --: config overrides for every run")
    a = ap.parse_args()
    if a.one:
        one(a.one[0], int(a.one[1]), a.work, a.extra)
        return
    t_start = time.time()
    print(f"secagg: {os.cpu_count()} CPUs, load average {load_avg()} at the start", flush=True)
    if a.shamir_only:
        shamir_costs(a.sizes, a.micro_repeat)
        ring_risk(a.sizes)
        return
    if not a.micro_only:
        work = a.work or Path(tempfile.mkdtemp(prefix="fedshield-secagg-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"real runs: news-topics, privacy=none, {ROUNDS} rounds (dropout by round {LEVELS}; round 1 not "
              f"counted), sizes {a.sizes}, repeat {a.repeat}, extra overrides {a.extra}; work dir {work}", flush=True)
        for n in a.sizes:
            print(f"  N={n}: dropped at 10%: {dropped_sites(n, 0.1)}, at 30%: {dropped_sites(n, 0.3)}", flush=True)
        results: dict[tuple[str, int], list[dict]] = {}
        for rep in range(a.repeat):
            for n in a.sizes:
                order = a.variants if rep % 2 == 0 else a.variants[::-1]
                for v in order:
                    load = load_avg()
                    r = measure(v, n, work, a.extra)
                    r["load"] = load
                    results.setdefault((v, n), []).append(r)
                    brief = r.get("error") or " ".join(f"{r['rounds'][k]['round_s']:.1f}" for k in r["rounds"])
                    print(f"  rep {rep + 1} N={n} {v}: rounds s {brief} (load {load}; {time.time() - t_start:.0f} s)",
                          flush=True)
        with open(work / "results.json", "w") as f:
            json.dump({f"{v}-{n}": rs for (v, n), rs in results.items()}, f)
        report(results, a.sizes, a.variants, a.repeat)
    if not a.sim_only:
        micro(a.sizes, a.micro_repeat)
        shamir_costs(a.sizes, a.micro_repeat)
        ring_risk(a.sizes)
    print(f"\nload average at the end {load_avg()}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()

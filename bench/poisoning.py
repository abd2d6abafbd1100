"""Poisoning: final central accuracy of each aggregation rule under each attack, side by side.

    .venv/bin/python bench/poisoning.py                          # the reduced protocol, full grid
    .venv/bin/python bench/poisoning.py --protocol default --attackers 1 --rules fedavg,fedmedian
    .venv/bin/python bench/poisoning.py --work /tmp/pois         # resumes the cells already in /tmp/pois

8 virtual sites of the default task (news-topics: BBC News, all-MiniLM-L6-v2, pooler + head
on the cached encoder output, IID). Sites 0 (and 1, for 2 attackers) attack; the others
are the real ClientApp. Every attacker trains honestly, then tampers with its reply:

- scaled:     the update (reply - the round's global weights) x 50
- sign-flip:  the update x -1
- huge-n:     num-examples = 1,000,000,000 (an integer; the FedAvg weight it would get)
- nan-n:      num-examples = NaN (Flower's MetricRecord takes a NaN float)
- label-flip: trains on labels y -> (y + 1) mod 5 (a valid reply: signed books and all)

Rules, each configured once per attacker count a (sites per round n = 8):
fedavg; fedmedian (f = a); fedtrimmedavg (f = a, trim_fraction 0.2 for a = 1 and 0.34 for a = 2:
cuts a per side of 8 updates, and of the 8 - a left when a replies are refused);
krum and multikrum (f = a; multikrum averages n - f); bulyan (f = 1: 8 sites allow no more,
4f + 3 <= 8); fedavg + bound (federation.update_norm_bound, clip; the bound is 1.5x the
largest honest update norm of the clean FedAvg run of the same protocol, or --bound).

Protocols: `default` is the README's run unchanged (DP-SGD at ε = 8, δ = 1e-5, 40 rounds);
`reduced` is the same task and pipeline without DP (privacy=none) and 10 rounds, which is
what makes a 70-run grid fit (see bench/RESULTS.md for both, measured side by side).
Runtime: `inprocess` (default) runs the real ServerApp (server.app.run_federation) and the
real ClientApp handlers with one in-process Grid that hands each message to the ClientApp
directly, site after site; `ray` uses Flower's simulation runtime exactly as `fedshield
simulate` (simulations.simulate.run_simulation). Both run the same code on either side of
the wire; in-process skips Ray's start-up and its message transport, and reuses each site's
frozen-prefix cache between runs (a pure function of the public model and the site's data).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
warnings.filterwarnings("ignore")

import fedshield.deploy.offline  # noqa: E402,F401  (first: nothing phones home)

ATTACKS = ("scaled", "sign-flip", "huge-n", "nan-n", "label-flip")
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fedavg+bound")
TRIM = {1: 0.2, 2: 0.34}  # fedtrimmedavg's trim_fraction for f: floor(beta n) = f for n = 8 - f .. 8
PROTOCOLS = {
    "default": [],
    "reduced": ["privacy=none", "federation.rounds=10"],
}


def malicious_app(attacks: dict[int, str]):
    """client.app's ClientApp with `attacks` (partition id -> attack) applied to its replies.
    Defined in one function so that Ray ships it to its workers by value."""
    from dataclasses import replace

    import fedshield.client.app as real
    import fedshield.protocol as wire

    def flipped(msg, plan, site):
        data = replace(site.data, labels=(site.data.labels + 1) % len(site.data.class_names))
        return real.train_round(msg, plan, replace(site, data=data))

    def train(msg, context):
        attack = attacks.get(int(context.node_config["partition-id"]), "")
        if attack == "label-flip":
            return real.handle(msg, context, flipped)
        reply = real.train(msg, context)
        if wire.ARRAYS not in reply.content:
            return reply
        if attack in ("scaled", "sign-flip"):
            start = wire.train_weights(msg)
            sent = wire.from_array_record(reply.content[wire.ARRAYS])
            factor = 50.0 if attack == "scaled" else -1.0
            reply.content[wire.ARRAYS] = wire.to_array_record(
                {k: (start[k] + factor * (v - start[k])).astype(v.dtype) for k, v in sent.items()})
        elif attack == "huge-n":
            reply.content[wire.METRICS][wire.NUM_EXAMPLES] = 10**9
        elif attack == "nan-n":
            reply.content[wire.METRICS][wire.NUM_EXAMPLES] = float("nan")
        return reply

    return real.site_app(train=train)


class InProcessGrid:
    """A Grid whose every message is handled at once by the ClientApp, in this process."""

    def __init__(self, app, num_sites: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.ids = list(range(1001, 1001 + num_sites))
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions":
                                                                          num_sites},
                                      state=RecordDict(), run_config={}) for i, nid in enumerate(self.ids)}

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def _cache_the_test_split(folder: Path) -> None:
    """The coordinator's evaluator encodes the held-out split with the frozen model in every
    run; in one process the runs share that encoding through task.pipeline.encode's own
    cache (keyed by the frozen weights and the token ids)."""
    import fedshield.server.evaluate
    from fedshield.task.pipeline import encode

    def encode_cached(cfg, view, data, cache_dir=None, **kw):
        return encode(cfg, view, data, cache_dir=cache_dir or folder, **kw)

    fedshield.server.evaluate.encode = encode_cached


def rule_overrides(rule: str, attackers: int, bound: float | None) -> list[str]:
    if rule == "fedavg+bound":
        return ["federation.strategy=fedavg", f"federation.update_norm_bound={bound}"]
    out = [f"federation.strategy={rule}"]
    f = max(attackers, 1)
    if rule in ("fedmedian", "krum", "multikrum", "fedtrimmedavg"):
        out.append(f"federation.num_malicious={f}")
    if rule == "fedtrimmedavg":  # cuts f per side of the 8 - f updates left when f replies are refused
        out.append(f"federation.trim_fraction={TRIM[f]}")
    if rule == "bulyan":
        out.append("federation.num_malicious=1")
    return out


def run_one(args, protocol: str, rule: str, attack: str, attackers: int, bound: float | None, work: Path) -> dict:
    from fedshield import conf
    from fedshield.server.run_dir import new_run_dir, read_jsonl

    name = f"{protocol}-{rule}-{attack}-{attackers}".replace("+", "-")
    overrides = [*PROTOCOLS[protocol], *rule_overrides(rule, attackers, bound), f"output.dir={work / 'runs'}",
                 f"output.run_name={name}", "output.save_model=false", f"federation.seed={args.seed}"]
    cfg = conf.load_config(overrides)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a cell not in results.jsonl did not finish
    attacks = {i: attack for i in range(attackers)} if attack != "none" else {}
    app = malicious_app(attacks)
    t0 = time.time()
    log = io.StringIO()
    if args.runtime == "ray":
        import fedshield.client.app
        from fedshield.simulations.simulate import run_simulation

        real_app = fedshield.client.app.app
        fedshield.client.app.app = app
        try:
            with contextlib.redirect_stdout(log):
                run_dir = run_simulation(cfg)
        finally:
            fedshield.client.app.app = real_app
    else:
        from flwr.supercore.task_identity import TaskIdentity

        from fedshield.server.app import run_federation

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        _cache_the_test_split(work / "test-cache")
        run_dir = new_run_dir(cfg)
        cache = work / "cache"
        for site_cache in cache.glob("site-*"):  # the frozen-prefix features of an earlier run
            shutil.copytree(site_cache, run_dir / "sites" / site_cache.name / "cache")
        with contextlib.redirect_stdout(log):
            run_federation(InProcessGrid(app, int(cfg.federation.num_sites)), cfg, run_dir)
        for site_dir in (run_dir / "sites").glob("site-*"):
            if not (cache / site_dir.name).exists() and (site_dir / "cache").is_dir():
                shutil.copytree(site_dir / "cache", cache / site_dir.name)
            shutil.rmtree(site_dir / "cache", ignore_errors=True)
    (run_dir / "bench-log.txt").write_text(log.getvalue())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    attackers_names = {f"site-{i}" for i in attacks}
    honest_norms = [v for r in rows[1:] for s, v in r.get("update_norms", {}).items() if s not in attackers_names]
    return {
        "protocol": protocol, "rule": rule, "attack": attack, "attackers": attackers, "bound": bound,
        "accuracy": rows[-1]["accuracy"], "macro_f1": rows[-1]["macro_f1"], "epsilon_max": rows[-1]["epsilon_max"],
        "rounds": len(rows) - 1, "skipped": sum(bool(r.get("skipped")) for r in rows[1:]),
        "attacker_rejected": sum(len(attackers_names & set(r.get("rejected_reasons", {}))) for r in rows[1:]),
        "attacker_clipped": sum(len(attackers_names & set(r.get("clipped_sites", []))) for r in rows[1:]),
        "attacker_left_out": sum(len(attackers_names & set(r.get("left_out_sites", []))) for r in rows[1:]),
        "honest_left_out": sum(len(set(r.get("left_out_sites", [])) - attackers_names) for r in rows[1:]),
        "honest_norm_max": max(honest_norms, default=0.0), "wall_s": round(time.time() - t0, 1),
        "runtime": args.runtime, "run_dir": str(run_dir),
    }


def cell(res: dict | None) -> str:
    if res is None:
        return "-"
    text = f"{res['accuracy']:.3f}"
    if res["skipped"]:
        text += f" (skip {res['skipped']}/{res['rounds']})"
    return text


def table(results: list[dict], protocol: str, runtime: str, counts: list[int], rules: list[str]) -> str:
    got = {(r["rule"], r["attack"], r["attackers"]): r for r in results
           if r["protocol"] == protocol and r["runtime"] == runtime}
    columns = [("none", 0)] + [(a, k) for k in counts for a in ATTACKS]
    head = "| rule | no attack | " + " | ".join(f"{a} x{k}" for a, k in columns[1:]) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(cell(got.get((rule, a, k))) for a, k in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="reduced")
    p.add_argument("--attackers", default="1,2", help="comma-separated attacker counts (of 8 sites)")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--bound", type=float, default=None, help="fedavg+bound's update norm bound (default: measured)")
    p.add_argument("--runtime", choices=("inprocess", "ray"), default="inprocess")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", type=Path, default=None, help="work folder; cells already in its results.jsonl are kept")
    args = p.parse_args()
    import flwr.common.logger  # noqa: F401  (sets up Flower's logger; then it is quietened)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    counts = [int(x) for x in args.attackers.split(",") if x]
    attacks = [a for a in args.attacks.split(",") if a]
    rules = [r for r in args.rules.split(",") if r]
    for a in attacks:
        if a not in ATTACKS:
            p.error(f"--attacks: {a!r} is not one of {', '.join(ATTACKS)}")
    for r in rules:
        if r not in RULES:
            p.error(f"--rules: {r!r} is not one of {', '.join(RULES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fedshield-poisoning-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.jsonl"
    results = [json.loads(line) for line in store.read_text().splitlines()] if store.exists() else []
    done = {(r["protocol"], r["rule"], r["attack"], r["attackers"], r["runtime"]) for r in results}
    print(f"poisoning: protocol {args.protocol} ({' '.join(PROTOCOLS[args.protocol]) or 'the README default'}), "
          f"8 sites, attackers {counts}, attacks {attacks}, rules {rules}, runtime {args.runtime}, seed {args.seed}; "
          f"work dir {work}", flush=True)
    t_all = time.time()

    def run(rule: str, attack: str, k: int, bound: float | None) -> dict:
        key = (args.protocol, rule, attack, k, args.runtime)
        if key in done:
            return next(r for r in results if (r["protocol"], r["rule"], r["attack"], r["attackers"],
                                                r["runtime"]) == key)
        res = run_one(args, args.protocol, rule, attack, k, bound, work)
        results.append(res)
        done.add(key)
        with open(store, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"  {rule:>13} {attack:>10} x{k}: acc {res['accuracy']:.4f}  skipped {res['skipped']}  attacker "
              f"rejected/clipped/left out {res['attacker_rejected']}/{res['attacker_clipped']}/"
              f"{res['attacker_left_out']}  honest left out {res['honest_left_out']}  honest |Δ| max "
              f"{res['honest_norm_max']:.3g}  ({res['wall_s']:.0f} s)", flush=True)
        return res

    clean = run("fedavg", "none", 0, None)
    bound = args.bound or float(f"{1.5 * clean['honest_norm_max']:.2g}")
    print(f"fedavg+bound: update_norm_bound={bound:g} (1.5x the largest honest update norm of the clean FedAvg "
          f"run, {clean['honest_norm_max']:.3g})" if not args.bound else f"fedavg+bound: update_norm_bound={bound:g}",
          flush=True)
    for rule in rules:
        run(rule, "none", 0, bound)
    for k in counts:
        for attack in attacks:
            for rule in rules:
                run(rule, attack, k, bound)
    print()
    print(f"Final central accuracy, protocol {args.protocol}, runtime {args.runtime} (skip s/r: the rule aggregated "
          "nothing in s of r rounds: too few usable updates for its f)")
    print(table(results, args.protocol, args.runtime, counts, rules))
    print(f"total {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()

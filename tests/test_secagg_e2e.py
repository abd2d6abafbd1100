"""SecAgg+ end to end (federation.secure_aggregation=secaggplus), with sites that vanish
mid-round: on Flower's simulation runtime, and in a TLS deployment of 3 sites.

Simulation, 4 virtual sites (threshold t = 3 of 4), 3 rounds; sites die by raising in their
ClientApp at a chosen stage (the Flower node answers with an error, as a crashed one would):

    round 1  site-1 dies at unmask, after its masked vector left: its vector stays in the
             sum, its private mask is removed with its seed rebuilt from 3 shares
    round 2  site-1 dies at collect (TRAIN), after sharing its keys, before training: out of
             the sum, its pairwise masks removed with its mask key rebuilt from 3 shares
    round 3  site-2 dies at share, site-3 at collect: 2 sites left, fewer than t: the round
             is skipped in one line, before any share is asked for, the model kept

Also: every TRAIN reply the coordinator read was a masked uint64 vector; each site's own
ledger charges each round it trained once and the run's copy holds exactly those entries;
the record-level audit passes.

Deployment (SuperLink over TLS, real SuperNodes): `fedshield server` with SecAgg+ and three
`fedshield client`s, 1 round; one site's agent is killed (SIGKILL; its SuperNode and
ClientApp go with it) as its round-1 TRAIN message comes in, i.e. after it shared its keys
and before it masked: the coordinator rebuilds its mask key from the two others' shares
(2 >= t = 2) and completes the run with them. One round only: each message costs a site a
ClientApp process (tens of seconds on a loaded 2-core machine), so a second round would
double the test's time; the simulation covers the rounds after a dropout.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from fedshield.conf.config import Config
from fedshield.server.run_dir import read_jsonl
from tests.helpers import synthetic_rows, tiny_overrides, write_csv
from tests.test_deployment import (  # the deployment tests' helpers and fixtures
    client_args,
    fedshield,
    finish,
    flower_processes,
    free_port,
    log_text,
    pki_dir,  # noqa: F401  (fixture)
    reap,  # noqa: F401  (autouse fixture: no process outlives the module)
    server_args,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# (round, stage) -> partition ids whose ClientApp raises at that stage of that round
VANISH = {(1, "unmask"): (1,), (2, "collect"): (1,), (3, "share"): (2,), (3, "collect"): (3,)}


def vanishing_app(vanish: dict[tuple[int, str], tuple[int, ...]]):
    """client.app's ClientApp whose sites die (raise) at the chosen SecAgg+ stages; every
    other message goes to the real handlers. Defined inside a function so that Ray ships
    it to its workers by value."""
    import fedshield.client.app as real
    import fedshield.protocol as wire

    def dies(msg, context, stage):
        step = wire.read_secagg(msg)
        pid = int(context.node_config["partition-id"])
        if step is not None and pid in vanish.get((step.server_round, stage), ()):
            raise RuntimeError(f"site {pid} vanishes at {stage} of round {step.server_round}")

    def dying(name, stage):
        forward = getattr(real, name)  # the real site's handler

        def run(msg, context):
            dies(msg, context, stage)
            return forward(msg, context)
        return run

    return real.site_app(train=dying("train", "collect"), secagg_setup=dying("secagg_setup", "setup"),
                         secagg_share=dying("secagg_share", "share"), secagg_unmask=dying("secagg_unmask", "unmask"))


def test_secagg_simulation_recovers_dropouts_after_sharing_and_skips_a_round_with_too_many(
        tiny_bert, synthetic_csv, tmp_path, monkeypatch, capsys):
    from fedshield import protocol
    from fedshield.privacy.audit import audit
    from fedshield.privacy.secure_sum import WEIGHT_SLOT
    from fedshield.simulations.simulate import run_simulation

    seen: list[dict[str, str]] = []  # what the coordinator got in each TRAIN reply: name -> dtype
    read = protocol.read_train_reply

    def spy(msg, expected):
        if not msg.has_error() and protocol.ARRAYS in msg.content:
            seen.append({k: str(v.dtype) for k, v in protocol.from_array_record(msg.content[protocol.ARRAYS]).items()})
        return read(msg, expected)

    monkeypatch.setattr(protocol, "read_train_reply", spy)  # the ServerApp runs in this process
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.secure_aggregation": "secaggplus", "federation.num_sites": 4, "federation.rounds": 3,
        "federation.secagg_timeout_s": 60, "privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 100,
        "privacy.target_epsilon": 100,
        "output.save_model": False, "training.center_features": False}))
    import fedshield.client.app as client_app  # `fedshield` here is tests.test_processes' command runner
    monkeypatch.setattr(client_app, "app", vanishing_app(VANISH))  # what run_simulation starts
    run = run_simulation(cfg)

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    r1, r2, r3 = rows[1:]
    # round 1: site-1 gone after masking; all four vectors are in the sum
    assert r1["skipped"] == "" and r1["trained"] == 4
    assert list(r1["secagg_dropped"]) == ["site-1"] and r1["secagg_dropped"]["site-1"].startswith("unmask")
    # round 2: site-1 gone after sharing, before training; recovered, three in the sum
    assert r2["skipped"] == "" and r2["trained"] == 3 and r2["failed_sites"] == ["site-1"]
    assert r2["secagg_dropped"] == {"site-1": "collect"}
    # round 3: two gone (one at share, one at collect): 2 of 4 left, below t = 3; skipped
    assert r3["trained"] == 2 and set(r3["secagg_dropped"]) == {"site-2", "site-3"}
    assert r3["secagg_dropped"]["site-2"].startswith("share") and r3["secagg_dropped"]["site-3"] == "collect"
    assert "fewer than the threshold 3" in r3["skipped"] and "\n" not in r3["skipped"]
    said = [x for x in capsys.readouterr().out.splitlines() if "round 3: nothing aggregated" in x]
    assert len(said) == 1 and r3["skipped"] in said[0], said
    assert r3["accuracy"] == r2["accuracy"] and r3["macro_f1"] == r2["macro_f1"]  # the global model kept
    report = (run / "report.md").read_text()
    assert "Rounds that aggregated nothing (the global model was kept): 3" in report
    assert "| 1 dropped out of secure aggregation (site-1 at collect) |" in report  # round 2's row
    assert r2["accuracy"] > 0.6  # the unmasked means moved the model (chance is 0.5)

    # The coordinator never held an update in the clear: every TRAIN reply it read was masked.
    assert len(seen) == 4 + 3 + 2
    assert all(WEIGHT_SLOT in s and set(s.values()) == {"uint64"} for s in seen)

    # The books: each site's own ledger charges every round it trained once, and the run's
    # copy holds exactly those entries; the record-level audit verifies and recomputes.
    trained = {"site-0": [1, 2, 3], "site-1": [1, 3], "site-2": [1, 2], "site-3": [1, 2]}
    ledger = read_jsonl(run / "privacy" / "ledger.jsonl")
    for site, want in trained.items():
        own = read_jsonl(run / "sites" / site / "ledger.jsonl")
        assert [(e["release"], e["round"]) for e in own] == [("record-count", 0)] + [("dp-sgd", r) for r in want]
        assert [e["hash"] for e in ledger if e["site"] == site] == [e["hash"] for e in own]
        # one masked vector per round, marked before it left
        folder = run / "sites" / site / "secagg"
        marks = sorted(int(p.name.rsplit(".round-", 1)[1]) for p in folder.iterdir() if ".round-" in p.name)
        assert marks == want, site
        # and the neighbours' ledger keys it pinned (trust on first use): the four sites' own
        assert sorted(json.loads((folder / "peers.json").read_text())) == sorted(trained)
    assert audit(run).ok


# ------------------------------------------------------------------ deployment over TLS


def started_training(log: str) -> bool:
    """The SuperNode's log shows round 1's TRAIN message in: the site has shared its keys
    (the coordinator sends TRAIN once every share reply is in) and not yet masked."""
    return "Receiving: train message" in log


@pytest.mark.timeout(900)
def test_secagg_deployment_of_three_sites_recovers_a_site_killed_mid_round(pki_dir, tiny_bert, tmp_path):  # noqa: F811
    """SIGKILL of a site's agent after it shared its keys, while it trains: the coordinator
    rebuilds its mask key from the two others' shares (2 >= t = 2), removes its pairwise
    masks from their sum and completes the run with them."""
    from fedshield.privacy.audit import audit

    t0 = time.time()
    server_data = write_csv(tmp_path / "server.csv", synthetic_rows(120, seed=7))
    port = free_port()
    names = ("st-marys", "st-johns", "city-bank")
    victim = "city-bank"
    # Generous timeouts (a loaded machine takes tens of seconds per message: one ClientApp
    # process each): a site that signs off is answered for by the SuperLink at once.
    server = fedshield(*server_args(pki_dir, [pki_dir / f"{n}.pub" for n in names], port, tiny_bert, server_data,
                                    tmp_path, **{"federation.secure_aggregation": "secaggplus",
                                                 "federation.rounds": 1, "federation.round_timeout_s": 180,
                                                 "federation.secagg_timeout_s": 180,
                                                 "training.center_features": False}), cwd=tmp_path)
    state = {n: tmp_path / f"state-{n}" for n in names}
    sites = {n: fedshield(*client_args(port, pki_dir / "ca.crt", pki_dir / f"{n}.key",
                                       write_csv(tmp_path / f"{n}.csv", synthetic_rows(60, seed=50 + i)), state[n]),
                          cwd=tmp_path) for i, n in enumerate(names)}
    log = state[victim] / "supernode.log"
    assert wait_for(lambda: started_training(log_text(log)), 400, step=0.1), log_text(log)[-3000:]
    sites[victim].kill()  # its SuperNode and ClientApp go with the agent (tests/test_deployment.py)
    killed = time.time() - t0
    assert finish(sites[victim], 30)[0] == -signal.SIGKILL
    assert wait_for(lambda: not flower_processes(state[victim] / ".flower"), 20)

    rc, out = finish(server, 600)
    assert rc == 0, out[-4000:]
    run_dir = tmp_path / "runs" / "deploy"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    r1 = rows[1]
    assert sorted(r1["sampled"]) == sorted(names) and r1["secagg_dropped"] == {victim: "collect"}, r1
    assert r1["skipped"] == "" and r1["trained"] == 2
    assert f"{victim}: dropped out of secure aggregation at collect" in out
    assert "nothing aggregated" not in out

    # The unmasked mean moved the model: the trained head is not the one the run started from.
    from safetensors.numpy import load_file

    start, final = load_file(tiny_bert / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert not np.allclose(start["classifier.weight"], final["classifier.weight"])

    ledger = read_jsonl(run_dir / "privacy" / "ledger.jsonl")
    for n in names:
        own = read_jsonl(state[n] / "ledger.jsonl")
        mine = [e for e in ledger if e["site"] == n]
        if n == victim:  # killed before its reply: the run holds only its count release (its own
            assert [(e["release"], e["round"]) for e in mine] == [("record-count", 0)]  # ledger may hold more:
            assert own[0]["hash"] == mine[0]["hash"]  # a crash over-counts, never under-counts)
            continue
        assert [(e["release"], e["round"]) for e in own] == [("record-count", 0), ("dp-sgd", 1)]
        assert [e["hash"] for e in mine] == [e["hash"] for e in own]
        folder = state[n] / "secagg"
        assert [p.name.rsplit(".round-", 1)[1] for p in folder.iterdir() if ".round-" in p.name] == ["1"]
        assert sorted(json.loads((folder / "peers.json").read_text())) == sorted(names)  # its pinned neighbours
        crc, cout = finish(sites[n], 120)
        assert crc == 0, f"{n}:\n{cout[-3000:]}"
    assert audit(run_dir).ok
    print(f"secagg deployment e2e: site killed at {killed:.0f}s, run done at {time.time() - t0:.0f}s")

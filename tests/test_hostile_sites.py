"""Hostile sites against the coordinator's checks, end to end on Flower's simulation runtime.

One DP simulation of nine virtual sites; seven of them are the real site (client.app) with
one attack each on what they send, two are honest. Every attack must be refused alone,
named in the report, and the run must complete with the honest sites:

    1  calls itself "/abs/dir/evil2" (a path, not a name)   refused at discovery
    2  claims an honest site's name                          one of the two refused at discovery
    3  adds a metric key                                     rejected: unexpected key
    4  sends ledger entries it re-signed (ε lowered)         rejected, kept apart, not asked again
    5  trains, but drops its ledger entries ("no DP")        rejected, not asked again
    6  claims -5 records                                     rejected: out of range
"""

from __future__ import annotations

import json

import pytest

from fedshield.conf.config import Config
from fedshield.server.run_dir import read_jsonl
from tests.helpers import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def hostile_app():
    """client.app's ClientApp with the attacks above, by partition id (defined inside so
    that Ray ships it to its workers by value)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    import fedshield.client.app as real
    import fedshield.protocol as wire
    from fedshield.privacy import signing
    from fedshield.privacy.ledger import entry_hash

    def pid(context):
        return int(context.node_config["partition-id"])

    def hello(msg, context):
        reply = real.hello(msg, context)
        if wire.SITE in reply.content and pid(context) in (1, 2):
            reply.content[wire.SITE][wire.NAME] = "/abs/dir/evil2" if pid(context) == 1 else "site-7"
        return reply

    def train(msg, context):
        reply = real.train(msg, context)
        if wire.ARRAYS not in reply.content:
            return reply
        attack = pid(context)
        if attack == 3:
            reply.content[wire.METRICS]["accuracy"] = 1.0
        elif attack == 4:
            forger = ec.generate_private_key(ec.SECP256R1())
            entries = json.loads(reply.content[wire.LEDGER][wire.ENTRIES])
            for e in entries:
                e["epsilon"] = 0.0
                e["hash"] = entry_hash(e)
                e["signature"] = base64.b64encode(signing.sign(forger, e["hash"].encode())).decode()
            reply.content[wire.LEDGER][wire.ENTRIES] = json.dumps(entries)
        elif attack == 5:
            reply.content[wire.LEDGER][wire.ENTRIES] = "[]"
        elif attack == 6:
            reply.content[wire.METRICS][wire.NUM_EXAMPLES] = -5
        return reply

    return real.site_app(hello=hello, train=train)


def test_each_hostile_site_is_refused_alone_and_named_and_the_honest_sites_carry_the_run(
        tiny_bert, synthetic_csv, tmp_path, monkeypatch):
    from fedshield.simulations.simulate import run_simulation

    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.num_sites": 9, "federation.rounds": 2, "privacy.noise_multiplier": 0.5,
        "privacy.budget_epsilon": 100,
        "privacy.target_epsilon": 100, "output.save_model": False, "training.center_features": False}))
    import fedshield.client.app
    monkeypatch.setattr(fedshield.client.app, "app", hostile_app())  # what run_simulation starts
    run = run_simulation(cfg)

    report = (run / "report.md").read_text()
    admitted = json.loads((run / "privacy" / "sites.json").read_text())
    assert "site-1" not in admitted and "/abs/dir/evil2" not in admitted
    assert "site name '/abs/dir/evil2' is not valid" in report
    assert "is taken by node" in report  # the honest site-7 or its impostor, never both, never the run
    assert not list((run / "privacy" / "ledger-keys").glob("*evil*")) and not (run.parent / "abs").exists()

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    first = rows[1]["rejected_reasons"]
    assert "unexpected key 'accuracy'" in first["site-3"]
    assert "do not verify" in first["site-4"]
    assert "no ledger entry" in first["site-5"]
    assert "num-examples=-5: must be between 1 and" in first["site-6"]
    assert {"site-4", "site-5"}.isdisjoint(rows[2]["sampled"])  # books failed: never asked again
    assert {"site-0", "site-8"} <= set(rows[2]["sampled"]) and rows[2]["trained"] >= 2

    ledger = read_jsonl(run / "privacy" / "ledger.jsonl")
    # The forged entries are not in the run's ledger (its genuine count release, at discovery, is).
    assert [e["release"] for e in ledger if e["site"] == "site-4"] == ["record-count"]
    apart = read_jsonl(run / "privacy" / "rejected-entries.jsonl")
    # site-4's forged entries; and, if the impostor won the name site-7 at discovery, its count
    # release, signed as site-2 (its own books), refused for not being site-7's.
    forged = [x for x in apart if x["from_site"] == "site-4"]
    assert forged and all(x["entry"]["epsilon"] == 0.0 for x in forged)
    assert {x["from_site"] for x in apart} <= {"site-4", "site-7"}
    if any(x["from_site"] == "site-7" for x in apart):
        assert "site-7" not in admitted and all(x["entry"]["site"] == "site-2" for x in apart
                                                if x["from_site"] == "site-7")
    for site in ("site-0", "site-8", "site-3", "site-6"):  # honest spends, even of refused updates, are recorded
        assert [(e["release"], e["round"]) for e in ledger if e["site"] == site][:2] == [("record-count", 0),
                                                                                        ("dp-sgd", 1)]
    from fedshield.privacy.audit import audit

    assert audit(run).ok  # the run's ledger verifies and recomputes


def never_trains():
    """client.app's ClientApp whose training always crashes (Flower replies with an error)."""
    import fedshield.client.app as real

    def train(msg, context):
        raise RuntimeError("the site's GPU fell over")

    return real.site_app(train=train)


def test_rounds_that_train_nothing_stop_the_run_with_one_line_and_keep_its_books(
        tiny_bert, synthetic_csv, tmp_path, monkeypatch, capsys):
    from fedshield.server.run_dir import RUN_STOPPED
    from fedshield.simulations.cli import main

    overrides = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.rounds": 4, "federation.max_empty_rounds": 2, "output.save_model": False,
        "training.center_features": False, "output.run_name": "stuck"})
    import fedshield.client.app
    monkeypatch.setattr(fedshield.client.app, "app", never_trains())  # what run_simulation starts
    assert main(["simulate", "privacy=none", *overrides]) == 2  # `fedshield simulate` exits non-zero
    out, err = capsys.readouterr()
    cause = "rounds 1-2 trained nothing (2 in a row; federation.max_empty_rounds=2); in round 2: site-0: failed: "
    stopped = [ln for ln in out.splitlines() if RUN_STOPPED in ln]
    assert len(stopped) == 1 and cause in stopped[0] and "the site's GPU fell over" in stopped[0]
    assert err.strip().splitlines()[-1].startswith(f"error: {cause}")  # the command's last word: one line
    assert out.count("TRAINED NOTHING") == 2
    run = tmp_path / "runs" / "stuck"
    assert [r["empty"] for r in read_jsonl(run / "metrics.jsonl")] == [False, True, True]
    assert (run / "checkpoint.npz").is_file() and (run / "privacy" / "sites.json").is_file()
    assert not (run / "report.md").exists()  # not complete: resumable

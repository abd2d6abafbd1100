"""Issue 21 items 1, 2, 9 end to end: real sites (client.app) on Flower's simulation runtime
each send one of the values that crashed or stalled the coordinator, signed with their own
ledger key; the run completes with the honest sites and names every refusal in one line.

    1  a train entry whose noise_multiplier is a 401-digit integer     rejected at round 1
    2  a train entry whose epsilon is a 401-digit integer              rejected at round 1
    3  a "late" round-0 entry of 1e9 steps before its round-1 spend   rejected at round 1
    4  its count release at σ = 0.001 (7.6 GiB to account)             refused at discovery
    5  a feature sum of 1e300 (inf in the float32 centre)               not used; centring goes on
    6  a train entry at σ = 0.01 (152 s to account)                      rejected at round 1
    7  declares n = 2^31 - 1 (its count release says so, signed)       refused at discovery
    8  calls itself "site-8\\n"                                          refused at discovery
    9  declines every round with ANSI escape sequences in its reason   escaped in output and report
    0, 10  honest

The fast, per-value tests are tests/test_hostile_values.py.
"""

from __future__ import annotations

import json

import pytest

from fedshield.conf.config import Config
from fedshield.server.run_dir import read_jsonl
from tests.helpers import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HUGE = 10**400


def hostile_app():
    """client.app's ClientApp with the attacks above, by partition id (defined inside so that
    Ray ships it to its workers by value)."""
    import base64

    import fedshield.client.app as real
    import fedshield.protocol as wire
    from fedshield.privacy import signing
    from fedshield.privacy.ledger import entry_hash

    def pid(context):
        return int(context.node_config["partition-id"])

    def rechain(msg, context, entries):
        """`entries` signed with the site's own key, each linked to the one before (the first
        keeps its place in the site's chain)."""
        key = real.resolve_site(wire.read_plan(msg), context).state.key
        out = []
        for e in entries:
            e = dict(e)
            if out:
                e.update(prev_hash=out[-1]["hash"], seq=out[-1]["seq"] + 1, run_seq=out[-1]["run_seq"] + 1)
            e["hash"] = entry_hash(e)
            e["signature"] = base64.b64encode(signing.sign(key, e["hash"].encode())).decode()
            out.append(e)
        return json.dumps(out)

    def hello(msg, context):
        reply = real.hello(msg, context)
        attack = pid(context)
        if wire.LEDGER not in reply.content:
            return reply
        entries = json.loads(reply.content[wire.LEDGER][wire.ENTRIES])
        if attack == 4:
            reply.content[wire.LEDGER][wire.ENTRIES] = rechain(msg, context, [dict(entries[0], noise_multiplier=0.001)])
        elif attack == 7:
            reply.content[wire.METRICS][wire.NUM_EXAMPLES] = 2**31 - 1
            reply.content[wire.LEDGER][wire.ENTRIES] = rechain(msg, context,
                                                               [dict(entries[0], released_count=2**31 - 1)])
        elif attack == 8:
            reply.content[wire.SITE][wire.NAME] = "site-8\n"
        return reply

    def feature_mean(msg, context):
        reply = real.feature_sum(msg, context)
        if pid(context) == 5 and wire.ARRAYS in reply.content:
            width = reply.content[wire.ARRAYS][wire.FEATURE_SUM_ARRAY].numpy().shape
            import numpy as np

            reply.content[wire.ARRAYS] = wire.to_array_record({wire.FEATURE_SUM_ARRAY: np.full(width, 1e300)})
        return reply

    def train(msg, context):
        attack = pid(context)
        if attack == 9:  # declines before it spends anything
            bad = wire.decline_reply(msg, site="site-9", kind="error", reason="x")
            bad.content[wire.DECLINE][wire.REASON] = "\x1b[2J\x1b[31mall good\x1b[0m\r\nround 2 | acc 1.000"
            return bad
        reply = real.train(msg, context)
        if wire.ARRAYS not in reply.content:
            return reply
        entries = json.loads(reply.content[wire.LEDGER][wire.ENTRIES])
        if attack == 1:
            entries[-1]["noise_multiplier"] = HUGE
        elif attack == 2:
            entries[-1]["epsilon"] = HUGE
        elif attack == 3:
            entries.insert(0, dict(entries[0], round=0, steps=10**9, sample_rate=1.0, noise_multiplier=10.0))
        elif attack == 6:
            entries[-1]["noise_multiplier"] = 0.01
        else:
            return reply
        reply.content[wire.LEDGER][wire.ENTRIES] = rechain(msg, context, entries)
        return reply

    return real.site_app(hello=hello, feature_sum=feature_mean, train=train)


def test_no_value_a_site_signs_crashes_or_stalls_the_run(tiny_bert, synthetic_csv, tmp_path, monkeypatch, capfd):
    from fedshield.simulations.simulate import run_simulation

    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.num_sites": 11, "federation.rounds": 2, "privacy.noise_multiplier": 0.5,
        "privacy.budget_epsilon": 100,
        "privacy.target_epsilon": 100, "output.save_model": False, "training.center_features": True}))
    import fedshield.client.app
    monkeypatch.setattr(fedshield.client.app, "app", hostile_app())  # what run_simulation starts
    run = run_simulation(cfg)
    out = capfd.readouterr().out

    report = (run / "report.md").read_text()
    summary = json.loads((run / "privacy" / "sites.json").read_text())
    # site-7's count release verified before its plan was refused: a spend of this run, so it
    # stays in the books (sites.json) with that spend alone; site-4's release was refused.
    assert "site-4" not in summary and not any("\n" in name for name in summary), summary.keys()
    assert "site-7" not in summary or summary["site-7"]["epsilon"] < 1.0, summary.get("site-7")
    assert "site site-4: not joining: its record-count release was refused: a ledger entry records noise " \
           "multiplier 0.001, below the 0.1" in report
    assert "site site-7: not joining: its declared record count makes a round" in report
    assert "site name 'site-8\\n' is not valid" in report

    assert "site-5: feature-mean reply not used: its feature sum has norm" in out
    assert "Feature centering" in report  # from the honest sums

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    first = rows[1]["rejected_reasons"]
    assert "noise_multiplier must be a number in [0, 1e+06], got an integer of 1329 bits" in first["site-1"]
    assert "epsilon must be a number >= 0 that a float holds, got an integer of 1329 bits" in first["site-2"]
    assert "late ledger entries of round 0 spend 1000000000 steps" in first["site-3"]
    assert "noise multiplier 0.01, below the 0.1" in first["site-6"]
    assert {"site-1", "site-2", "site-3", "site-6"}.isdisjoint(rows[2]["sampled"])  # never asked again
    assert {"site-0", "site-10"} <= set(rows[2]["sampled"]) and rows[2]["trained"] >= 2

    # The ESC sequences and the forged line never reach the terminal, the report or the metrics.
    for text in (out, report, (run / "metrics.jsonl").read_text()):
        assert "\x1b" not in text and "\r" not in text
    assert "\\x1b[2J\\x1b[31mall good\\x1b[0m round 2 | acc 1.000" in out
    assert not any(line.startswith("round 2 | acc 1.000") for line in out.splitlines())

    from fedshield.privacy.audit import audit

    result = audit(run)
    assert result.ok, result.flags  # the run's ledger verifies and recomputes

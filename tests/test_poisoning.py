"""Poisoning defences: the config keys, the report, and end to end on Flower's simulation
runtime with a malicious ClientApp built here.

The malicious app is the real site (client.app) whose replies, for some partition ids, are
tampered with after honest training: the update scaled x50 or sign-flipped (from the
round's global weights), num-examples set to 1e9 or NaN (Flower's MetricRecord takes a NaN
float), or training on flipped labels. One simulation runs every attack at once.
"""

from __future__ import annotations

import pytest

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.server.run_dir import read_jsonl
from fedshield.strategies import flower
from tests.helpers import tiny_overrides

ATTACKS = {0: "scaled", 1: "sign-flip", 2: "huge-n", 3: "nan-n", 4: "label-flip"}  # partition id -> attack


def malicious_app(attacks: dict[int, str]):
    """client.app's ClientApp, with the attacks above at the given partition ids.

    Everything is defined inside this function so that Ray ships it to its workers by
    value (the workers need not import this test module)."""
    from dataclasses import replace

    import fedshield.client.app as real
    import fedshield.protocol as wire

    def flipped(msg, plan, site):
        labels = site.data.labels
        data = replace(site.data, labels=(labels + 1) % len(site.data.class_names))
        return real.train_round(msg, plan, replace(site, data=data))

    def train(msg, context):
        attack = attacks.get(int(context.node_config["partition-id"]), "")
        if attack == "label-flip":  # trains on wrong labels: a valid reply, signed books and all
            return real.handle(msg, context, flipped)
        reply = real.train(msg, context)
        if wire.ARRAYS not in reply.content:  # a decline stays a decline
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


# ------------------------------------------------------------ config


def test_strategy_keys_are_validated_and_an_impossible_rule_is_refused_in_one_line():
    for name in flower.STRATEGIES:
        assert Config.load([f"federation.strategy={name}"]).federation.strategy == name
    cfg = Config.load([])
    assert (cfg.federation.num_malicious, cfg.federation.trim_fraction, cfg.federation.krum_select) == (1, 0.2, 0)
    assert (cfg.federation.update_norm_bound, cfg.federation.update_norm_action) == (None, "clip")
    refused = {
        "federation.strategy=bulyan federation.num_malicious=2": "needs at least 11 sites per round",
        "federation.strategy=krum federation.fraction_train=0.5": "federation.fraction_train=0.5 asks 4",
        "federation.strategy=fedtrimmedavg federation.num_malicious=2":
            "federation.trim_fraction=0.2: needs at least 10",
        "federation.strategy=fedmedian federation.num_sites=4 federation.num_malicious=2": "needs at least 5",
        "federation.strategy=multikrum federation.krum_select=8": "federation.krum_select=8: needs at least 9",
        "federation.trim_fraction=0.5": "federation.trim_fraction=0.5: must be in [0, 0.5)",
        "federation.num_malicious=-1": "federation.num_malicious=-1",
        "federation.update_norm_bound=0": "federation.update_norm_bound=0.0: must be a finite number > 0 or null",
        "federation.update_norm_bound=inf": "federation.update_norm_bound=inf",
        "federation.update_norm_action=drop": "must be one of clip, reject",
        "federation.strategy=fedsgd": "must be one of fedavg, fedprox, fedadam, fedmedian",
    }
    for overrides, message in refused.items():
        with pytest.raises(conf.ConfigError, match="^config: ") as err:
            Config.load(overrides.split())
        assert message in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))
    assert Config.load("federation.strategy=bulyan federation.num_malicious=1".split())
    assert Config.load(["federation.update_norm_bound=2.5"]).federation.update_norm_bound == 2.5


# ------------------------------------------------------------ the report


def test_the_report_names_each_sites_defence_outcome(tmp_path):
    from fedshield.server.app import RoundLog
    from fedshield.server.report import write_report
    from fedshield.server.settings import CoordinatorSettings
    from fedshield.strategies.report import RoundReport, SiteReply

    cfg = Config.load(["federation.strategy=krum", "federation.update_norm_bound=3", "privacy=none",
                            f"output.dir={tmp_path}"])
    sites = {1: {"site": "a", "n": 5}, 2: {"site": "b", "n": 5}, 3: {"site": "c", "n": 5}}
    settings = CoordinatorSettings.from_config(cfg)
    log = RoundLog(tmp_path, settings, sites)
    metrics = {"accuracy": 0.5, "macro_f1": 0.5, "per_class": {}}
    log.on_evaluated(0, metrics)
    log.on_round(RoundReport(1, ["a", "b", "c"], [
        SiteReply("a", 1, "trained", num_examples=5, update_norm=40.0, clipped=True, selected=False),
        SiteReply("b", 2, "trained", num_examples=5, update_norm=1.5, selected=True),
        SiteReply("c", 3, "rejected", "claims 1000000000 records; it declared 5 at discovery"),
    ], rule="krum"))
    row = log.on_evaluated(1, metrics)
    assert row["clipped_sites"] == ["a"] and row["left_out_sites"] == ["a"] and row["update_norms"] == {
        "a": 40.0, "b": 1.5}
    assert row["rejected_reasons"] == {"c": "claims 1000000000 records; it declared 5 at discovery"}
    short = "1 usable update(s): krum withstands federation.num_malicious=1 only with at least 5"
    log.on_round(RoundReport(2, ["a", "b", "c"], [SiteReply("b", 2, "trained", update_norm=1.0)], rule="krum",
                             skipped=short))
    log.on_evaluated(2, metrics)
    write_report(tmp_path, settings, log.rows, {"a": {}, "b": {}, "c": {}})
    report = (tmp_path / "report.md").read_text()
    assert "## Poisoning defences" in report
    assert "Aggregation `krum`, withstanding federation.num_malicious=1" in report and "bound 3" in report
    assert "| a | 0 | 1 | 1 | 0 | 0 | 0 | 40 | - |" in report
    assert "| b | 1 | 0 | 0 | 0 | 0 | 0 | 1.5 | - |" in report
    assert "| c | 0 | 0 | 0 | 1 | 0 | 0 | - | claims 1000000000 records; it declared 5 at discovery (round 1) |" \
        in report
    assert "Rounds that aggregated nothing (the global model was kept): 2." in report
    assert "nothing aggregated: 1 usable update(s): krum" in report


# ------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_every_attack_at_once_is_refused_clipped_or_left_out_and_the_honest_sites_carry_the_run(
        tiny_bert, synthetic_csv, tmp_path, monkeypatch):
    """13 sites, 5 of them attacking (one attack each), multikrum (f=5) and an update norm bound.

    The two replies refused for a breach unmask 2 of the f=5 attackers and leave 11 updates a
    round, 3 of them poisoned (the clipped one still points 6 away from where honest sites
    go): Multi-Krum withstands the f=3 left with n >= 9 and averages the n - f = 8
    best-scored updates.

    Without DP noise, so that honest updates agree (the tiny model's plain clipped SGD
    barely moves without DP: AdamW learns it in two rounds). The bound: AdamW moves each
    weight by about lr per step, so lr x sqrt(9,666 trainable weights) x 6 steps = 5.9
    (honest updates measured 2.6 to 3.8); the scaled update is ~50x an honest one."""
    from fedshield.simulations.simulate import run_simulation

    rounds, bound = 3, 6.0
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.num_sites": 13, "federation.rounds": rounds, "privacy": "none", "output.save_model": False,
        "training.optimizer": "adamw", "training.learning_rate": 0.01,
        "federation.strategy": "multikrum", "federation.num_malicious": 5, "federation.update_norm_bound": bound,
    }))
    import fedshield.client.app
    monkeypatch.setattr(fedshield.client.app, "app", malicious_app(ATTACKS))  # what run_simulation starts
    run = run_simulation(cfg)

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert rows[-1]["accuracy"] >= 0.75  # two balanced classes: chance is 0.5
    honest = [f"site-{i}" for i in range(5, 13)]
    for r in rows[1:]:
        assert not r["skipped"] and r["trained"] == 11
        assert r["breach_sites"] == ["site-2", "site-3"] and r["withstood"] == 3
        assert r["rejected_reasons"].keys() == {"site-2", "site-3"}
        assert "claims 1000000000 records; it declared" in r["rejected_reasons"]["site-2"]
        assert "num-examples: expected an integer, got float" in r["rejected_reasons"]["site-3"]
        assert "site-1" in r["left_out_sites"]  # the sign flip
        assert not set(honest) & set(r["clipped_sites"])
        assert all(r["update_norms"][s] <= bound for s in honest)
        assert "site-0" in r["clipped_sites"] and r["update_norms"]["site-0"] > 10 * bound
    assert "site-4" in rows[-1]["left_out_sites"]  # the label flip, once honest updates agree (not in round 1)

    report = (run / "report.md").read_text()
    assert "## Poisoning defences" in report and "Aggregation `multikrum`" in report
    section = report.split("## Poisoning defences")[1].split("## Rounds")[0]
    lines = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| site-")}
    assert "claims 1000000000 records" in lines["site-2"] and "expected an integer, got float" in lines["site-3"]
    cells = {s: lines[s].strip("|").split("|") for s in lines}
    assert int(cells["site-0"][2]) == rounds  # clipped
    assert int(cells["site-1"][3]) == rounds  # left out every round
    assert int(cells["site-2"][4]) == rounds and int(cells["site-3"][4]) == rounds  # rejected every round
    for s in honest:
        assert int(cells[s][4]) == 0 and int(cells[s][2]) == 0  # never rejected or clipped


@pytest.mark.e2e
def test_under_dp_a_refused_update_is_named_and_its_spend_still_recorded(tiny_bert, synthetic_csv, tmp_path,
                                                                        monkeypatch):
    """DP-SGD at every site, fedmedian, the norm bound rejecting: the scaled update and the
    one claiming 1e9 records are refused, each with its reason, but the privacy they spent
    to make them is in the run's ledger (spent whether or not the update is used)."""
    from fedshield.simulations.simulate import run_simulation

    bound = 400.0  # DP noise dominates a tiny model's update: honest norms measured ~21, the scaled one ~1,050
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.num_sites": 5, "privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 100,
        "privacy.target_epsilon": 100,
        "output.save_model": False, "federation.strategy": "fedmedian",
        "federation.update_norm_bound": bound, "federation.update_norm_action": "reject",
    }))
    import fedshield.client.app
    monkeypatch.setattr(fedshield.client.app, "app", malicious_app({0: "scaled", 1: "huge-n"}))
    run = run_simulation(cfg)

    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 3
    for r in rows[1:]:
        assert r["trained"] == 3 and not r["skipped"] and r["rejected_reasons"].keys() == {"site-0", "site-1"}
        assert r["rejected_reasons"]["site-0"].startswith("update norm ")
        assert f"is above federation.update_norm_bound={bound:g}" in r["rejected_reasons"]["site-0"]
        assert all(r["update_norms"][f"site-{i}"] < bound for i in (2, 3, 4))
    entries = read_jsonl(run / "privacy" / "ledger.jsonl")
    for site in ("site-0", "site-1", "site-2"):  # the count and the release (round 0), both rounds, refused or not
        assert sorted(e["round"] for e in entries if e["site"] == site) == [0, 0, 1, 2]
    report = (run / "report.md").read_text()
    assert "Aggregation `fedmedian`, withstanding federation.num_malicious=1" in report
    assert "action `reject`" in report and "claims 1000000000 records" in report
    assert "update norm " in report.split("## Poisoning defences")[1]

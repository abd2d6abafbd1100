"""A site's privacy is its own: a deployed site (the ClientApp with a site's node config, as
`fedshield client` starts it) refuses every plan that asks for less than its policy, field
by field, before it touches a record, and releases nothing."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedshield import protocol
from fedshield.conf.config import Config
from tests.helpers import synthetic_rows, tiny_overrides, write_csv

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def coordinator_plan(tiny_bert, data, tmp_path, **hostile) -> tuple[ConfigRecord, dict]:
    from fedshield.task.pipeline import build_view, pool_and_test, view_fingerprint

    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{
        "privacy.delta": 1e-5, "training.center_features": False, **hostile}))
    view = build_view(cfg)
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="run-1", run_dir="/coordinator/runs/run-1",
                                frozen_fingerprint=view_fingerprint(view),
                                class_names=pool_and_test(cfg)[1].class_names)
    plan[protocol.SERVER_ROUND] = 1
    return plan, view.trainable_state()


def deployed(tmp_path, data, **policy) -> Context:
    node = {"site-name": "st-marys", "data-path": str(data), "state-dir": str(tmp_path / "state"), **policy}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def ask_to_train(plan, weights, context):
    import fedshield.client.app as site

    msg = Message(content=RecordDict({protocol.PLAN: plan, protocol.ARRAYS: protocol.to_array_record(weights)}),
                  message_type=protocol.TRAIN, dst_node_id=1)
    return protocol.read_train_reply(site.train(msg, context), {k: (v.shape, v.dtype) for k, v in weights.items()})


def spent(tmp_path) -> list[dict]:
    ledger = tmp_path / "state" / "ledger.jsonl"
    return [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.is_file() else []


@pytest.fixture
def site_data(tmp_path):
    return write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))


@pytest.mark.parametrize("hostile, policy, says", [
    ({"privacy": "none"}, {}, "privacy.mode='none': this site trains only with DP"),
    ({"privacy.target_epsilon": 50}, {}, "privacy.target_epsilon=50: above this site's 8"),
    ({"privacy.target_epsilon": 3}, {"privacy.target_epsilon": 2.0}, "privacy.target_epsilon=3: above this site's 2"),
    ({"privacy.budget_epsilon": 100}, {}, "privacy.budget_epsilon=100: above this site's 8"),
    ({"privacy.delta": 1e-3}, {}, "privacy.delta=0.001: above this site's 1e-05"),
    ({"privacy.noise_multiplier": 0.3}, {"privacy.min_noise_multiplier": 1.0},
     "privacy.noise_multiplier=0.3: below this site's minimum 1"),
    ({"privacy.center_noise_multiplier": 0.5}, {}, "privacy.center_noise_multiplier=0.5: below this site's 4"),
    ({"privacy.neighbouring": "replace-one"}, {}, "privacy.neighbouring='replace-one': this site accounts under "
                                                   "'add-remove'"),
    ({"privacy.neighbouring": "add-remove"}, {"privacy.neighbouring": "replace-one"},
     "privacy.neighbouring='add-remove': this site accounts under 'replace-one'"),
    ({"privacy.count_noise_multiplier": 1.0}, {}, "privacy.count_noise_multiplier=1: below this site's 10"),
])
def test_a_hostile_plan_is_declined_field_by_field_and_nothing_is_spent_or_released(
        tiny_bert, site_data, tmp_path, hostile, policy, says):
    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **hostile)
    got = ask_to_train(plan, weights, deployed(tmp_path, site_data, **policy))
    assert isinstance(got, protocol.Decline) and got.kind == "policy", got
    assert says in got.reason and "\n" not in got.reason
    assert spent(tmp_path) == []


def test_a_plan_without_dp_cannot_even_get_a_site_to_join(tiny_bert, site_data, tmp_path):
    import fedshield.client.app as site

    plan, _ = coordinator_plan(tiny_bert, site_data, tmp_path, privacy="none")
    got = protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1),
                                         deployed(tmp_path, site_data)))
    assert isinstance(got, protocol.Decline) and got.kind == "policy"


def test_a_stricter_plan_is_used_and_the_sites_noise_floor_holds(tiny_bert, site_data, tmp_path):
    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{"privacy.target_epsilon": 4})
    got = ask_to_train(plan, weights, deployed(tmp_path, site_data, **{"privacy.min_noise_multiplier": 3.0}))
    assert isinstance(got, protocol.TrainReply), got
    count, entry = spent(tmp_path)  # no HELLO first: the round released the protected count too
    assert count["release"] == "record-count" and got.num_examples == count["released_count"]
    assert [e["hash"] for e in got.ledger_entries] == [count["hash"], entry["hash"]]
    assert entry["noise_multiplier"] >= 3.0  # calibration for ε=4 over 2 rounds needs less: the floor wins
    assert entry["epsilon"] <= 4.0

"""What a site really sends equals docs/auditor.md's data-flow table: no field more, none less.

A real site (client.app's handlers, in simulation mode on the tiny model) answers each
message kind; every (reply, record, field) it sends must be a row of the table, and every
row must be something it sends. A field added to a reply without its row in the auditor's
table, or a row for a field no longer sent, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedshield import protocol
from fedshield.conf.config import Config
from tests.helpers import tiny_overrides

TABLE = Path(__file__).resolve().parents[1] / "docs" / "auditor.md"
TENSORS = "(each trainable tensor)"


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def documented() -> set[tuple[str, str, str]]:
    text = TABLE.read_text(encoding="utf-8").split("## What leaves a site", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[A-Z][A-Za-z]+", cells[0]) and cells[0] != "reply":
            rows.add((cells[0], cells[1], cells[2]))
    return rows


def sent(kind: str, reply: Message, tensors: set[str]) -> set[tuple[str, str, str]]:
    out = set()
    for record_name, record in reply.content.items():
        for field in record.keys():
            out.add((kind, record_name, TENSORS if isinstance(record, ArrayRecord) and field in tensors else field))
    return out


def test_a_site_sends_exactly_the_fields_of_the_auditors_table(tiny_bert, synthetic_csv, tmp_path):
    import fedshield.client.app as site
    from fedshield.task.pipeline import build_view, pool_and_test, view_fingerprint

    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{"privacy.noise_multiplier": 1.0}))
    view = build_view(cfg)
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="flow", run_dir=str(tmp_path / "run"),
                                frozen_fingerprint=view_fingerprint(view),
                                class_names=pool_and_test(cfg)[1].class_names)
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    weights = view.trainable_state()
    tensors = set(weights)

    from fedshield.deploy.pki import connection_key_pair  # a deployed site also signs its HELLO with its connection key

    connection_key_pair("site-0", tmp_path / "keys")
    deployed = Context(run_id=7, node_id=1, node_config={**context.node_config,
                                                         "connection-key": str(tmp_path / "keys" / "site-0.key")},
                       state=RecordDict(), run_config={})
    got = sent("SiteHello", site.hello(protocol.instruction(protocol.HELLO, plan, 1), deployed), tensors)
    assert isinstance(protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context)),
                      protocol.SiteHello)
    got |= sent("FeatureSumReply", site.feature_sum(protocol.instruction(protocol.FEATURE_SUM, plan, 1), context),
                tensors)
    train_plan = ConfigRecord(dict(plan))
    train_plan[protocol.SERVER_ROUND] = 1
    train = Message(content=RecordDict({protocol.PLAN: train_plan, protocol.ARRAYS: protocol.to_array_record(weights)}),
                    message_type=protocol.TRAIN, dst_node_id=1)
    reply = site.train(train, context)
    assert isinstance(protocol.read_train_reply(reply, {k: (v.shape, v.dtype) for k, v in weights.items()}),
                      protocol.TrainReply)
    got |= sent("TrainReply", reply, tensors)
    got |= sent("Done", site.done(protocol.instruction(protocol.DONE, plan, 1), context), tensors)
    broken = Message(content=RecordDict({protocol.PLAN: ConfigRecord({"x": 1})}), message_type=protocol.TRAIN,
                     dst_node_id=1)
    decline = site.train(broken, context)
    assert isinstance(protocol.read_train_reply(decline, {}), protocol.Decline)
    got |= sent("Decline", decline, tensors)
    got |= secure_round(site, cfg, view, weights, tensors, tmp_path)

    assert got == documented()


def secure_round(site, cfg, view, weights, tensors, tmp_path) -> set[tuple[str, str, str]]:
    """The same site through one SecAgg+ round (federation.secure_aggregation=secaggplus),
    two other sites' stage code holding the other slots."""
    from fedshield.client import secagg as site_side
    from fedshield.task.pipeline import pool_and_test, view_fingerprint

    secure = Config.load(tiny_overrides(Path(cfg.task.model), Path(cfg.task.data_path), tmp_path, **{
        "privacy.noise_multiplier": 1.0, "federation.secure_aggregation": "secaggplus"}))
    plan = protocol.plan_record(config_yaml=secure.to_yaml(), run_id="flow-secure",
                                run_dir=str(tmp_path / "run"), frozen_fingerprint=view_fingerprint(view),
                                class_names=pool_and_test(secure)[1].class_names)
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    others = {slot: Context(run_id=7, node_id=slot, node_config={}, state=RecordDict(), run_config={})
              for slot in (2, 3)}

    def step(stage: str, **fields) -> protocol.SecAggStep:
        return protocol.SecAggStep(stage, 1, {protocol.SA_ROUND: 1, **fields})

    from cryptography.hazmat.primitives.asymmetric import ec

    from fedshield.privacy import secure_sum, signing

    got = set()
    setup = protocol.secagg_instruction("setup", plan, 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 1})
    me = site.resolve_site(protocol.read_plan(setup), context)
    ledger = {1: me.state.key, 2: ec.generate_private_key(signing.CURVE()), 3: ec.generate_private_key(signing.CURVE())}
    names = {1: me.name, 2: "other-2", 3: "other-3"}
    reply = site.secagg_setup(setup, context)
    keys = {1: protocol.read_secagg_reply(reply, "setup").fields}
    got |= sent("SecAggKeys", reply, tensors)
    for slot, ctx in others.items():
        keys[slot] = site_side.setup(ctx, step("setup", slot=slot), "flow-secure", ledger[slot], names[slot])
    pems = {s: signing.public_key_pem(k) for s, k in ledger.items()}
    hood = {protocol.SA_SLOTS: [1, 2, 3], protocol.SA_PK1S: [keys[s][protocol.SA_PK1] for s in (1, 2, 3)],
            protocol.SA_PK2S: [keys[s][protocol.SA_PK2] for s in (1, 2, 3)],
            protocol.SA_NAMES: [names[s].encode() for s in (1, 2, 3)],
            protocol.SA_LEDGER_KEYS: [pems[s] for s in (1, 2, 3)],
            protocol.SA_KEY_SIGS: [keys[s][protocol.SA_KEY_SIG] for s in (1, 2, 3)]}
    reply = site.secagg_share(protocol.secagg_instruction("share", plan, 1, {protocol.SA_ROUND: 1, **hood}), context)
    assert isinstance(protocol.read_secagg_reply(reply, "share"), protocol.SecAggReply)
    got |= sent("SecAggShares", reply, tensors)
    to_me, view_sigs = [], []
    for slot, ctx in others.items():
        out = site_side.share(ctx, step("share", **hood), "flow-secure", secure, ledger[slot], None)
        to_me.append(out[protocol.SA_CIPHERTEXTS][out[protocol.SA_DESTINATIONS].index(1)])
        view_sigs.append(out[protocol.SA_VIEW_SIG])
    seen = secure_sum.view({s: secure_sum.key_statement("flow-secure", 1, s, names[s], pems[s],
                                                        keys[s][protocol.SA_PK1], keys[s][protocol.SA_PK2])
                            for s in (1, 2, 3)})
    reply = site.secagg_check(protocol.secagg_instruction("check", plan, 1, {
        protocol.SA_ROUND: 1, protocol.SA_SOURCES: [2, 3], protocol.SA_CIPHERTEXTS: to_me,
        protocol.SA_VIEWS: [seen, seen], protocol.SA_VIEW_SIGS: view_sigs}), context)
    assert protocol.read_secagg_reply(reply, "check").fields == {protocol.SA_UNREADABLE: []}
    got |= sent("SecAggCheck", reply, tensors)
    train_plan = ConfigRecord(dict(plan))
    train_plan[protocol.SERVER_ROUND] = 1
    train = Message(content=RecordDict({protocol.PLAN: train_plan, protocol.ARRAYS: protocol.to_array_record(weights)}),
                    message_type=protocol.TRAIN, dst_node_id=1)
    train = protocol.with_secagg(train, {protocol.SA_ROUND: 1, protocol.SA_SOURCES: [2, 3]})
    reply = site.train(train, context)
    masked = {k: (v.shape, np.dtype(np.uint64)) for k, v in weights.items()} | {"@weight": ((1,), np.dtype(np.uint64))}
    assert isinstance(protocol.read_train_reply(reply, masked), protocol.TrainReply)  # masked, never the weights
    got |= sent("TrainReply", reply, tensors)
    reply = site.secagg_unmask(protocol.secagg_instruction(
        "unmask", plan, 1, {protocol.SA_ROUND: 1, protocol.SA_ACTIVE: [1, 2], protocol.SA_DROPPED: [3]}), context)
    assert isinstance(protocol.read_secagg_reply(reply, "unmask"), protocol.SecAggReply)
    got |= sent("SecAggUnmask", reply, tensors)
    return got


def test_an_error_reason_does_not_carry_the_sites_details(tiny_bert, tmp_path):
    """A site whose data cannot be read says so to the coordinator in one generic line;
    its path and the offending row stay in its own log."""
    import fedshield.client.app as site

    bad = tmp_path / "secret-ward-7.csv"
    bad.write_text("text,label\nthe patient in bed 12 has cancer,\n")  # a row without its label
    cfg = Config.load(["task=text-file", f"task.data_path={bad}", f"task.model={tiny_bert}",
                            "task.labels=[weather,markets]"])
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="r", run_dir=str(tmp_path),
                                frozen_fingerprint="", class_names=["markets", "weather"])
    context = Context(run_id=7, node_id=1, node_config={"site-name": "st-marys", "data-path": str(bad),
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    reply = protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context))
    assert isinstance(reply, protocol.Decline) and reply.kind == "error"
    assert "DataError" in reply.reason
    for secret in ("secret-ward-7", "bed 12", "cancer", str(tmp_path)):
        assert secret not in reply.reason


def test_the_task_caches_are_keyed_by_a_typed_value_not_the_configs_text():
    """pool_and_test, the base model and the virtual sites are cached per process by the
    task's TaskSpec (a frozen dataclass), so two configs that say the same task in other
    YAML (key order, a quoted number) share one entry, and a changed column does not."""
    from fedshield.task.pipeline import TaskSpec, pool_and_test

    a = Config.load(["task=heart-disease"])
    b = Config.from_text(a.to_yaml())
    assert TaskSpec.of(a.task) == TaskSpec.of(b.task) and hash(TaskSpec.of(a.task)) == hash(TaskSpec.of(b.task))
    assert pool_and_test(a) is pool_and_test(b)  # one cache entry
    own = TaskSpec.of(a.task, text_column="notes", site_column="")
    assert own != TaskSpec.of(a.task) and own.text_column == "notes" and own.labels == ()

"""The site's own model copy: the plan names the model by a digest of its folder
(task.model_digest, task/model_digest.py), a deployed site loads its own copy (its own
task.model, or the bundled model) and declines with kind `model` when the digests differ."""

from __future__ import annotations

import shutil

import pytest
from flwr.app import Context, Message, RecordDict

from fedshield import protocol
from fedshield.conf.config import Config
from fedshield.task.model_digest import folder_digest
from tests.helpers import synthetic_rows, tiny_overrides, write_csv

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def flip_one_byte(path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_digest_is_stable_and_changes_with_one_byte_of_weights_or_config(tiny_bert, tmp_path):
    digest = folder_digest(tiny_bert)
    assert len(digest) == 64 and folder_digest(tiny_bert) == digest
    same = shutil.copytree(tiny_bert, tmp_path / "elsewhere" / "copy")
    assert folder_digest(same) == digest  # the content, not the path
    weights = shutil.copytree(tiny_bert, tmp_path / "weights")
    flip_one_byte(weights / "model.safetensors")  # the last byte of the last tensor: the header stays valid
    assert folder_digest(weights) != digest
    config = shutil.copytree(tiny_bert, tmp_path / "config")
    text = (config / "config.json").read_text()
    (config / "config.json").write_text(text.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert text != (config / "config.json").read_text() and folder_digest(config) != digest
    # A file changed in place is hashed again (the cache is keyed by size and mtime).
    before = folder_digest(same)
    flip_one_byte(same / "model.safetensors", offset_from_end=5)
    assert folder_digest(same) != before


def test_model_digest_prints_the_digest_of_a_folder(tiny_bert, capsys):
    from fedshield.simulations.cli import main

    assert main(["model-digest", str(tiny_bert)]) == 0
    assert capsys.readouterr().out == f"{folder_digest(tiny_bert)}  {tiny_bert}\n"
    assert main(["model-digest", str(tiny_bert / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err


def coordinator_plan(tiny_bert, data, tmp_path, where="/coordinator/models/tiny-bert"):
    """A plan as the coordinator builds it (server/app.py): the digest of its model folder, and
    its own path for it, which does not exist at the site."""
    from fedshield.task.pipeline import build_view, model_digest, pool_and_test, view_fingerprint

    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{"privacy.delta": 1e-5,
                                                                   "training.center_features": False,
                                                                   "training.local_epochs": 1}))
    view = build_view(cfg)
    plan_cfg = cfg.with_values({"task.model_digest": model_digest(cfg), "task.model": where})
    plan = protocol.plan_record(config_yaml=plan_cfg.to_yaml(), run_id="run-1", run_dir="/coordinator/runs/run-1",
                                frozen_fingerprint=view_fingerprint(view),
                                class_names=pool_and_test(cfg)[1].class_names)
    return plan, view.trainable_state()


def deployed(tmp_path, data, **own) -> Context:
    node = {"site-name": "st-marys", "data-path": str(data), "state-dir": str(tmp_path / "state"), **own}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def hello(plan, context):
    import fedshield.client.app as site

    return protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context))


@pytest.fixture
def site_data(tmp_path):
    return write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))


def test_a_site_whose_copy_differs_declines_with_kind_model_and_spends_nothing(tiny_bert, site_data, tmp_path):
    plan, _ = coordinator_plan(tiny_bert, site_data, tmp_path)
    other = shutil.copytree(tiny_bert, tmp_path / "site-model")
    flip_one_byte(other / "model.safetensors")
    got = hello(plan, deployed(tmp_path, site_data, **{"task.model": str(other)}))
    assert isinstance(got, protocol.Decline) and got.kind == "model", got
    assert "its model" in got.reason and "the coordinator's plan names" in got.reason and "\n" not in got.reason
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


def test_a_site_with_its_own_folder_at_another_path_joins_and_trains(tiny_bert, site_data, tmp_path):
    import fedshield.client.app as site

    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path)
    own = shutil.copytree(tiny_bert, tmp_path / "opt" / "models" / "mine")
    context = deployed(tmp_path, site_data, **{"task.model": str(own)})
    got = hello(plan, context)
    assert isinstance(got, protocol.SiteHello) and got.site == "st-marys", got
    plan[protocol.SERVER_ROUND] = 1
    msg = Message(content=RecordDict({protocol.PLAN: plan, protocol.ARRAYS: protocol.to_array_record(weights)}),
                  message_type=protocol.TRAIN, dst_node_id=1)
    reply = protocol.read_train_reply(site.train(msg, context), {k: (v.shape, v.dtype) for k, v in weights.items()})
    assert isinstance(reply, protocol.TrainReply), reply
    assert [e["release"] for e in reply.ledger_entries][-1] == "dp-sgd"


def test_the_bundled_model_needs_no_site_setting(site_data, tmp_path):
    from fedshield.task.pipeline import model_digest

    cfg = Config.load(["task=text-file", f"task.data_path={site_data}", "privacy.delta=1e-5"])
    plan = protocol.plan_record(config_yaml=cfg.with_values({"task.model_digest": model_digest(cfg)}).to_yaml(),
                                run_id="run-1", run_dir="/coordinator/runs/run-1", frozen_fingerprint="",
                                class_names=["markets", "weather"])
    got = hello(plan, deployed(tmp_path, site_data))
    assert isinstance(got, protocol.SiteHello), got


def test_the_per_message_copy_check_compares_digests_without_transformers_model_table(tiny_bert, tmp_path,
                                                                                      monkeypatch):
    """check_model_copy runs in every deployed ClientApp process: it must not import
    transformers' table (a second each); it still refuses a copy whose digest differs, and
    the full folder check (fedshield client, the coordinator) still checks the type."""
    from fedshield.task import model
    from fedshield.task.pipeline import ModelCopyError, check_model_copy, model_digest

    data = write_csv(tmp_path / "d.csv", synthetic_rows(20, seed=1))
    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path))
    planned = cfg.with_values({"task.model_digest": model_digest(cfg)})

    def table():
        raise AssertionError("transformers' model table imported by the per-message check")

    monkeypatch.setattr(model, "sequence_classification_types", table)
    check_model_copy(planned, "site a")  # the same folder: accepted
    other = shutil.copytree(tiny_bert, tmp_path / "other")
    flip_one_byte(other / "model.safetensors")
    with pytest.raises(ModelCopyError, match="site a: its model .* has digest"):
        check_model_copy(planned.with_values({"task.model": str(other)}), "site a")
    with pytest.raises(AssertionError, match="model table"):
        model.check_model_folder(tiny_bert)  # the full check still asks the table

"""The batched simulation engine (simulations/batched.py): a Grid of virtual sites in one
process, and its equivalence with Flower's simulation runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.simulations.batched import BatchedGrid
from fedshield.simulations.simulate import engine_of, run_header
from tests.helpers import tiny_overrides

# What a ledger entry says of a spend (privacy/events.py): the engines must agree on all of
# it. `plan_digest` names the request, whose config holds the run's output folder and
# engine: it differs by construction; hashes and signatures follow from it.
SPEND_FIELDS = ("site", "run_id", "round", "seq", "release", "mechanism", "neighbouring", "noise_multiplier",
                "sample_rate", "steps", "max_grad_norm", "epsilon", "delta", "accountant", "released_count",
                "budget_epsilon")
# Final models: the batched engine trains a round's sites together (task/cohort.py); its
# sums run in another order than Opacus' one site at a time: float rounding, nothing else.
MODEL_ATOL = 1e-4


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if msg.content["config"]["raise"]:
            raise RuntimeError("this site's handler failed")
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"pid": pid})}), reply_to=msg)

    return app


def _query(node: int, fail: bool = False) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"raise": fail})}), dst_node_id=node, message_type="query")


def test_grid_answers_every_message_from_the_site_it_names(flower_task_identity):
    grid = BatchedGrid(_echo_app(), 5)  # in this process (one worker)
    assert list(grid.get_node_ids()) == [1, 2, 3, 4, 5]
    replies = list(grid.send_and_receive([_query(n) for n in (5, 2, 3)]))
    assert sorted((r.metadata.src_node_id, int(r.content["config"]["pid"])) for r in replies) == \
        [(2, 1), (3, 2), (5, 4)]
    # Pull is by message id, as on a SuperLink: a reply is handed out once.
    ids = list(grid.push_messages([_query(1)]))
    assert [r.metadata.src_node_id for r in grid.pull_messages(ids)] == [1]
    assert list(grid.pull_messages(ids)) == []


def test_a_handler_that_raises_gives_flowers_error_reply_and_the_others_answer(flower_task_identity):
    grid = BatchedGrid(_echo_app(), 3)
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive([_query(1), _query(2, fail=True), _query(3)])}
    assert set(replies) == {1, 2, 3}
    assert replies[2].has_error() and "this site's handler failed" in replies[2].error.reason
    assert not replies[1].has_error() and not replies[3].has_error()
    with pytest.raises(ValueError, match="no virtual site has node id 9"):
        grid.push_messages([_query(9)])


def test_auto_takes_the_batched_engine_unless_a_ray_cluster_is_named_and_the_first_line_says_which():
    assert engine_of(Config.load([])) == "batched"
    assert engine_of(Config.load(["simulation.ray_address=127.0.0.1:6379"])) == "flower"
    assert engine_of(Config.load(["simulation.engine=flower"])) == "flower"
    assert "engine batched (auto)" in run_header(Config.load([]))
    assert "engine flower)" in run_header(Config.load(["simulation.engine=flower"]))
    with pytest.raises(conf.ConfigError, match="simulation.engine='batched'.*ray_address"):
        Config.load(["simulation.engine=batched", "simulation.ray_address=127.0.0.1:6379"])
    with pytest.raises(conf.ConfigError, match="simulation.engine"):
        Config.load(["simulation.engine=threads"])


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT without dropout: the only random draws of a site's round are then its
    sampler's and its noise's, which both engines take from the same seeds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedshield.task.model import bundled_model_path

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(out)
    return out


def _spends(run: Path) -> dict[str, list[dict[str, object]]]:
    books = {}
    for ledger in sorted((run / "sites").glob("*/ledger.jsonl")):
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        books[ledger.parent.name] = [{k: e.get(k) for k in SPEND_FIELDS} for e in entries]
    return books


@pytest.mark.e2e
@pytest.mark.parametrize("trainable", ["last_layers"])
def test_flower_and_batched_engines_give_the_same_ledgers_and_models(dropout_free_bert, synthetic_csv, tmp_path,
                                                                     trainable):
    """Same config and seed on both engines: every site's ledger entry for entry (σ, q,
    steps, ε, ...), both audits pass, the same rounds, and final models within MODEL_ATOL.
    4 sites, 3 of them asked a round (the selection is by site name and seed), DP-SGD under
    add-remove (noisy counts, feature centering)."""
    from safetensors.numpy import load_file

    import fedshield
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    runs = {}
    for engine in ("flower", "batched"):
        cfg = Config.load(tiny_overrides(dropout_free_bert, synthetic_csv, tmp_path / engine, **{
            "simulation.engine": engine, "federation.num_sites": 4, "federation.fraction_train": 0.75,
            "training.trainable": trainable, "output.run_name": "same"}))
        runs[engine] = run_simulation(cfg)
    flower, batched = runs["flower"], runs["batched"]

    assert _spends(flower) == _spends(batched)
    assert sum(len(v) for v in _spends(batched).values()) == 4 * 2 + 3 * 2  # count + centre per site, 3 a round
    for run in (flower, batched):
        assert fedshield.audit(run, write_report=False).ok
    fm, bm = read_jsonl(flower / "metrics.jsonl"), read_jsonl(batched / "metrics.jsonl")
    assert [(r["round"], r.get("trained")) for r in fm] == [(r["round"], r.get("trained")) for r in bm]
    assert [r["epsilon_max"] for r in fm] == [r["epsilon_max"] for r in bm]
    a, b = load_file(flower / "model" / "model.safetensors"), load_file(batched / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= MODEL_ATOL, f"final models differ by {worst:g} (> {MODEL_ATOL:g})"
    # Sites trained and the model moved: equal models are not two untouched initial ones.
    assert fm[-1]["trained"] == 3 and bm[-1]["accuracy"] != bm[0]["accuracy"]


def test_a_module_with_dropout_trains_one_site_at_a_time_and_a_dropout_free_one_together():
    """train_jobs vectorises only where the result is the one train_local gives each site:
    dropout masks come from each site's own stream there, interleaved with its noise."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedshield.simulations.batched import has_dropout
    from fedshield.task.model import make_train_view

    def view(dropout: float):
        config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=2,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return make_train_view(BertForSequenceClassification(config), "last_layers", 1, 8, 16)

    assert has_dropout(view(0.1).module)
    assert not has_dropout(view(0.0).module)

"""The batched simulation engine (simulations/batched.py): a Grid of virtual sites in one
process, and its equivalence with Flower's simulation runtime."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.simulations.batched import WORKER_NICENESS, BatchedGrid
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


def test_a_round_opens_at_most_sites_per_chunk_handlers_at_once(flower_task_identity, monkeypatch, request):
    """The memory of a round is bounded: TRAIN handlers run to their training SITES_PER_CHUNK
    at a time, whatever the round samples (their encoded records and state live until the
    chunk finishes)."""
    from fedshield.client.app import TrainOutcome
    from fedshield.simulations import batched

    monkeypatch.setattr(batched, "SITES_PER_CHUNK", 2)
    open_now, most, trained = [0], [0], []

    def steps(msg: Message, context: Context):
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        yield context.node_id
        open_now[0] -= 1
        return Message(RecordDict({"config": ConfigRecord({"node": context.node_id})}), reply_to=msg)

    monkeypatch.setattr(batched, "train_jobs", lambda jobs: trained.append(list(jobs)) or
                        [TrainOutcome(None) for _ in jobs])
    grid = BatchedGrid(_echo_app(), 5, train_steps=steps)
    request.addfinalizer(grid.close)  # it froze this process's heap at its TRAIN push
    train = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3, 4, 5)]
    replies = list(grid.send_and_receive([*train, _query(3)]))
    assert sorted(int(r.content["config"]["node"]) for r in replies if "node" in r.content["config"]) == \
        [1, 2, 3, 4, 5]
    assert most[0] == 2 and [len(jobs) for jobs in trained] == [2, 2, 1]


@pytest.mark.e2e
def test_a_killed_worker_process_gives_each_of_its_sites_an_error_reply_and_the_other_worker_answers(
        flower_task_identity):
    """Node k is served by worker (k - 1) mod workers; a worker that dies answers nothing, and
    the coordinator gets Flower's Error reply for each of its sites, not a hang."""
    from fedshield.client.app import app, train_steps_of

    grid = BatchedGrid(app, 4, workers=2, train_steps=train_steps_of(app))
    try:
        # Each worker process runs WORKER_NICENESS nicer than the coordinator (its aggregation
        # is what a round waits for once the replies are in).
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, w.process.pid) for w in grid._workers] == \
            [min(19, own + WORKER_NICENESS)] * 2
        dead = grid._workers[0]
        dead.process.kill()
        dead.process.wait()
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive([_query(n) for n in (1, 2, 3, 4)])}
        assert set(replies) == {1, 2, 3, 4}
        for node in (1, 3):  # worker 0's sites
            assert replies[node].has_error()
            assert "worker process serving this virtual site ended" in replies[node].error.reason
        for node in (2, 4):  # worker 1 answers (this query is not a fedshield HELLO: its handler says so)
            assert not replies[node].has_error() or "worker process" not in replies[node].error.reason
    finally:
        grid.close()


@pytest.mark.e2e
def test_on_a_ray_cluster_the_workers_are_actors_and_a_killed_actor_gives_its_sites_error_replies(
        flower_task_identity):
    """With actor_resources the grid's workers are Ray actors (simulation.ray_address), each
    answering its share over its own authenticated connection; an actor that dies answers
    nothing more, and its sites get Flower's Error reply, not a hang."""
    import logging

    import ray

    from fedshield.client.app import app, train_steps_of
    from fedshield.simulations.batched import SiteWorkerActor

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    try:
        grid = BatchedGrid(app, 4, workers=2, train_steps=train_steps_of(app),
                           actor_resources={"num_cpus": 1, "num_gpus": 0})
        try:
            assert len(grid._workers) == 2 and grid._host is None
            assert all(SiteWorkerActor.__name__ in repr(w.actor) for w in grid._workers)
            assert _eventually(lambda: ray.available_resources().get("CPU", 0) == 0)  # each actor holds its CPU
            replies = {r.metadata.src_node_id: r for r in grid.send_and_receive([_query(n) for n in (1, 2, 3, 4)])}
            assert set(replies) == {1, 2, 3, 4}  # each answered by its site's handler
            assert not any(r.has_error() and "Ray actor" in r.error.reason for r in replies.values())
            dead = grid._workers[0]
            ray.kill(dead.actor)
            assert _eventually(dead.ended)
            replies = {r.metadata.src_node_id: r for r in grid.send_and_receive([_query(n) for n in (1, 2, 3, 4)])}
            assert set(replies) == {1, 2, 3, 4}
            for node in (1, 3):  # the dead actor's sites
                assert "Ray actor serving this virtual site ended" in replies[node].error.reason
            for node in (2, 4):  # the other actor answers
                assert not replies[node].has_error() or "Ray actor" not in replies[node].error.reason
        finally:
            grid.close()
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_worker_actors_the_ray_cluster_cannot_place_are_one_line_and_released(flower_task_identity, monkeypatch):
    """More workers than the cluster has CPUs for: the run stops before round 1 with one line
    naming the keys to change, and the actor that did start is released."""
    import logging

    import ray

    import fedshield.simulations.batched as batched
    from fedshield.client.app import app, train_steps_of

    monkeypatch.setattr(batched, "ACTOR_START_TIMEOUT_S", 3.0)
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    try:
        # One of the two cannot be placed (the first may still be starting on a loaded machine).
        with pytest.raises(conf.ConfigError, match=r"[12] of its 2 worker actors \(1 CPU each\) did not start.*"
                                                   r"simulation.num_cpus.*simulation.client_cpus"):
            BatchedGrid(app, 4, workers=2, train_steps=train_steps_of(app),
                        actor_resources={"num_cpus": 1, "num_gpus": 0})
        assert _eventually(lambda: ray.available_resources().get("CPU", 0) == 1)  # both actors gone
    finally:
        ray.shutdown()


@pytest.mark.timeout(120)
def test_a_send_to_a_worker_actor_that_stops_reading_ends_that_worker_instead_of_waiting_for_ever():
    """A worker actor on a lost node leaves the coordinator's send blocked once the
    connection's buffers are full: with its sends bounded (`bound_stalled_sends`, as every
    actor connection is), the send fails after the stall and the worker is lost, not waited for."""
    import threading
    from multiprocessing.connection import Client, Listener

    import fedshield.simulations.batched as batched

    key = b"k" * 32
    with Listener(("127.0.0.1", 0), family="AF_INET", authkey=key) as listener:
        accepted = []
        accepting = threading.Thread(target=lambda: accepted.append(listener.accept()))
        accepting.start()
        conn = Client(listener.address, family="AF_INET", authkey=key)
        accepting.join()
    batched.bound_stalled_sends(conn, 0.2)
    worker = batched._Worker(([1], 1, 1, 1))
    worker._conn = conn  # its far end (`accepted`) never reads again
    worker.send([b"x" * (256 << 20)])  # more than any socket buffer holds
    assert not worker.alive and worker.connection is None
    conn.close()
    accepted[0].close()


@pytest.mark.timeout(120)
def test_a_worker_actor_refuses_a_connection_without_the_key_and_still_takes_the_coordinators():
    """Anyone on a Ray cluster's network can reach an actor's listener first: a connection
    with another key fails the challenge and is dropped, and the coordinator's, with the
    run's key, is the one the actor serves."""
    import threading
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client, Listener

    from fedshield.simulations.batched import accept_authenticated

    key = os.urandom(32)
    with Listener(("127.0.0.1", 0), family="AF_INET", authkey=key) as listener:
        accepted = []
        accepting = threading.Thread(target=lambda: accepted.append(accept_authenticated(listener)))
        accepting.start()
        with pytest.raises(AuthenticationError):
            Client(listener.address, family="AF_INET", authkey=os.urandom(32))
        assert accepting.is_alive() and not accepted  # still waiting for the coordinator
        coordinator = Client(listener.address, family="AF_INET", authkey=key)
        accepting.join(60)
    assert len(accepted) == 1
    coordinator.send(("plan", 1))
    assert accepted[0].recv() == ("plan", 1)
    coordinator.close()
    accepted[0].close()


def _eventually(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_worker_that_ended_without_closing_its_connection_gives_its_sites_error_replies(
        flower_task_identity, monkeypatch):
    """A worker on a lost machine of a Ray cluster leaves its TCP connection silent, not
    closed: the coordinator checks every _LIVENESS_CHECK_S that each silent worker is still
    there, reads what it sent before it ended, and answers the rest with Error replies."""
    import multiprocessing

    import fedshield.simulations.batched as batched

    monkeypatch.setattr(batched, "_LIVENESS_CHECK_S", 0.05)

    class Silent(batched._Worker):
        """A worker whose far end sent one reply, then went quiet; `ended` once told so."""

        def __init__(self, conn, far):
            super().__init__(([1, 2], 2, 1, 1))
            self._conn, self.far, self.gone = conn, far, False

        def send(self, messages):
            self.far.send([(0, Message(RecordDict(), reply_to=messages[0]))])  # its first site's reply

        def ended(self):
            return self.gone

        def why_lost(self):
            return "gone quiet"

    grid = BatchedGrid(_echo_app(), 2)
    near, far = multiprocessing.Pipe()
    worker = Silent(near, far)
    grid._host, grid._workers, grid._nodes = None, [worker], [1, 2]
    replies = iter(grid.send_and_receive([_query(1), _query(2)]))
    first = next(replies)
    assert first.metadata.src_node_id == 1 and not first.has_error()
    worker.gone = True  # the machine is lost: the connection says nothing more
    second = next(replies)
    assert second.metadata.src_node_id == 2 and second.error.reason == "RuntimeError: gone quiet"
    assert list(replies) == []
    far.close()
    near.close()


def test_a_host_answers_queries_first_then_train_chunks_as_slices(flower_task_identity, monkeypatch):
    """A worker sends each slice as it is ready (the coordinator checks one chunk's replies
    while the next trains): the queries, then TRAIN messages `chunk` sites at a time."""
    from fedshield.client.app import TrainOutcome
    from fedshield.simulations import batched

    def steps(msg: Message, context: Context):
        yield context.node_id
        return Message(RecordDict({"config": ConfigRecord({"node": context.node_id})}), reply_to=msg)

    monkeypatch.setattr(batched, "train_jobs", lambda jobs: [TrainOutcome(None) for _ in jobs])
    host = batched.SiteHost(_echo_app(), range(1, 6), 5, 1, steps)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3, 4, 5)]
    messages.insert(2, _query(3))
    slices = [[k for k, _ in part] for part in host.answer_slices(messages, chunk=2)]
    assert slices == [[2], [0, 1], [3, 4], [5]]
    assert [r.metadata.src_node_id for r in host.answer(messages)] == [1, 2, 3, 3, 4, 5]  # in their order


@pytest.mark.e2e
def test_replies_come_as_the_workers_send_them_and_an_unread_batch_is_finished_before_the_next(
        flower_task_identity):
    """send_and_receive hands replies out as the workers stream them; a batch its caller did
    not read to the end is read (and dropped) before the next is sent, so every reply
    answers the message it names."""
    from fedshield.client.app import app, train_steps_of

    grid = BatchedGrid(app, 4, workers=2, train_steps=train_steps_of(app))
    try:
        first = [_query(n) for n in (1, 2, 3, 4)]
        unread = iter(grid.send_and_receive(first))
        next(unread)  # one reply read; three are still coming
        second = [_query(n) for n in (1, 2, 3, 4)]
        replies = list(grid.send_and_receive(second))
        assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(m.metadata.message_id for m in second)
        assert {r.metadata.src_node_id for r in replies} == {1, 2, 3, 4}
    finally:
        grid.close()


def test_auto_takes_the_batched_engine_on_this_machine_and_on_a_ray_cluster_and_the_first_line_says_which():
    assert engine_of(Config.load([])) == "batched"
    assert engine_of(Config.load(["simulation.ray_address=127.0.0.1:6379"])) == "batched"
    assert engine_of(Config.load(["simulation.engine=flower"])) == "flower"
    assert "engine batched (auto)" in run_header(Config.load([]))
    assert "engine flower)" in run_header(Config.load(["simulation.engine=flower"]))
    cluster = Config.load(["simulation.engine=batched", "simulation.ray_address=127.0.0.1:6379"])
    assert engine_of(cluster) == "batched"
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
    from fedshield.task.pipeline import build_model

    initial = build_model(cfg).state_dict()["classifier.weight"].numpy()
    assert fm[-1]["trained"] == 3 and float(np.max(np.abs(b["classifier.weight"] - initial))) > 1e-3


def test_a_chunks_spends_are_on_disk_before_any_site_trains_and_its_releases_before_any_reply(
        flower_task_identity, monkeypatch, tmp_path, request):
    """Group commit (privacy/files.py): the sites' fsyncs are deferred and made durable by one
    syncfs per file system, before the chunk's training (spend before compute) and before the
    replies leave; a barrier that fails trains nothing and answers each site with an Error."""
    from fedshield.client.app import TrainOutcome
    from fedshield.privacy import files
    from fedshield.simulations import batched

    events: list[str] = []
    written = iter(range(100))
    monkeypatch.setattr(files, "_SYNCFS", lambda fd: events.append("syncfs") or 0)
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append("fsync"))

    def steps(msg: Message, context: Context):
        files.create_file(tmp_path / f"spend-{next(written)}", b"entry", private=False)  # its spend
        events.append(f"spent {context.node_id}")
        yield context.node_id
        files.create_file(tmp_path / f"release-{next(written)}", b"kept", private=False)
        events.append(f"kept {context.node_id}")
        return Message(RecordDict({"config": ConfigRecord({"node": context.node_id})}), reply_to=msg)

    def trained(jobs):
        events.append("train")
        return [TrainOutcome(None) for _ in jobs]

    monkeypatch.setattr(batched, "train_jobs", trained)
    grid = BatchedGrid(_echo_app(), 3, train_steps=steps)
    request.addfinalizer(grid.close)
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]))
    assert not any(r.has_error() for r in replies)
    assert "fsync" not in events  # deferred, every one
    assert events == ["spent 1", "spent 2", "syncfs", "train", "kept 1", "kept 2", "syncfs"]

    events.clear()
    monkeypatch.setattr(files, "_SYNCFS", lambda fd: events.append("syncfs") or -1)  # the disk refuses
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]))
    assert all(r.has_error() and "syncfs" in r.error.reason for r in replies)
    assert "train" not in events and not any(e.startswith("kept") for e in events)

    events.clear()
    verdicts = iter([0, -1])  # the barrier before training holds; the one before the replies fails
    monkeypatch.setattr(files, "_SYNCFS", lambda fd: events.append("syncfs") or next(verdicts))
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]))
    assert "train" in events and all(r.has_error() and "syncfs" in r.error.reason for r in replies)


def test_a_failed_exit_barrier_does_not_hide_the_error_that_ended_the_group(monkeypatch, tmp_path):
    from fedshield.privacy import files

    monkeypatch.setattr(files, "_SYNCFS", lambda fd: -1)
    with pytest.raises(ValueError, match="the block's own"), files.group_commit():
        files.create_file(tmp_path / "a", b"1", private=False)
        raise ValueError("the block's own")
    with pytest.raises(files.BarrierError, match="syncfs failed"), files.group_commit():
        files.create_file(tmp_path / "b", b"1", private=False)


def test_a_workers_sites_are_cut_into_whole_chunks_then_halves_so_the_last_slice_is_small():
    """The coordinator checks the last slice's replies while nothing trains: after whole
    chunks, the last two chunks' worth is halved until half a chunk or less is left."""
    from fedshield.simulations.batched import chunk_sizes

    for chunk in (1, 2, 3, 128):
        for n in range(0, 700):
            sizes = chunk_sizes(n, chunk)
            assert sum(sizes) == n and all(0 < s <= chunk for s in sizes)
            if n > chunk:
                assert sizes[-1] <= max(1, chunk // 2) + 1
    assert chunk_sizes(500, 128) == [128, 128, 122, 61, 61]
    assert chunk_sizes(64, 128) == [64]


def test_with_workers_the_coordinator_collects_once_a_round_while_they_train_and_restores_the_collector(
        flower_task_identity):
    """With worker processes, the coordinator stops the collector's own full collections at
    the first TRAIN push (frozen heap, generation 2 out of reach: `own_full_collections`)
    and makes one itself each later TRAIN push, once its workers have the round, freezing
    what survives it (`collect_and_freeze`); queries trigger none. `close` gives the
    collector its thresholds back and unfreezes."""
    import gc

    class Worker:  # what `_hand_out` and `close` use of a worker process
        def __init__(self) -> None:
            self.sent: list[list[Message]] = []

        def send(self, share: list[Message]) -> None:
            events.append("send")
            self.sent.append(share)

        def stop(self) -> None:
            pass

        def close(self) -> None:
            pass

    def train() -> list[Message]:
        return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]

    events: list[str] = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            events.append("full")

    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    grid = BatchedGrid(_echo_app(), 2)
    workers = [Worker(), Worker()]
    grid._workers = workers  # type: ignore[assignment]
    gc.callbacks.append(count)
    try:
        grid._hand_out([_query(1), _query(2)])
        assert gc.get_threshold() == before and "full" not in events and gc.get_freeze_count() == 0
        events.clear()
        grid._hand_out(train())
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] >= 1 << 30
        assert gc.get_freeze_count() > 0 and events == ["full", "send", "send"]  # freeze_heap's, first
        for _ in (2, 3):
            kept, dropped = [[n] for n in range(1000)], [[n] for n in range(1000)]  # a round's books, its garbage
            frozen = gc.get_freeze_count()
            events.clear()
            grid._hand_out(train())
            assert events == ["send", "send", "full"]  # one a round, once the round is handed out
            # What survived it is frozen (the next collections do not scan the run's books
            # again); what is frozen and then dropped is still freed, by its reference count.
            assert gc.get_freeze_count() >= frozen + 2000
            assert not {id(kept), id(dropped)} & {id(x) for x in gc.get_objects()}  # in no generation: frozen
            grown = gc.get_freeze_count()
            del dropped
            assert gc.get_freeze_count() <= grown - 1000
            assert kept[-1] == [999]
        events.clear()
        grid._hand_out([_query(1)])
        assert events == ["send"]
        assert [len(w.sent) for w in workers] == [5, 4]  # node 1 to the first worker, node 2 to the second
    finally:
        gc.callbacks.remove(count)
        grid.close()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_worker_collects_its_young_objects_about_once_a_round_and_the_coordinator_as_before():
    """`own_full_collections(young=...)` (a worker's, after its first batch) puts the young
    generation's threshold at `young` and generation 2 out of reach, the middle one as it
    was; without it (the coordinator's) the young threshold stays. Each returns the
    thresholds it found, which `close` (or the worker's end) gives back."""
    import gc

    from fedshield.simulations import batched

    before = gc.get_threshold()
    try:
        assert batched.own_full_collections(young=batched._WORKER_YOUNG_COLLECTION) == before
        assert gc.get_threshold() == (batched._WORKER_YOUNG_COLLECTION, before[1], batched._NO_FULL_COLLECTION)
        gc.set_threshold(*before)
        assert batched.own_full_collections() == before
        assert gc.get_threshold() == (before[0], before[1], batched._NO_FULL_COLLECTION)
    finally:
        gc.set_threshold(*before)


def test_a_worker_freezes_its_heap_after_its_first_batch_and_collects_after_each_train_batch(
        flower_task_identity, monkeypatch):
    """Between batches a worker first tends its heap, then prepares the next round's budget
    checks until work comes: the heap frozen once, after the first batch (the query rounds,
    in the long wait before the first TRAIN batch), then one collection after each TRAIN
    batch; every batch answered and closed by None before any of it."""
    from fedshield.simulations import batched

    calls: list[str] = []
    monkeypatch.setattr(batched, "freeze_heap", lambda: calls.append("freeze"))
    monkeypatch.setattr(batched, "own_full_collections", lambda young=None: calls.append(f"young {young}"))
    monkeypatch.setattr(batched, "collect_and_freeze", lambda: calls.append("collect"))
    monkeypatch.setattr(batched, "prepare_budget_checks", lambda interrupted: calls.append("prepare"))

    train = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    inbox = [([1, 2], 2, 1, 1), [_query(1), _query(2)], [train], [_query(2)], [train], None]
    sent: list[object] = []

    class Conn:
        def recv(self) -> object:
            return inbox.pop(0)

        def send(self, obj: object) -> None:
            sent.append(obj)
            if obj is None:
                calls.append("answered")

        def poll(self, timeout: float = 0.0) -> bool:
            return False

    import torch

    threads = torch.get_num_threads()
    try:
        batched._serve(Conn())  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)  # _serve sets the worker's
    young = f"young {batched._WORKER_YOUNG_COLLECTION}"
    assert calls == ["answered", "freeze", young, "prepare",  # the queries
                     "answered", "collect", "prepare",  # the first TRAIN batch
                     "answered", "prepare",  # a query batch: nothing to collect
                     "answered", "collect", "prepare"]
    assert sum(1 for x in sent if x is None) == 4 and not inbox


def test_the_coordinator_freezes_its_heap_at_the_first_train_push_and_unfreezes_it_when_the_run_ends(
        flower_task_identity, monkeypatch):
    """Python's collector stops rescanning what the run keeps to its end (gc.freeze) from the
    first TRAIN push; `close` unfreezes it, so a process that runs many simulations collects
    each one's garbage. Someone else's freeze is left as it is."""
    import gc

    from fedshield.client.app import TrainOutcome
    from fedshield.simulations import batched

    def steps(msg: Message, context: Context):
        yield context.node_id
        return Message(RecordDict({"config": ConfigRecord({"node": context.node_id})}), reply_to=msg)

    monkeypatch.setattr(batched, "train_jobs", lambda jobs: [TrainOutcome(None) for _ in jobs])
    assert gc.get_freeze_count() == 0
    grid = BatchedGrid(_echo_app(), 2, train_steps=steps)
    list(grid.send_and_receive([_query(1)]))
    assert gc.get_freeze_count() == 0  # queries: the run's model may not be built yet
    replies = list(grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]))
    assert sorted(int(r.content["config"]["node"]) for r in replies) == [1, 2]
    assert gc.get_freeze_count() > 0
    grid.close()
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a process that froze its own heap
    try:
        frozen = gc.get_freeze_count()
        grid = BatchedGrid(_echo_app(), 2, train_steps=steps)
        list(grid.send_and_receive([Message(RecordDict(), dst_node_id=1, message_type="train")]))
        grid.close()
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen by the grid (freed objects leave it)
    finally:
        gc.unfreeze()

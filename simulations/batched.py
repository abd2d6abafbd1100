"""The batched simulation engine (`simulation.engine=batched`): many virtual sites in each
worker (a process here, or a Ray actor on a cluster), their local training vectorised
across sites.

What stays the same as on Flower's runtime (`simulation.engine=flower`):
- the coordinator: the very ServerApp, strategy stack and round loop (`Strategy.start`),
  driven through Flower's `Grid` interface: `BatchedGrid` is a Grid;
- every virtual site: the very ClientApp handlers (client/app.py), with their policy
  checks, released counts, calibration, budget checks, signed ledger entries written and
  fsynced before training (spend before release), kept releases and typed replies
  (protocol.py). Queries (HELLO, FEATURE_SUM, DONE, the secure-aggregation stages) are
  delivered to the ClientApp one by one, as a SuperNode would.

What changes is how messages travel and how TRAIN work is done:
- no SuperLink, no protobuf: a message is handed to the site's handler in this process, or
  to a worker as the Message object itself (pickled over an authenticated connection: a
  local socket to a worker process, or TCP to a worker actor on a Ray cluster), and its
  reply is returned as it comes (no polling interval);
- a round's TRAIN messages are run as steps (`client.app.train_steps`): every site runs its
  handler up to its local training (everything before it, its spend included, is done),
  then the jobs of all the sites are trained together (`train_jobs`: vectorised across
  sites by task/cohort.py where the trainable module allows it, one by one otherwise), and
  every site finishes its handler with its own result (its release kept, its reply built);
- the sites of a process share one model view per plan and keep their encoded records in
  memory (`client.app.shared_views`): each job loads its own starting point before it trains.

The equivalence with Flower's runtime (same ledgers entry for entry, final models within a
stated tolerance) is tested in tests/test_batched.py.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedshield.client.app import Steps, TrainJob, TrainOutcome, prepare_budget_checks, shared_views
from fedshield.conf import ConfigError
from fedshield.privacy.files import BarrierError, group_commit
from fedshield.task.cohort import CohortJob, module_refusal, plan_refusal, train_cohort

log = logging.getLogger("fedshield.simulation")

# Flower's simulation runtime names the partition a virtual SuperNode serves so; the sites'
# handlers read these keys (client/app.py resolve_site).
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
# Sites whose TRAIN steps are open at once: bounds the memory of a round (their encoded
# records and handlers' state) whatever federation.fraction_train asks of 10,000 sites.
SITES_PER_CHUNK = 1024
# How often the coordinator, waiting for its workers' replies, checks that each is still there.
_LIVENESS_CHECK_S = 5.0
# Sites a worker trains, and answers, at a time: the coordinator checks one such slice's
# replies while the next one trains (bench/RESULTS.md: the chunk size measured).
STREAM_CHUNK = 128
# A local worker process runs this much nicer than the coordinator: when the round's last
# replies are in, the coordinator's aggregation is all the round waits for, and it then
# gets a core ahead of the workers' between-round preparation (2.5% of a 1,000-site round on
# 2 cores: bench/RESULTS.md). Not applied to a Ray cluster's actors (its own scheduling).
WORKER_NICENESS = 5

StepsFn = Callable[[Message, Context], Steps]


class SiteHost:
    """Virtual sites served in this process: node id -> its Context (Flower's: partition id,
    and the node's state across messages, which secure aggregation keeps), and the handlers
    that answer them.

    `app` answers every message, as a SuperNode's ClientApp would; with `train_steps`
    (client.app.train_steps, for fedshield's own ClientApp) TRAIN messages are run as steps
    and their training is batched (`train_jobs`). A handler that raises gives the Error
    reply a SuperNode's would (ErrorCode.CLIENT_APP_RAISED_EXCEPTION): the coordinator
    carries on without that site, as on Flower's runtime.
    """

    def __init__(self, app: ClientApp, node_ids: Iterable[int], num_sites: int, run_id: int,
                 train_steps: StepsFn | None) -> None:
        self._app = app
        self._train_steps = train_steps
        # Node ids 1..N serve partitions 0..N-1 (the coordinator keys sites by name, never by id).
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={PARTITION_ID: node - 1, NUM_PARTITIONS: num_sites},
                          state=RecordDict(), run_config={})
            for node in node_ids
        }

    def answer(self, messages: Sequence[Message]) -> list[Message]:
        """The replies to `messages`, in their order (`answer_slices`, collected)."""
        replies = dict(pair for part in self.answer_slices(messages) for pair in part)
        return [replies[k] for k in range(len(messages))]

    def answer_slices(self, messages: Sequence[Message],
                      chunk: int = SITES_PER_CHUNK) -> Iterator[list[tuple[int, Message]]]:
        """(index in `messages`, reply) for every message, a slice at a time as they are
        ready: the queries, answered one by one, then the TRAIN messages in chunks of
        `chunk` sites (at most SITES_PER_CHUNK) whose trainings run together. A worker
        sends each slice as it comes, so the coordinator checks one chunk's replies while
        the next one trains."""
        chunk = max(1, min(chunk, SITES_PER_CHUNK))
        train = [k for k, m in enumerate(messages) if self._train_steps is not None and _is_train(m)]
        chosen = set(train)
        queries = [(k, self._deliver(msg)) for k, msg in enumerate(messages) if k not in chosen]
        if queries:
            yield queries
        start = 0
        for size in chunk_sizes(len(train), chunk):
            part = train[start:start + size]
            start += size
            yield list(zip(part, self._train_chunk([messages[k] for k in part]), strict=True))

    def _deliver(self, msg: Message) -> Message:
        try:
            return self._app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what Flower's runtime makes of a ClientApp that raised
            return _error_reply(msg, exc)

    def _train_chunk(self, messages: Sequence[Message]) -> list[Message]:
        """Every site's TRAIN steps up to its training, the training of all, then each
        site's finish: replies in the order of `messages`."""
        try:
            return self._train_chunk_durably(messages)
        except BarrierError as exc:  # the exit barrier failed: the kept releases may not be on disk
            return [_error_reply(msg, exc) for msg in messages]  # so no reply of the chunk leaves

    def _train_chunk_durably(self, messages: Sequence[Message]) -> list[Message]:
        assert self._train_steps is not None
        replies: dict[int, Message] = {}
        open_steps: list[tuple[int, Steps, TrainJob]] = []
        # The sites' writes (ledger entries, marks) are made durable together (group commit,
        # privacy/files.py): all of them before the first training step, as each site's own
        # fsyncs would have been (spend before compute), and the kept releases before any
        # reply leaves this process.
        with group_commit() as group:
            for k, msg in enumerate(messages):
                steps = self._train_steps(msg, self.contexts[msg.metadata.dst_node_id])
                try:
                    open_steps.append((k, steps, next(steps)))
                except StopIteration as stop:  # declined, or a kept release sent again
                    replies[k] = stop.value
                except Exception as exc:
                    replies[k] = _error_reply(msg, exc)
            try:
                if group is not None:
                    group.barrier()
            except BarrierError as exc:  # spends not known to be on disk: nothing trains
                for k, steps, _ in open_steps:
                    steps.close()
                    replies[k] = _error_reply(messages[k], exc)
                open_steps = []
            outcomes = train_jobs([job for _, _, job in open_steps]) if open_steps else []
            for (k, steps, _), outcome in zip(open_steps, outcomes, strict=True):
                try:
                    steps.send(outcome)
                    replies[k] = _error_reply(messages[k],
                                              RuntimeError("a site asked for a second training in one round"))
                except StopIteration as stop:
                    replies[k] = stop.value
                except Exception as exc:
                    replies[k] = _error_reply(messages[k], exc)
        return [replies[k] for k in range(len(messages))]


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """How `n` sites are cut into chunks of at most `chunk`: whole chunks, then, over the last
    two chunks' worth, halves of what is left until half a chunk or less is left. The
    coordinator checks a slice's replies while the next one trains, but the last slice's
    while nothing trains: it is kept to half a chunk or less (two or three more chunks a
    round)."""
    sizes: list[int] = []
    left = n
    while left > 0:
        if left > 2 * chunk:
            size = chunk
        elif left > chunk // 2:
            size = -(-left // 2)
        else:
            size = left
        sizes.append(size)
        left -= size
    return sizes


class _Worker:
    """The coordinator's end of one worker (`_serve` at the other end): a site's messages
    always go to the same worker, which keeps its Context and caches."""

    def __init__(self, setup: tuple[list[int], int, int, int]) -> None:
        self._setup = setup  # (node ids, num_sites, run id, torch threads), sent on `attach`
        self._conn: Connection | None = None
        self.alive = True

    def attach(self, conn: Connection) -> None:
        """Take this worker's connection and send it its share of the sites."""
        self._conn = conn
        conn.send(self._setup)

    @property
    def connection(self) -> Connection | None:
        return self._conn if self.alive else None

    def send(self, messages: Sequence[Message]) -> None:
        """Hand the worker `messages`: it answers them in slices (`receive`), then None."""
        if self.alive and self._conn is not None:
            try:
                self._conn.send(list(messages))  # pickled: see `_serve`
            except (OSError, EOFError):
                self.alive = False

    def receive(self) -> list[tuple[int, Message]] | None:
        """The worker's next slice of replies, (index in what it was sent, reply); None when
        it has answered everything, or is gone (its unanswered sites then get Error replies
        from `lost`)."""
        if self.alive and self._conn is not None:
            try:
                part = self._conn.recv()
                if part is None:
                    return None
                return [(int(k), reply) for k, reply in part]
            except (OSError, EOFError):
                self.alive = False
        return None

    def ended(self) -> bool:
        """Whether the worker is known to have ended, whatever its connection says (a worker
        on another machine that died leaves its TCP connection silent, not closed)."""
        return False

    def why_lost(self) -> str:
        return "the worker serving this virtual site ended"

    def lost(self, messages: Sequence[Message]) -> list[Message]:
        """Error replies for `messages`, which this worker will never answer: it ended."""
        why = RuntimeError(self.why_lost())
        return [_error_reply(m, why) for m in messages]

    def stop(self) -> None:
        """Tell the worker to finish (`close` waits for it: all workers are told first)."""
        if self.alive and self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, EOFError):
                pass
            self.alive = False

    def close(self) -> None:
        self.stop()
        self._wait_or_kill()
        if self._conn is not None:
            self._conn.close()

    def _wait_or_kill(self) -> None:
        raise NotImplementedError


class _WorkerProcess(_Worker):
    """A worker process on this machine serving a fixed share of the virtual sites.

    Started as `python -m fedshield.simulations.batched` (not multiprocessing's spawn, which
    would run the caller's main script again in every worker; nor fork, unsafe once torch's
    threads run); it connects back over a local socket that only a holder of the key
    (sent on its stdin) can use."""

    def __init__(self, listener: Listener, authkey: bytes, node_ids: list[int], num_sites: int, run_id: int,
                 threads: int) -> None:
        super().__init__((node_ids, num_sites, run_id, threads))
        # The worker imports what this process imports: its module search path, as it is now.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen([sys.executable, "-m", "fedshield.simulations.batched"],
                                        stdin=subprocess.PIPE, env=env)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"address": listener.address, "authkey": authkey.hex()}).encode())
        self.process.stdin.close()

    def ended(self) -> bool:
        return self.process.poll() is not None

    def why_lost(self) -> str:
        return f"the worker process serving this virtual site ended (exit code {self.process.poll()})"

    def _wait_or_kill(self) -> None:
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SiteWorkerActor:
    """A worker of the batched engine as a Ray actor (`simulation.ray_address`): `_serve` on
    a node of the cluster, for the share of the sites the coordinator sends it. It listens
    on its node's address for one connection, authenticated with the run's worker key (the
    coordinator's, passed in the actor call); the cluster's nodes reach the run folder, the
    data and the model at the same paths, as Flower's runtime on Ray needs too."""

    def __init__(self) -> None:
        import fedshield.deploy.offline  # noqa: F401  (nothing phones home, in this process too)

        self._listener: Listener | None = None

    def listen(self, authkey: bytes) -> tuple[str, int]:
        """Open this actor's listener on its node's address; (host, port) to connect to."""
        import ray

        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._listener = Listener((host, 0), family="AF_INET", authkey=authkey)
        address: tuple[str, int] = self._listener.address
        return address

    def serve(self) -> None:
        """Accept the coordinator's connection and serve it until it says None (or is gone)."""
        assert self._listener is not None, "listen first"
        with self._listener as listener:
            conn = accept_authenticated(listener)
        _serve_until_gone(conn)


def accept_authenticated(listener: Listener) -> Connection:
    """The first connection to `listener` that proves the key: one that fails the challenge
    (anyone on the cluster's network may knock) is dropped and the next one awaited."""
    while True:
        try:
            return listener.accept()
        except (AuthenticationError, EOFError, OSError) as exc:
            log.warning("a worker actor refused a connection that did not prove the run's key: %s", exc)


# How long the worker actors of a run may take to be placed and started on a Ray cluster.
ACTOR_START_TIMEOUT_S = 300.0
# A send to a worker actor that makes no progress for this long (its node lost with the
# connection's buffers full) ends that worker, as a closed connection does: its sites get
# Error replies, and the coordinator goes on with the others.
ACTOR_SEND_STALL_S = 60.0


def bound_stalled_sends(conn: Connection, seconds: float) -> None:
    """Make a send on the TCP connection `conn` that makes no progress for `seconds` fail
    (OSError, SO_SNDTIMEO) instead of waiting for ever; receiving is not bounded."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # the same socket: its options are shared
    try:
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", whole, int(round((seconds - whole) * 1_000_000))))
    finally:
        sock.close()


class _WorkerActor(_Worker):
    """A worker of the batched engine on a Ray cluster: a `SiteWorkerActor` holding
    `resources` (Ray's num_cpus, num_gpus), its `_serve` reached over TCP."""

    def __init__(self, authkey: bytes, resources: dict[str, float], node_ids: list[int], num_sites: int,
                 run_id: int, threads: int) -> None:
        import ray

        super().__init__((node_ids, num_sites, run_id, threads))
        self.actor = ray.remote(**resources)(SiteWorkerActor).remote()  # type: ignore[call-overload]
        self.address_ref = self.actor.listen.remote(authkey)
        self.serving: object | None = None  # the ObjectRef of its `serve` call

    def start_serving(self, address: tuple[str, int], authkey: bytes) -> None:
        self.serving = self.actor.serve.remote()
        conn = Client(address, family="AF_INET", authkey=authkey)
        bound_stalled_sends(conn, ACTOR_SEND_STALL_S)
        self.attach(conn)

    def _outcome(self, timeout: float) -> BaseException | None | bool:
        """The `serve` call's end: None (returned), its error, or False (not ended yet)."""
        import ray

        if self.serving is None:
            return None
        ready, _ = ray.wait([self.serving], timeout=timeout)
        if not ready:
            return False
        try:
            ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001  the actor's failure, said in `why_lost`
            return exc
        return None

    def ended(self) -> bool:
        return self._outcome(0) is not False

    def why_lost(self) -> str:
        outcome = self._outcome(0)
        said = f": {type(outcome).__name__}" if isinstance(outcome, BaseException) else ""
        return f"the Ray actor serving this virtual site ended{said}"

    def _wait_or_kill(self) -> None:
        import ray

        if self._outcome(30) is False:
            log.warning("a worker actor of the batched engine did not finish in 30 s: killed")
        ray.kill(self.actor)


def start_actor_workers(authkey: bytes, resources: dict[str, float], shares: list[list[int]], num_sites: int,
                        run_id: int, threads: int) -> list[_Worker]:
    """One `SiteWorkerActor` per share of the sites on the Ray cluster this process is
    connected to, each connected to and sent its share; a cluster that cannot place them
    all within ACTOR_START_TIMEOUT_S is one line (ConfigError), the actors released."""
    import ray

    workers: list[_WorkerActor] = []
    try:
        for share in shares:
            workers.append(_WorkerActor(authkey, resources, share, num_sites, run_id, threads))
        refs = [w.address_ref for w in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_START_TIMEOUT_S)
        if len(ready) < len(refs):
            free = ray.available_resources().get("CPU", 0)  # type: ignore[no-untyped-call]
            raise ConfigError(
                f"the batched engine: {len(refs) - len(ready)} of its {len(refs)} worker actors "
                f"({resources.get('num_cpus', 1):g} CPU each) did not start on the Ray cluster within "
                f"{ACTOR_START_TIMEOUT_S:.0f} s (CPUs free now: {free:g}); set simulation.num_cpus to the "
                "CPUs the run may take, or simulation.client_cpus lower")
        for worker, address in zip(workers, ray.get(refs), strict=True):
            worker.start_serving((str(address[0]), int(address[1])), authkey)
    except BaseException:
        for worker in workers:
            worker.alive = False
            ray.kill(worker.actor)
        raise
    return list(workers)


def _serve(conn: Connection) -> None:
    """A worker process: fedshield's own ClientApp for its share of the nodes, their TRAIN
    messages as steps, until the coordinator sends None."""
    from fedshield.client.app import app, train_steps_of

    node_ids, num_sites, run_id, threads = conn.recv()
    torch.set_num_threads(threads)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    host = SiteHost(app, node_ids, num_sites, run_id, train_steps_of(app))
    frozen = False
    with shared_views():
        # Messages travel as Flower's Message objects, pickled by the connection (whose peers
        # authenticated with the workers' key), as this process's own host hands them over
        # unserialised: Flower's protobuf form cost seven times as much each way (0.8 ms a
        # message), and one push's messages share one ArrayRecord, which pickle sends once.
        while (batch := conn.recv()) is not None:
            trained = any(_is_train(m) for m in batch)
            for part in host.answer_slices(batch, STREAM_CHUNK):
                conn.send(part)
            conn.send(None)
            del batch
            # While the coordinator aggregates, this process has nothing to do: it collects
            # the round's garbage (`own_full_collections`) and makes ready what the next round
            # will need, until the next batch comes. The heap is frozen after the first batch
            # (the query rounds: the model, its views, the sites' records and states are
            # built), in the long wait before the first TRAIN batch; after the first TRAIN
            # batch it took 0.3 s of the short wait before the second, and the next round's
            # preparation then ran in that round.
            if not frozen:
                frozen = True
                freeze_heap()
                own_full_collections(young=_WORKER_YOUNG_COLLECTION)
            elif trained:
                collect_and_freeze()
            prepare_budget_checks(conn.poll)


def _serve_until_gone(conn: Connection) -> None:
    """`_serve` until the coordinator says None, or is gone; the connection closed."""
    try:
        _serve(conn)
    except EOFError:  # the coordinator is gone: nothing to answer
        pass
    finally:
        conn.close()


class BatchedGrid(Grid):
    """The coordinator's Grid over virtual sites: in this process (`workers=1`), or spread
    over `workers` worker processes (node k to worker (k - 1) mod workers), each serving
    its sites with fedshield's own ClientApp; a push is answered by all workers at once."""

    simulated = True  # server/app.py: the simulation's nodes, fixed, and their books in the run folder

    def __init__(self, app: ClientApp, num_sites: int, *, run_id: int = 1,
                 train_steps: StepsFn | None = None, workers: int = 1, threads: int = 1,
                 actor_resources: dict[str, float] | None = None) -> None:
        """`actor_resources` (Ray's num_cpus, num_gpus of each): the workers are Ray actors on
        the cluster this process is connected to (`SiteWorkerActor`), else processes here."""
        self._run = Run.create_empty(run_id)
        self._nodes = list(range(1, num_sites + 1))
        self._replies: dict[str, Message] = {}
        self._in_flight: Iterator[Message] | None = None  # the replies send_and_receive is handing out
        self._frozen: bool | None = None  # whether `freeze_heap` ran at the first TRAIN push (None: not yet)
        self._thresholds: tuple[int, int, int] | None = None  # the collector's own, while this grid holds them
        self._host: SiteHost | None = None
        self._workers: list[_Worker] = []
        authkey = os.urandom(32)
        if actor_resources is not None:
            shares = [self._nodes[w::workers] for w in range(max(1, workers))]
            self._workers = start_actor_workers(authkey, actor_resources, shares, num_sites, run_id, threads)
            return
        if workers <= 1:
            self._host = SiteHost(app, self._nodes, num_sites, run_id, train_steps)
            return
        with tempfile.TemporaryDirectory(prefix="fedshield-workers-") as folder:
            with Listener(str(Path(folder) / "socket"), family="AF_UNIX", authkey=authkey) as listener:
                try:
                    for w in range(workers):
                        self._workers.append(_WorkerProcess(listener, authkey, self._nodes[w::workers], num_sites,
                                                            run_id, threads))
                    # Workers connect in any order: each says its pid, which names its process
                    # (the one `close` waits for, and whose exit a dead worker's replies report).
                    by_pid = {w.process.pid: w for w in self._workers if isinstance(w, _WorkerProcess)}
                    for _ in self._workers:
                        conn = listener.accept()
                        worker = by_pid.pop(conn.recv(), None)
                        if worker is None:
                            conn.close()
                            raise RuntimeError("the batched engine: a process that is not one of its workers "
                                               "connected with the workers' key")
                        worker.attach(conn)
                except BaseException:
                    self.close()
                    raise

    def close(self) -> None:
        """Stop the workers. Replies still in flight are not waited for: a worker finishes its
        batch (a run's last, DONE, is short), and one still busy after 30 s is killed: its
        sites' books are crash-safe, as a SuperNode's are."""
        self._in_flight = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        if self._frozen:
            self._frozen = False
            gc.unfreeze()
        for worker in self._workers:
            worker.stop()
        for worker in self._workers:
            worker.close()

    # -- Grid -------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver `messages` and keep their replies for `pull_messages`: all of them are
        answered before this returns (a virtual site never times out)."""
        batch = self._hand_out(messages)
        for reply in self._replies_to(batch):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in batch]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies to `messages`, as they come: the workers start at once, and the
        caller (the strategy's aggregate_train: the reply gate's checks) reads each slice
        while the next one trains. Read to its end, as Flower's round loop does; the next
        call to this grid finishes it otherwise (its replies are then dropped)."""
        batch = self._hand_out(messages)
        self._in_flight = self._replies_to(batch)
        return self._in_flight

    def _hand_out(self, messages: Iterable[Message]) -> list[Message]:
        """Stamp `messages` and hand them to their sites' workers (or this process's host)."""
        self._finish_in_flight()
        batch = list(messages)
        trains = any(_is_train(m) for m in batch)
        collect = trains and self._thresholds is not None  # a later round: the last one's garbage, below
        if self._frozen is None and trains:  # the model and evaluator are built
            # Not over someone else's freeze (this may run inside a researcher's own process):
            # `close` unfreezes what this grid froze, so a process that runs many simulations
            # collects each one's garbage once it is done.
            self._frozen = gc.get_freeze_count() == 0
            if self._frozen:
                freeze_heap()
                if self._workers:  # this process then waits for their replies, each round
                    self._thresholds = own_full_collections()
        for msg in batch:
            if not 1 <= msg.metadata.dst_node_id <= len(self._nodes):
                raise ValueError(f"no virtual site has node id {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids set it
        for worker, share in zip(self._workers, self._shares(batch), strict=True):
            if share:
                worker.send(share)
        if collect:
            collect_and_freeze()  # while the workers train and this process would only wait
        return batch

    def _shares(self, batch: Sequence[Message]) -> list[list[Message]]:
        return [[m for m in batch if (m.metadata.dst_node_id - 1) % len(self._workers) == w]
                for w in range(len(self._workers))]

    def _replies_to(self, batch: list[Message]) -> Iterator[Message]:
        """The replies to `batch` (handed out by `_hand_out`), each stamped as it comes:
        answered here and now by this process's host, or as the workers send them."""
        return _stamped(self._host.answer(batch) if self._host is not None else self._from_workers(batch))

    def _from_workers(self, batch: list[Message]) -> Iterator[Message]:
        # worker index -> (the worker, its share of `batch`, the indices in it not answered yet)
        waiting = {i: (w, share, set(range(len(share))))
                   for i, (w, share) in enumerate(zip(self._workers, self._shares(batch), strict=True)) if share}
        while waiting:
            live = [w.connection for w, _, _ in waiting.values() if w.connection is not None]
            ready = {id(c) for c in wait(live, timeout=_LIVENESS_CHECK_S)} if live else set()
            for key, (worker, share, unanswered) in list(waiting.items()):
                conn = worker.connection
                if conn is not None and id(conn) not in ready:
                    # Silent for _LIVENESS_CHECK_S (no worker sent anything): still training,
                    # or ended without its connection saying so (a machine of the Ray cluster
                    # lost). What it sent before it ended is read first.
                    if ready or not worker.ended() or conn.poll(0):
                        continue
                    worker.alive = False
                part = worker.receive()
                if part is None:  # done, or gone: whatever it did not answer gets its Error reply
                    del waiting[key]
                    yield from worker.lost([share[k] for k in sorted(unanswered)])
                    continue
                for k, reply in part:
                    if k in unanswered:
                        unanswered.discard(k)
                        yield reply

    def _finish_in_flight(self) -> None:
        """Read what is left of the last send_and_receive (dropped): the workers' pipes are
        then empty for the next batch."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            for _ in in_flight:
                pass


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach (gc.freeze),
    after one full collection. By its first TRAIN batch a process holds most of what it keeps
    for the run (the torch and transformers modules, the model and its views, the evaluator;
    a worker's sites' states and caches once it has trained: about 460,000 objects in a
    worker, 640,000 in the coordinator), and each full collection scanned all of it again:
    0.1-0.15 s, several times a round (5% of the CPU a virtual site costs; bench/RESULTS.md).
    What becomes garbage later is still freed by its reference count; a worker keeps its
    objects to its end, and the coordinator unfreezes them when the run ends
    (`BatchedGrid.close`)."""
    gc.collect()
    gc.freeze()


def collect_and_freeze() -> None:
    """A round's full collection (`own_full_collections`), then what survived it frozen like
    the heap of the first round: a run's books grow by a few objects a site a round (its
    entries, their events), and each full collection scanned all of them again (0.03 s at
    round 1 and 0.2 s at round 30 in the coordinator at 1,000 sites a round: bench/RESULTS.md).
    What is frozen and later dropped is still freed by its reference count."""
    gc.collect()
    gc.freeze()


# The collector's own full collections, out of reach (a generation-2 threshold it never meets).
_NO_FULL_COLLECTION = 1 << 30


# A worker's young generation: collected after this many new container objects, about once a
# round at 500 sites a worker (every 700 by default: 120-130 young and 11-13 middle
# collections a worker round, 40-45 ms at 500 sites; bench/RESULTS.md). A worker's round
# leaves few objects alive, its sites' own state, so that the collections found little;
# its once-a-round collection takes the rest. Not in the coordinator: the round's replies
# live until aggregated, and young collections of 100,000 of them took 60 ms each.
_WORKER_YOUNG_COLLECTION = 100_000


def own_full_collections(young: int | None = None) -> tuple[int, int, int]:
    """Stop the cyclic collector's own full collections (and, with `young`, collect the
    young generation only after that many new objects); returns the thresholds it had. The
    caller then collects once a round, when it would only wait (a worker after answering a
    round, the coordinator once it has handed a round out). A round's objects live until the
    round is done (the coordinator keeps every reply until it aggregates them), and the
    collector's own full collections, triggered as they pile up, found nothing to collect:
    at 1,000 sites a round, two in the coordinator of 65 and 94 ms and one or two in each
    worker of 30-70 ms, while the workers train (bench/RESULTS.md). Garbage in a cycle
    waits at most a round."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0] if young is None else young, thresholds[1], _NO_FULL_COLLECTION)
    return thresholds


def _stamped(replies: Iterable[Message]) -> Iterator[Message]:
    for reply in replies:
        reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids set it
        yield reply


def train_jobs(jobs: Sequence[TrainJob]) -> list[TrainOutcome]:
    """Train every job as `TrainJob.run` would: the jobs of one view (one plan: the same
    frozen weights and centre) together with task/cohort.py where it can train that module
    (the same records, clipping, noise, steps and spends per site), the others one by one."""
    outcomes: list[TrainOutcome | None] = [None] * len(jobs)
    groups: dict[tuple[int, tuple[float, ...] | None, str], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.view), job.center, str(job.device)), []).append(i)
    for members in groups.values():
        module = jobs[members[0]].view.module
        vectorised = module_refusal(module) is None  # the same module for the whole group
        together = [i for i in members if vectorised and plan_refusal(jobs[i].plan) is None]
        chosen = set(together)
        for i in members:
            if i not in chosen:
                outcomes[i] = jobs[i].run()
        if not together:
            continue
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        cohort = []
        start: dict[str, torch.Tensor] = {}
        last: TrainJob | None = None
        for i in together:
            if last is None or not _same_start(last, jobs[i]):
                jobs[i].load()  # its start, by the module's own parameter names
                start = {n: p.detach().clone() for n, p in trainable}
                last = jobs[i]
            cohort.append(CohortJob(start, jobs[i].dataset, jobs[i].plan, jobs[i].seed))
        for i, done in zip(together, train_cohort(module, cohort, jobs[together[0]].device), strict=True):
            outcomes[i] = TrainOutcome(done.result, done.error, params=done.params if done.error is None else None)
    return [o if o is not None else TrainOutcome(None, RuntimeError("not trained")) for o in outcomes]


def _same_start(a: TrainJob, b: TrainJob) -> bool:
    """Whether two jobs of one group (one view, one centre) start from the very same weights:
    the same read-only arrays (a push's sites share its global weights, protocol.array_value),
    which nothing can change. Their start is then loaded and copied once, and shared."""
    return a.weights.keys() == b.weights.keys() and all(
        v is b.weights[k] and not v.flags.writeable for k, v in a.weights.items())


def _is_train(msg: Message) -> bool:
    """A TRAIN message ("train", or "train.<handler>"): Flower's category before the dot."""
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _error_reply(msg: Message, exc: BaseException) -> Message:
    log.error("virtual site (node %s): %s: %s", msg.metadata.dst_node_id, type(exc).__name__, exc,
              exc_info=exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                   reply_to=msg)


def worker_count(num_sites: int, num_cpus: int, client_cpus: float, cpus_here: int | None = None) -> int:
    """Workers for the batched engine: one per `client_cpus` of `num_cpus` (0: all of
    `cpus_here`, this machine's cores unless said), at most one per site."""
    cpus = num_cpus or cpus_here or os.cpu_count() or 1
    return max(1, min(num_sites, int(cpus / client_cpus)))


def run_batched(server_app: ServerApp, client_app: ClientApp, num_sites: int, train_steps: StepsFn | None,
                workers: int = 1, actor_resources: dict[str, float] | None = None) -> None:
    """Run `server_app` against `num_sites` virtual sites (the batched engine): served by
    `workers` worker processes when `client_app` is fedshield's own (`train_steps` given),
    else by `client_app` in this process. With `actor_resources` the workers are Ray actors
    holding them, on the cluster this process is connected to (`ray.init`)."""
    if train_steps is None:
        workers, actor_resources = 1, None
    if actor_resources is not None:
        threads = max(1, int(actor_resources.get("num_cpus", 1)))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
    grid = BatchedGrid(client_app, num_sites, train_steps=train_steps, workers=workers, threads=threads,
                       actor_resources=actor_resources)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # Flower stamps every Message with the process's run and task (its runtimes set them, as
    # its compat layer does for a grid it drives): the coordinator's, as on the SuperLink.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    try:
        with shared_views():
            server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        grid.close()


def _worker_main() -> None:
    """`python -m fedshield.simulations.batched`: a worker of the batched engine. Its stdin
    says where the coordinator listens and the key to connect with."""
    import fedshield.deploy.offline  # noqa: F401  (nothing phones home, in this process too)

    setup = json.loads(sys.stdin.read())
    with contextlib.suppress(OSError):  # a platform without it: the same run, a little slower
        os.nice(WORKER_NICENESS)
    conn = Client(setup["address"], family="AF_UNIX", authkey=bytes.fromhex(setup["authkey"]))
    conn.send(os.getpid())
    _serve_until_gone(conn)
    # Done: every ledger and release was fsynced as it was written. Skip the interpreter's
    # teardown of every site's objects (15 s at 500 sites a worker), as multiprocessing's
    # own children end with os._exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker_main()

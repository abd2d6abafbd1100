"""The batched simulation engine (`simulation.engine=batched`): many virtual sites in one
process, their local training vectorised across sites.

What stays the same as on Flower's runtime (`simulation.engine=flower`):
- the coordinator: the very ServerApp, strategy stack and round loop (`Strategy.start`),
  driven through Flower's `Grid` interface: `BatchedGrid` is a Grid;
- every virtual site: the very ClientApp handlers (client/app.py), with their policy
  checks, released counts, calibration, budget checks, signed ledger entries written and
  fsynced before training (spend before release), kept releases and typed replies
  (protocol.py). Queries (HELLO, FEATURE_SUM, DONE, the secure-aggregation stages) are
  delivered to the ClientApp one by one, as a SuperNode would.

What changes is how messages travel and how TRAIN work is done:
- no Ray, no SuperLink, no serialisation: a message is handed to the site's handler in this
  process, and its reply is returned at once (no polling interval);
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

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedshield.client.app import Steps, TrainJob, TrainOutcome, shared_views
from fedshield.privacy.files import group_commit
from fedshield.task.cohort import CohortJob, module_refusal, plan_refusal, train_cohort

log = logging.getLogger("fedshield.simulation")

# Flower's simulation runtime names the partition a virtual SuperNode serves so; the sites'
# handlers read these keys (client/app.py resolve_site).
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
# Sites whose TRAIN steps are open at once: bounds the memory of a round (their encoded
# records and handlers' state) whatever federation.fraction_train asks of 10,000 sites.
SITES_PER_CHUNK = 1024

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
        """The replies to `messages`, in their order: queries one by one, TRAIN messages
        in chunks of SITES_PER_CHUNK sites whose trainings run together."""
        replies: dict[int, Message] = {}
        train = [k for k, m in enumerate(messages) if self._train_steps is not None and _is_train(m)]
        for k, msg in enumerate(messages):
            if not (self._train_steps is not None and _is_train(msg)):
                replies[k] = self._deliver(msg)
        for start in range(0, len(train), SITES_PER_CHUNK):
            chunk = train[start:start + SITES_PER_CHUNK]
            for k, reply in zip(chunk, self._train_chunk([messages[k] for k in chunk]), strict=True):
                replies[k] = reply
        return [replies[k] for k in range(len(messages))]

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
        except OSError as exc:  # the last barrier failed: the kept releases may not be on disk
            return [_error_reply(msg, exc) for msg in messages]

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
            except OSError as exc:  # spends not known to be on disk: nothing trains
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


class _WorkerProcess:
    """A worker process serving a fixed share of the virtual sites (`_serve`): a site's
    messages always go to the same worker, which keeps its Context and caches.

    Started as `python -m fedshield.simulations.batched` (not multiprocessing's spawn, which
    would run the caller's main script again in every worker; nor fork, unsafe once torch's
    threads run); it connects back over a local socket that only a holder of the key
    (sent on its stdin) can use."""

    def __init__(self, listener: Listener, authkey: bytes, node_ids: list[int], num_sites: int, run_id: int,
                 threads: int) -> None:
        # The worker imports what this process imports: its module search path, as it is now.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen([sys.executable, "-m", "fedshield.simulations.batched"],
                                        stdin=subprocess.PIPE, env=env)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"address": listener.address, "authkey": authkey.hex()}).encode())
        self.process.stdin.close()
        self._setup = (node_ids, num_sites, run_id, threads)
        self._conn: Connection | None = None
        self.alive = True

    def attach(self, conn: Connection) -> None:
        """Take this worker's connection and send it its share of the sites."""
        self._conn = conn
        conn.send(self._setup)

    def send(self, messages: Sequence[Message]) -> None:
        if self.alive and self._conn is not None:
            try:
                self._conn.send([message_to_proto(m).SerializeToString() for m in messages])
            except (OSError, EOFError):
                self.alive = False

    def receive(self, messages: Sequence[Message]) -> list[Message]:
        if self.alive and self._conn is not None:
            try:
                return [message_from_proto(ProtoMessage.FromString(b)) for b in self._conn.recv()]
            except (OSError, EOFError):
                self.alive = False
        why = RuntimeError(f"the worker process serving this virtual site ended (exit code {self.process.poll()})")
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
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._conn is not None:
            self._conn.close()


def _serve(conn: Connection) -> None:
    """A worker process: fedshield's own ClientApp for its share of the nodes, their TRAIN
    messages as steps, until the coordinator sends None."""
    from fedshield.client.app import app, train_steps_of

    node_ids, num_sites, run_id, threads = conn.recv()
    torch.set_num_threads(threads)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
    host = SiteHost(app, node_ids, num_sites, run_id, train_steps_of(app))
    with shared_views():
        while (batch := conn.recv()) is not None:
            messages = [message_from_proto(ProtoMessage.FromString(b)) for b in batch]
            conn.send([message_to_proto(r).SerializeToString() for r in host.answer(messages)])


class BatchedGrid(Grid):
    """The coordinator's Grid over virtual sites: in this process (`workers=1`), or spread
    over `workers` worker processes (node k to worker (k - 1) mod workers), each serving
    its sites with fedshield's own ClientApp; a push is answered by all workers at once."""

    simulated = True  # server/app.py: the simulation's nodes, fixed, and their books in the run folder

    def __init__(self, app: ClientApp, num_sites: int, *, run_id: int = 1,
                 train_steps: StepsFn | None = None, workers: int = 1, threads: int = 1) -> None:
        self._run = Run.create_empty(run_id)
        self._nodes = list(range(1, num_sites + 1))
        self._replies: dict[str, Message] = {}
        self._host: SiteHost | None = None
        self._workers: list[_WorkerProcess] = []
        if workers <= 1:
            self._host = SiteHost(app, self._nodes, num_sites, run_id, train_steps)
            return
        authkey = os.urandom(32)
        with tempfile.TemporaryDirectory(prefix="fedshield-workers-") as folder:
            with Listener(str(Path(folder) / "socket"), family="AF_UNIX", authkey=authkey) as listener:
                try:
                    for w in range(workers):
                        self._workers.append(_WorkerProcess(listener, authkey, self._nodes[w::workers], num_sites,
                                                            run_id, threads))
                    # Workers connect in any order: each says its pid, which names its process
                    # (the one `close` waits for, and whose exit a dead worker's replies report).
                    by_pid = {worker.process.pid: worker for worker in self._workers}
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
        batch = list(messages)
        for msg in batch:
            if not 1 <= msg.metadata.dst_node_id <= len(self._nodes):
                raise ValueError(f"no virtual site has node id {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids set it
        if self._host is not None:
            replies = self._host.answer(batch)
        else:
            shares = [[m for m in batch if (m.metadata.dst_node_id - 1) % len(self._workers) == w]
                      for w in range(len(self._workers))]
            for worker, share in zip(self._workers, shares, strict=True):
                if share:
                    worker.send(share)
            replies = [r for worker, share in zip(self._workers, shares, strict=True) if share
                       for r in worker.receive(share)]
        for reply in replies:
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in batch]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))


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
        for i in together:
            jobs[i].load()  # its start, by the module's own parameter names
            start = {n: p.detach().clone() for n, p in trainable}
            cohort.append(CohortJob(start, jobs[i].dataset, jobs[i].plan, jobs[i].seed))
        for i, done in zip(together, train_cohort(module, cohort, jobs[together[0]].device), strict=True):
            outcomes[i] = TrainOutcome(done.result, done.error, params=done.params if done.error is None else None)
    return [o if o is not None else TrainOutcome(None, RuntimeError("not trained")) for o in outcomes]


def _is_train(msg: Message) -> bool:
    """A TRAIN message ("train", or "train.<handler>"): Flower's category before the dot."""
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _error_reply(msg: Message, exc: BaseException) -> Message:
    log.error("virtual site (node %s): %s: %s", msg.metadata.dst_node_id, type(exc).__name__, exc,
              exc_info=exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                   reply_to=msg)


def worker_count(num_sites: int, num_cpus: int, client_cpus: float) -> int:
    """Worker processes for the batched engine: one per `client_cpus` of `num_cpus` (0: this
    machine's), at most one per site."""
    cpus = num_cpus or os.cpu_count() or 1
    return max(1, min(num_sites, int(cpus / client_cpus)))


def run_batched(server_app: ServerApp, client_app: ClientApp, num_sites: int, train_steps: StepsFn | None,
                workers: int = 1) -> None:
    """Run `server_app` against `num_sites` virtual sites (the batched engine): served by
    `workers` worker processes when `client_app` is fedshield's own (`train_steps` given),
    else by `client_app` in this process."""
    cpus = os.cpu_count() or 1
    workers = workers if train_steps is not None else 1
    grid = BatchedGrid(client_app, num_sites, train_steps=train_steps, workers=workers,
                       threads=max(1, cpus // workers))
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
    conn = Client(setup["address"], family="AF_UNIX", authkey=bytes.fromhex(setup["authkey"]))
    conn.send(os.getpid())
    try:
        _serve(conn)
    except EOFError:  # the coordinator is gone: nothing to answer
        pass
    finally:
        conn.close()
    # Done: every ledger and release was fsynced as it was written. Skip the interpreter's
    # teardown of every site's objects (15 s at 500 sites a worker), as multiprocessing's
    # own children end with os._exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker_main()

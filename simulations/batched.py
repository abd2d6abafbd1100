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

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedshield.client.app import Steps, TrainJob, TrainOutcome, shared_views

log = logging.getLogger("fedshield.simulation")

# Flower's simulation runtime names the partition a virtual SuperNode serves so; the sites'
# handlers read these keys (client/app.py resolve_site).
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
# Sites whose TRAIN steps are open at once: bounds the memory of a round (their encoded
# records and handlers' state) whatever federation.fraction_train asks of 10,000 sites.
SITES_PER_CHUNK = 1024

StepsFn = Callable[[Message, Context], Steps]


class BatchedGrid(Grid):
    """A Grid whose nodes are virtual sites served in this process.

    `app` answers every message, as a SuperNode's ClientApp would; with `train_steps`
    (client.app.train_steps, for fedshield's own ClientApp) TRAIN messages are run as steps
    and their training is batched (`train_jobs`). A handler that raises gives the Error
    reply a SuperNode's would (ErrorCode.CLIENT_APP_RAISED_EXCEPTION): the coordinator
    carries on without that site, as on Flower's runtime.
    """

    simulated = True  # server/app.py: the simulation's nodes, fixed, and their books in the run folder

    def __init__(self, app: ClientApp, num_sites: int, *, run_id: int = 1,
                 train_steps: StepsFn | None = None) -> None:
        self._app = app
        self._train_steps = train_steps
        self._run = Run.create_empty(run_id)
        # Node ids 1..N, partition ids 0..N-1 (the coordinator keys sites by name, never by id).
        self._contexts = {
            pid + 1: Context(run_id=run_id, node_id=pid + 1,
                             node_config={PARTITION_ID: pid, NUM_PARTITIONS: num_sites},
                             state=RecordDict(), run_config={})
            for pid in range(num_sites)
        }
        self._replies: dict[str, Message] = {}
        self.train_seconds = 0.0  # time in local training (train_jobs), for the run's summary

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
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver `messages` and keep their replies for `pull_messages`: all of them are
        answered before this returns (a virtual site never times out)."""
        batch = list(messages)
        ids = []
        for msg in batch:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no virtual site has node id {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids set it
            ids.append(msg.metadata.message_id)
        train = [m for m in batch if self._train_steps is not None and _is_train(m)]
        for msg in batch:
            if not (self._train_steps is not None and _is_train(msg)):
                self._keep(self._deliver(msg))
        for start in range(0, len(train), SITES_PER_CHUNK):
            for reply in self._train_chunk(train[start:start + SITES_PER_CHUNK]):
                self._keep(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- delivery ---------------------------------------------------------------------

    def _keep(self, reply: Message) -> None:
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self._replies[reply.metadata.reply_to_message_id] = reply

    def _context(self, msg: Message) -> Context:
        return self._contexts[msg.metadata.dst_node_id]

    def _deliver(self, msg: Message) -> Message:
        try:
            return self._app(msg, self._context(msg))
        except Exception as exc:  # what Flower's runtime makes of a ClientApp that raised
            return _error_reply(msg, exc)

    def _train_chunk(self, messages: Sequence[Message]) -> list[Message]:
        """Every site's TRAIN steps up to its training, the training of all, then each
        site's finish: replies in the order of `messages`."""
        assert self._train_steps is not None
        replies: dict[int, Message] = {}
        open_steps: list[tuple[int, Steps, TrainJob]] = []
        for k, msg in enumerate(messages):
            steps = self._train_steps(msg, self._context(msg))
            try:
                open_steps.append((k, steps, next(steps)))
            except StopIteration as stop:  # declined, or a kept release sent again
                replies[k] = stop.value
            except Exception as exc:
                replies[k] = _error_reply(msg, exc)
        t0 = time.perf_counter()
        outcomes = train_jobs([job for _, _, job in open_steps])
        self.train_seconds += time.perf_counter() - t0
        for (k, steps, _), outcome in zip(open_steps, outcomes, strict=True):
            try:
                steps.send(outcome)
                replies[k] = _error_reply(messages[k], RuntimeError("a site asked for a second training in one round"))
            except StopIteration as stop:
                replies[k] = stop.value
            except Exception as exc:
                replies[k] = _error_reply(messages[k], exc)
        return [replies[k] for k in range(len(messages))]


def train_jobs(jobs: Sequence[TrainJob]) -> list[TrainOutcome]:
    """Train every job: one by one, each as `TrainJob.run` does."""
    return [job.run() for job in jobs]


def _is_train(msg: Message) -> bool:
    kind = msg.metadata.message_type
    return kind == "train" or kind.startswith("train.")


def _error_reply(msg: Message, exc: BaseException) -> Message:
    log.error("virtual site (node %s): %s: %s", msg.metadata.dst_node_id, type(exc).__name__, exc,
              exc_info=exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                   reply_to=msg)


def run_batched(server_app: ServerApp, client_app: ClientApp, num_sites: int,
                train_steps: StepsFn | None) -> BatchedGrid:
    """Run `server_app` against `num_sites` virtual sites served by `client_app` in this
    process (the batched engine); returns the grid (its timings)."""
    grid = BatchedGrid(client_app, num_sites, train_steps=train_steps)
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
    return grid

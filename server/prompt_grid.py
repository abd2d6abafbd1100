"""Flower's deployment Grid, polled promptly.

Flower's `HttpGrid.send_and_receive` (flwr 1.41) pushes a round's messages, then pulls the
replies every 3 s: the last reply of every phase waits 1.5 s on average, up to 3 s, before
the coordinator sees it. A round of a deployed federation has up to six such phases (the
training, SecAgg+'s four key stages, the end of the run), and a small federation's phase
takes seconds, so most of a short round was spent waiting on that sleep.

`PromptGrid` wraps the Grid `flwr run` hands the ServerApp and does the same as Flower's
`send_and_receive` with Flower's own `push_messages` and `pull_messages`, only pulling
sooner: after 0.05 s, then twice as long each time, at most every 0.5 s (a pull with
nothing to return is one local request to the SuperLink's ServerAppIo API). Everything
else is the wrapped grid's. The simulation's grids (Flower's InMemoryGrid, the batched
engine's) are left as they are: they do not sleep like this.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

FIRST_PULL_S = 0.05
LONGEST_PAUSE_S = 0.5


class PromptGrid(Grid):
    """A Grid that delegates to `inner` and polls for replies at most every 0.5 s."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:  # with their public keys (server/app.py connection_keys)
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: push, then pull until every message has its reply or
        `timeout` seconds have passed (None: no limit); the replies that came."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = FIRST_PULL_S
        while end is None or time.monotonic() < end:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
            pause = min(2 * pause, LONGEST_PAUSE_S)
        return replies


def prompt(grid: Grid) -> Grid:
    """`grid` wrapped in a PromptGrid if it is Flower's deployment grid; otherwise itself."""
    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid

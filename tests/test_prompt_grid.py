"""server/prompt_grid.py: Flower's send_and_receive contract, polled sooner than every 3 s."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from flwr.superlink.grid.http_grid import HttpGrid

from fedshield.server import prompt_grid
from fedshield.server.prompt_grid import PromptGrid, prompt


class ScriptedGrid(Grid):
    """A grid whose pulls return the replies of `script` in turn (one list per pull)."""

    def __init__(self, script: list[list[str]]) -> None:
        self.script = list(script)
        self.pulls: list[set[str]] = []
        self.pushed: list[Any] = []

    def set_run(self, run: Any) -> None:
        self.ran = run

    @property
    def run(self) -> Any:
        return "the run"

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return SimpleNamespace(args=(content, message_type, dst_node_id, group_id, ttl))

    def get_node_ids(self) -> Iterable[int]:
        return [3, 4]

    def get_nodes(self) -> Iterable[Any]:
        return ["node 3", "node 4"]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls.append(set(message_ids))
        due = self.script.pop(0) if self.script else []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in due]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not call the inner grid's send_and_receive (it sleeps 3 s)")


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    """The pauses PromptGrid takes, recorded instead of slept; the clock moves by each."""
    taken: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(prompt_grid.time, "sleep", lambda s: (taken.append(s), clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: clock[0])
    return taken


def test_every_reply_is_collected_with_pauses_from_50_ms_doubling_to_half_a_second(pauses):
    inner = ScriptedGrid([[], ["m1"], [], [], [], [], ["m0", "m2"]])
    replies = PromptGrid(inner).send_and_receive(["a", "b", "c"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pushed == ["a", "b", "c"]
    assert inner.pulls[0] == {"m0", "m1", "m2"} and inner.pulls[2] == {"m0", "m2"}  # only what is still owed
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]  # no pause after the last reply


def test_a_timeout_ends_the_wait_with_the_replies_that_came(pauses):
    inner = ScriptedGrid([["m0"]])  # m1 never answers
    replies = PromptGrid(inner).send_and_receive(["a", "b"], timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert sum(pauses) == pytest.approx(2.0)  # the last pause is cut to the deadline
    assert max(pauses) <= prompt_grid.LONGEST_PAUSE_S


def test_without_a_timeout_it_waits_until_every_reply_came(pauses):
    inner = ScriptedGrid([[]] * 30 + [["m0"]])
    replies = PromptGrid(inner).send_and_receive(["a"], timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert len(inner.pulls) == 31


def test_everything_else_is_the_inner_grids():
    inner = ScriptedGrid([])
    grid = PromptGrid(inner)
    grid.set_run("run 7")
    assert inner.ran == "run 7" and grid.run == "the run"
    assert list(grid.get_node_ids()) == [3, 4] and list(grid.get_nodes()) == ["node 3", "node 4"]
    assert grid.create_message("c", "train", 3, "g", 5.0).args == ("c", "train", 3, "g", 5.0)


def test_only_flowers_deployment_grid_is_wrapped():
    http = HttpGrid("127.0.0.1:1", insecure=True, token="t")  # connects on first use only
    wrapped = prompt(http)
    assert isinstance(wrapped, PromptGrid) and wrapped.inner is http
    simulated = InMemoryGrid.__new__(InMemoryGrid)  # the simulation runtime's: no sleep of 3 s
    assert prompt(simulated) is simulated

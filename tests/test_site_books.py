"""No free bits, rollback-proof books (issue 20, items 3 and 4), through the real ClientApp
with a deployed node config (tests/test_site_policy.py's helpers).

- A plan whose classes omit a label gets the same answer whether or not the site holds a
  record with that label; a plan with a dummy class does not make it release its count again.
- A site whose books were put back to an older, consistent state (ledger + head record)
  refuses, against the head the coordinator holds and against its own witness file.
- An interrupted spend (`ledger.jsonl.pending`) is counted by `fedshield audit --site`;
  a forged one is refused before anything is appended.
"""

from __future__ import annotations

import json
import shutil

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedshield import conf, protocol
from fedshield.client.site import SiteState
from fedshield.privacy.accountant import Spend
from tests.helpers import synthetic_rows, write_csv
from tests.test_site import _spend_rounds
from tests.test_site_policy import ask_to_train, coordinator_plan, deployed, spent
from tests.test_torn_write import crashed_site, spend

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def ask_hello(plan, context) -> protocol.SiteHello | protocol.Decline:
    import fedshield.client.app as site

    got = protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context))
    assert isinstance(got, (protocol.SiteHello, protocol.Decline)), got
    return got


def site_file(tmp_path, name: str, extra: list[tuple[str, str]]):
    return write_csv(tmp_path / name, synthetic_rows(120, seed=3) + extra)


# ------------------------------------------------------------ item 3: no free bits


@pytest.mark.parametrize("declared", [None, "markets,rare,weather"])
def test_a_plan_that_omits_a_label_gets_the_same_answer_whether_or_not_the_site_holds_it(
        tiny_bert, tmp_path, declared):
    """The coordinator's classes are markets, weather; one site holds a 'rare' record, the
    other not. Before: the first declined (DataError, kind error), the second joined: a
    noise-free membership bit. Now both join (undeclared: rows of other labels are left
    out) or both decline (a site that declared its classes takes exactly those)."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    plan, _ = coordinator_plan(tiny_bert, coordinator, tmp_path)
    assert list(plan[protocol.CLASS_NAMES]) == ["markets", "weather"]
    policy = {} if declared is None else {"labels": declared}
    answers = []
    for holds in (True, False):
        data = site_file(tmp_path, f"site-{holds}.csv", [("a one-off case", "rare")] if holds else [])
        where = tmp_path / f"holds-{holds}"
        got = ask_hello(plan, deployed(where, data, **policy))
        answers.append((type(got).__name__, getattr(got, "kind", None), getattr(got, "reason", None)))
    assert answers[0] == answers[1], answers
    if declared is None:
        assert answers[0][0] == "SiteHello"
    else:
        assert answers[0][:2] == ("Decline", "policy") and "declared" in answers[0][2]


def test_a_plan_with_a_dummy_class_does_not_release_the_count_again(tiny_bert, tmp_path):
    """The count is released once per data file: the plan's class list is not in its digest."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    data = site_file(tmp_path, "site.csv", [])
    context = deployed(tmp_path, data)
    plan, _ = coordinator_plan(tiny_bert, coordinator, tmp_path)
    first = ask_hello(plan, context)
    dummy = ConfigRecord(dict(plan))
    dummy[protocol.CLASS_NAMES] = ["aaa-dummy", "markets", "weather"]
    dummy[protocol.RUN_ID] = "run-2"
    again = ask_hello(dummy, context)
    assert isinstance(first, protocol.SiteHello) and isinstance(again, protocol.SiteHello)
    counts = [e for e in spent(tmp_path) if e.get("release") == "record-count"]
    assert len(counts) == 1 and again.num_examples == first.num_examples  # reused: post-processing
    # The entry goes with every hello as the signed proof of the release (not a new spend).
    assert again.ledger_entries == first.ledger_entries == (counts[0],)


# ------------------------------------------------------------ item 4: rollback-proof books


def backup(state, to):
    for name in ("ledger.jsonl", "ledger.jsonl.head"):
        shutil.copy2(state / name, to / name)


def restore(frm, state):
    for name in ("ledger.jsonl", "ledger.jsonl.head"):
        shutil.copy2(frm / name, state / name)


def test_books_put_back_behind_the_coordinators_head_are_refused(tiny_bert, tmp_path):
    """An older, consistent ledger with its head record verifies on its own; the plan's
    books head (what the coordinator holds) shows it is behind: declined, nothing spent."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    data = site_file(tmp_path, "site.csv", [])
    context = deployed(tmp_path, data)
    plan, weights = coordinator_plan(tiny_bert, coordinator, tmp_path)
    assert isinstance(ask_hello(plan, context), protocol.SiteHello)  # the count: seq 0
    state_dir = tmp_path / "state"
    (tmp_path / "backup").mkdir()
    backup(state_dir, tmp_path / "backup")
    _spend_rounds(SiteState(state_dir, "st-marys"), Spend(1.1, 0.25, 4), range(1, 3))  # seq 1, 2
    newest = spent(tmp_path)[-1]
    head = protocol.BooksHead(newest["seq"], newest["hash"])
    with_head = protocol.with_books_head(plan, head)
    assert isinstance(ask_hello(with_head, context), protocol.SiteHello)  # books that hold it: fine

    restore(tmp_path / "backup", state_dir)  # the site's books, as they were after seq 0
    rolled_back = (state_dir / "ledger.jsonl").read_bytes()
    import fedshield.client.app as site

    msg = Message(content=RecordDict({protocol.PLAN: with_head,
                                               protocol.ARRAYS: protocol.to_array_record(weights)}),
                  message_type=protocol.TRAIN, dst_node_id=1)
    got = protocol.read_train_reply(site.train(msg, context), {k: (v.shape, v.dtype) for k, v in weights.items()})
    assert isinstance(got, protocol.Decline) and got.kind == "books", got
    assert "the coordinator holds this site's entry seq 2" in got.reason and "\n" not in got.reason
    assert (state_dir / "ledger.jsonl").read_bytes() == rolled_back  # nothing trained, nothing spent
    forked = protocol.with_books_head(plan, protocol.BooksHead(0, "0" * 64))  # not the entry it holds
    got = ask_hello(forked, context)
    assert isinstance(got, protocol.Decline) and got.kind == "books" and "not the one" in got.reason


def test_books_put_back_to_before_the_count_are_refused_at_hello_before_a_second_count(tiny_bert, tmp_path):
    """The gap a HELLO without a head left: books put back to before the count's release
    (a state folder restored from before the first run) would release a second noisy count at
    that HELLO. In deployment the HELLO carries the head of the site its connection key is
    enrolled as (server/app.py discover_sites): declined, kind books, and nothing released."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    data = site_file(tmp_path, "site.csv", [])
    context = deployed(tmp_path, data)
    plan, _ = coordinator_plan(tiny_bert, coordinator, tmp_path)
    state_dir = tmp_path / "state"
    assert isinstance(ask_hello(plan, context), protocol.SiteHello)
    [count] = spent(tmp_path)
    for name in ("ledger.jsonl", "ledger.jsonl.head"):  # the state folder as it was before any run
        (state_dir / name).unlink()
    got = ask_hello(protocol.with_books_head(plan, protocol.BooksHead(count["seq"], count["hash"])), context)
    assert isinstance(got, protocol.Decline) and got.kind == "books", got
    assert spent(tmp_path) == []  # no second count: the rolled-back books released nothing


def test_books_put_back_behind_the_sites_own_witness_are_refused(tiny_bert, tmp_path):
    """`ledger-witness` (fedshield client --ledger-witness): the site appends the head of its
    books there after every entry; books behind it are refused at the next message, HELLO too."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    data = site_file(tmp_path, "site.csv", [])
    witness = tmp_path / "other-volume" / "st-marys.witness"
    witness.parent.mkdir()
    context = deployed(tmp_path, data, **{"ledger-witness": str(witness)})
    plan, _ = coordinator_plan(tiny_bert, coordinator, tmp_path)
    assert isinstance(ask_hello(plan, context), protocol.SiteHello)
    state_dir = tmp_path / "state"
    (tmp_path / "backup").mkdir()
    backup(state_dir, tmp_path / "backup")
    _spend_rounds(SiteState(state_dir, "st-marys", witness=witness), Spend(1.1, 0.25, 4), range(1, 2))
    marks = [json.loads(x) for x in witness.read_text().splitlines()]
    assert [m["seq"] for m in marks] == [0, 1] and marks[-1]["hash"] == spent(tmp_path)[-1]["hash"]
    assert isinstance(ask_hello(plan, context), protocol.SiteHello)

    restore(tmp_path / "backup", state_dir)
    got = ask_hello(plan, context)
    assert isinstance(got, protocol.Decline) and got.kind == "books", got
    assert "its witness" in got.reason and "entry seq 1" in got.reason
    from fedshield.client.site import BooksBehind

    with pytest.raises(BooksBehind, match="rolled back"):  # the site's agent, on its next start
        SiteState(state_dir, "st-marys", witness=witness)


def test_a_books_head_in_a_plan_is_bounded():
    def plan_with(**head):
        record = ConfigRecord({protocol.CONFIG_YAML: "x", protocol.RUN_ID: "r", protocol.RUN_DIR: "",
                               protocol.FROZEN_FINGERPRINT: "f", protocol.CLASS_NAMES: ["a"], **head})
        return Message(content=RecordDict({protocol.PLAN: record}), message_type=protocol.HELLO, dst_node_id=1)

    good = {protocol.BOOKS_SEQ: 3, protocol.BOOKS_HASH: "ab" * 32}
    assert protocol.read_plan(plan_with(**good)).books_head == protocol.BooksHead(3, "ab" * 32)
    assert protocol.read_plan(plan_with()).books_head is None
    for bad in ({protocol.BOOKS_SEQ: -1, protocol.BOOKS_HASH: "ab" * 32},
                {protocol.BOOKS_SEQ: protocol.MAX_SEQ, protocol.BOOKS_HASH: "ab" * 32},
                {protocol.BOOKS_SEQ: 3, protocol.BOOKS_HASH: "AB" * 32},
                {protocol.BOOKS_SEQ: 3, protocol.BOOKS_HASH: "ab" * 31},
                {protocol.BOOKS_SEQ: 3}):
        with pytest.raises(protocol.ProtocolError, match="books-"):
            protocol.read_plan(plan_with(**bad))
    with pytest.raises(ValueError):
        protocol.with_books_head(ConfigRecord({}), protocol.BooksHead(-1, "ab" * 32))


def test_the_coordinator_sends_each_site_the_head_of_its_books_it_holds(tmp_path):
    """server/site_heads.py: verified entries advance a site's head (never back), across runs;
    a site that comes back with another ledger key gets none."""
    from fedshield.server.site_heads import SiteHeads

    state = SiteState(tmp_path / "state", "a")
    entries = [state.record_spend(spend(r)) for r in (1, 2, 3)]
    fp = entries[0]["key_fingerprint"]
    heads = SiteHeads(tmp_path / "site-heads.json")
    assert heads.get("a", fp) is None
    heads.advance("a", entries[:2])
    heads.advance("a", entries[:1])  # an older entry again: the head stays
    again = SiteHeads(tmp_path / "site-heads.json")  # the next run of this coordinator
    assert again.get("a", fp) == protocol.BooksHead(1, entries[1]["hash"])
    assert again.get("a", "SHA256:" + "0" * 64) is None
    state.check_head(1, entries[1]["hash"], "the coordinator")  # the site's books hold it


def test_a_rounds_heads_are_written_once_and_each_moves_as_it_would_alone(tmp_path, monkeypatch):
    """advance_all (a round's replies): one write of the file for every site, each head where
    advancing it alone would put it (the newest entry, never back)."""
    from fedshield.server.site_heads import SiteHeads

    books = {name: [SiteState(tmp_path / name, name).record_spend({**spend(r), "site": name}) for r in (1, 2)]
             for name in ("a", "b", "c")}
    one_by_one = SiteHeads(tmp_path / "one.json")
    for name, entries in books.items():
        one_by_one.advance(name, entries)
    together = SiteHeads(tmp_path / "all.json")
    writes = []
    monkeypatch.setattr(together, "_write", lambda: writes.append(dict(together.heads)))
    together.advance_all([("a", books["a"]), ("b", books["b"][:1]), ("c", books["c"]), ("b", books["b"]),
                          ("a", books["a"][:1])])
    assert len(writes) == 1 and together.heads == one_by_one.heads
    together.advance_all([("a", books["a"][:1])])  # nothing new: nothing written
    assert len(writes) == 1


# ------------------------------------------------------------ pending lines
# ------------------------------------------------------------ pending lines


def test_audit_site_counts_an_interrupted_spend_as_the_site_does(tmp_path, monkeypatch, capsys):
    from fedshield.privacy.audit import audit
    from fedshield.privacy.cli import audit_main

    crashed_site(tmp_path, monkeypatch, 0, spend(2, sigma=1.5))  # signed, pending, not in ledger.jsonl
    state = tmp_path / "state"
    assert len((state / "ledger.jsonl").read_text().splitlines()) == 1
    result = audit(state)
    assert result.ok and result.sites["a"].entries == 2 and result.sites["a"].steps == 8
    assert any("interrupted spend" in n for n in result.notes)
    assert audit_main(["--site", str(state), "--out", str(tmp_path / "audit")]) == 0
    assert len((state / "ledger.jsonl").read_text().splitlines()) == 1  # an audit only reads


def test_a_forged_pending_line_is_refused_and_never_appended(tmp_path, monkeypatch):
    import base64

    from fedshield.privacy import signing
    from fedshield.privacy.cli import audit_main
    from fedshield.privacy.errors import LedgerError
    from fedshield.privacy.ledger import entry_hash

    state = crashed_site(tmp_path, monkeypatch, 0, spend(2))
    pending = json.loads(state.ledger.pending_path.read_text())
    pending["noise_multiplier"] = 9.0  # "more noise than I used": re-hashed, signed with another key
    signing.generate_site_key(tmp_path / "other.key")
    other = signing.load_private_key(tmp_path / "other.key")
    pending["hash"] = entry_hash(pending)
    pending["signature"] = base64.b64encode(signing.sign(other, pending["hash"].encode())).decode()
    state.ledger.pending_path.write_text(json.dumps(pending) + "\n")
    ledger = tmp_path / "state" / "ledger.jsonl"
    before = ledger.read_bytes()
    with pytest.raises(LedgerError) as refused:
        SiteState(tmp_path / "state", "a")
    assert ledger.read_bytes() == before  # refused before anything was appended
    assert "ledger.jsonl.pending (an interrupted spend) does not verify" in str(refused.value)
    assert audit_main(["--site", str(tmp_path / "state"), "--out", str(tmp_path / "audit")]) == 1


# ------------------------------------------------------------ labels (item 8)


def test_an_entrys_time_is_the_hour_of_the_spend(tmp_path):
    """What leaves the site carries no timing: the entry's signed `time` is to the hour."""
    import re

    entry = SiteState(tmp_path / "state", "a").record_spend(spend(1))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00Z", entry["time"]), entry["time"]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_empirical_audit_names_the_runs_own_accountant(tmp_path, accountant):
    from fedshield.privacy.canary import CanaryResult
    from fedshield.simulations.empirical import report

    result = CanaryResult(epsilon_lb=0.5, guesses=10, correct=8, k_plus=5, k_minus=5, m=100, delta=1e-5)
    record, text, leak = report(result, "site-0", 4.0, True, tmp_path, accountant=accountant,
                                neighbouring="add-remove")
    assert record["accountant"] == accountant and not leak
    assert f"({accountant.upper()} accountant, add-remove)" in text


def test_each_sites_training_plan_carries_the_head_of_its_own_books():
    """strategies/reply_gate.py: Flower's strategy gives every TRAIN message one shared
    plan; each site's copy gets its own books head (none for a site the coordinator holds none of)."""
    import numpy as np

    from fedshield.strategies.flower import flower_strategy
    from fedshield.strategies.stack import build_stack
    from tests.test_site_aware import EXPECTED, SITES, FakeGrid, Heads, trains

    heads = {"alpha": protocol.BooksHead(4, "a" * 64), "bravo": protocol.BooksHead(9, "b" * 64)}
    strategy = build_stack(flower_strategy("fedavg"), SITES, fraction_train=1.0, seed=1,
                           expected_arrays=EXPECTED, heads=Heads(heads))
    grid = FakeGrid({s: trains(1.0) for s in SITES.values()})
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    messages = strategy.configure_train(1, protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                                        ConfigRecord(dict(plan)), grid)
    got = {SITES[m.metadata.dst_node_id]: protocol.read_plan(m).books_head for m in messages}
    assert got == {"alpha": heads["alpha"], "bravo": heads["bravo"], "charlie": None, "delta": None}


def test_a_site_whose_books_are_behind_is_not_asked_again():
    from tests.test_site_aware import declines, run, trains

    behaviours = {"alpha": declines("books"), "bravo": trains(2.0), "charlie": trains(2.0), "delta": trains(2.0)}
    strategy, grid, _, _ = run(behaviours, rounds=3)
    assert [r for r, s in grid.sent if s == "alpha"] == [1]
    assert strategy.excluded == {"alpha": "books says no"}


def test_a_witness_line_torn_by_a_crash_does_not_swallow_the_next(tmp_path):
    from fedshield.client.site import BooksBehind

    witness = tmp_path / "st-marys.witness"
    state = SiteState(tmp_path / "state", "a", witness=witness)
    state.record_spend(spend(1))
    with open(witness, "a") as f:
        f.write('{"hash": "ab')  # the process died mid-line
    state.record_spend(spend(2))
    newest = SiteState(tmp_path / "state", "a", witness=witness).entries()[-1]
    assert json.loads(witness.read_text().splitlines()[-1])["seq"] == newest["seq"] == 1
    state.check_head(1, newest["hash"], "its witness")
    with pytest.raises(BooksBehind, match="holds this site's entry seq 2"):
        state.check_head(2, newest["hash"], "its witness")


def test_a_plan_cannot_choose_which_column_of_the_sites_file_is_read(tiny_bert, tmp_path):
    """The plan's task.label_column pointed at another column of the site's file (one with an
    empty cell at one site only): before, that site failed the read (a free bit about a
    record); now both read their own columns (`fedshield client --label-column`) alike."""
    import csv

    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    plan, _ = coordinator_plan(tiny_bert, coordinator, tmp_path)
    hostile = conf.from_yaml(plan[protocol.CONFIG_YAML])
    hostile.task.label_column = "note"
    plan[protocol.CONFIG_YAML] = conf.to_yaml(hostile)
    answers = []
    for empty_note in (True, False):
        path = tmp_path / f"site-{empty_note}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "note"])
            for i, (text, label) in enumerate(synthetic_rows(120, seed=3)):
                w.writerow([text, label, "" if empty_note and i == 7 else label])
        got = ask_hello(plan, deployed(tmp_path / f"empty-{empty_note}", path))
        answers.append((type(got).__name__, getattr(got, "kind", None)))
    assert answers == [("SiteHello", None), ("SiteHello", None)]


def test_a_site_none_of_whose_labels_the_plan_names_trains_as_any_other(tiny_bert, tmp_path):
    """An undeclared site whose rows all have labels outside the plan's classes trains on the
    public row alone (empty Poisson batches: noise-only steps) and replies with weights, as a
    site holding the plan's labels does: no decline tells the two apart."""
    coordinator = write_csv(tmp_path / "coordinator.csv", synthetic_rows(120, seed=1))
    plan, weights = coordinator_plan(tiny_bert, coordinator, tmp_path)
    answers = []
    for name, rows in (("theirs", synthetic_rows(60, seed=3)), ("other", [(f"case {i}", "rare") for i in range(60)])):
        data = write_csv(tmp_path / f"{name}.csv", rows)
        reply = ask_to_train(plan, weights, deployed(tmp_path / name, data))
        answers.append(type(reply).__name__)
    assert answers == ["TrainReply", "TrainReply"], answers

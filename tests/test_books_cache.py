"""What a site and the coordinator remember of books they checked, and why it hides nothing.

A virtual site re-reads and re-checks its own books before every decision, and the
coordinator checks every reply's entries as the continuation of the site's chain. Both now
check only what is new (privacy/ledger.py `Ledger`, `verify_ledger(start=...)`;
privacy/ledger_check.py `LedgerCheck._accepted`): each test here changes the books behind
their back (an edit, a rollback, a replaced file) and the change is still found, with the
same message a check of the whole gives.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedshield.client.site import BooksBehind, SiteState
from fedshield.privacy import signing
from fedshield.privacy.errors import LedgerError
from fedshield.privacy.files import group_commit
from fedshield.privacy.ledger import Ledger, entry_hash, verify_ledger
from fedshield.privacy.ledger_check import LedgerCheck
from tests.test_torn_write import spend


def _books(tmp_path, rounds: int = 3) -> SiteState:
    state = SiteState(tmp_path / "state", "a")
    for r in range(1, rounds + 1):
        state.record_spend(spend(r))
    return state


def _lines(state: SiteState) -> list[dict]:
    return [json.loads(x) for x in state.ledger.path.read_text().splitlines()]


def _write(state: SiteState, entries: list[dict]) -> None:
    state.ledger.path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
                                         for e in entries))


def _refused_after(state: SiteState, change: str, edited: int) -> None:
    """Edit entry `edited` of the books, or drop their last entry: the next refresh refuses them."""
    entries = _lines(state)
    if change == "edit a verified entry":
        entries[edited]["steps"] = 1
        _write(state, entries)
        with pytest.raises(LedgerError, match="hash does not match"):
            state.refresh()
    else:
        _write(state, entries[:-1])
        with pytest.raises(LedgerError, match="cut off"):
            state.refresh()


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_checking_from_a_chain_state_finds_what_a_whole_check_finds(tmp_path, cut):
    """verify_ledger(suffix, start=state after the prefix) == verify_ledger(whole), problems
    and indices included, for an honest suffix and for each kind of tampering in it."""
    state = _books(tmp_path, rounds=4)
    key = {"a": state.key.public_key()}
    entries = _lines(state)
    start = verify_ledger(entries[:cut], key).state
    assert verify_ledger(entries[cut:], key, start).ok
    assert verify_ledger(entries[cut:], key, start).state.entries == len(entries)
    edited = [dict(e) for e in entries]
    edited[cut]["steps"] = 1  # an edit: the hash no longer covers it
    dropped = entries[:cut] + entries[cut + 1:] if cut < len(entries) - 1 else None  # a removal: the link breaks
    swapped = entries[:cut] + [entries[-1]] + entries[cut:-1] if cut < len(entries) - 1 else None
    for books in (edited, dropped, swapped):
        if books is None:
            continue
        whole = verify_ledger(books, key)
        part = verify_ledger(books[cut:], key, verify_ledger(books[:cut], key).state)
        assert not whole.ok and not part.ok
        assert part.problems == whole.problems


def test_a_site_reads_only_the_lines_past_what_it_has_read(tmp_path, monkeypatch):
    state = _books(tmp_path)
    parsed: list[bytes] = []
    from fedshield.privacy import ledger as ledger_module

    real = ledger_module.parse_ledger_bytes
    monkeypatch.setattr(ledger_module, "parse_ledger_bytes", lambda data, name: parsed.append(data) or real(data, name))
    state.refresh()
    state.record_spend(spend(4))
    state.refresh()
    assert all(b.count(b"\n") <= 1 for b in parsed)  # never the whole file again
    assert [e["round"] for e in state.entries()] == [1, 2, 3, 4]


@pytest.mark.parametrize("change", ["edit a verified entry", "drop the last entry", "put back an older copy",
                                    "replace the whole file"])
def test_books_changed_behind_a_sites_back_are_checked_whole_again(tmp_path, change):
    """The read cache keys on a sha256 of the bytes it read: an edit anywhere in them,
    a rollback or a new file is read whole and verified whole."""
    state = _books(tmp_path)
    state.refresh()  # verified, remembered
    if change in ("edit a verified entry", "drop the last entry"):
        _refused_after(state, change, edited=0)
    elif change == "put back an older copy":
        older = state.ledger.path.read_bytes()
        head = state.ledger.head_path.read_bytes()
        state.record_spend(spend(4))
        state.ledger.path.write_bytes(older)
        state.ledger.head_path.write_bytes(head)  # an older state, whole: it verifies
        state.refresh()
        assert [e["round"] for e in state.entries()] == [1, 2, 3]  # read as it is now, not as remembered
        with pytest.raises(BooksBehind):  # and the coordinator's head finds it behind
            state.check_head(3, _lines(state)[-1]["hash"], "the coordinator")
    else:
        other = SiteState(tmp_path / "other", "a")
        other.record_spend(spend(1))
        state.ledger.path.write_bytes(other.ledger.path.read_bytes())
        with pytest.raises(LedgerError, match="signed with key"):
            state.refresh()


@pytest.mark.parametrize("change", [None, "edit a verified entry", "drop the last entry", "torn last line",
                                    "an interrupted spend"])
def test_books_read_ahead_between_rounds_decide_nothing_and_a_change_since_is_still_found(tmp_path, change,
                                                                                          monkeypatch):
    """A worker reads and checks its sites' books while it waits (`prepare_next_read`): the
    next refresh parses and verifies nothing it found then, and decides exactly as without
    it; the books changed after the read ahead are read and checked whole at the refresh;
    nothing is recovered or written by the read ahead."""
    from fedshield.privacy import ledger as ledger_module

    state = _books(tmp_path)
    state.record_spend(spend(4))  # appended this round: its line not yet read back
    before = state.ledger.path.read_bytes()
    state.prepare_next_read()
    assert state.ledger.path.read_bytes() == before
    if change is None:
        parsed: list[bytes] = []
        verified: list[int] = []
        real_parse, real_verify = ledger_module.parse_ledger_bytes, ledger_module.verify_ledger
        monkeypatch.setattr(ledger_module, "parse_ledger_bytes",
                            lambda data, name: parsed.append(data) or real_parse(data, name))
        monkeypatch.setattr(ledger_module, "verify_ledger",
                            lambda entries, keys, start=None: verified.append(len(entries)) or real_verify(
                                entries, keys, start))
        state.refresh()
        assert parsed == [b""] and verified == [0]  # nothing new since the read ahead
        assert [e["round"] for e in state.entries()] == [1, 2, 3, 4]
        return
    if change in ("edit a verified entry", "drop the last entry"):
        _refused_after(state, change, edited=1)
    elif change == "torn last line":
        state.ledger.path.write_bytes(before[:-20])
        state.prepare_next_read()  # a torn line is refresh's to set aside
        assert state.ledger.path.read_bytes() == before[:-20]
        with pytest.raises(LedgerError, match="cut off"):  # recovered, then found short of its head
            state.refresh()
    else:
        pending = state.ledger.path.with_name("ledger.jsonl.pending")
        extra = SiteState(tmp_path / "state", "a")
        line = extra.ledger.path.read_bytes().splitlines(keepends=True)[-1]
        state.ledger.path.write_bytes(before[: -len(line)])
        pending.write_bytes(line)
        state.prepare_next_read()
        assert pending.exists() and state.ledger.path.read_bytes() == before[: -len(line)]
        state.refresh()  # the interrupted spend is booked, by the refresh
        assert not pending.exists() and [e["round"] for e in state.entries()] == [1, 2, 3, 4]


def test_an_entry_appended_behind_a_sites_back_is_verified(tmp_path):
    """A line added by someone else past the verified prefix is parsed and verified (it is
    not signed by the site's key: refused), never taken as verified because the prefix is."""
    state = _books(tmp_path)
    state.refresh()
    last = _lines(state)[-1]
    forged = dict(last, seq=3, round=4, run_seq=3, prev_hash=last["hash"])  # a spend the site never signed
    forged["hash"] = entry_hash(forged)
    with state.ledger.path.open("a") as f:
        f.write(json.dumps(forged, sort_keys=True) + "\n")
    with pytest.raises(LedgerError, match="signature does not verify"):
        state.refresh()


def test_own_signatures_are_known_and_a_forged_one_is_not(tmp_path):
    key = SiteState(tmp_path / "s", "a").key
    fp = signing.fingerprint(key)
    sig = signing.sign_known(key, fp, b"data")
    assert signing.verify(key.public_key(), sig, b"data")  # a real signature, not only remembered
    assert signing.verify_known(key.public_key(), fp, sig, b"data")
    assert not signing.verify_known(key.public_key(), fp, sig, b"other data")


def test_the_coordinator_checks_only_new_entries_and_a_restored_chain_again(tmp_path):
    state = _books(tmp_path, rounds=3)
    entries = _lines(state)
    check = LedgerCheck("r", {"a": state.key.public_key()}, dp=True, delta=1e-5, accountant="rdp")
    seen: list[int] = []
    from fedshield.privacy import ledger_check as module

    real = module.verify_ledger

    def counting(batch, keys, start=None):
        seen.append(len(batch))
        return real(batch, keys, start)

    module.verify_ledger = counting
    try:
        for r, e in enumerate(entries, start=1):
            assert check.check("a", r, [e], None).problem is None
        assert seen == [0, 1, 1, 1]  # nothing accepted yet; then each reply: its own entry, continuing the chain
        check.accepted["a"] = [dict(e) for e in entries]  # a resume: the run's ledger read back
        forged = dict(entries[-1], seq=3, round=4, run_seq=3, prev_hash=entries[-1]["hash"])
        forged["hash"] = entry_hash(forged)
        verdict = check.check("a", 4, [forged], None)
        assert verdict.problem is not None and "signature" in verdict.problem
        assert seen[4:] == [3, 1]  # the restored chain checked whole once, then the new entry
    finally:
        module.verify_ledger = real


def test_a_spend_in_a_group_commit_leaves_no_pending_copy_and_its_line_whole(tmp_path):
    state = SiteState(tmp_path / "state", "a")
    pending = state.ledger.pending_path
    writes: list[str] = []
    real = Ledger._write_line

    def watch(self, data):
        writes.append(str(pending.exists()))
        real(self, data)

    Ledger._write_line = watch  # type: ignore[method-assign]
    try:
        with group_commit():
            state.record_spend(spend(1))
        state.record_spend(spend(2))  # outside a group: the pending copy, as ever
    finally:
        Ledger._write_line = real  # type: ignore[method-assign]
    assert writes == ["False", "True"]
    assert not pending.exists()
    state.refresh()
    assert [e["round"] for e in state.entries()] == [1, 2]


def test_a_kept_release_round_trips_every_dtype_and_the_older_form_is_still_read(tmp_path):
    state = SiteState(tmp_path / "site", "s")
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2.0], dtype=">f8"),
              "h": np.ones(3, dtype=np.float16), "n": np.array([True, False]), "s": np.float32(3.0).reshape(())}
    state.save_release("run-1", 1, "d", arrays, {"num_examples": 4})
    got = SiteState(tmp_path / "site", "s").stored_release("run-1", 1, "d", dp=False)
    assert got is not None and set(got[0]) == set(arrays)
    for name, value in arrays.items():
        assert got[0][name].dtype == value.dtype and got[0][name].shape == value.shape
        np.testing.assert_array_equal(got[0][name], value)
    path = tmp_path / "site" / "runs" / "run-1.release.npz"
    with np.load(path) as data:  # what np.load reads: the record and the data
        assert json.loads(bytes(data["__release__"]).decode())["round"] == 1
    # The form written before: one w/<name> member per array.
    record = {"run_id": "run-1", "round": 1, "digest": "d", "meta": {"num_examples": 4}}
    np.savez(path.with_suffix(""), __release__=np.frombuffer(json.dumps(record).encode(), dtype=np.uint8),
             **{f"w/{k}": v for k, v in arrays.items()})
    got = SiteState(tmp_path / "site", "s").stored_release("run-1", 1, "d", dp=False)
    assert got is not None
    np.testing.assert_array_equal(got[0]["w"], arrays["w"])


def test_a_kept_release_replaced_behind_a_sites_back_is_read_again(tmp_path, monkeypatch):
    """The site knows the request of the release it wrote without opening it, only while
    the file is the one it wrote (device, inode, size, modification and change times):
    another file there is read (and torn, never replayed)."""
    state = SiteState(tmp_path / "site", "s")
    state.save_release("run-1", 1, "d1", {"w": np.zeros(2, dtype=np.float32)}, {"num_examples": 4})
    opened = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.name) or real(self))
    assert state.stored_release("run-1", 2, "d2", dp=False) is None  # the last round's: known unopened
    assert opened == []
    replay = state.stored_release("run-1", 1, "d1", dp=False)  # the very request: always read
    assert replay is not None and opened == ["run-1.release.npz"]
    monkeypatch.setattr(Path, "read_bytes", real)
    other = SiteState(tmp_path / "other", "s")
    other.save_release("run-1", 2, "d2", {"w": np.ones(2, dtype=np.float32)}, {"num_examples": 4})
    path = tmp_path / "site" / "runs" / "run-1.release.npz"
    path.write_bytes((tmp_path / "other" / "runs" / "run-1.release.npz").read_bytes())
    got = state.stored_release("run-1", 2, "d2", dp=False)
    assert got is not None
    np.testing.assert_array_equal(got[0]["w"], np.ones(2, dtype=np.float32))
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        data = z.getinfo("data.npy")
    damaged = bytearray(blob)
    damaged[data.header_offset + 100] ^= 0xFF  # a flipped byte inside the weights: the CRC catches it
    path.write_bytes(bytes(damaged))
    assert state.stored_release("run-1", 2, "d2", dp=False) is None


def test_a_request_digest_kept_for_a_shared_record_is_the_one_computed(flower_task_identity):
    """The digest of a push's shared ArrayRecord is reused only for that very record and
    plan head: the same value as computed afresh, and another plan or record is hashed."""
    from dataclasses import replace

    from fedshield import protocol
    from fedshield.client import app as site_app
    from tests.test_protocol import train_instruction

    weights = {"w": np.arange(4, dtype=np.float32)}
    record = protocol.to_array_record(weights)
    p = protocol.read_plan(train_instruction())
    first = site_app._request_digest(p, weights, record)
    assert site_app._request_digest(p, weights, record) == first == site_app._request_digest(p, weights)
    other = {"w": np.ones(4, dtype=np.float32)}
    assert site_app._request_digest(p, other, protocol.to_array_record(other)) != first
    assert site_app._request_digest(replace(p, server_round=p.server_round + 1), weights, record) != first
    # Every field of the head, each changed on its own, is hashed afresh for the same record;
    # floats by their bits (-0.0 is written "-0.0": not the digest of 0.0, though == 0.0).
    variants = [replace(p, config_yaml=p.config_yaml + "\n"), replace(p, run_id="run-other"),
                replace(p, frozen_fingerprint="other"), replace(p, class_names=(*p.class_names, "extra")),
                replace(p, feature_center=(0.0, 1.5)), replace(p, feature_center=(-0.0, 1.5)),
                replace(p, proximal_mu=0.0), replace(p, proximal_mu=-0.0)]
    for variant in variants:
        site_app._request_digest(p, weights, record)  # the kept digest is p's
        assert site_app._request_digest(variant, weights, record) == site_app._request_digest(variant, weights)
    for plus, minus in (variants[4:6], variants[6:8]):  # kept for 0.0, asked for -0.0: hashed afresh
        site_app._request_digest(plus, weights, record)
        assert site_app._request_digest(minus, weights, record) == site_app._request_digest(minus, weights)
    digests = {site_app._request_digest(v, weights, record) for v in variants}
    assert len(digests) == len(variants) and first not in digests


def test_in_a_group_commit_a_kept_release_is_written_in_place_and_reads_back(tmp_path):
    """Within a group (the batched engine) the kept release is overwritten where it is, no
    temporary copy renamed; it reads back whole, and one torn by a crash is never replayed."""
    state = SiteState(tmp_path / "site", "s")
    path = tmp_path / "site" / "runs" / "run-1.release.npz"
    state.save_release("run-1", 1, "d1", {"w": np.zeros(8, dtype=np.float32)}, {"num_examples": 4})
    inode = path.stat().st_ino
    with group_commit():
        state.save_release("run-1", 2, "d2", {"w": np.ones(8, dtype=np.float32)}, {"num_examples": 4})
        state.mark_unreported([{"hash": "h1"}])
    assert path.stat().st_ino == inode  # in place
    assert not list(path.parent.glob("*.tmp"))
    got = SiteState(tmp_path / "site", "s").stored_release("run-1", 2, "d2", dp=False)
    assert got is not None
    np.testing.assert_array_equal(got[0]["w"], np.ones(8, dtype=np.float32))
    assert state._unreported_hashes() == ["h1"]
    with group_commit():
        state.mark_unreported([{"hash": "h2"}])  # the list exists: replaced atomically
    assert state._unreported_hashes() == ["h1", "h2"]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] + bytes(len(blob) - len(blob) // 2))  # torn: the rest never written
    assert SiteState(tmp_path / "site", "s").stored_release("run-1", 2, "d2", dp=False) is None


@pytest.mark.parametrize("shape", [[3], [9], [-1], [2, 5], [10 ** 12]])
def test_a_kept_release_whose_record_lies_about_its_arrays_is_never_replayed(tmp_path, shape):
    """A kept release's record names each array's dtype and shape; one whose shapes do not
    cut its data exactly (too few, too many, negative, absurd) is not replayed."""
    from fedshield.protocol import npy_bytes

    state = SiteState(tmp_path / "site", "s")
    state.save_release("run-1", 1, "d1", {"w": np.arange(8, dtype=np.float32)}, {"num_examples": 4})
    path = tmp_path / "site" / "runs" / "run-1.release.npz"
    with zipfile.ZipFile(path) as archive:
        record = json.loads(bytes(np.load(archive.open("__release__.npy"))).decode())
        data = archive.read("data.npy")
    record["arrays"][0][2] = shape
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__release__.npy", npy_bytes(np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)))
        archive.writestr("data.npy", data)
    assert SiteState(tmp_path / "site", "s").stored_release("run-1", 1, "d1", dp=False) is None


def test_in_a_group_commit_the_head_record_is_swapped_with_its_spare_and_always_whole(tmp_path):
    """Within a group the head record is written over its spare copy and the two names
    exchanged (renameat2 RENAME_EXCHANGE, no rename over it): the head always reads whole
    and verifies, the spare holds the one before, and a truncation is still caught."""
    from fedshield.privacy import files

    state = SiteState(tmp_path / "site", "a")
    ledger = state.ledger
    state.record_spend(spend(1))  # the first head: no spare to exchange with yet
    spare = ledger.head_path.with_name(f".{ledger.head_path.name}.spare")
    for r in (2, 3, 4):
        before = ledger.head_path.read_bytes()
        with group_commit():
            state.record_spend(spend(r))
            if files._RENAME_EXCHANGE is not None:
                assert spare.read_bytes() == before  # the previous head, whole
        assert json.loads(ledger.head_path.read_bytes())["a"]["seq"] == r - 1
        SiteState(tmp_path / "site", "a").refresh()  # verifies against the head
    assert not list(ledger.path.parent.glob(".*.tmp-*"))
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    ledger.path.write_bytes(b"".join(lines[:-1]))  # the last entry cut off
    with pytest.raises(LedgerError, match="head"):
        SiteState(tmp_path / "site", "a").refresh()
    assert not files.write_by_exchange(ledger.head_path, b"{}\n")  # outside a group: not used


def test_a_head_record_whose_exchange_cannot_be_made_is_renamed_as_before(tmp_path, monkeypatch):
    """No RENAME_EXCHANGE (an older kernel, a file system without it: the call fails), or a
    spare linked to another file (never written through): the head is replaced by a rename,
    whole, and the other file is untouched."""
    from fedshield.privacy import files

    state = SiteState(tmp_path / "site", "a")
    state.record_spend(spend(1))
    head = state.ledger.head_path
    monkeypatch.setattr(files, "_RENAME_EXCHANGE", lambda a, b: -1)
    with group_commit():
        state.record_spend(spend(2))
    assert json.loads(head.read_bytes())["a"]["seq"] == 1
    monkeypatch.undo()
    other = tmp_path / "other"
    other.write_bytes(b"not a head\n")
    spare = head.with_name(f".{head.name}.spare")
    spare.unlink(missing_ok=True)
    os.link(other, spare)  # planted as a hard link to another file
    with group_commit():
        state.record_spend(spend(3))
    assert other.read_bytes() == b"not a head\n"
    assert json.loads(head.read_bytes())["a"]["seq"] == 2
    SiteState(tmp_path / "site", "a").refresh()


def test_in_a_group_commit_the_unreported_list_is_emptied_and_refilled_in_place(tmp_path):
    """Within a group the list of unreported spends is emptied where it is when a reply takes
    it (no unlink) and written over in place only while it holds none; one that holds some
    is replaced atomically, so a torn write never loses a mark. Outside a group it goes."""
    state = SiteState(tmp_path / "site", "s")
    path = state._unreported_path()
    entry = state.record_spend(spend(1))
    with group_commit():
        state.mark_unreported([entry])
        inode = path.stat().st_ino
        assert [e["hash"] for e in state.take_unreported("r")] == [entry["hash"]]
        assert path.read_bytes() == b"[]\n" and state.take_unreported("r") == []  # taken once
        state.mark_unreported([entry])
        assert path.stat().st_ino == inode  # refilled in place: it held none
        state.mark_unreported([{"hash": "h2"}])
        assert path.stat().st_ino != inode  # it held a mark: replaced atomically
    assert state._unreported_hashes() == [entry["hash"], "h2"]
    path.write_bytes(b'["h2", "h')  # torn: reads as none, as a missing list does
    assert state._unreported_hashes() == []
    state.mark_unreported([entry])
    assert [e["hash"] for e in state.take_unreported("r")] == [entry["hash"]]
    assert not path.exists()  # outside a group: removed


def test_a_reply_without_entries_leaves_the_sites_chain_state_its_own(tmp_path):
    """A reply with no new entry (a decline after a spend, a replay) is taken without a
    chain check: the site's chain state must stay its own, not the one another site's check
    left behind, or its next honest entry would be checked against the wrong chain."""
    a, b = SiteState(tmp_path / "a", "a"), SiteState(tmp_path / "b", "b")
    for r in (1, 2):
        a.record_spend(spend(r))
        b.record_spend({**spend(r), "site": "b"})
    check = LedgerCheck("r", {"a": a.key.public_key(), "b": b.key.public_key()}, dp=True, delta=1e-5,
                        accountant="rdp")
    assert check.check("a", 1, _lines(a)[:1], None).problem is None
    assert check.check("b", 1, _lines(b)[:1], None).problem is None
    assert check.check("a", 2, _lines(a)[1:], None).problem is None
    assert check.check("b", 2, [], None).problem is None  # nothing new, right after a's check
    assert check.check("b", 2, _lines(b)[1:], None).problem is None  # checked against b's own chain
    forged = dict(_lines(b)[1], seq=2, round=3, run_seq=2, prev_hash=_lines(a)[1]["hash"])
    forged["hash"] = entry_hash(forged)
    assert "do not verify" in check.check("b", 3, [forged], None).problem


def test_a_workers_sites_records_are_hashed_once_not_on_every_message(monkeypatch):
    """The digest of a site's records (what its released count counts) is kept per data
    object for as many sites as a batched worker serves (thousands), each computed once:
    asked again, none is hashed again; another object of the same rows has the same digest."""
    from fedshield.client import app as site_app
    from fedshield.task.data import LabeledData

    monkeypatch.setattr(site_app, "_DIGESTS", {})
    sites = [LabeledData(labels=np.array([i % 2, 1], dtype=np.int64), class_names=["a", "b"], texts=[f"r{i}", "s"])
             for i in range(600)]
    first = [site_app._data_bytes(d) for d in sites]
    assert len(set(first)) == len(sites)

    class NoHashing:
        def __call__(self, *args, **kwargs):
            raise AssertionError("hashed again")

    with monkeypatch.context() as m:
        m.setattr(site_app.hashlib, "sha256", NoHashing())
        assert [site_app._data_bytes(d) for d in sites] == first
    copy = LabeledData(labels=sites[7].labels.copy(), class_names=["a", "b"], texts=list(sites[7].texts or []))
    assert site_app._data_bytes(copy) == first[7]

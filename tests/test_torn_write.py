"""A spend whose ledger write a crash interrupts is counted as spent, reported at the site,
and sent to the coordinator with the site's next reply of that run (over-count, never
under-count)."""

from __future__ import annotations

import json

import pytest

from fedshield.client.site import SiteState
from fedshield.privacy.accountant import Spend, epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.ledger_check import Expected, LedgerCheck


class Crash(BaseException):
    """What a kill -9 does to the writer: nothing after this point runs."""


def spend(round_: int, sigma: float = 2.0) -> dict:
    return {"run_id": "r", "round": round_, "site": "a", "noise_multiplier": sigma, "sample_rate": 0.5, "steps": 4,
            "max_grad_norm": 0.1, "delta": 1e-5, "accountant": "rdp", "release": "dp-sgd"}


def crash_while_writing(monkeypatch, keep_bytes: int | None) -> None:
    """The next ledger line is cut after `keep_bytes` bytes (negative: all but that many;
    None: the whole line is written, then the process dies before its head record)."""
    real = Ledger._write_line

    def cut(self, data: bytes) -> None:
        if keep_bytes is None:
            real(self, data)
        elif keep_bytes:
            real(self, data[:keep_bytes])
        raise Crash

    monkeypatch.setattr(Ledger, "_write_line", cut)


def crashed_site(tmp_path, monkeypatch, keep_bytes: int | None, second: dict) -> SiteState:
    """A site that spent round 1, then was killed while writing `second` (crash_while_writing)."""
    state = SiteState(tmp_path / "state", "a")
    state.record_spend(spend(1))
    with monkeypatch.context() as m:
        crash_while_writing(m, keep_bytes)
        with pytest.raises(Crash):
            state.record_spend(second)
    return state


@pytest.mark.parametrize("keep_bytes", [0, 150])  # nothing written, a torn line
def test_an_interrupted_spend_is_counted_once_and_the_books_verify(tmp_path, monkeypatch, keep_bytes):
    state = crashed_site(tmp_path, monkeypatch, keep_bytes, spend(2, sigma=1.5))
    pending = json.loads(state.ledger.pending_path.read_text())

    after = SiteState(tmp_path / "state", "a")  # the site restarts: its books are read and checked
    assert [e["hash"] for e in after.entries()][-1] == pending["hash"]
    assert len(after.entries()) == 2 and not after.ledger.pending_path.exists()
    assert "interrupted spend of run r round 2 (seq 1) is counted as spent" in after.recovery_message
    want = epsilon([Spend(2.0, 0.5, 4), Spend(1.5, 0.5, 4)], 1e-5)
    assert after.epsilon(1e-5, "rdp") == pytest.approx(want)  # the interrupted spend is in ε
    after.ledger.check_own("a", after.key.public_key())  # chain, signatures, head: all verify
    assert SiteState(tmp_path / "state", "a").recovery_message == ""  # booked once, not again
    assert len(SiteState(tmp_path / "state", "a").entries()) == 2


@pytest.mark.parametrize("keep_bytes", [None, -1])  # the whole line, all but its newline
def test_a_write_that_completed_before_the_crash_is_not_booked_twice(tmp_path, monkeypatch, keep_bytes):
    state = crashed_site(tmp_path, monkeypatch, keep_bytes, spend(2))
    # the line is whole; the crash came before the pending copy was removed (and before the head)
    assert state.ledger.pending_path.exists()
    after = SiteState(tmp_path / "state", "a")
    assert len(after.entries()) == 2 and not after.ledger.pending_path.exists()


def test_the_next_reply_carries_the_late_spend_and_the_coordinator_books_it(tmp_path, monkeypatch):
    state = SiteState(tmp_path / "state", "a")
    books = LedgerCheck("r", {"a": state.key.public_key()}, dp=True, delta=1e-5, accountant="rdp")
    plan = Expected(sample_rate=0.5, steps=4)
    first = state.record_spend(spend(1))
    assert books.check("a", 1, [first], plan).problem is None
    with monkeypatch.context() as m:
        crash_while_writing(m, 150)
        with pytest.raises(Crash):
            state.record_spend(spend(2))  # round 2's spend: its reply never left

    after = SiteState(tmp_path / "state", "a")
    third = after.record_spend(spend(3))
    late = after.take_unreported("r")
    assert [e["round"] for e in late] == [2] and after.take_unreported("r") == []  # reported once
    verdict = books.check("a", 3, [*late, third], plan)
    assert verdict.problem is None and [e["round"] for e in verdict.new_entries] == [2, 3]
    # A late entry is recorded, never counted against this round's plan: without round 3's own
    # spend the reply is still short of what the plan asks.
    books2 = LedgerCheck("r", {"a": after.key.public_key()}, dp=True, delta=1e-5, accountant="rdp")
    assert books2.check("a", 1, [first], plan).problem is None
    assert "the plan asks 4 steps" in books2.check("a", 3, late, plan).problem
    # An entry of a later round than asked is not a late spend.
    assert "expected 'a', 'r', 2" in books2.check("a", 2, [third], plan).problem


def test_a_late_spend_of_another_run_stays_in_the_sites_own_books(tmp_path, monkeypatch):
    crashed_site(tmp_path, monkeypatch, 0, spend(2))
    after = SiteState(tmp_path / "state", "a")
    assert after.take_unreported("another-run") == []
    assert len(after.entries()) == 2  # counted all the same


@pytest.mark.parametrize("damage", ["garbage", "edited", "resigned-by-another-key"])
def test_a_damaged_or_planted_pending_spend_is_refused_and_nothing_is_trained_on(tmp_path, monkeypatch, damage):
    """A local attacker edits the interrupted spend (less noise) or plants one of their own:
    the site refuses its books, naming the file, instead of counting a spend it cannot trust."""
    import base64

    from fedshield.privacy import signing
    from fedshield.privacy.errors import LedgerError
    from fedshield.privacy.ledger import entry_hash

    state = crashed_site(tmp_path, monkeypatch, 150, spend(2))
    pending = json.loads(state.ledger.pending_path.read_text())
    if damage == "garbage":
        state.ledger.pending_path.write_bytes(b"{not json")
    else:
        pending["noise_multiplier"] = 9.0  # "more noise than I used": ε would be under-counted
        if damage == "resigned-by-another-key":
            signing.generate_site_key(tmp_path / "other.key")
            other = signing.load_private_key(tmp_path / "other.key")
            pending["hash"] = entry_hash(pending)
            pending["signature"] = base64.b64encode(signing.sign(other, pending["hash"].encode())).decode()
        state.ledger.pending_path.write_text(json.dumps(pending) + "\n")
    says = "do not verify|not signed|signature" if damage == "resigned-by-another-key" else "pending .* is damaged"
    with pytest.raises(LedgerError, match=says):
        SiteState(tmp_path / "state", "a")

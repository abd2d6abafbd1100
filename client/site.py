"""A site's privacy state, on the site's own disk.

    <state_dir>/
      site.key, site.pub   the site's ledger signing key (0600); signs every ledger entry
      ledger.jsonl         every privacy spend of this site, across rounds, runs, restarts
      runs/<run_id>.json   the noise multiplier calibrated for that run, with what it was
                           calibrated for (reused on restart for exactly that plan)
      runs/<run_id>.release.npz   the last reply of that run, re-sent if the same round is asked again
      runs/<run_id>.done   the coordinator said the run completed
      cache/               frozen-prefix features: derived from private data, stays here

Under add-remove (privacy.neighbouring) the record count is protected: the site releases
it once per dataset, with Gaussian noise, as a `release: record-count` entry of its ledger
(`released_count`: the noisy count and a keyed digest of the data it counted), and every
later run reuses that noisy count: re-using a release is post-processing and spends nothing.

Rolled-back books. The chain and the signed head record (privacy/ledger.py) show an
edited, removed or cut-off entry, but not a whole older state put back (an old ledger.jsonl
with its old head, from a backup or a snapshot): that state verifies, and its ε is too low.
So the site also checks its books against a head kept elsewhere (`check_head`), and
refuses to train or release on books that are behind it (BooksBehind; decline kind `books`):
- the coordinator's: every instruction after HELLO carries the newest (seq, hash) of this
  site's ledger that the coordinator holds, verified, across runs (server/site_heads.py);
- the site's own witness (node config `ledger-witness`, `fedshield client --ledger-witness`):
  an append-only file, ideally on another volume or host, where the site appends the
  (seq, hash) of every entry once it is fsynced; on load, books behind the witness are refused.

The ledger is the accountant's history: ε is always recomputed from all of the site's
entries, never reset per round or per run. The site checks two budgets before it touches a
record (`check_budget`): the run's releases at this site together with the planned one stay
within the run's target ε, and its whole history within its lifetime budget, whatever σ or
number of rounds the plan states. It writes (and fsyncs) a training release's entry before
the first DP step (client/app.py `local_update`: spend before compute), so a training that
fails or a process that dies after steps ran is still a spend: a crash can over-count a
spend, never under-count it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedshield.privacy.accountant import (
    ADD_REMOVE,
    Spend,
    SpendTotals,
    calibrate_noise_multiplier,
    epsilon,
    planned_epsilon,
)
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.events import COUNT_RELEASE, TRAIN_RELEASE, neighbouring_of
from fedshield.privacy.files import fsync, in_group_commit, open_in_folder, write_fully
from fedshield.privacy.ledger import Entry, Ledger, site_history
from fedshield.privacy.signing import generate_site_key, load_private_key, public_key_pem
from fedshield.protocol import npy_bytes


class BooksBehind(FedShieldError):
    """The site's ledger is behind a head recorded elsewhere: an older state was put back."""


@dataclass(frozen=True)
class BudgetDecision:
    ok: bool
    epsilon_now: float
    epsilon_after: float
    budget: float
    reason: str = ""


class SiteState:
    def __init__(self, state_dir: Path, site: str, key_path: Path | None = None,
                 witness: Path | None = None) -> None:
        self.dir = Path(state_dir)
        self._unreported = self.dir / "ledger.jsonl.unreported"  # paths named once (pathlib's cost)
        self._releases: dict[str, Path] = {}  # run id -> its kept release's path
        self.site = site
        self.witness = Path(witness) if witness is not None else None  # see the module docstring
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedShieldError(f"site state folder {str(self.dir)!r}: {exc.strerror}") from None
        self.key_path = key_path or self.dir / "site.key"
        if not self.key_path.exists():
            if key_path is not None:
                raise FedShieldError(f"ledger signing key {str(key_path)!r}: not found")
            pub = generate_site_key(self.key_path)
            (self.dir / "site.pub").write_bytes(pub)
        self.key = load_private_key(self.key_path)
        self.public_key = self.key.public_key()  # one object: its fingerprint is computed once (privacy/signing.py)
        self._digest_key: bytes | None = None  # data_digest's HMAC key, derived from `key` once
        # The last kept release seen: its run, its file's `_identity`, the request it answers.
        self._kept: tuple[str, tuple[int, ...], dict[str, Any]] | None = None
        self.ledger = Ledger(self.dir / "ledger.jsonl")
        self._entries: list[Entry] = []  # this site's entries, as of the last refresh and own appends
        self._history: list[Spend] = []  # their spends
        # The same spends as the accountants group them, in all and per run (`_tally`): a
        # budget check reads one step per (σ, q), whatever the number of rounds behind it.
        self._totals = SpendTotals()
        self._run_totals: dict[str, SpendTotals] = {}
        # The last budget check's arguments, and the history length its next ε was prepared
        # for (`prepare_next_check`).
        self._last_check: tuple[Any, ...] | None = None
        self._prepared_at: int | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read the ledger (once per message): every decision until the next refresh uses
        this reading, and the entries this state appends. A torn last line from a crash is
        set aside and reported."""
        read = self.ledger.recover(self.public_key)
        self.recovery_message = read.message if read.truncated_bytes or read.recovered else ""
        if read.recovered:  # interrupted spends, now counted: the coordinator hears of them in the next reply
            marks = self._unreported_hashes() + [str(e.get("hash")) for e in read.recovered]
            _atomic_write(self._unreported_path(), json.dumps(marks) + "\n")
        # The site's own books must verify, whole, before it decides anything with them
        # (the Ledger checks again only what it has not verified: privacy/ledger.py).
        self.ledger.check_own(self.site, self.public_key, read.entries)
        own = [e for e in read.entries if e.get("site") == self.site]
        known = self._entries
        if len(own) >= len(known) and all(a is b or a == b for a, b in zip(own, known, strict=False)):
            new = site_history(own[len(known):], self.site)  # the new ones parsed
            self._history = [*self._history, *new]
            self._tally(own[len(known):], new)
        else:
            self._history = site_history(own, self.site)
            self._totals, self._run_totals = SpendTotals(), {}
            self._tally(own, self._history)
        self._entries = own
        if self.witness is not None:
            mark = self._witnessed()
            if mark is not None:
                self.check_head(mark[0], mark[1], f"its witness {self.witness}")
            if self._entries and (mark is None or mark[0] < int(self._entries[-1]["seq"])):
                self._witness(self._entries[-1])  # a crash came between an entry and its witness line

    # -- the head kept elsewhere: the coordinator's, the site's witness -------------

    def check_head(self, seq: int, digest: str, holder: str) -> None:
        """Refuse (BooksBehind, one line) books that do not hold entry `seq` with hash
        `digest`, which `holder` recorded: an older state of the ledger was put back (or
        another site's books). Books ahead of it are fine (the holder has not heard yet)."""
        repair = ("the site will not train on books older than what was recorded: find the newest ledger.jsonl "
                  "and ledger.jsonl.head (docs/site-operator.md)")
        if len(self._entries) <= seq:
            last = f"seq {self._entries[-1]['seq']}" if self._entries else "no entry"
            raise BooksBehind(f"ledger {self.ledger.path}: it ends at {last}, but {holder} holds this site's "
                              f"entry seq {seq}: its books were rolled back; {repair}")
        if self._entries[seq].get("hash") != digest:
            raise BooksBehind(f"ledger {self.ledger.path}: its entry seq {seq} is not the one {holder} holds: "
                              f"these are not the books it saw; {repair}")

    def _witnessed(self) -> tuple[int, str] | None:
        """The newest (seq, hash) in the witness file (a torn last line from a crash is skipped)."""
        assert self.witness is not None
        try:
            with open(self.witness, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 65536))
                tail = f.read()
        except FileNotFoundError:
            return None  # first use: started from the books as they are now
        except OSError as exc:
            raise FedShieldError(f"ledger witness {str(self.witness)!r}: cannot read: {exc.strerror}") from None
        for raw in reversed(tail.splitlines()):
            try:
                mark = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(mark, dict) or mark.get("site") != self.site:
                continue
            seq, digest = mark.get("seq"), mark.get("hash")
            if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(digest, str):
                return seq, digest
        if tail.strip():
            raise FedShieldError(f"ledger witness {str(self.witness)!r}: no line of site {self.site} in its end: "
                                 "not this site's witness")
        return None

    def _witness(self, entry: Entry) -> None:
        """Append (seq, hash) of an entry on disk to the witness, fsynced."""
        assert self.witness is not None
        line = json.dumps({"site": self.site, "seq": entry["seq"], "hash": entry["hash"]}, sort_keys=True) + "\n"
        try:
            fd = os.open(self.witness, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash stays apart
                    line = "\n" + line
                write_fully(fd, line.encode("ascii"))
            finally:
                os.close(fd)
        except OSError as exc:
            raise FedShieldError(f"ledger witness {str(self.witness)!r}: cannot append: {exc.strerror}") from None

    def public_key_pem(self) -> str:
        return public_key_pem(self.key).decode()

    def history(self) -> list[Spend]:
        """This site's spends, oldest first, as of the last `refresh` and own appends."""
        return list(self._history)

    def _tally(self, entries: Sequence[Entry], spends: Sequence[Spend]) -> None:
        """Count `spends` (those of `entries`, newly read or appended) into the totals."""
        for entry, spend in zip(entries, spends, strict=True):
            self._totals.add(spend)
            run = entry.get("run_id")
            if isinstance(run, str):  # `run_history` compares it with a run id
                self._run_totals.setdefault(run, SpendTotals()).add(spend)

    def epsilon_after(self, planned: Spend, delta: float, accountant: str, neighbouring: str = ADD_REMOVE) -> float:
        """`planned_epsilon(self.history(), planned, ...)`, from the kept totals."""
        return planned_epsilon(self._totals, planned, delta, accountant, neighbouring)

    def _run_spends(self, run_id: str, assumed: Sequence[Spend]) -> SpendTotals:
        """The totals of `run_history(run_id)` plus `assumed`."""
        run = self._run_totals.get(run_id, SpendTotals()).copy()
        for spend in assumed:
            run.add(spend)
        return run

    def _unreported_path(self) -> Path:
        return self._unreported

    def _unreported_hashes(self) -> list[str]:
        try:
            marks = json.loads(self._unreported_path().read_text())
        except (OSError, ValueError):
            return []
        return [str(h) for h in marks] if isinstance(marks, list) else []

    def mark_unreported(self, entries: Sequence[Entry]) -> None:
        """Spends the coordinator has not heard of yet (a crash, or a training spent before it
        ran that may not reach a reply): they go with the next reply of their run
        (`take_unreported`), so the run's copy of this site's chain has no gap."""
        marks = self._unreported_hashes()
        new = [str(e.get("hash")) for e in entries if str(e.get("hash")) not in marks]
        if new:  # in place only over a list that holds no spend (a torn write loses none)
            _group_write(self._unreported_path(), (json.dumps(marks + new) + "\n").encode(), in_place=not marks)

    def take_unreported(self, run_id: str) -> list[Entry]:
        """Spends that a crash interrupted and `refresh` counted, to go with the next reply of
        `run_id` (entries of another run stay in this ledger only: the site's own books)."""
        marks = self._unreported_hashes()
        if not marks:
            return []
        found = [e for e in self._entries if e.get("hash") in marks and e.get("run_id") == run_id]
        if in_group_commit():  # emptied in place: an unlink waited on the journal, a third of a ms a site
            _group_write(self._unreported_path(), b"[]\n", in_place=True)
        else:
            self._unreported_path().unlink(missing_ok=True)
        return found

    def entries(self) -> list[Entry]:
        """This site's ledger entries, oldest first (as `history`)."""
        return list(self._entries)

    def neighbouring(self) -> str | None:
        """The relation this site's ledger is accounted under (None: no spend yet)."""
        return neighbouring_of(self._entries[-1]) if self._entries else None

    def epsilon(self, delta: float, accountant: str, neighbouring: str = ADD_REMOVE) -> float:
        return epsilon(self._totals, delta, accountant, neighbouring)

    def run_history(self, run_id: str) -> list[Spend]:
        """This site's spends in run `run_id` (its count if released in it, its feature mean,
        its rounds), oldest first: what the run's target ε bounds."""
        return [s for s, e in zip(self._history, self._entries, strict=True) if e.get("run_id") == run_id]

    def check_budget(self, planned: Spend, budget: float, delta: float, accountant: str,
                     neighbouring: str = ADD_REMOVE, *, run_id: str | None = None,
                     run_target: float | None = None, run_assumed: Sequence[Spend] = ()) -> BudgetDecision:
        """Whether the `planned` spend may go ahead: the whole history after it within the
        lifetime `budget` and, given `run_id` and `run_target`, the run's spends at this site
        (`run_history`, plus `run_assumed`: releases of the run counted as if made, e.g. a
        feature mean the site may not have been asked for: over-count, never under-count)
        after it within the run's target. Both hold whatever σ or rounds a plan states."""
        self._last_check = (planned, delta, accountant, neighbouring, run_id, run_target, tuple(run_assumed))
        now = self.epsilon(delta, accountant, neighbouring)
        if run_id is not None and run_target is not None:
            run = self._run_spends(run_id, run_assumed)
            in_run = planned_epsilon(run, planned, delta, accountant, neighbouring)
            if in_run > run_target:
                reason = (
                    f"this round would take run {run_id}'s ε at this site from "
                    f"{epsilon(run, delta, accountant, neighbouring):.3f} to {in_run:.3f}, past the run's target "
                    f"{run_target:g} (δ={delta:g})"
                )
                return BudgetDecision(False, now, in_run, run_target, reason)
        after = self.epsilon_after(planned, delta, accountant, neighbouring)
        if after > budget:
            reason = (
                f"this round would take ε from {now:.3f} to "
                f"{after:.3f}, past its budget {budget:g} (δ={delta:g})"
            )
            return BudgetDecision(False, now, after, budget, reason)
        return BudgetDecision(True, now, after, budget)

    def prepare_next_check(self) -> None:
        """Compute, ahead, the ε that the last budget check would compute if the same spend
        were planned again on the history as it is now: what next round's check needs, if
        its plan is the same. Only the accountant's cache keeps the result; the check itself
        runs in full when it comes (and a plan that changed computes its own). A batched
        worker calls this while it waits for the next round (simulations/batched.py), as
        each ε is a few tens of milliseconds of dp-accounting a new history."""
        if self._last_check is None or self._prepared_at == len(self._entries):
            return
        self._prepared_at = len(self._entries)
        planned, delta, accountant, neighbouring, run_id, run_target, run_assumed = self._last_check
        try:
            if run_id is not None and run_target is not None:
                planned_epsilon(self._run_spends(run_id, run_assumed), planned, delta, accountant, neighbouring)
            self.epsilon_after(planned, delta, accountant, neighbouring)
        except Exception:  # noqa: BLE001  only a cache is at stake: the check raises it in its place
            pass

    def prepare_next_read(self) -> None:
        """Read and check the books ahead, as the next message's `refresh` will: the Ledger
        keeps the bytes it parsed and the chain it verified, so that `refresh`, which reads
        the file again when the message comes, finds those very bytes known and checks only
        what changed since (a file changed in between is read and checked whole, as ever).
        Nothing is decided or written here: recovering a torn line or an interrupted spend
        is `refresh`'s, under the ledger's lock. A batched worker calls this while it waits
        for the next round (simulations/batched.py)."""
        try:
            read = self.ledger.read()
            if not (read.truncated_bytes or read.missing_newline):
                self.ledger.check_own(self.site, self.public_key, read.entries)
        except Exception:  # noqa: BLE001  only caches are at stake: refresh raises it in its place
            pass

    def noise_multiplier(
        self, run_id: str, target_epsilon: float, delta: float, sample_rate: float,
        steps_per_round: int, rounds: int, accountant: str, before: list[Spend] | None = None,
        neighbouring: str = ADD_REMOVE,
    ) -> float:
        """σ that makes this run's spend alone reach target_epsilon after `rounds` rounds,
        together with the run's other releases `before` (the feature mean, the count).

        Calibrated once per run and kept, so a restarted site keeps the same noise: reused
        only for the very same question (q, steps, rounds, target, δ, accountant, relation,
        `before`), calibrated again otherwise. The σ alone promises nothing: `check_budget`
        bounds the run's spends by its target whatever the plan's rounds turn out to be.
        """
        before = list(before or [])
        path = self.dir / "runs" / f"{_safe(run_id)}.json"
        question = {
            "sample_rate": sample_rate, "steps_per_round": steps_per_round, "rounds": rounds,
            "target_epsilon": target_epsilon, "delta": delta, "accountant": accountant,
            "neighbouring": neighbouring, "before": [list(s.as_tuple()) for s in before],
        }
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = None  # damaged: calibrate again
            if isinstance(saved, dict) and all(saved.get(k) == v for k, v in question.items()) \
                    and isinstance(saved.get("noise_multiplier"), float):
                return float(saved["noise_multiplier"])
        sigma = calibrate_noise_multiplier(
            target_epsilon, delta, sample_rate, steps_per_round * rounds, accountant, before=before,
            neighbouring=neighbouring,
        )
        record = {"run_id": run_id, "noise_multiplier": sigma, **question}
        _atomic_write(path, json.dumps(record, indent=2))
        return sigma

    # -- the protected record count (add-remove) ----------------------------------

    def data_digest(self, canonical: bytes) -> str:
        """A digest of the site's data keyed by its secret signing key: it tells the site
        whether its data changed since it released a count, and tells nobody else anything
        (without the key, a guessed dataset cannot be confirmed against it)."""
        if self._digest_key is None:
            self._digest_key = hashlib.sha256(b"fedshield record-count\0" + self.key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())).digest()
        return hmac.new(self._digest_key, canonical, hashlib.sha256).hexdigest()

    def released_count(self, digest: str) -> tuple[int, Entry] | None:
        """(the noisy count, its entry) this site released for the data of `digest`, if any."""
        for e in reversed(self._entries):
            if e.get("release") == COUNT_RELEASE and e.get("data_digest") == digest:
                count = e.get("released_count")
                if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
                    return count, e
        return None

    def record_spend(self, fields: dict[str, Any]) -> Entry:
        """Append the signed entry and fsync it; returns the entry as written."""
        entry = self.ledger.append(fields, self.key)
        spend = self.ledger.event(entry).spend()  # the event append computed
        self._history.append(spend)
        self._entries.append(entry)
        self._tally([entry], [spend])
        if self.witness is not None:
            self._witness(entry)  # after the entry is fsynced: the witness never runs ahead of the books
        return entry

    # A release is kept until the next one, so that a coordinator that restarts and asks for
    # the same round again (the same request: `plan_digest`, client/app.py) gets the very
    # same reply: re-sending a release is post-processing and costs nothing, where training
    # again would spend again. Under DP the spend comes first: the round's entry, carrying
    # the request's digest, is in the ledger before the first step; the weights are kept
    # after training. A kept release is replayed only with an entry of the very same digest:
    # never under an entry spent for other weights or another plan.

    def train_entries(self, run_id: str, server_round: int) -> list[Entry]:
        """This site's training spends (`release: dp-sgd`) for round `server_round` of `run_id`."""
        return [e for e in self._entries if e.get("run_id") == run_id and e.get("round") == server_round
                and e.get("release") == TRAIN_RELEASE]

    def save_release(self, run_id: str, server_round: int, digest: str, arrays: dict[str, np.ndarray],
                     meta: dict[str, Any]) -> None:
        """Keep this reply's arrays (atomically replaced, fsynced; within a group commit
        written in place, `_group_write`) until the next release:
        a zip of two .npy members, as np.savez writes, `__release__` (the request it
        answers, the arrays' names, dtypes and shapes) and `data` (their bytes, in that
        order); `stored_release` also reads the older form, one member per array."""
        values = {k: np.asarray(v) for k, v in arrays.items()}  # tobytes() below: C order, whatever the layout
        record = {"run_id": run_id, "round": server_round, "digest": digest, "meta": meta,
                  "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in values.items()]}
        body = b"".join(v.tobytes() for v in values.values())
        # Two members, not one per array: np.savez's per-array path was a tenth of a
        # virtual site's round, and a member per array still most of what was left of it.
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr("__release__.npy", npy_bytes(np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)))
            archive.writestr("data.npy", npy_bytes(np.frombuffer(body, dtype=np.uint8)))
        blob = buf.getvalue()
        path = self._release_path(run_id)
        _group_write(path, blob)
        self._kept = (run_id, _identity(path), record)

    def stored_release(self, run_id: str, server_round: int, digest: str,
                       dp: bool) -> tuple[dict[str, np.ndarray], dict[str, Any], list[Entry]] | None:
        """(arrays, meta, entries) of the kept release for exactly this request, with the
        spends this site's verified ledger holds for that request (entries of that run and
        round whose `plan_digest` is `digest`); None if there is no such release, or (DP) no
        spend of this very request is recorded.

        Every round asks, and every round but a restarted coordinator's finds the last
        round's release: the file's request is known without reading it when the file is
        the very one this state wrote or read last (the same device, inode, size, and
        modification and change times: `_identity`). Only a "not this request" is ever
        decided so: a replay always reads the file, and a file changed behind this state's
        back (which the change time shows) is read afresh."""
        path = self._release_path(run_id)
        try:
            identity = _identity(path)
        except OSError:  # none kept (or unreadable: never replayed)
            return None
        known = self._kept if self._kept is not None and self._kept[:2] == (run_id, identity) else None
        if known is not None and (known[2].get("run_id"), known[2].get("round"), known[2].get("digest")) \
                != (run_id, server_round, digest):
            return None  # another request's (the last round's, as a rule): its weights are not read
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as data:
                record = json.loads(bytes(data["__release__"]).decode())
                self._kept = (run_id, identity, record)
                if (record.get("run_id"), record.get("round"), record.get("digest")) != (run_id, server_round, digest):
                    return None
                arrays = _kept_arrays(data, record)
        except Exception:  # a torn or damaged copy is never replayed
            return None
        entries = [e for e in self.train_entries(run_id, server_round) if e.get("plan_digest") == digest]
        if dp and not entries:
            return None
        return arrays, record.get("meta", {}), entries

    def mark_done(self, run_id: str) -> None:
        """The coordinator said the run ended (its report is written): `fedshield client`
        then exits 0 even if this site was not picked for the last round."""
        _atomic_write(done_path(self.dir, run_id), run_id + "\n")

    def _release_path(self, run_id: str) -> Path:
        named = self._releases.get(run_id)
        if named is None:
            named = self._releases[run_id] = self.dir / "runs" / f"{_safe(run_id)}.release.npz"
        return named


def _identity(path: Path) -> tuple[int, ...]:
    """What tells one state of a file from another without reading it: its device, inode,
    size, modification time, and change time (set by the kernel on every write or rename,
    never by a caller)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kept_arrays(data: Any, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a kept release (np.load's view of its zip): the `data` member cut as
    `record["arrays"]` says, or one `w/<name>` member per array (the form written before)."""
    if "arrays" not in record:
        return {k[2:]: data[k] for k in data.files if k.startswith("w/")}
    body, arrays, offset = data["data"], {}, 0
    for name, dtype, shape in record["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[str(name)] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(tuple(shape)).copy()
        offset += count * dt.itemsize
    if offset != body.nbytes:
        raise ValueError("a kept release's data does not match its arrays")
    return arrays


def done_path(state_dir: Path, run_id: str) -> Path:
    return Path(state_dir) / "runs" / f"{_safe(run_id)}.done"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)


def _group_write(path: Path, data: bytes, *, in_place: bool = True) -> None:
    """`_atomic_write_bytes`, or, within a group commit (the batched engine) and `in_place`,
    `data` written over the file in place, without the temporary copy and its rename (a third
    of a millisecond a file on ext4, twice a site a round). Nothing of the group is known to
    be on disk before its barrier, renamed or not, and nothing leaves before it; a crash
    before it can leave such a file torn, as it can leave it missing: a torn kept release is
    never replayed (its zip's CRCs; the round's spend, recorded before, stands: a decline), a
    torn list of unreported spends reads as none, as a missing one does (so a list that holds
    some is replaced atomically: `in_place` False)."""
    if not (in_place and in_group_commit()):
        _atomic_write_bytes(path, data)
        return
    fd = open_in_folder(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_fully(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())

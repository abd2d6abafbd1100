"""The privacy ledger: append-only JSON lines, a hash chain per site, site signatures.

One line per privacy spend (one DP-SGD segment: σ, q, steps; one count or feature-sum
release; one site-level round). Readers parse a line into a typed `LedgerEntry`
(privacy/events.py: the mechanism names, the version migration). Fields of an entry:

    ledger_version  2 (absent: version 1, read as privacy/events.py says)
    run_id, round, site, mechanism (privacy/events.py `Mechanism`), privacy_unit ("record"),
    noise_multiplier, sample_rate, steps, max_grad_norm, delta, accountant ("pld", the
              config's default, | "rdp" | "prv"),
    neighbouring  "add-remove" | "replace-one" (absent in entries written before it existed:
              add-remove, the relation they were accounted under); one per site's chain
    epsilon   cumulative ε of this site after this spend, over ALL of this site's entries
              in the ledger it was appended to (the site's own ledger: every round, run
              and restart), computed by `privacy.accountant.epsilon` (pld: dp-accounting's
              PLD; rdp, prv: the larger of Opacus and dp-accounting); a caller's larger
              value is kept, a smaller one never
    seq       index of the entry in its site's chain (0, 1, 2, ...)
    run_seq   index of the entry among its site's entries of the same run_id (0, 1, ...)
    time      ISO 8601 UTC, to the hour (`entry_time`: it leaves the site, so it carries no timing)
    key_fingerprint   "SHA256:<hex>" of the site's public key
    prev_hash the hash of the previous entry OF THE SAME SITE ("0"*64 for seq 0)
    hash      sha256 hex of the canonical JSON of every field except hash and signature
    signature base64 ECDSA-P256-SHA256 signature by the site key over `hash` (ASCII bytes)

Canonical JSON: sort_keys, separators (",", ":"), ensure_ascii. Fields other than these
are allowed and are covered by the hash and the signature.

The chain is PER SITE. A site appends to its own ledger in its own state folder; the
coordinator concatenates the entries it receives from many sites into the run's
`privacy/ledger.jsonl`. In such a combined file, each entry's prev_hash links to the
previous entry of the same site in the file, so each site's sub-sequence is its own chain,
signed by its own key, and the coordinator cannot edit, drop, reorder or insert a site's
entries without breaking that site's chain or signature. A site's chain in a run's ledger
may start after seq 0 (the site spent budget in earlier runs): `verify_ledger` reports
that as a partial history (not tampering) provided it starts at the first spend of a run
(run_seq 0); its ε then covers spends that are not in the file, and only the site's own
ledger allows a full recomputation. Entries missing at the start of a run (run_seq > 0 as
the first entry of that run) are a failure.

What a chain cannot show: the removal of a site's LAST entries (a truncated chain is
still a valid chain). The audit cross-checks against the run's summary where one exists;
the site's own ledger is the authority.

Durability: each entry is written with one write() to a file opened O_APPEND, then
flush + fsync (and the directory is fsynced when the file is created): spend before
release. Before that write, the whole signed line is saved in `<ledger>.pending` (atomic,
fsynced), and removed once the line and the head record are on disk (not within a group
commit, whose barrier comes before anything the spend pays for: `Ledger.append`). A crash can only
cut the last line; `read` keeps every whole line and reports the cut tail, `recover` sets
the tail aside in `<ledger>.torn-<timestamp>`, rewrites the ledger atomically, and then
**counts the interrupted spend as spent**: a pending line that the ledger does not hold is
appended as it was signed (over-count, never under-count: the crash may have come before
or after anything left the process), once it verifies as the next entry of its site's
chain under the site's key (`pending_entry`): a forged or edited pending line is refused
before anything is appended. A damaged line in the middle is not recoverable: LedgerError.

Neither the chain nor the head record shows a whole older state put back (an old
ledger.jsonl with its old head): that takes a record kept elsewhere. The site checks its
books against the head the coordinator holds for it and against its own witness file
(client/site.py `SiteState.check_head`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fedshield.privacy import signing
from fedshield.privacy.accountant import Spend, SpendTotals, epsilon
from fedshield.privacy.errors import LedgerError
from fedshield.privacy.events import (
    FILLED,
    GENESIS,
    LEDGER_VERSION,
    RECORD,
    RELEASE_MECHANISM,
    REQUIRED,
    SITE,
    SKELLAM_FIELDS,
    UNIT,
    VERSION_FIELD,
    Mechanism,
    PrivacyEvent,
    as_float,
    chain_kind,
    chain_problem,
    event_of,
    field_problem,
    mechanism_of,
    neighbouring_of,
    shown,
)
from fedshield.privacy.files import fsync, in_group_commit, open_in_folder, write_by_exchange, write_fully
from fedshield.privacy.skellam import skellam_history_epsilon

# The mechanism names and fields live in privacy/events.py (typed events); their old names here.
MECHANISM = Mechanism.DP_SGD.value
_EVENTS_KEPT = 65_536  # parsed events a Ledger keeps (`_events_of`); past it, start over
PRIVACY_UNIT = RECORD
# The coordinator's own ledger under privacy.unit=site (strategies/site_dp.py): one entry per
# round, the Poisson-subsampled Gaussian on the clipped sum of the sites' updates.
SITE_MECHANISM = Mechanism.DP_FEDAVG.value
# Site-level DP under secure aggregation: the sites add Skellam noise before masking
# (privacy/skellam.py). Its entries carry the noise that the round's sum really held
# (`skellam_variance`, in quantization levels²) and the integer sensitivities
# (`skellam_l1`, `skellam_l2`); noise_multiplier is the equivalent sqrt(variance) / l2
# (for reading only), sample_rate 1 (no amplification claimed), one step.
SKELLAM_MECHANISM = Mechanism.SKELLAM.value
SITE_UNIT = SITE
FEDERATION = "@federation"  # the name its entries carry (no site may be called so: protocol.SITE_NAME_RULE)
MECHANISMS = {m.value: unit for m, unit in UNIT.items()}


Entry = dict[str, Any]  # one ledger entry, a JSON object


def entry_time(now: dt.datetime) -> str:
    """An entry's `time`: the UTC hour of the spend ("2026-12-02T10:00:00Z"). It leaves the
    site with the entry, so it is coarse: no training duration can be read from it (the
    data-flow table, docs/auditor.md)."""
    return now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0).strftime("%Y-%m-%dT%H:00:00Z")


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: Entry) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass
class LedgerRead:
    entries: list[Entry]
    truncated_bytes: int = 0
    message: str = ""
    truncated_at: int | None = None  # byte offset where the cut tail starts
    missing_newline: bool = False  # the last entry is whole but lacks its newline
    recovered: list[Entry] = field(default_factory=list)  # interrupted spends booked by `recover`


@dataclass(frozen=True)
class _Parsed:
    """A ledger file's bytes as last read whole and clean: their length, their sha256, their entries."""

    size: int
    digest: bytes
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class _Verified:
    """A site's chain as `check_own` last verified it: the entries (the objects the read cache
    handed out), the key's fingerprint, the chain state after them (`verify_ledger`)."""

    fingerprint: str
    entries: tuple[Entry, ...]
    state: ChainState


class Ledger:
    """A ledger file. One object is kept for the life of a site or a run: it remembers the
    file's bytes as last read (a sha256 of them) with their entries, and each site's chain as
    last verified, so that a read parses, and `check_own` verifies, only the entries past
    what it has seen: a file whose first bytes are not exactly those (edited, replaced, rolled
    back) is read and checked whole, as before. Entries handed out are never modified."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Its side files, named once (pathlib builds a new Path at each call: a dozen a spend).
        self._pending_path = self.path.with_name(self.path.name + ".pending")
        self._head_path = self.path.with_name(self.path.name + ".head")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._parsed: _Parsed | None = None
        self._verified: dict[str, _Verified] = {}
        self._events: dict[int, tuple[Entry, PrivacyEvent]] = {}  # id(entry) -> (entry, event_of(entry))
        # Site -> (its entries, the hash of its last, their spends grouped) after its last
        # append here (`_chain_totals`): the next append's ε reads one step per (σ, q).
        self._totals: dict[str, tuple[int, str, SpendTotals]] = {}

    # -- reading -----------------------------------------------------------------
    def read(self) -> LedgerRead:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return LedgerRead([], 0, f"ledger {self.path}: no entries yet")
        except IsADirectoryError:
            raise LedgerError(f"ledger {str(self.path)!r}: is a folder, not a ledger file") from None
        except OSError as exc:
            raise LedgerError(f"ledger {str(self.path)!r}: cannot read: {exc.strerror}") from None
        return self._parse(data)

    def _parse(self, data: bytes) -> LedgerRead:
        """parse_ledger_bytes(data), parsing only the bytes past the clean prefix read last
        time when `data` starts with exactly those bytes (their sha256) and what follows is
        whole lines: the same entries and message as a parse of the whole."""
        known, name = self._parsed, str(self.path)
        if known is not None and len(data) >= known.size:
            head = hashlib.sha256(memoryview(data)[:known.size])
            if head.digest() == known.digest:
                try:
                    tail = parse_ledger_bytes(data[known.size:], name)
                except LedgerError:
                    tail = None  # a damaged line: the whole parse names it
                if tail is not None and not (tail.truncated_bytes or tail.missing_newline):
                    entries = [*known.entries, *tail.entries]
                    head.update(memoryview(data)[known.size:])
                    self._parsed = _Parsed(len(data), head.digest(), tuple(entries))
                    return LedgerRead(entries, 0, f"ledger {name}: {len(entries)} entries")
        r = parse_ledger_bytes(data, name)
        if not (r.truncated_bytes or r.missing_newline):
            self._parsed = _Parsed(len(data), hashlib.sha256(data).digest(), tuple(r.entries))
        return r

    def recover(self, public_key: signing.PublicKey | None = None) -> LedgerRead:
        """read(); if the last line was cut, keep its bytes aside and rewrite the ledger without
        it; then book a pending spend (`pending_entry`, verified under `public_key`, the
        signer's: without it a pending line is refused, never appended unverified)."""
        with self._lock():
            return self._recover_locked(public_key)

    def _recover_locked(self, public_key: signing.PublicKey | None) -> LedgerRead:
        r = self.read()
        if r.truncated_bytes or r.missing_newline:
            data = self.path.read_bytes()
            if r.truncated_bytes:
                stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
                torn = self.path.with_name(f"{self.path.name}.torn-{stamp}")
                _write_atomic(torn, data[r.truncated_at:])
                keep = data[: r.truncated_at]
                r.message += f"; the lost bytes are kept in {torn}"
            else:
                keep = data + b"\n"
            _write_atomic(self.path, keep)
        self._book_pending(r, public_key)
        return r

    @property
    def pending_path(self) -> Path:
        return self._pending_path

    def pending_entry(self, entries: list[Entry],
                      public_key: signing.PublicKey | Mapping[str, signing.PublicKey] | None) -> Entry | None:
        """The interrupted spend in `<ledger>.pending` that `entries` (the ledger as read) lack,
        verified as an entry of this ledger: None if there is no pending line or the ledger
        holds it already (the write had completed). Read only: `recover` books it, `fedshield
        audit --site` counts it, both through here.

        The pending copy is written atomically and fsynced, so one that does not parse, whose
        hash does not cover it, that does not continue its site's chain (prev_hash, seq,
        run_seq, rounds, ε) or whose signature does not verify under `public_key` was damaged
        or planted afterwards: LedgerError (whether it was a spend cannot be told). It is
        checked whole BEFORE anything is appended: a forged line never reaches the ledger."""
        if not self.pending_path.is_file():
            return None
        line = self.pending_path.read_bytes()
        entry = _parse_line(line.strip())
        repair = "restore ledger.jsonl from a backup (docs/site-operator.md)"
        if entry is None or entry.get("hash") != entry_hash(entry) or _field_problem(entry):
            raise LedgerError(f"ledger {self.path}: {self.pending_path.name} (an interrupted spend) is damaged: "
                              f"it may have been released and cannot be counted; {repair}")
        if any(e.get("hash") == entry["hash"] for e in entries):
            return None
        site = str(entry.get("site"))
        mine = [e for e in entries if e.get("site") == site]
        if (mine[-1]["hash"] if mine else GENESIS) != entry.get("prev_hash"):
            raise LedgerError(f"ledger {self.path}: {self.pending_path.name} does not continue the ledger; {repair}")
        if isinstance(public_key, Mapping):  # an auditor's keys, by site
            public_key = public_key.get(site)
        if public_key is None:
            raise LedgerError(f"ledger {self.path}: {self.pending_path.name} (an interrupted spend) cannot be "
                              f"counted without site {site}'s public key to check its signature")
        # Its place in its site's chain (seq, run_seq, rounds, ε) and its signature. A problem
        # of an earlier entry is the books' own (`check_own` names it), not the pending line's.
        checked = verify_ledger([*mine, entry], {site: public_key})
        problems = [why for i, why in checked.problems if i == len(mine)]
        if problems:
            raise LedgerError(f"ledger {self.path}: {self.pending_path.name} (an interrupted spend) does not "
                              f"verify: {problems[0]}; it is not counted; {repair}")
        return entry

    def _book_pending(self, r: LedgerRead, public_key: signing.PublicKey | None) -> None:
        """A spend whose write was interrupted is counted: appended as it was signed, once
        `pending_entry` has verified it."""
        if not self.pending_path.is_file():
            return
        entry = self.pending_entry(r.entries, public_key)
        if entry is None:
            self.pending_path.unlink()  # the write had completed
            return
        line = self.pending_path.read_bytes()
        self._write_line(line if line.endswith(b"\n") else line + b"\n")
        r.entries.append(entry)
        r.recovered.append(entry)
        r.message += (f"; the interrupted spend of run {entry.get('run_id')} round {entry.get('round')} "
                      f"(seq {entry.get('seq')}) is counted as spent")
        self.pending_path.unlink()

    def history(self, site: str) -> list[Spend]:
        return site_history(self.read().entries, site)

    def _events_of(self, entries: list[Entry]) -> list[PrivacyEvent]:
        """event_of each entry, each entry's parsed once while this object holds it (the
        entries it hands out are never modified; the entry itself is kept, so an id is never
        another object's)."""
        events = []
        for e in entries:
            kept = self._events.get(id(e))
            if kept is None or kept[0] is not e:
                kept = (e, event_of(e))
                self._remember_event(e, kept[1])
            events.append(kept[1])
        return events

    # -- writing -----------------------------------------------------------------
    def append(self, fields: dict[str, Any], key: signing.PrivateKey) -> Entry:
        """Sign and append one spend; fsynced before this returns. Returns the entry as written."""
        entry = {k: v for k, v in fields.items() if k not in FILLED}
        # Without a mechanism: the one of its release (a count, a feature sum), else DP-SGD.
        entry.setdefault("mechanism", RELEASE_MECHANISM.get(str(entry.get("release")), Mechanism.DP_SGD).value)
        entry.setdefault("privacy_unit", MECHANISMS.get(str(entry["mechanism"]), PRIVACY_UNIT))
        # What is appended now is version 2 (privacy/events.py); version 1 is only read.
        if entry.setdefault(VERSION_FIELD, LEDGER_VERSION) != LEDGER_VERSION:
            raise LedgerError(f"ledger {self.path}: refusing to append a {VERSION_FIELD} "
                              f"{shown(entry[VERSION_FIELD])} entry: entries are written as version {LEDGER_VERSION}")
        missing = [k for k in ("run_id", "round", "site", "noise_multiplier", "sample_rate", "steps",
                               "max_grad_norm", "delta", "accountant") if k not in entry]
        if missing:
            raise LedgerError(f"ledger {self.path}: entry lacks {', '.join(missing)}")
        problem = _field_problem(entry, need_epsilon=False)
        if problem:
            raise LedgerError(f"ledger {self.path}: refusing to append: {problem}")
        site = entry["site"]
        fp = signing.fingerprint(key)
        with self._lock():
            r = self._recover_locked(key.public_key())
            mine = [e for e in r.entries if e.get("site") == site]
            last = mine[-1] if mine else None
            if last is not None:
                if last.get("key_fingerprint") != fp:
                    raise LedgerError(
                        f"ledger {self.path}: site {site}'s entries are signed by {last.get('key_fingerprint')}, "
                        f"not by this key ({fp}); one site keeps one key per ledger"
                    )
                if last.get("run_id") == entry["run_id"] and int(entry["round"]) < int(last["round"]):
                    raise LedgerError(
                        f"ledger {self.path}: site {site}: round {entry['round']} after round {last['round']} "
                        f"of run {entry['run_id']}"
                    )
            relation = neighbouring_of(entry)
            if last is not None and neighbouring_of(last) != relation:
                raise LedgerError(
                    f"ledger {self.path}: site {site}'s spends are accounted under {neighbouring_of(last)}; "
                    f"a spend under {relation} cannot join them (the two ε do not compose)"
                )
            kind = chain_kind(Mechanism(mechanism_of(entry)))
            if last is not None and chain_kind(Mechanism(mechanism_of(last))) != kind:
                raise LedgerError(
                    f"ledger {self.path}: site {site}'s spends are of mechanism {mechanism_of(last)}; a "
                    f"{mechanism_of(entry)} spend cannot join them (one chain, one accountant)")
            new_event = event_of(entry)
            totals = self._chain_totals(site, mine, new_event)
            if totals is None:  # a Skellam chain: its own bound
                eps = chain_epsilon([*mine, entry], float(entry["delta"]), [*self._events_of(mine), new_event])
            else:  # = chain_epsilon([*mine, entry], ...): the Gaussian accountant of this entry
                eps = epsilon(totals, float(entry["delta"]), entry["accountant"], new_event.relation.value)
            given = entry.get("epsilon")
            entry["epsilon"] = float(eps) if given is None else max(float(given), float(eps))
            entry["seq"] = int(last["seq"]) + 1 if last is not None else 0
            entry["run_seq"] = sum(1 for e in mine if e.get("run_id") == entry["run_id"])
            entry["prev_hash"] = last["hash"] if last is not None else GENESIS
            entry["time"] = entry_time(dt.datetime.now(dt.UTC))
            entry["key_fingerprint"] = fp
            entry["hash"] = entry_hash(entry)
            entry["signature"] = base64.b64encode(signing.sign_known(key, fp, entry["hash"].encode("ascii"))).decode()
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"
            # The pending copy is booked by `recover` if the line's write is cut. Within a group
            # commit (the batched engine, privacy/files.py) nothing is durable before the
            # group's barrier, the copy no more than the line, and nothing the spend pays for
            # runs or leaves before that barrier has made the line durable: a crash before it
            # can cut the line of a spend that released nothing; after it, the line is whole.
            pending = not in_group_commit()
            if pending:
                _write_atomic(self.pending_path, line.encode("ascii"))
            self._write_line(line.encode("ascii"))
            self._write_head(entry, key)
            if pending:
                self.pending_path.unlink()
            if totals is not None:
                self._totals[site] = (len(mine) + 1, entry["hash"], totals)
        # Its event as computed above: the fields added since (ε, seq, hashes, time, signature)
        # are not the event's (privacy/events.py `_event`).
        self._remember_event(entry, new_event)
        return entry

    def _chain_totals(self, site: str, mine: list[Entry], new_event: PrivacyEvent) -> SpendTotals | None:
        """The spends of `site`'s chain `mine` and the new one, grouped (None for a Skellam
        chain): from the totals of this object's last append for the site when `mine` still
        ends with that entry (its count and hash; the appends are serialised by the lock, and
        the site's books were verified whole before it spends), else counted afresh."""
        if new_event.mechanism is Mechanism.SKELLAM:
            return None
        kept = self._totals.get(site)
        if kept is not None and mine and kept[0] == len(mine) and kept[1] == mine[-1].get("hash"):
            totals = kept[2].copy()
        else:
            totals = SpendTotals(ev.spend() for ev in self._events_of(mine))
        totals.add(new_event.spend())
        return totals

    def event(self, entry: Entry) -> PrivacyEvent:
        """`event_of(entry)`, computed once while this object holds the entry (`_events_of`)."""
        return self._events_of([entry])[0]

    def _remember_event(self, entry: Entry, event: PrivacyEvent) -> None:
        if len(self._events) >= _EVENTS_KEPT:
            self._events.clear()
        self._events[id(entry)] = (entry, event)

    # -- the head record: what the chain alone cannot show ---------------------------
    # A chain shows an edited, removed or inserted entry, but not its last entries cut off.
    # After every append the signer also writes `<ledger>.head`: per site, the seq and hash
    # of its newest entry, signed with the same key. A ledger whose newest entry is older
    # than its head was truncated; a crash between the two writes leaves the ledger one
    # entry ahead of its head, which is fine (the head catches up at the next append).

    @property
    def head_path(self) -> Path:
        return self._head_path

    def _write_head(self, entry: Entry, key: signing.PrivateKey) -> None:
        heads = self._read_heads() if self.head_path.is_file() else {}
        mark = {"site": entry["site"], "seq": entry["seq"], "hash": entry["hash"]}
        signature = signing.sign_known(key, entry["key_fingerprint"], canonical(mark))
        mark["signature"] = base64.b64encode(signature).decode("ascii")
        heads[str(entry["site"])] = mark
        data = (json.dumps(heads, sort_keys=True) + "\n").encode("ascii")
        if write_by_exchange(self.head_path, data):  # within a group commit (privacy/files.py)
            _fsync_dir(self.path.parent)  # the exchange is durable at the group's barrier
        else:
            _write_atomic(self.head_path, data)

    def _read_heads(self) -> dict[str, Any]:
        try:
            heads = json.loads(self.head_path.read_bytes().decode("ascii"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise LedgerError(f"ledger {self.path}: its head record {self.head_path.name} is unreadable") from None
        if not isinstance(heads, dict):
            raise LedgerError(f"ledger {self.path}: its head record {self.head_path.name} is not a record")
        return heads

    def check_own(self, site: str, public_key: signing.PublicKey, entries: list[Entry] | None = None) -> None:
        """The site's own books, as the site must find them before it trains: its whole chain
        from seq 0, every hash and signature by its key, and not cut short of its head
        record. LedgerError (one line naming the entry, and what to do) otherwise."""
        entries = self.read().entries if entries is None else entries
        own = [e for e in entries if e.get("site") == site]
        repair = ("the site will not train on books that do not verify: restore ledger.jsonl and "
                  "ledger.jsonl.head from a backup (docs/site-operator.md)")
        if not own:
            if self.head_path.is_file() and site in self._read_heads():
                raise LedgerError(f"ledger {self.path}: empty, but its head record says site {site} has "
                                  f"entries up to seq {self._read_heads()[site].get('seq')}: truncated; {repair}")
            return
        if own[0].get("seq") != 0:
            raise LedgerError(f"ledger {self.path}: site {site}'s chain starts at seq {own[0].get('seq')}, "
                              f"not 0: its first entries are missing; {repair}")
        verified = self._verify_own(site, public_key, own)
        if not verified.ok:
            raise LedgerError(f"ledger {self.path}: {verified.reason}; {repair}")
        if not self.head_path.is_file():
            raise LedgerError(f"ledger {self.path}: its head record {self.head_path.name} is missing; {repair}")
        mark = self._read_heads().get(site)
        if not isinstance(mark, dict):
            raise LedgerError(f"ledger {self.path}: its head record has no entry for site {site}; {repair}")
        body = {k: mark.get(k) for k in ("site", "seq", "hash")}
        try:
            sig = base64.b64decode(str(mark.get("signature", "")), validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        if not sig or not signing.verify_known(public_key, signing.fingerprint(public_key), sig, canonical(body)):
            raise LedgerError(f"ledger {self.path}: its head record for site {site} is not signed by the "
                              f"site's key; {repair}")
        last = own[-1]
        if not isinstance(body["seq"], int) or last["seq"] < body["seq"]:
            raise LedgerError(f"ledger {self.path}: it ends at site {site}'s seq {last['seq']}, but the site "
                              f"signed entries up to seq {body['seq']}: its last entries were cut off; {repair}")
        if own[body["seq"]].get("hash") != body["hash"]:
            raise LedgerError(f"ledger {self.path}: site {site}'s entry seq {body['seq']} is not the one its head "
                              f"record signed; {repair}")

    def _verify_own(self, site: str, public_key: signing.PublicKey, own: list[Entry]) -> VerifyResult:
        """verify_ledger(own, {site: public_key}); only the entries past those it verified last
        time when `own` starts with those very entries (the same objects: the read cache hands
        them out only for the same bytes) and the key is the same: the same verdict."""
        fp, keys = signing.fingerprint(public_key), {site: public_key}
        known = self._verified.get(site)
        if known is not None and known.fingerprint == fp and len(own) >= len(known.entries) \
                and all(a is b for a, b in zip(own, known.entries, strict=False)):
            verified = verify_ledger(own[len(known.entries):], keys, known.state)
        else:
            verified = verify_ledger(own, keys)
        if verified.ok and verified.state is not None:
            self._verified[site] = _Verified(fp, tuple(own), verified.state)
        return verified

    def _write_line(self, data: bytes) -> None:
        created = False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:  # the first entry: the file (and its folder) made, the folder fsynced
            created = True
            fd = open_in_folder(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            write_fully(fd, data)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    def _lock(self) -> _FileLock:
        return _FileLock(self._lock_path)


class _FileLock:
    """An exclusive flock on a side file (the ledger itself is replaced by recover())."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _FileLock:
        self.fd = open_in_folder(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:  # exceptions propagate
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def parse_ledger_bytes(data: bytes, name: str) -> LedgerRead:
    """Entries of a ledger file's bytes; see `Ledger.read`."""
    cut = data.rfind(b"\n") + 1  # bytes [cut:] are after the last newline
    body, tail = data[:cut], data[cut:]
    entries: list[Entry] = []
    for n, raw in enumerate(body.split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        obj = _parse_line(raw)
        if obj is None:
            raise LedgerError(
                f"ledger {name}: line {n} is not a valid entry; a damaged line in the middle of a "
                "ledger cannot be recovered automatically (restore it from a copy)"
            )
        entries.append(obj)
    r = LedgerRead(entries, 0, f"ledger {name}: {len(entries)} entries")
    if tail:
        obj = _parse_line(tail)
        if obj is not None:  # a whole entry whose newline was not written
            entries.append(obj)
            r.missing_newline = True
            r.message = f"ledger {name}: {len(entries)} entries (the last one lacks its newline)"
        else:
            r.truncated_bytes = len(tail)
            r.truncated_at = cut
            r.message = (
                f"ledger {name}: last entry cut off at byte {cut} ({len(tail)} bytes); "
                f"recovered {len(entries)} entries"
            )
    return r


def _parse_line(raw: bytes) -> Entry | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def site_history(entries: list[Entry], site: str) -> list[Spend]:
    """The spends of `site` among `entries`, in order."""
    return [_spend(e) for e in entries if e.get("site") == site]


def skellam_spend(e: Entry) -> tuple[float, float, float]:
    """(total variance, l1, l2) of a Skellam entry."""
    noise = event_of(e).skellam
    if noise is None:
        where = f"ledger entry of site {e.get('site')!r} round {e.get('round')!r}"
        raise LedgerError(f"{where}: no {', '.join(SKELLAM_FIELDS)}")
    return (noise.variance, noise.l1, noise.l2)


def chain_epsilon(chain: list[Entry], delta: float, events: list[PrivacyEvent] | None = None) -> float:
    """ε at δ of one site's chain of spends (one kind of mechanism, one relation), from their
    events: the Skellam bound for a Skellam chain, else the Gaussian accountant of its last
    entry (DP-SGD, the count and the feature sum compose in it, each a Spend(σ, q, steps)).
    `events`: the chain's, `event_of` each entry, where the caller has them."""
    if not chain:
        return 0.0
    events = [event_of(e) for e in chain] if events is None else events
    if events[-1].mechanism is Mechanism.SKELLAM:
        return skellam_history_epsilon([(n.variance, n.l1, n.l2) for ev in events if (n := ev.skellam)], delta)
    return epsilon([ev.spend() for ev in events], delta, chain[-1]["accountant"], events[-1].relation.value)


def _spend(e: Entry) -> Spend:
    return event_of(e).spend()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_fully(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_field_problem = field_problem  # its old name


@dataclass
class VerifyResult:
    ok: bool
    first_bad_index: int | None = None
    reason: str = ""
    problems: list[tuple[int, str]] = field(default_factory=list)  # every problem found, in order
    checked: dict[str, int] = field(default_factory=dict)  # entries, hashes, links, signatures, sites
    signatures_checked: bool = False
    notes: list[str] = field(default_factory=list)  # not failures: partial histories, δ changes
    partial_sites: dict[str, int] = field(default_factory=dict)  # site -> seq of its first entry here
    state: ChainState | None = None  # where the chains stand after the entries checked (`verify_ledger`)


@dataclass
class ChainState:
    """What `verify_ledger` carries from one entry to the next: given the state after a
    prefix that verified, the entries that follow are checked as they would be in a check
    of the whole (the same problems, at the same indices). A caller that keeps it must pass
    it only with the very entries it was made from before the new ones, under the same keys
    (`Ledger.check_own`, privacy/ledger_check.py); the prefix's notes are not repeated."""

    entries: int = 0  # entries checked so far: the index of the next one
    last: dict[str, Entry] = field(default_factory=dict)  # site -> its last entry
    last_round: dict[tuple[str, str], int] = field(default_factory=dict)  # (run, site) -> its latest round
    run_seq: dict[tuple[str, str], int] = field(default_factory=dict)  # (run, site) -> its last run_seq

    def copy(self) -> ChainState:
        return ChainState(self.entries, dict(self.last), dict(self.last_round), dict(self.run_seq))


def _where(i: int, e: Entry) -> str:
    return f"entry {i} (round {e.get('round')!r}, site {e.get('site')!r})"


def verify_ledger(entries: list[Entry], public_keys: dict[str, signing.PublicKey] | None,
                  start: ChainState | None = None) -> VerifyResult:
    """Check the per-site hash chains, the signatures, rounds and cumulative ε.

    `public_keys`: site -> public key. With keys, every entry's signature must verify under
    its site's key (a site without a key is a failure). With None, signatures are NOT
    checked and the result says so (`signatures_checked` False): anyone can recompute
    hashes, so an unsigned check shows accidents, not tampering.

    `start`: the `VerifyResult.state` of a check of the entries that come before `entries`
    (which verified): only `entries` are checked, continuing those chains. Every reply and
    every round re-checked a site's whole chain; this checks what is new.
    """
    res = VerifyResult(ok=True, signatures_checked=public_keys is not None)
    counts = {"entries": len(entries), "hashes": 0, "links": 0, "signatures": 0, "sites": 0}
    state = start.copy() if start is not None else ChainState()
    offset = state.entries
    last, last_round, run_seq = state.last, state.last_round, state.run_seq
    fps: dict[str, str] = {}

    def bad(i: int, e: Entry, why: str) -> None:
        res.problems.append((i, f"{_where(i, e)}: {why}"))

    for i, e in enumerate(entries, start=offset):
        if not isinstance(e, dict):
            res.problems.append((i, f"entry {i}: not a JSON object"))
            continue
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            bad(i, e, f"missing field(s) {', '.join(missing)}")
            continue
        problem = _field_problem(e)
        if problem:
            bad(i, e, problem)
        broken = chain_problem(e)
        if broken:
            bad(i, e, broken)
            continue
        site = e["site"] if isinstance(e["site"], str) else repr(e["site"])
        rs_key = (str(e["run_id"]), site)
        want = run_seq.get(rs_key, -1) + 1
        if e["run_seq"] != want:
            bad(i, e, f"it is spend #{e['run_seq']} of run {e['run_id']} but spend #{want} was expected: "
                      "an entry of this run was removed, inserted or reordered")
        run_seq[rs_key] = e["run_seq"]
        # 1. the hash covers the contents
        if entry_hash(e) != e["hash"]:
            bad(i, e, "its hash does not match its contents (the entry was edited)")
        else:
            counts["hashes"] += 1
        # 2. the link to the same site's previous entry
        prev = last.get(site)
        if prev is None:
            if e["seq"] == 0:
                if e["prev_hash"] != GENESIS:
                    bad(i, e, "seq 0 but prev_hash is not the genesis hash")
                else:
                    counts["links"] += 1
            else:
                if e["prev_hash"] == GENESIS:
                    bad(i, e, f"seq {e['seq']} but prev_hash is the genesis hash")
                res.partial_sites[site] = e["seq"]
                res.notes.append(
                    f"site {site}: this ledger starts at its spend #{e['seq']} (seq {e['seq']}): "
                    f"{e['seq']} earlier spend(s) of this site are not here; the recorded ε includes them"
                )
        else:
            if e["prev_hash"] != prev["hash"]:
                bad(i, e, f"prev_hash does not link to site {site}'s previous entry (seq {prev['seq']}): "
                          "an entry was removed, inserted or reordered")
            elif e["seq"] != prev["seq"] + 1:
                bad(i, e, f"seq {e['seq']} follows seq {prev['seq']}")
            else:
                counts["links"] += 1
        # 3. the signature
        if public_keys is not None:
            key = public_keys.get(site)
            if key is None:
                bad(i, e, f"no public key for site {site}: its signature cannot be checked")
            else:
                fp = fps.setdefault(site, signing.fingerprint(key))
                if e["key_fingerprint"] != fp:
                    bad(i, e, f"signed with key {e['key_fingerprint']}, not site {site}'s key {fp}")
                else:
                    try:
                        sig = base64.b64decode(str(e["signature"]), validate=True)
                    except (binascii.Error, ValueError):
                        sig = b""
                    if sig and signing.verify_known(key, fp, sig, str(e["hash"]).encode("ascii", "replace")):
                        counts["signatures"] += 1
                    else:
                        bad(i, e, f"the signature does not verify under site {site}'s key")
        # 4. rounds move forward per (run, site); several spends may share a round
        rk = (str(e["run_id"]), site)
        if isinstance(e["round"], int) and rk in last_round and e["round"] < last_round[rk]:
            bad(i, e, f"round {e['round']} comes after round {last_round[rk]} of run {e['run_id']}: "
                      "rounds went backwards")
        if isinstance(e["round"], int):
            last_round[rk] = max(e["round"], last_round.get(rk, e["round"]))
        # 5. one neighbouring relation per chain; cumulative ε never decreases (same δ and accountant)
        if prev is not None and neighbouring_of(prev) != neighbouring_of(e):
            bad(i, e, f"accounted under {neighbouring_of(e)} after spends under {neighbouring_of(prev)}: "
                      "one site's ε is composed under one relation")
        if prev is not None and not problem and not field_problem(prev) and \
                chain_kind(Mechanism(mechanism_of(prev))) != chain_kind(Mechanism(mechanism_of(e))):
            bad(i, e, f"a {mechanism_of(e)} spend after {mechanism_of(prev)} spends: one chain, one accountant")
        now, before = as_float(e.get("epsilon")), as_float(prev.get("epsilon")) if prev is not None else None
        if prev is not None and now is not None and before is not None:
            if (e.get("delta"), e.get("accountant")) == (prev.get("delta"), prev.get("accountant")):
                if now < before:
                    bad(i, e, f"cumulative ε went down from {before:.6g} to {now:.6g}")
            else:
                res.notes.append(
                    f"site {site}: δ/accountant changed at entry {i} ({prev.get('delta')}/{prev.get('accountant')}"
                    f" -> {e.get('delta')}/{e.get('accountant')}); ε is not comparable across the change"
                )
        last[site] = e
    counts["sites"] = len(last)
    res.checked = counts
    state.entries = offset + len(entries)
    res.state = state
    if res.problems:
        res.ok = False
        res.first_bad_index, res.reason = res.problems[0]
    if public_keys is None:
        res.notes.append("signatures not checked (no site public keys given)")
    return res

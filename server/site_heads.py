"""The coordinator's record of each site's books: the newest entry of its ledger it holds.

    <output.dir>/site-heads.json     deployment: one file for every run of this coordinator
    <run>/privacy/site-heads.json    simulation: the virtual sites' books live in the run

    {"<site>": {"seq": 12, "hash": "<64 hex>", "key_fingerprint": "SHA256:..."}, ...}

Why. A site's chain and its signed head record (privacy/ledger.py) show an edited, removed
or cut-off entry, but not a whole older state of its books put back (a backup, a snapshot):
that state verifies, its ε is too low, and a site that trains on it under-counts (docs/
auditor.md, "rolled-back books"). The coordinator has every entry the site sent, verified
on arrival (privacy/ledger_check.py), so it knows a head the site's books must still
hold. It sends it in the plan of every instruction to that site once discovery has said
which node is which site (`protocol.with_books_head`); the site refuses (decline kind
`books`) when its books are behind it (client/site.py `SiteState.check_head`).

Only verified entries advance a head (`advance` is called where the run's ledger takes
them in: server/app.py `RoundLog.record`), never down. A head is kept with the ledger key
that signed it: a site that comes back with another key (a new identity, its old books
gone) gets no head, since none of its entries can be compared. A hostile coordinator can
send a false head: the site then declines, which is denial of service, not a spend.

HELLO, where a site may release its record count, goes before the node has said which site
it is. In deployment the enrolment registry binds each connection key to a site name
(deploy/enrolment.py), so the coordinator knows it from the node's key and the HELLO carries
that name's head too (`latest`: the ledger key is not known yet, so the newest head held for
the name whatever key signed it; a site that truly started new books under a new key is
refused until the operator removes its line: over-refuse, never under-count). The limit: a
simulation, or a deployment with hand-collected keys whose names are not enrolled, sends its
HELLO without a head; a site whose books were put back to a state older than its record
count's release can then release that count again at that HELLO (add-remove: one Gaussian
count, once per such restore) before its first TRAIN or FEATURE_SUM is refused. A site that
keeps a witness of its head (`fedshield client --ledger-witness`) refuses at HELLO always.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedshield.privacy.errors import FedShieldError
from fedshield.protocol import MAX_SEQ, SHA256_HEX, BooksHead

FILE = "site-heads.json"


class SiteHeads:
    """Per-site books heads kept in one JSON file (rewritten atomically on every change).

    Parameters
    ----------
    path : Path
        The file; missing means no head is known yet.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.heads: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FedShieldError(f"{self.path}: the sites' books heads are unreadable ({exc}); fix or remove "
                                 "the file (the sites then are not checked against the heads it held)") from None
        if not isinstance(data, dict):
            raise FedShieldError(f"{self.path}: the sites' books heads are not a JSON object")
        return {str(k): v for k, v in data.items() if _valid(v)}

    def get(self, site: str, key_fingerprint: str) -> BooksHead | None:
        """The head held for `site`'s books signed by `key_fingerprint`, or None."""
        mark = self.heads.get(site)
        if mark is None or mark.get("key_fingerprint") != key_fingerprint:
            return None
        return BooksHead(int(mark["seq"]), str(mark["hash"]))

    def latest(self, site: str) -> BooksHead | None:
        """The newest head held for `site`, whatever ledger key signed it (at HELLO, before the
        site has presented its ledger key), or None."""
        mark = self.heads.get(site)
        return None if mark is None else BooksHead(int(mark["seq"]), str(mark["hash"]))

    def advance(self, site: str, entries: Iterable[dict[str, Any]]) -> None:
        """Take in `site`'s verified entries: its head moves to the newest (never back)."""
        self.advance_all([(site, entries)])

    def advance_all(self, spent: Iterable[tuple[str, Iterable[dict[str, Any]]]]) -> None:
        """Take in the verified entries of many sites (a round's replies): each head moves to
        its site's newest, and the file is written once, not once per site (it holds every
        site's head: a write per site made a round cost sites x sites)."""
        changed = False
        for site, entries in spent:
            changed = self._take(site, entries) or changed
        if changed:
            self._write()

    def _take(self, site: str, entries: Iterable[dict[str, Any]]) -> bool:
        mark = self.heads.get(site)
        changed = False
        for e in entries:
            new = {"seq": e.get("seq"), "hash": e.get("hash"), "key_fingerprint": e.get("key_fingerprint")}
            if not _valid(new):
                continue
            same_key = mark is not None and mark.get("key_fingerprint") == new["key_fingerprint"]
            if mark is None or not same_key or int(str(new["seq"])) > int(str(mark["seq"])):  # _valid: ints
                mark, changed = new, True
        if changed and mark is not None:
            self.heads[site] = mark
        return changed

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.heads, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _valid(mark: object) -> bool:
    if not isinstance(mark, dict):
        return False
    seq, digest, fp = mark.get("seq"), mark.get("hash"), mark.get("key_fingerprint")
    return (isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < MAX_SEQ
            and isinstance(digest, str) and bool(SHA256_HEX.match(digest)) and isinstance(fp, str))

"""The coordinator's enrolment registry: which site name goes with which connection key, and
which keys are revoked (the deny-list).

Why names are bound to connection keys, and how (issue 20 item 7, issue 21 item 8): a site
names itself in its HELLO, and before this registry the first claim of a name in node-id
order won, so a registered site with a key of its own could take an honest site's name about
half the time. What Flower 1.41 gives the ServerApp (read from its source): with
`--enable-supernode-auth` a node id is created by `flwr supernode register KEY.pub` for that
one public key (`LinkState.create_node`), and every Fleet request of the node is signed with
that key and refused unless the key maps to the node id it claims
(flwr/superlink/routers/fleet/node_auth.py `authenticate_node`). The ServerApp's
`Grid.get_nodes()` returns each node's `NodeInfo`, `public_key` included (the PEM
SubjectPublicKeyInfo it was registered with). So the coordinator can learn, for each node id,
the key that node authenticated with, and no challenge of its own is needed: the HELLO of
node N is accepted under name X only if N's registered key is the key enrolled for X
(`Enrolment.check`). An impostor with a valid key of its own is refused every time, whatever
its node id. One gap remains in Flower 1.41: the Fleet API authenticates the node that pushes
a reply but does not compare it with the reply's `src_node_id` (a reply only has to answer an
instruction addressed to that node, found by its message id, a hash of the instruction). So
the HELLO is also signed with the connection key over (run id, node id, name)
(`protocol.connection_statement`, `proves`): only the holder of the enrolled key can answer
a HELLO as that site.

The registry is one JSON file, `<pki>/enrolment.json`, written by `fedshield certs sign` and
`fedshield certs revoke` (deploy/pki.py) and only replaced whole (a temporary file, fsync,
rename), so a reader never sees half of it:

    {"version": 1,
     "sites":   {NAME: {"key": "SHA256:<hex>", "public_key": "ecdsa-sha2-nistp384 AAAA... NAME",
                        "certificate": "SHA256:<hex>", "not_after": ISO-8601, "enrolled_at": ISO-8601}},
     "revoked": [{"key": "SHA256:<hex>", "site": NAME or null, "at": ISO-8601, "reason": TEXT}]}

`key` is `privacy.signing.fingerprint` (SHA-256 of the DER SubjectPublicKeyInfo), the one
format fedshield prints. A key is enrolled under at most one name, a name has at most one
key, and a revoked key never comes back (revocations are only appended).

Revocation without a restart: the ServerApp checks the deny-list at every HELLO and before
every round, and the TLS front before forwarding each request (it sees the key in Flower's
`flwr-public-key` header), both through `LiveEnrolment`, which re-reads the file when it
changes. A reader keeps every revocation it has seen for as long as it runs, so rolling the
file back to an older copy cannot un-revoke a key in a running coordinator.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.files import write_fully
from fedshield.privacy.signing import fingerprint, verify

REGISTRY = "enrolment.json"  # in the coordinator's PKI folder
VERSION = 1
PUBLIC_KEY_HEADER = b"flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER
PASS_TO_SUPERLINK = ("/v1/fleet/register-node", "/v1/fleet/activate-node")  # LiveEnrolment.refuses
MAX_REGISTRY_BYTES = 64 * 1024 * 1024  # ~200,000 sites: a bigger file is not ours


class EnrolmentError(FedShieldError):
    """The enrolment registry is unreadable, or a change to it is refused."""


@dataclass(frozen=True)
class Enrolled:
    """One enrolled site: its name, connection key and certificate."""

    name: str
    key: str  # fingerprint of the connection public key
    public_key: str  # its OpenSSH line (what `flwr supernode register` reads)
    certificate: str = ""  # fingerprint of the certificate `certs sign` issued ("" for a hand-collected key)
    not_after: str = ""  # the certificate's end of validity, ISO-8601 ("" : none)
    enrolled_at: str = ""

    def expired(self, now: dt.datetime | None = None) -> bool:
        if not self.not_after:
            return False
        return (now or dt.datetime.now(dt.UTC)) > dt.datetime.fromisoformat(self.not_after)


@dataclass
class Enrolment:
    """The registry in memory: sites by name, revoked key fingerprints with their records."""

    sites: dict[str, Enrolled] = field(default_factory=dict)
    revoked: dict[str, dict[str, Any]] = field(default_factory=dict)  # key fingerprint -> record

    # ------------------------------------------------------------ questions

    def name_of(self, key: str) -> str | None:
        """The site name enrolled with key fingerprint `key`, or None."""
        for s in self.sites.values():
            if s.key == key:
                return s.name
        return None

    def check(self, name: str, key: str | None, now: dt.datetime | None = None) -> str | None:
        """Why node with connection key fingerprint `key` may not be site `name` (None: it may).

        The one rule of the name binding: the key is known, not revoked, enrolled, enrolled
        under exactly this name, and its certificate (if it has one) has not expired.
        """
        if key is None:
            return "the coordinator cannot tell which connection key its node authenticated with"
        if key in self.revoked:
            return f"its connection key {key} was revoked"
        owner = self.name_of(key)
        if owner is None:
            return f"its connection key {key} is not enrolled"
        if owner != name:
            return (f"it calls itself {name!r} but its connection key {key} is enrolled as {owner!r} "
                    "(a site's name is bound to its enrolled key)")
        site = self.sites[owner]
        if site.expired(now):
            return (f"its enrolment certificate expired on {site.not_after[:10]}; "
                    f"renew it with `fedshield certs sign {name}.csr`")
        return None

    # ------------------------------------------------------------ changes (deploy/pki.py)

    def revoke(self, key: str, site: str | None, reason: str, now: dt.datetime | None = None) -> None:
        """Deny `key` from now on; a site enrolled with it is no longer enrolled."""
        if key not in self.revoked:
            at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
            self.revoked[key] = {"key": key, "site": site, "at": at, "reason": reason}
        for name in [n for n, s in self.sites.items() if s.key == key]:
            del self.sites[name]

    # ------------------------------------------------------------ file

    def to_json(self) -> bytes:
        data = {"version": VERSION,
                "sites": {n: vars(s) | {"name": n} for n, s in sorted(self.sites.items())},
                "revoked": list(self.revoked.values())}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def load_enrolment(path: Path | str) -> Enrolment:
    """The registry at `path` (a missing file: an empty registry), or one EnrolmentError."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_REGISTRY_BYTES + 1)
    except FileNotFoundError:
        return Enrolment()
    except OSError as exc:
        raise EnrolmentError(f"enrolment registry {p}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_REGISTRY_BYTES:
        raise EnrolmentError(f"enrolment registry {p}: over {MAX_REGISTRY_BYTES // 2**20} MiB; not a registry")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"not version {VERSION}")
        sites = {}
        for name, s in dict(data.get("sites", {})).items():
            rec = Enrolled(**{k: str(s[k]) for k in ("name", "key", "public_key", "certificate", "not_after",
                                                      "enrolled_at") if k in s})
            if rec.name != name or not rec.key.startswith("SHA256:"):
                raise ValueError(f"site {name!r}: inconsistent record")
            if rec.not_after:
                dt.datetime.fromisoformat(rec.not_after)
            sites[name] = rec
        revoked = {}
        for r in list(data.get("revoked", [])):
            if not isinstance(r, dict) or not str(r.get("key", "")).startswith("SHA256:"):
                raise ValueError("a revocation without a key fingerprint")
            revoked[str(r["key"])] = dict(r)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EnrolmentError(f"enrolment registry {p}: not a fedshield registry ({exc})") from None
    return Enrolment(sites, revoked)


def save_enrolment(path: Path | str, enrolment: Enrolment) -> None:
    """Replace the registry at `path` whole (temporary file, fsync, rename, fsync the folder)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            write_fully(fd, enrolment.to_json())
        finally:
            os.close(fd)
        os.replace(tmp, p)
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EnrolmentError(f"enrolment registry {p}: cannot write: {exc.strerror}") from None


# ------------------------------------------------------------------ keys as Flower carries them


def flower_key_fingerprint(public_key: bytes | str | None) -> str | None:
    """The fingerprint of a key as Flower carries it (PEM SubjectPublicKeyInfo: `NodeInfo.public_key`;
    base64 of it: the `flwr-public-key` header), or None if it is not an EC public key."""
    if not public_key:
        return None
    data = public_key.encode() if isinstance(public_key, str) else bytes(public_key)
    if not data.lstrip().startswith(b"-----"):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else None


def proves(flower_public_key: bytes | str | None, proof: bytes, statement: bytes) -> bool:
    """Whether `proof` is `statement` signed (ECDSA, SHA-256: `privacy.signing`) by the key
    Flower carries as `flower_public_key` (the node's registered connection key)."""
    if not proof or not flower_public_key:
        return False
    data = flower_public_key.encode() if isinstance(flower_public_key, str) else bytes(flower_public_key)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and verify(key, proof, statement)


# ------------------------------------------------------------------ a running coordinator's view


class LiveEnrolment:
    """The registry as a running coordinator sees it: re-read when the file changes (its
    size, mtime or inode), and every revocation ever seen kept (a rolled-back file cannot
    un-revoke a key). A file that cannot be read keeps the last good view: `problem` says
    why, once per change. Thread-safe (the front calls it from its event loop's thread).

    `bindings`: where names and keys come from (None: the registry at `path`, i.e. enrolment by
    `fedshield certs sign`; else a fixed `Enrolment`, e.g. built from hand-collected keys).
    """

    def __init__(self, path: Path | str | None, bindings: Enrolment | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.fixed = bindings
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._view = Enrolment(dict(bindings.sites) if bindings else {}, dict(bindings.revoked) if bindings else {})
        self._ever_revoked: dict[str, dict[str, Any]] = dict(self._view.revoked)
        self._header_cache: dict[bytes, str | None] = {}
        self.problem: str | None = None

    def current(self) -> Enrolment:
        """The view now (re-read if the file changed)."""
        with self._lock:
            if self.path is None:
                return self._view
            try:
                st = os.stat(self.path)
                stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError:
                stamp = (-1, -1, -1)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    read = load_enrolment(self.path)
                except EnrolmentError as exc:
                    self.problem = f"{exc}; keeping the registry as last read"
                    return self._view
                self.problem = None
                self._ever_revoked.update(read.revoked)
                sites = dict(self.fixed.sites) if self.fixed is not None else read.sites
                self._view = Enrolment({n: s for n, s in sites.items() if s.key not in self._ever_revoked},
                                       dict(self._ever_revoked))
            return self._view

    def take_problem(self) -> str | None:
        """Why the file could not be read at its last change (once: cleared when taken)."""
        with self._lock:
            problem, self.problem = self.problem, None
        return problem

    def check(self, name: str, flower_public_key: bytes | str | None) -> str | None:
        """`Enrolment.check` for a node whose key is `flower_public_key` (`NodeInfo.public_key`)."""
        return self.current().check(name, flower_key_fingerprint(flower_public_key))

    def revoked(self, key: str | None) -> bool:
        return key is not None and key in self.current().revoked

    def name_of(self, flower_public_key: bytes | str | None) -> str | None:
        """The site name enrolled for a node whose key is `flower_public_key`, or None: known
        before the node says who it is, so its HELLO can carry what the coordinator holds of
        that site's books (server/site_heads.py)."""
        fp = flower_key_fingerprint(flower_public_key)
        return next((name for name, s in self.current().sites.items() if fp is not None and s.key == fp), None)

    def refuses(self, path: str, headers: list[tuple[bytes, bytes]]) -> str | None:
        """For the TLS front: why a Fleet request (raw `path`) whose headers carry a revoked key
        must not pass. Activation passes: a key revoked before the job started is not
        registered, and the SuperLink's own answer to it ("[code: 2004] Failed to activate
        SuperNode") is what `fedshield client` turns into its one-line refusal; every other
        request of a revoked key (one revoked mid-run, still registered) is refused here."""
        if path in PASS_TO_SUPERLINK:
            return None
        value = next((v for k, v in headers if k.lower() == PUBLIC_KEY_HEADER), None)
        if value is None:
            return None  # the SuperLink refuses an unsigned Fleet request itself
        with self._lock:
            key = self._header_cache.get(value, "?")
        if key == "?":
            key = flower_key_fingerprint(value)
            with self._lock:
                if len(self._header_cache) > 100_000:  # bounded: an attacker can send any header
                    self._header_cache.clear()
                self._header_cache[value] = key
        return f"connection key {key} is revoked" if self.revoked(key) else None

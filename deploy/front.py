"""The coordinator's public boundary: a TLS front that forwards only Flower Fleet API requests.

Why it exists (flwr 1.41, read from its source): one uvicorn port of `flower-superlink`
serves the Fleet API (`/v1/fleet/*`, the sites), the Control API (`/v1/control/*`: start
runs, register nodes, pull artifacts) and the Runtime API (`/v1/runtime/*`: the ServerApp's
messages), and the open-source build does not authenticate Control API callers (NoOp
plugin). Publishing that port would let any site, or anyone who reaches it, submit runs or
register keys. So `fedshield server` binds the SuperLink to loopback and publishes only
this front. It is not a transport: requests, SuperNode signatures (`flwr-public-key`,
`flwr-signature`, `flwr-timestamp` headers) and replies are Flower's own and are checked by
the SuperLink; the front only decides what may pass, and bounds what one client can make
the coordinator hold.

What passes, and nothing else:
- method POST (every Fleet RPC in 1.41 is a unary POST);
- a raw request path (the bytes on the wire, ASGI `raw_path`, never the decoded path) that
  is exactly `/v1/fleet` followed by one or more `/segment`s of `[A-Za-z0-9_-]`: no empty
  segment (no `//`, no trailing `/`), no dot segment, no percent-encoding, nothing outside
  ASCII, so that no normalisation downstream can turn an allowed path into a Control or
  Runtime API one;
- no query string;
- a Content-Length (Flower's client, httpx with a bytes body, always sends one; 411 without
  it, 400 for a malformed or repeated one or a Transfer-Encoding) of at most the body limit
  (413 above it, answered before a byte of the body is read).
Anything else gets 403 and never reaches the SuperLink. A SuperLink that cannot be reached,
or does not answer in time, gives 503. Every refusal closes the connection (the unread body
of a refused request is never read).

Authentication first, then the whole body, then the SuperLink (issue 21 item 3). A front
that streamed each body on as it arrived gave every upload one of its SuperLink connections
for as long as the body took: 80 slow uploads held all 64 for up to `body_timeout_s`, and
honest sites got 503 for minutes (measured, bench/RESULTS.md). So, in this order:
1. with the admitted connection keys (`authorized_keys`, what `fedshield server` registers),
   the request head must carry Flower's SuperNode authentication (`node_auth_error`: one
   `flwr-public-key` that is admitted, a `flwr-timestamp` within Flower's window, a valid
   `flwr-signature` of it: the SuperLink's own check, flwr/superlink/routers/fleet/
   node_auth.py), else 401 before a byte of the body is read: unauthenticated bodies
   never reach the SuperLink, whole or in part (the SuperLink checks again, and the node id).
   One exception keeps Flower's own answer for a site whose key was not registered ("[code:
   2004] Failed to activate SuperNode", which `fedshield client` explains): a request
   validly signed by a key that is not admitted passes when its body is at most
   `unadmitted_body_bytes` (64 KiB: node registration and activation are bytes); a larger
   one gets 401 unread;
2. the body is read whole, under the body limits below, into a `_Spool`: memory up to
   `memory_body_bytes` (256 KiB: every request but an array chunk), beyond that an unlinked
   temporary file (`spool_dir`: the coordinator's private Flower folder), so that what the
   front holds in memory is bounded and given back when the request ends;
3. only then does it take one of the `upstream_connections` and send the body on, with
   the client's Content-Length; the reply comes back streamed, with the SuperLink's.
A Fleet request is at most `max_body_bytes`, so holding it whole costs a few MiB of disk at
most, and a retry, not a SuperLink connection, is what a slow client delays.

Forwarding is byte for byte: the body as received; the request headers in their order and
spelling, less the hop-by-hop ones (RFC 9110 7.6.1: Connection and the headers it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*), Host and Expect (the new hop
sets its own Host; the front answers `100-continue` itself); and back, the SuperLink's
status, headers (less the same) and undecoded body (its Content-Encoding stays with it).

The body limit (`MAX_BODY_BYTES`, derived, below; `fedshield server --max-body-mb`). The
largest legitimate request is not the largest update: Flower 1.41 sends a message as
objects, one object per `push-object` request, and splits every array into chunks of at
most `FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE` bytes (5 MiB; flwr/app/message/array.py
`slice_array`, flwr/supernode/fleet_http_connection.py `push_object`). A full
all-MiniLM-L6-v2 update (90.9 MB) thus travels as ~20 requests of at most 5 MiB each. The
other objects a fedshield site sends are small (record headers, a round's signed ledger
entries: kilobytes), and `push-messages` carries the message without its content plus the
object tree (tens of KB for 200 tensors). So the limit is Flower's chunk size plus a 1 MiB
margin for protobuf framing and those objects: 6 MiB. A coordinator whose sites change
`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE` must raise it to match.

What one client can hold (`FrontLimits`; hand-written here only what uvicorn 0.49 lacks):
- TLS handshake: `handshake_timeout_s` (asyncio's default is 60 s; uvicorn does not expose
  it, so the event loop's `create_server` is given it);
- the request head (line and headers): at most `max_header_bytes` (h11's
  `max_incomplete_event_size`, uvicorn `h11_max_incomplete_event_size`; 400 beyond) and
  complete within `header_timeout_s` of the connection (or of the previous reply): uvicorn
  has only an idle keep-alive timer, which any byte resets, so a client sending its head a
  byte at a time would hold a connection for ever; here it gets 408 and is closed;
- idle keep-alive: `keep_alive_s` (uvicorn `timeout_keep_alive`);
- the body: no byte for `body_idle_timeout_s`, not complete within `body_timeout_s`, or,
  after `body_grace_s` (10 s), slower on average than `min_body_bytes_per_s` (16 KiB/s: a
  6 MiB chunk in 6.5 min at worst): 408 (written by the front; uvicorn has no body timeout);
- uploads: at most `max_uploads_per_address` (8: a SuperNode has up to ~4 requests in
  flight, so two sites behind one NAT address are never refused) bodies being read at once
  from one source address, and `max_buffered_bytes` (512 MiB of Content-Lengths) being
  read or forwarded in all; 503 beyond (Flower retries it), before the body is read;
- the reply: a client that does not read it for `send_timeout_s` is disconnected;
- connections: at most `max_per_address` at once from one source address (503 and closed
  beyond: uvicorn has no per-address cap) and `max_connections` in total (uvicorn
  `limit_concurrency`: 503 beyond); `backlog` (uvicorn) unaccepted ones;
- the SuperLink: at most `upstream_connections` requests in flight to it (httpx pool),
  each with its whole body in hand; a request that waits for one longer than
  `upstream_pool_timeout_s` gets 503 (Flower retries 503).

Access log (`AccessLog`): one line per request, and per connection refused or timed out,
never a traceback: ISO time (UTC), source address:port, method, path (escaped, cut at 120
characters), status, bytes in and out, duration, and a note when the request did not end
normally (e.g. `client disconnected after 300000 of 10000000 bytes`, status 499).
uvicorn's own messages for a connection ("Invalid HTTP request received.", "Exceeded
concurrency limit.") and the event loop's errors go there too, one line each.

The ASGI app (`fleet_app`) is separate from the server that runs it (`FleetFront`: uvicorn
with the coordinator's certificate, in a thread of `fedshield server`), so that the
allow-list and the body handling are tested in-process with an in-memory client
(tests/test_front.py); the connection limits are tested over loopback sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import logging.handlers
import re
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import h11
import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedshield.privacy.errors import FedShieldError

# Used with fullmatch (a `$` would also match before a trailing newline).
FLEET_PATH = re.compile(r"/v1/fleet(/[A-Za-z0-9_-]+)+")

MIB = 1024 * 1024
FLOWER_CHUNK_BYTES = 5 * MIB  # flwr 1.41 FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE default (checked in tests)
BODY_MARGIN_BYTES = 1 * MIB
MAX_BODY_BYTES = FLOWER_CHUNK_BYTES + BODY_MARGIN_BYTES

HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"host", b"content-length", b"expect",
})

REFUSED = "fedshield coordinator: only the Flower Fleet API is served here\n"
UNAVAILABLE = "fedshield coordinator: SuperLink unavailable\n"
REVOKED = "fedshield coordinator: this connection key is revoked\n"
CLIENT_GONE = 499  # the nginx convention: the client closed the connection before the reply
NOT_ADMITTED = "a SuperNode key that is not admitted"


def max_body_bytes(chunk_bytes: int | None = None) -> int:
    """The derived body limit: Flower's array chunk size (as this process's flwr reads it,
    or `chunk_bytes`) plus `BODY_MARGIN_BYTES` (see the module docstring)."""
    if chunk_bytes is None:
        from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

        chunk_bytes = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    return int(chunk_bytes) + BODY_MARGIN_BYTES


@dataclasses.dataclass(frozen=True)
class FrontLimits:
    """What one client may make the front hold, and for how long (module docstring)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_connections: int = 256
    max_per_address: int = 16
    handshake_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    body_idle_timeout_s: float = 30.0
    body_timeout_s: float = 300.0
    send_timeout_s: float = 60.0
    max_header_bytes: int = 16 * 1024
    backlog: int = 256
    upstream_connections: int = 64
    upstream_timeout_s: float = 600.0
    upstream_pool_timeout_s: float = 30.0
    body_grace_s: float = 10.0
    min_body_bytes_per_s: int = 16 * 1024
    max_uploads_per_address: int = 8
    max_buffered_bytes: int = 512 * MIB
    memory_body_bytes: int = 256 * 1024
    unadmitted_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{f.name}={value!r}: must be a positive number")
        for name in ("max_body_bytes", "max_connections", "max_per_address", "keep_alive_s",
                     "max_header_bytes", "backlog", "upstream_connections", "min_body_bytes_per_s",
                     "max_uploads_per_address", "max_buffered_bytes", "memory_body_bytes",
                     "unadmitted_body_bytes"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive int")


# ------------------------------------------------------------------ access log


def escape_for_log(text: str, limit: int = 120) -> str:
    """Printable ASCII as is; anything else (controls, spaces, quotes, backslash, non-ASCII)
    as \\xNN; cut at `limit` characters."""
    out = "".join(c if 0x21 <= ord(c) < 0x7F and c not in '"\\' else f"\\x{ord(c):02x}" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _address(client: Any) -> str:
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class AccessLog:
    """One line per request or refused connection; to a file (rotated at 64 MiB, 3 kept)
    and the last `keep` lines in memory (`lines`, for tests and diagnostics)."""

    _count = 0

    def __init__(self, path: Path | None = None, keep: int = 1000):
        self.path = path
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        AccessLog._count += 1
        self._logger = logging.getLogger(f"fedshield.front.access.{AccessLog._count}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=64 * MIB, backupCount=3,
                                                                 encoding="ascii", errors="backslashreplace")
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(self._handler)

    def write(self, client: Any, method: str, path: str, status: int | str, bytes_in: int, bytes_out: int,
              seconds: float, note: str = "") -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = (f"{now} {_address(client)} {escape_for_log(method, 16) or '-'} {escape_for_log(path) or '-'} {status} "
                f"in={bytes_in} out={bytes_out} {seconds:.3f}s")
        if note:
            line += f' note="{escape_for_log(note, 300)}"'
        self._logger.info(line)  # the file first: `lines` never shows a line the file lacks
        self.lines.append(line)

    def event(self, client: Any, status: int | str, note: str) -> None:
        """A connection-level event (no request line): refused, timed out, uvicorn's message."""
        self.write(client, "-", "-", status, 0, 0, 0.0, note)

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()


class _ConnectionLogger:
    """Stands in for uvicorn's "uvicorn.error" logger on one connection: its messages become
    access-log events with the client's address, one line each, never a traceback."""

    level = logging.WARNING

    def __init__(self, access: AccessLog, protocol: H11Protocol):
        # A weak reference: protocol -> logger -> protocol was a reference cycle that kept
        # every closed connection (its transport, TLS and request buffers) alive until a
        # full garbage collection, which a front under load rarely reaches: 48 refused
        # 6 MiB uploads left +33 MB per wave (bench/RESULTS.md, "slow uploads").
        self.access, self._protocol = access, weakref.ref(protocol)

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if level < self.level:
            return
        text = str(msg) % args if args else str(msg)
        text = " ".join(text.split())
        if isinstance(exc_info, BaseException):
            text += f" {type(exc_info).__name__}: {exc_info}"
        status = 503 if "concurrency limit" in text else 400 if "Invalid HTTP" in text else "-"
        protocol = self._protocol()
        self.access.event(protocol.client if protocol is not None else None, status, text)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.INFO, msg, *args, **kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kw)

    exception = error
    critical = error


# ------------------------------------------------------------------ the app

# ASGI (asgi.readthedocs.io): a scope and each message are dicts whose keys depend on their
# "type"; the app reads the few it needs and checks the type of those a client controls.
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def fleet_path(scope: Scope) -> str | None:
    """The request's raw path if it may be forwarded (see the module docstring), else None."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes) or scope.get("query_string"):
        return None  # no raw path (an ASGI server may omit it): refuse rather than trust the decoded one
    try:
        path = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return path if FLEET_PATH.fullmatch(path) else None


def end_to_end_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`raw` less the hop-by-hop headers, Host, Content-Length and Expect, order and bytes kept."""
    named = {t.strip().lower() for k, v in raw if k.lower() == b"connection" for t in v.split(b",")}
    return [(k, v) for k, v in raw if k.lower() not in HOP_HEADERS and k.lower() not in named]


class _Refused(Exception):
    """The request ends with the front's own answer (`status`, one line) or, for 499, none."""

    def __init__(self, status: int, text: str, note: str = ""):
        super().__init__(text)
        self.status, self.text, self.note = status, text, note or text


@dataclasses.dataclass
class _Exchange:
    status: int | str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    note: str = ""


def _content_length(headers: list[tuple[bytes, bytes]], limit: int) -> int:
    declared = [v for k, v in headers if k.lower() == b"content-length"]
    if any(k.lower() == b"transfer-encoding" for k, _ in headers):
        raise _Refused(400, "fedshield coordinator: Transfer-Encoding is not accepted; send a Content-Length\n")
    if not declared:
        raise _Refused(411, "fedshield coordinator: a Content-Length is required\n")
    if len(set(declared)) != 1 or not declared[0].isdigit():
        raise _Refused(400, "fedshield coordinator: malformed Content-Length\n")
    length = int(declared[0])
    if length > limit:
        raise _Refused(413, f"fedshield coordinator: request body over the limit of {limit} bytes\n",
                       f"Content-Length {length} over the limit of {limit}")
    return length


class _Spool:
    """A request body while it arrives: in memory up to `memory_bytes`, beyond that in an
    unlinked temporary file in `folder` (so that what the front holds in memory is bounded
    whatever the bodies, and is given back when the request ends); `pieces()` reads it back
    in 64 KiB pieces for the SuperLink."""

    PIECE = 64 * 1024

    def __init__(self, memory_bytes: int, folder: Path | None):
        self.memory_bytes, self.folder = memory_bytes, folder
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: Any = None

    def write(self, chunk: bytes) -> None:
        if self.file is None and self.size + len(chunk) > self.memory_bytes:
            self.file = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115 - closed in __aexit__
            for c in self.chunks:
                self.file.write(c)
            self.chunks = []
        if self.file is not None:
            self.file.write(chunk)
        else:
            self.chunks.append(chunk)
        self.size += len(chunk)

    async def pieces(self) -> AsyncIterator[bytes]:
        if self.file is None:
            for c in self.chunks:
                yield c
            return
        self.file.seek(0)
        while piece := self.file.read(self.PIECE):
            yield piece

    async def __aenter__(self) -> _Spool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.chunks = []
        if self.file is not None:
            self.file.close()
            self.file = None


def node_key_bytes(key: Any) -> bytes:
    """A SuperNode's public key as Flower sends it in `flwr-public-key` (base64 of these
    bytes) and keys its node registry by (PEM SubjectPublicKeyInfo, flwr's
    `public_key_to_bytes`)."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return public_key_to_bytes(key)


def node_auth_error(headers: list[tuple[bytes, bytes]], keys: Collection[bytes],
                    wall_clock: Callable[[], dt.datetime] | None = None) -> str | None:
    """Why a request's SuperNode authentication headers fail, or None if they pass.

    The check the SuperLink makes (flwr 1.41 `superlink/routers/fleet/node_auth.py`
    `authenticate_node`: one `flwr-public-key`, a `flwr-timestamp` within Flower's window,
    a `flwr-signature` of that timestamp by that key), made here on the request head, plus
    what only the coordinator knows up front: the key is one of the admitted connection keys
    (`keys`, `node_key_bytes` form; `NOT_ADMITTED` when it is not, checked last, after the
    signature). The SuperLink still checks all of it, and the node id; this only stops a
    request that it would refuse before its body is read.
    """
    import base64
    import binascii

    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

    named = {n.encode(): [v for k, v in headers if k.lower() == n.encode()]
             for n in (FLEET_HTTP_PUBLIC_KEY_HEADER, TIMESTAMP_HEADER, FLEET_HTTP_SIGNATURE_HEADER)}
    if any(len(v) != 1 for v in named.values()):
        return "no SuperNode authentication headers (flwr-public-key, flwr-timestamp, flwr-signature)"
    raw_key, raw_time, raw_sig = named.values()
    try:
        key = base64.b64decode(raw_key[0], validate=True)
        signature = base64.b64decode(raw_sig[0], validate=True)
        timestamp = raw_time[0].decode("ascii")
        signed_at = dt.datetime.fromisoformat(timestamp)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return "malformed SuperNode authentication headers"
    now = (wall_clock or (lambda: dt.datetime.now(dt.UTC)))()
    try:
        age = (now - signed_at).total_seconds()
    except TypeError:  # a timestamp without a time zone
        return "malformed SuperNode authentication headers"
    if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
        return "a SuperNode signature outside Flower's time window"
    try:
        valid = verify_signature(bytes_to_public_key(key), timestamp.encode("ascii"), signature)
    except Exception:  # noqa: BLE001 - any key bytes a client sends (another algorithm, a curve
        valid = False  # `cryptography` does not support: UnsupportedAlgorithm) is a refusal
    if not valid:
        return "an invalid SuperNode signature"
    return None if key in keys else NOT_ADMITTED


def fleet_app(upstream: str, client: httpx.AsyncClient, max_body_bytes: int | None = None, *,
              limits: FrontLimits | None = None, access: AccessLog | None = None,
              clock: Callable[[], float] = time.monotonic, authorized_keys: Collection[bytes] | None = None,
              spool_dir: Path | None = None,
              refuse: Callable[[str, list[tuple[bytes, bytes]]], str | None] | None = None) -> ASGIApp:
    """The front as an ASGI app.

    Parameters
    ----------
    upstream : str
        The SuperLink's base URL, e.g. ``https://127.0.0.1:PORT``; the allowed raw path is
        appended to it as is.
    client : httpx.AsyncClient
        What reaches the SuperLink (its TLS verification, timeouts and pool limits are the
        caller's). The caller owns it and closes it.
    max_body_bytes : int, optional
        The largest request body forwarded (default: `limits.max_body_bytes`).
    limits : FrontLimits, optional
        Body limit and timeouts (default `FrontLimits()`); the connection limits in it are
        `FleetFront`'s.
    access : AccessLog, optional
        Where each request's line goes (default: an in-memory `AccessLog`).
    clock : callable, optional
        Monotonic seconds, for the body's deadlines and rate (tests pass their own).
    authorized_keys : collection of bytes, optional
        The admitted SuperNode keys (`node_key_bytes`): a request whose authentication
        headers do not pass `node_auth_error` gets 401 before its body is read. None: no
        check here (the SuperLink's alone).
    spool_dir : Path, optional
        Where a body over `limits.memory_body_bytes` waits, in an unlinked temporary file,
        until it is whole (default: the system's temporary folder).
    refuse : Callable, optional
        (raw path, headers) -> why the request must not pass (403 before any upstream
        connection), or None: the enrolment deny-list (`deploy.enrolment.LiveEnrolment.refuses`, the key
        in Flower's `flwr-public-key` header).
    """
    limits = limits or FrontLimits()
    if max_body_bytes is not None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes!r}: must be a positive int")
        limits = dataclasses.replace(limits, max_body_bytes=max_body_bytes)
    log = access if access is not None else AccessLog()
    base = upstream.rstrip("/")
    keys = frozenset(authorized_keys) if authorized_keys is not None else None
    uploads: collections.Counter[str] = collections.Counter()  # bodies being read, per source address
    buffered = [0]  # bytes reserved by the bodies being read or forwarded (their Content-Lengths)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        t0 = clock()
        ex = _Exchange()
        try:
            await _exchange(scope, receive, send, ex, t0)
        finally:
            raw = scope.get("raw_path")
            path = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope.get("path", "-"))
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            log.write(scope.get("client"), scope.get("method", "-"), path, ex.status, ex.bytes_in,
                      ex.bytes_out, clock() - t0, ex.note)

    async def _exchange(scope: Scope, receive: Receive, send: Send, ex: _Exchange, t0: float) -> None:
        try:
            path = fleet_path(scope)
            if path is None or scope.get("method") != "POST":
                raise _Refused(403, REFUSED, "not a Fleet API request")
            headers = list(scope.get("headers", []))
            if refuse is not None and (why := refuse(path, headers)):
                raise _Refused(403, REVOKED, why)
            length = _content_length(headers, limits.max_body_bytes)
            if keys is not None:
                why = node_auth_error(headers, keys)
                if why == NOT_ADMITTED and length <= limits.unadmitted_body_bytes:
                    why = None  # validly signed: the SuperLink gives Flower's own answer (module docstring)
                if why is not None:
                    raise _Refused(401, "fedshield coordinator: SuperNode authentication failed\n", why)
            async with _buffer_budget(length), _Spool(limits.memory_body_bytes, spool_dir) as spool:
                async with _upload_slot(scope):
                    await _read_body(receive, length, ex, t0, spool)
                # Only a whole body takes one of the SuperLink connections (module docstring).
                request = httpx.Request("POST", base + path,
                                        headers=[*end_to_end_headers(headers),
                                                 (b"content-length", str(length).encode())],
                                        content=spool.pieces())
                try:
                    reply = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise _Refused(503, UNAVAILABLE, f"SuperLink: {type(exc).__name__}") from None
        except _Refused as r:
            ex.status, ex.note = r.status, r.note
            if r.status != CLIENT_GONE:
                ex.bytes_out = await _answer(send, r.status, r.text)
            return
        try:
            await _relay(reply, send, ex)
        finally:
            await reply.aclose()

    @contextlib.asynccontextmanager
    async def _upload_slot(scope: Scope) -> AsyncIterator[None]:
        """One of `max_uploads_per_address` for this source address while its body is read;
        503 (Flower retries it) when they are all taken."""
        client_addr = scope.get("client")
        address = str(client_addr[0]) if client_addr else "-"
        if uploads[address] >= limits.max_uploads_per_address:
            raise _Refused(503, f"fedshield coordinator: more than {limits.max_uploads_per_address} uploads at "
                                "once from this address\n",
                           f"more than {limits.max_uploads_per_address} uploads at once from this address")
        uploads[address] += 1
        try:
            yield
        finally:
            uploads[address] -= 1
            if uploads[address] <= 0:
                del uploads[address]

    @contextlib.asynccontextmanager
    async def _buffer_budget(length: int) -> AsyncIterator[None]:
        """`length` bytes of `max_buffered_bytes` while the body is read and forwarded; 503
        (Flower retries it) when they are not there, before a byte of the body is read."""
        if buffered[0] + length > limits.max_buffered_bytes:
            raise _Refused(503, "fedshield coordinator: busy, retry\n",
                           f"bodies being read would exceed {limits.max_buffered_bytes} bytes")
        buffered[0] += length
        try:
            yield
        finally:
            buffered[0] -= length

    async def _read_body(receive: Receive, length: int, ex: _Exchange, t0: float, spool: _Spool) -> None:
        """The whole body into `spool`, or 408 when it is idle for `body_idle_timeout_s`, not
        complete within `body_timeout_s`, or, after `body_grace_s`, behind
        `min_body_bytes_per_s` (averaged since the grace ended)."""
        deadline = t0 + limits.body_timeout_s
        start = clock()

        def too_slow(why: str) -> _Refused:
            return _Refused(408, "fedshield coordinator: the request body came too slowly\n",
                            f"body {why} after {ex.bytes_in} of {length} bytes")

        while True:
            # The time by which the bytes received so far stop meeting the minimum rate.
            behind_at = start + limits.body_grace_s + ex.bytes_in / limits.min_body_bytes_per_s
            now = clock()
            if ex.bytes_in < length and now >= behind_at:
                raise too_slow(f"slower than {limits.min_body_bytes_per_s} bytes/s "
                               f"(after a {limits.body_grace_s:g} s grace)")
            wait = min(limits.body_idle_timeout_s, deadline - now, behind_at - now)
            try:
                if wait <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                now = clock()
                if deadline - now <= 0:
                    raise too_slow(f"not complete within {limits.body_timeout_s:g} s") from None
                if now >= behind_at:
                    continue  # the rate check above answers
                raise too_slow(f"idle for {limits.body_idle_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                raise _Refused(CLIENT_GONE, "", f"client disconnected after {ex.bytes_in} of {length} bytes")
            chunk = message.get("body", b"")
            if ex.bytes_in + len(chunk) > length:
                raise _Refused(400, "fedshield coordinator: the body is longer than its Content-Length\n",
                               f"body longer than its Content-Length {length}")
            ex.bytes_in += len(chunk)
            if chunk:
                spool.write(chunk)
            if not message.get("more_body", False):
                break
        if ex.bytes_in != length:
            raise _Refused(400, "fedshield coordinator: the body is shorter than its Content-Length\n",
                           f"body of {ex.bytes_in} bytes, Content-Length {length}")

    async def _relay(reply: httpx.Response, send: Send, ex: _Exchange) -> None:
        ex.status = reply.status_code
        headers = end_to_end_headers(reply.headers.raw)
        declared = reply.headers.get_list("content-length")
        if len(declared) == 1 and declared[0].isdigit():
            headers.append((b"content-length", declared[0].encode()))
        try:
            await _send(send, {"type": "http.response.start", "status": reply.status_code, "headers": headers})
            async for chunk in reply.aiter_raw():
                await _send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
                ex.bytes_out += len(chunk)
            await _send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # uvicorn closes the connection: the reply is incomplete
            ex.note = f"SuperLink reply cut after {ex.bytes_out} bytes: {type(exc).__name__}"
        except TimeoutError:
            ex.note = f"client did not read the reply for {limits.send_timeout_s:g} s"

    async def _send(send: Send, message: Message) -> None:
        await asyncio.wait_for(send(message), limits.send_timeout_s)

    async def _answer(send: Send, status: int, text: str) -> int:
        body = text.encode()
        try:
            await _send(send, {"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})  # the unread body of a refused request is never read
            await _send(send, {"type": "http.response.body", "body": body, "more_body": False})
        except TimeoutError:
            return 0
        return len(body)

    return app


# ------------------------------------------------------------------ the server around it


class _FrontProtocol(H11Protocol):
    """uvicorn's h11 protocol with what uvicorn lacks: a per-address connection cap, a
    request-head deadline, and its messages in the access log (see `FrontLimits`).
    `FleetFront` makes a subclass per front with `limits`, `access` and `per_address` set."""

    limits: FrontLimits
    access: AccessLog
    per_address: collections.Counter[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _ConnectionLogger(self.access, self)  # type: ignore[assignment]
        self._head_timer: asyncio.TimerHandle | None = None
        self._counted: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = str(self.client[0]) if self.client else "-"
        self.per_address[address] += 1
        self._counted = address
        if self.per_address[address] > self.limits.max_per_address:
            self._refuse(503, f"more than {self.limits.max_per_address} connections at once from this address")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is not None:
            self.per_address[self._counted] -= 1
            if self.per_address[self._counted] <= 0:
                del self.per_address[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request head is complete: the body has its own timeouts

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's head has the same deadline

    def send_400_response(self, msg: str) -> None:
        self.access.event(self.client, 400, msg)
        super().send_400_response(msg)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._refuse(408, f"request head not complete within {self.limits.header_timeout_s:g} s")

    def _refuse(self, status: int, note: str) -> None:
        """Answer outside any request (`Connection: close`) and close; one access-log line."""
        self.access.event(self.client, status, note)
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        body = b"fedshield coordinator: " + note.encode() + b"\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), body))
        self.transport.close()  # TLS close_notify, bounded by the loop's ssl_shutdown_timeout
        self.connections.discard(self)  # no longer counts against the total cap (uvicorn's set)


def _loop_factory(limits: FrontLimits) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop uvicorn would pick (uvloop, else asyncio's), whose `create_server`
    bounds the TLS handshake and shutdown (uvicorn passes neither)."""
    try:
        import uvloop

        base: type = uvloop.Loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] here
        base = asyncio.SelectorEventLoop

    class Loop(base):  # type: ignore[misc]
        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", limits.handshake_timeout_s)
                kwargs.setdefault("ssl_shutdown_timeout", min(5.0, limits.handshake_timeout_s))
            return await super().create_server(*args, **kwargs)

    return Loop


class FleetFront:
    """`fleet_app` on a TLS listener (uvicorn, the coordinator's certificate) in a thread.

    The SuperLink is reached at ``https://127.0.0.1:upstream_port``, verified with
    `upstream_ca` (the per-job loopback CA). `access_log`: the access log's file (None: in
    memory only, `self.access.lines`). `authorized_keys`, `spool_dir`: as `fleet_app`'s.
    """

    def __init__(self, host: str, port: int, certfile: Path, keyfile: Path, upstream_port: int,
                 upstream_ca: Path, max_body_bytes: int | None = None, upstream_timeout_s: float | None = None,
                 *, limits: FrontLimits | None = None, access_log: Path | None = None,
                 authorized_keys: Collection[bytes] | None = None, spool_dir: Path | None = None,
                 refuse: Callable[[str, list[tuple[bytes, bytes]]], str | None] | None = None) -> None:
        import uvicorn

        limits = limits or FrontLimits()
        if max_body_bytes is not None:
            limits = dataclasses.replace(limits, max_body_bytes=max_body_bytes)
        if upstream_timeout_s is not None:
            limits = dataclasses.replace(limits, upstream_timeout_s=upstream_timeout_s)
        self.limits = limits
        self.access = AccessLog(access_log)
        ctx = ssl.create_default_context(cafile=str(upstream_ca))
        self.client = httpx.AsyncClient(
            verify=ctx, timeout=httpx.Timeout(limits.upstream_timeout_s, connect=10.0,
                                              pool=limits.upstream_pool_timeout_s),
            limits=httpx.Limits(max_connections=limits.upstream_connections,
                                max_keepalive_connections=min(16, limits.upstream_connections)))
        self.app = fleet_app(f"https://127.0.0.1:{upstream_port}", self.client, limits=limits, access=self.access,
                             authorized_keys=authorized_keys, spool_dir=spool_dir, refuse=refuse)
        protocol = type("FrontProtocol", (_FrontProtocol,),
                        {"limits": limits, "access": self.access, "per_address": collections.Counter()})
        config = uvicorn.Config(self.app, host=host, port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile),
                                http=protocol, ws="none", lifespan="off", log_level="warning", access_log=False,
                                server_header=False, date_header=False,  # the SuperLink's own come back
                                limit_concurrency=limits.max_connections, backlog=limits.backlog,
                                timeout_keep_alive=limits.keep_alive_s,
                                h11_max_incomplete_event_size=limits.max_header_bytes,
                                timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fleet-front", daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            asyncio.get_running_loop().set_exception_handler(self._loop_error)
            async with self.client:  # closed on the loop that used it
                await self.server.serve()

        with asyncio.Runner(loop_factory=_loop_factory(self.limits)) as runner:
            runner.run(serve())

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:  # noqa: ARG002
        exc = context.get("exception")
        text = str(context.get("message", "event loop error"))
        if exc is not None:
            text += f": {type(exc).__name__}: {exc}"
        peer = None
        transport = context.get("transport")
        if transport is not None:
            try:
                peer = transport.get_extra_info("peername")
            except Exception:  # noqa: BLE001 - a closed transport; the line goes out without it
                peer = None
        self.access.event(peer, "-", text)

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise FedShieldError("could not listen on the coordinator address (in use? permission?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.access.close()

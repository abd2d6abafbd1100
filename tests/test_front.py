"""The TLS front's allow-list (deploy/front.py), in-process: paths, methods, encodings, body limits.

The front is driven two ways, both without TLS or sockets: through httpx's ASGI transport
(a real HTTP client), and by calling the ASGI app with a hand-made scope, which is how the
raw request-target bytes that uvicorn passes on (dot segments, percent-encoding, non-ASCII,
a trailing newline) reach it untouched; httpx would normalise some of them first. The
SuperLink side is an httpx.MockTransport that records what it was sent.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
import urllib.parse

import httpx
import pytest

from fedshield.deploy import front
from fedshield.deploy.front import MAX_BODY_BYTES, AccessLog, FleetFront, FrontLimits, fleet_app
from fedshield.deploy.processes import free_port

UPSTREAM = "https://127.0.0.1:9999"
PATH = "/v1/fleet/push-messages"


class Stream(httpx.AsyncByteStream):
    """A reply body that arrives in pieces, as from a real connection."""

    def __init__(self, body: bytes):
        self.body = body

    async def __aiter__(self):
        for i in range(0, len(self.body), 7):
            yield self.body[i:i + 7]


class SuperLink:
    """A fake SuperLink: records every request, answers with a fixed reply."""

    def __init__(self, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
                 body: bytes = b"\x08\x01reply", error: Exception | None = None):
        self.requests: list[tuple[httpx.Request, bytes]] = []
        self.status, self.headers, self.body, self.error = status, headers, body, error

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append((request, body))
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, headers=self.headers or [(b"content-type", b"application/protobuf")],
                              stream=Stream(self.body))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def via_http(link: SuperLink, method: str, url: str, limit: int = MAX_BODY_BYTES, **kw) -> httpx.Response:
    """One request through a real HTTP client into the front (ASGI transport, in memory)."""

    async def go() -> httpx.Response:
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream, limit)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="https://fl.example.org") as c:
                r = await c.request(method, url, **kw)
                await r.aread()
                return r

    return asyncio.run(go())


class Sent:
    """What the front answered to a raw ASGI call, and how much of the body it read."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.chunks_read = 0


def via_asgi(link: SuperLink, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]] | None = None,
             chunks: list[bytes] | None = None, query: bytes = b"", limit: int = MAX_BODY_BYTES,
             scope_extra: dict | None = None, drop: tuple[str, ...] = (), length: bool = True,
             access: AccessLog | None = None, limits: FrontLimits | None = None,
             receive_hook=None, keys=None) -> Sent:
    """Call the app as uvicorn does: `raw_path` is the request target's bytes before `?`.
    A Content-Length of the chunks' total is added unless `headers` has one or `length` is
    False. `receive_hook(n)` runs (awaited) before the n-th body message is handed over."""
    chunks = list(chunks or [])
    sent = Sent()
    headers = list(headers or [])
    if length and not any(k.lower() == b"content-length" for k, _ in headers):
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))

    async def go() -> None:
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream, limit, limits=limits, access=access, authorized_keys=keys)
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                "scheme": "https", "path": urllib.parse.unquote(raw_path.decode("latin-1")),
                "raw_path": raw_path, "query_string": query, "root_path": "",
                "headers": [(b"host", b"fl.example.org:9092"), *headers],
                "client": ("203.0.113.7", 50000), "server": ("0.0.0.0", 9092), **(scope_extra or {}),
            }
            for key in drop:
                scope.pop(key)
            pending = list(chunks)

            async def receive():
                if receive_hook is not None:
                    message = await receive_hook(sent.chunks_read)
                    if message is not None:
                        return message
                if not pending:
                    return {"type": "http.request", "body": b"", "more_body": False}
                sent.chunks_read += 1
                return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

            async def send(message):
                if message["type"] == "http.response.start":
                    sent.status = message["status"]
                    sent.headers = list(message.get("headers", []))
                elif message["type"] == "http.response.body":
                    sent.body += message.get("body", b"")

            await app(scope, receive, send)

    asyncio.run(go())
    return sent


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


# ------------------------------------------------------------------ what passes


def test_fleet_request_is_forwarded_byte_for_byte():
    body = bytes(range(256)) * 64 + b"\r\n\x00end"
    reply = bytes(range(255, -1, -1)) * 3
    link = SuperLink(status=200, body=reply, headers=[
        (b"content-type", b"application/protobuf"), (b"x-flwr-reply", b"A b\tC"),
        (b"Connection", b"close"), (b"keep-alive", b"timeout=5")])
    sent_headers = {
        "content-type": "application/protobuf", "accept": "application/protobuf",
        "flwr-public-key": "BAxk+/w==", "flwr-signature": "MEUCIQ+/==", "flwr-timestamp": "2026-01-01T00:00:00+00:00",
        "user-agent": "python-httpx/0.28.1",
    }
    r = via_http(link, "POST", PATH, content=body, headers=sent_headers)

    assert r.status_code == 200
    assert r.content == reply
    assert r.headers["content-type"] == "application/protobuf"
    assert r.headers["x-flwr-reply"] == "A b\tC"
    assert "keep-alive" not in r.headers  # the SuperLink's hop-by-hop headers stay on its hop
    assert len(link.requests) == 1
    req, got = link.requests[0]
    assert req.method == "POST"
    assert req.url.raw_path == PATH.encode()
    assert (req.url.scheme, req.url.host, req.url.port) == ("https", "127.0.0.1", 9999)
    assert got == body
    assert req.headers["content-length"] == str(len(body))
    for k, v in sent_headers.items():  # node authentication and content type pass unchanged
        assert header(req.headers.raw, k.encode()) == [v.encode()], k
    assert req.headers["host"] == "127.0.0.1:9999"


def test_header_order_duplicates_and_hop_by_hop_headers():
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"x"], headers=[
        (b"content-length", b"1"), (b"x-b", b"2"), (b"x-a", b"1"), (b"x-b", b"3"),
        (b"connection", b"keep-alive, x-secret"), (b"x-secret", b"hop only"), (b"te", b"trailers"),
        (b"upgrade", b"h2c"), (b"proxy-authorization", b"Basic Zm9v"), (b"expect", b"100-continue")])
    assert sent.status == 200
    req, got = link.requests[0]
    assert got == b"x"
    names = [k.lower() for k, _ in req.headers.raw]
    for hop in (b"connection", b"x-secret", b"te", b"upgrade", b"proxy-authorization", b"expect"):
        assert hop not in names, hop
    custom = [(k, v) for k, v in req.headers.raw if k.startswith(b"x-")]
    assert custom == [(b"x-b", b"2"), (b"x-a", b"1"), (b"x-b", b"3")]


@pytest.mark.parametrize("status", [200, 401, 404, 500])
def test_the_superlinks_status_and_body_come_back(status):
    link = SuperLink(status=status, body=f"status {status}".encode())
    r = via_http(link, "POST", "/v1/fleet/pull-messages", content=b"q")
    assert (r.status_code, r.content) == (status, f"status {status}".encode())
    assert len(link.requests) == 1


def test_an_encoded_reply_comes_back_undecoded():
    packed = gzip.compress(b"a reply" * 100)
    link = SuperLink(body=packed, headers=[(b"content-type", b"application/protobuf"),
                                           (b"content-encoding", b"gzip"),
                                           (b"content-length", str(len(packed)).encode())])
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"q"])
    assert sent.body == packed
    assert header(sent.headers, b"content-encoding") == [b"gzip"]
    assert header(sent.headers, b"content-length") == [str(len(packed)).encode()]  # the SuperLink's


def test_a_reply_without_a_length_goes_back_without_one():
    """Streamed as it comes: the front never adds a Content-Length it would have to buffer for."""
    link = SuperLink(body=b"r" * 100)
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"q"])
    assert sent.body == b"r" * 100
    assert header(sent.headers, b"content-length") == []


def test_every_fleet_rpc_of_flower_passes_and_no_other_api_does():
    """The route table of the installed flwr 1.41: every Fleet RPC passes, every Control
    and Runtime RPC is refused (sent as a site would, POST with a body)."""
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    routes = sorted(PROTOBUF_REQUEST_TYPES)
    fleet = [p for m, p in routes if p.startswith("/v1/fleet/")]
    other = [p for m, p in routes if not p.startswith("/v1/fleet/")]
    assert {"/v1/fleet/push-messages", "/v1/fleet/pull-object", "/v1/fleet/register-node"} <= set(fleet)
    assert {"/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/push-messages"} <= set(other)
    assert {m for m, _ in routes} == {"POST"}
    for p in fleet:
        link = SuperLink()
        assert via_asgi(link, "POST", p.encode(), chunks=[b"m"]).status == 200, p
        assert [r.url.raw_path for r, _ in link.requests] == [p.encode()]
    for p in other:
        link = SuperLink()
        assert via_asgi(link, "POST", p.encode(), chunks=[b"m"]).status == 403, p
        assert link.requests == [], p


# ------------------------------------------------------------------ what is refused


REFUSED_PATHS = [
    b"/v1/control/start-run", b"/v1/control/register-node", b"/v1/control/pull-artifacts",
    b"/v1/runtime/pull-messages", b"/v1/runtime/push-task-output",
    b"/v1/fleet", b"/v1/fleet/", b"/v1/fleet/pull-messages/", b"/v1/fleet//pull-messages",
    b"//v1/fleet/pull-messages", b"/v1//fleet/pull-messages", b"/", b"", b"*",
    b"/v1/fleet/../control/start-run", b"/v1/fleet/./pull-messages", b"/v1/fleet/..", b"/v1/fleet/.",
    b"/v1/fleet/%2e%2e/control/start-run", b"/v1/fleet/%2E%2E/control/start-run",
    b"/v1/fleet%2Fpull-messages", b"/v1/fleet/pull-messages%2F..%2F..%2Fcontrol%2Fstart-run",
    b"/v1/fleet/pull%2Dmessages", b"/v1/fleet/pull-messages%00", b"/%761/fleet/pull-messages",
    b"/v1/fleet/pull-messages\n", b"/v1/fleet/pull-messages\r\n", b"/v1/fleet/pull-messages\x00",
    b"/v1/fleet/pull-messages;x=1", b"/v1/fleet/pull messages", b"/v1/fleet\\..\\control\\start-run",
    b"/V1/fleet/pull-messages", b"/v1/Fleet/pull-messages", b"/v2/fleet/pull-messages",
    b"/v1/fleet/pull-m\xc3\xa9ssages", b"/v1/fleet/pull-messages\xff", b"/v1/fleet/\xd0\xb0",
    b"https://127.0.0.1:9092/v1/control/start-run", b"https://evil/v1/fleet/pull-messages",
    b"/api/v1/fleet/pull-messages", b"/v1/fleetx/pull-messages", b"/v1/fleet-x",
]


@pytest.mark.parametrize("raw_path", REFUSED_PATHS, ids=lambda b: repr(b)[2:-1] or "empty")
def test_paths_outside_the_plain_fleet_api_are_refused(raw_path):
    link = SuperLink()
    sent = via_asgi(link, "POST", raw_path, chunks=[b"payload"])
    assert sent.status == 403
    assert b"only the Flower Fleet API" in sent.body
    assert link.requests == []
    assert front.fleet_path({"raw_path": raw_path, "query_string": b""}) is None


@pytest.mark.parametrize("query", [b"x=1", b"a", b"=", b"next=/v1/control/start-run"])
def test_a_query_string_is_refused(query):
    link = SuperLink()
    assert via_asgi(link, "POST", PATH.encode(), chunks=[b"m"], query=query).status == 403
    assert link.requests == []
    r = via_http(SuperLink(), "POST", f"{PATH}?{query.decode()}", content=b"m")
    assert r.status_code == 403


def test_a_request_without_a_raw_path_is_refused():
    """The decoded path is never trusted: an ASGI server that gives no raw path gets 403."""
    link = SuperLink()
    assert via_asgi(link, "POST", PATH.encode(), chunks=[b"m"], drop=("raw_path",)).status == 403
    assert via_asgi(link, "POST", PATH.encode(), chunks=[b"m"], scope_extra={"raw_path": None}).status == 403
    assert link.requests == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "post"])
def test_methods_other_than_post_are_refused_on_an_allowed_path(method):
    link = SuperLink()
    sent = via_asgi(link, method, PATH.encode(), chunks=[b"m"])
    assert sent.status == 403
    assert link.requests == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_methods_other_than_post_are_refused_through_a_client(method):
    link = SuperLink()
    r = via_http(link, method, PATH, **({"content": b"m"} if method in ("PUT", "PATCH") else {}))
    assert r.status_code == 403
    assert link.requests == []


def test_a_websocket_is_not_accepted():
    link = SuperLink()
    messages = []

    async def go():
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream)
            scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "wss", "path": PATH,
                     "raw_path": PATH.encode(), "query_string": b"", "root_path": "", "headers": [],
                     "subprotocols": []}

            async def receive():
                return {"type": "websocket.connect"}

            async def send(message):
                messages.append(message)

            await app(scope, receive, send)

    asyncio.run(go())
    assert [m["type"] for m in messages] == ["websocket.close"]
    assert link.requests == []


# ------------------------------------------------------------------ body limit


LIMIT = 1024


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read():
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), headers=[(b"content-length", str(LIMIT + 1).encode())],
                    chunks=[b"x" * (LIMIT + 1)], limit=LIMIT)
    assert sent.status == 413
    assert sent.chunks_read == 0
    assert header(sent.headers, b"connection") == [b"close"]  # the rest of the body is never read
    assert link.requests == []
    r = via_http(SuperLink(), "POST", PATH, content=b"x" * (LIMIT + 1), limit=LIMIT)
    assert r.status_code == 413


def test_a_body_without_a_content_length_is_refused_unread():
    """Flower's client always declares the length (httpx, bytes body): a chunked body is
    refused before a byte of it is read, so the limit is always known up front."""
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"y" * 100] * 50, limit=LIMIT, length=False)
    assert sent.status == 411
    assert sent.chunks_read == 0
    assert link.requests == []

    async def gen():
        for _ in range(50):
            yield b"y" * 100

    r = via_http(link, "POST", PATH, content=gen(), limit=LIMIT)  # Transfer-Encoding: chunked
    assert r.status_code == 400
    assert "Transfer-Encoding" in r.text
    assert link.requests == []


def test_a_body_longer_than_its_content_length_is_cut():
    """A small Content-Length followed by a long body (an ASGI server that does not frame):
    counted as it streams, not trusted, and nothing past the declared length is forwarded."""
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), headers=[(b"content-length", b"10")],
                    chunks=[b"z" * 600, b"z" * 600, b"z" * 600], limit=LIMIT)
    assert sent.status == 400
    assert b"longer than its Content-Length" in sent.body
    assert sent.chunks_read == 1
    assert link.requests == []


def test_a_body_shorter_than_its_content_length_is_refused():
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), headers=[(b"content-length", b"100")], chunks=[b"z" * 60])
    assert sent.status == 400
    assert link.requests == []


def test_a_body_exactly_at_the_limit_is_forwarded():
    body = bytes(i % 251 for i in range(LIMIT))
    link = SuperLink()
    r = via_http(link, "POST", PATH, content=body, limit=LIMIT)
    assert r.status_code == 200
    assert link.requests[0][1] == body
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[body[:1000], body[1000:]], limit=LIMIT)
    assert sent.status == 200
    assert link.requests[0][1] == body
    assert link.requests[0][0].headers["content-length"] == str(LIMIT)
    assert "transfer-encoding" not in link.requests[0][0].headers


def test_an_empty_body_is_forwarded():
    link = SuperLink()
    assert via_http(link, "POST", PATH, limit=LIMIT).status_code == 200
    assert link.requests[0][1] == b""


@pytest.mark.parametrize("values", [[b"abc"], [b"-1"], [b"1e3"], [b"5", b"6"], [b" 5"]])
def test_a_malformed_content_length_is_refused(values):
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), headers=[(b"content-length", v) for v in values],
                    chunks=[b"12345"], limit=LIMIT)
    assert sent.status == 400
    assert link.requests == []


def test_the_default_limit_is_flowers_chunk_plus_a_margin():
    """Derived, not guessed: Flower 1.41 sends every array as chunks of at most
    FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, one object per push-object request; the largest such
    request, built with Flower's own code from a full-size MiniLM tensor, fits."""
    import numpy as np
    from flwr.app import Array
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE == front.FLOWER_CHUNK_BYTES == 5 * 1024 * 1024
    assert MAX_BODY_BYTES == front.max_body_bytes() == FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 1024 * 1024
    assert front.max_body_bytes(8 * 1024 * 1024) == 9 * 1024 * 1024
    embeddings = Array(np.ones((30522, 384), dtype=np.float32))  # all-MiniLM-L6-v2's largest tensor: 46.9 MB
    chunks = embeddings.slice_array()
    assert len(chunks) == 9
    biggest = max(
        len(PushObjectRequest(node=Node(node_id=2**63), run_id=2**63, object_id=oid, session_id="s" * 64,
                              object_content=chunk.deflate()).SerializeToString())
        for oid, chunk in chunks)
    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE < biggest < MAX_BODY_BYTES - 1024 * 1024 + 4096
    with pytest.raises(ValueError, match="max_body_bytes"):
        fleet_app(UPSTREAM, httpx.AsyncClient(), 0)
    with pytest.raises(ValueError, match="max_per_address"):
        FrontLimits(max_per_address=0)
    with pytest.raises(ValueError, match="header_timeout_s"):
        FrontLimits(header_timeout_s=-1.0)


# ------------------------------------------------------------------ streaming, timeouts, the access log


class Recorder(SuperLink):
    """A SuperLink that reads the body piece by piece and notes how much of it the client
    had handed over when each piece arrived."""

    def __init__(self, sent: Sent, **kw):
        super().__init__(**kw)
        self.sent = sent
        self.progress: list[int] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        got = b""
        async for piece in request.stream:
            self.progress.append(self.sent.chunks_read)
            got += piece
        self.requests.append((request, got))
        return httpx.Response(200, headers=[(b"content-length", str(len(self.body)).encode())],
                              stream=Stream(self.body))

    def client(self) -> httpx.AsyncClient:
        link = self

        class Transport(httpx.AsyncBaseTransport):  # MockTransport would read the whole body first
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                return await link.handle(request)

        return httpx.AsyncClient(transport=Transport())


def test_the_superlink_sees_a_request_only_once_its_body_is_whole():
    """No piece reaches the SuperLink before the client has handed over the last one: a slow
    body holds a front connection, never one of the SuperLink's (issue 21 item 3)."""
    sent = Sent()
    pieces = [bytes([i]) * 1000 for i in range(20)]

    async def go() -> None:
        link = Recorder(sent, body=b"\x08\x01" * 500)
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream)
            pending = list(pieces)

            async def receive():
                sent.chunks_read += 1
                return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

            async def send(message):
                if message["type"] == "http.response.start":
                    sent.status = message["status"]
                else:
                    sent.body += message.get("body", b"")

            scope = {"type": "http", "method": "POST", "raw_path": PATH.encode(), "path": PATH,
                     "query_string": b"", "headers": [(b"content-length", b"20000")], "client": ("198.51.100.2", 4)}
            await app(scope, receive, send)
            assert link.requests[0][1] == b"".join(pieces)
            assert link.progress and set(link.progress) == {20}

    asyncio.run(go())
    assert sent.status == 200
    assert sent.body == b"\x08\x01" * 500


def test_a_client_that_stops_sending_gets_408_and_one_log_line():
    access = AccessLog()
    limits = FrontLimits(body_idle_timeout_s=0.2)

    async def stall(n):
        if n == 2:
            await asyncio.sleep(5)
        return None

    sent = via_asgi(SuperLink(), "POST", PATH.encode(), chunks=[b"a" * 10, b"b" * 10, b"c" * 10],
                    access=access, limits=limits, receive_hook=stall)
    assert sent.status == 408
    assert header(sent.headers, b"connection") == [b"close"]
    [line] = access.lines
    assert ' 408 in=20 ' in line and 'note="body\\x20idle\\x20for\\x200.2\\x20s\\x20after\\x2020\\x20of\\x2030' in line


def test_a_body_that_drips_past_the_deadline_gets_408():
    limits = FrontLimits(body_idle_timeout_s=1.0, body_timeout_s=0.3)

    async def drip(n):
        await asyncio.sleep(0.1)
        return None

    access = AccessLog()
    sent = via_asgi(SuperLink(), "POST", PATH.encode(), chunks=[b"d"] * 20, access=access, limits=limits,
                    receive_hook=drip)
    assert sent.status == 408
    assert "not\\x20complete\\x20within\\x200.3\\x20s" in access.lines[-1]


def test_a_client_that_disconnects_mid_upload_is_one_line_and_no_answer():
    access = AccessLog()
    link = SuperLink()

    async def leave(n):
        return {"type": "http.disconnect"} if n == 2 else None

    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"e" * 100] * 5, access=access, receive_hook=leave)
    assert sent.status == 0  # nothing is written to a client that is gone
    assert link.requests == []  # the SuperLink's half-sent request was abandoned
    [line] = access.lines
    assert " 499 in=200 " in line
    assert "client\\x20disconnected\\x20after\\x20200\\x20of\\x20500\\x20bytes" in line


def test_the_access_log_line(tmp_path):
    access = AccessLog(tmp_path / "access.log")
    via_asgi(SuperLink(body=b"R" * 17), "POST", PATH.encode(), chunks=[b"x" * 33], access=access)
    weird = b"/v1/control/" + b"a" * 300 + b"\x00\xff \"\\\n"
    via_asgi(SuperLink(), "POST", weird, chunks=[b"m"], access=access, query=b"q=1")
    access.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert lines == list(access.lines)
    ok, refused = (line.split(" ") for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok[0])
    assert ok[1:8] == ["203.0.113.7:50000", "POST", PATH, "200", "in=33", "out=17", ok[7]]
    assert re.fullmatch(r"\d+\.\d{3}s", ok[7]) and len(ok) == 8
    assert refused[2:4] == ["POST", "/v1/control/" + "a" * 108 + "..."]
    assert refused[4] == "403" and 'note="not\\x20a\\x20Fleet\\x20API\\x20request"' in lines[1]
    assert all(32 <= ord(c) < 127 for line in lines for c in line)  # escaped: one line per request, ASCII
    assert front.escape_for_log('/a b"\\\x00\xe9') == "/a\\x20b\\x22\\x5c\\x00\\xe9"


# ------------------------------------------------------------------ upstream trouble


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                                   httpx.RemoteProtocolError("cut")], ids=type)
def test_an_unreachable_superlink_is_503(error):
    link = SuperLink(error=error)
    r = via_http(link, "POST", PATH, content=b"m")
    assert r.status_code == 503
    assert "SuperLink unavailable" in r.text
    assert len(link.requests) == 1


def test_a_closed_superlink_port_is_503():
    """The real transport, to a loopback port nobody listens on."""

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as upstream:
            app = fleet_app(f"http://127.0.0.1:{free_port()}", upstream)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://x") as c:
                return await c.post(PATH, content=b"m")

    assert asyncio.run(go()).status_code == 503


# ------------------------------------------------------------------ the TLS server around it


def test_fleet_front_serves_the_app_over_tls(tmp_path):
    """FleetFront: uvicorn with the coordinator's certificate; a loopback SuperLink that is down."""
    from fedshield.deploy import pki

    pki.init_pki(tmp_path, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    port = free_port()
    f = FleetFront("127.0.0.1", port, tmp_path / "server.crt", tmp_path / "server.key", free_port(),
                   tmp_path / "ca.crt", max_body_bytes=LIMIT)
    f.start()
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with httpx.Client(verify=ctx, base_url=f"https://127.0.0.1:{port}", timeout=10) as c:
            assert c.post("/v1/control/start-run", content=b"m").status_code == 403
            assert c.get(PATH).status_code == 403
            assert c.post(PATH, content=b"x" * (LIMIT + 1)).status_code == 413
            r = c.post(PATH, content=b"m")
            assert r.status_code == 503
            assert len(r.headers.get_list("server")) == 0  # no uvicorn banner
        with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
            httpx.post(f"https://127.0.0.1:{port}{PATH}", content=b"m", verify=True, timeout=10)
    finally:
        f.stop()
    assert not f.thread.is_alive()


# ------------------------------------------------------------------ connection limits, over loopback sockets


class Upstream:
    """A stand-in SuperLink on loopback TLS: reads each body as it streams, answers with its
    length and SHA-256."""

    def __init__(self, pki_dir):
        import uvicorn

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = f"{size} {digest.hexdigest()}".encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, ssl_certfile=str(pki_dir / "server.crt"),
            ssl_keyfile=str(pki_dir / "server.key"), log_level="critical", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the stand-in SuperLink did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def loopback_pki(tmp_path_factory):
    from fedshield.deploy import pki

    d = tmp_path_factory.mktemp("front-pki")
    pki.init_pki(d, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    return d


@pytest.fixture()
def live(loopback_pki, tmp_path):
    """A FleetFront with tight limits in front of a stand-in SuperLink."""
    upstream = Upstream(loopback_pki)
    limits = FrontLimits(max_body_bytes=4 * 1024 * 1024, max_connections=12, max_per_address=3,
                         handshake_timeout_s=1.0, header_timeout_s=1.0, body_idle_timeout_s=1.0)
    port = free_port()
    f = FleetFront("127.0.0.1", port, loopback_pki / "server.crt", loopback_pki / "server.key", upstream.port,
                   loopback_pki / "ca.crt", limits=limits, access_log=tmp_path / "access.log")
    f.start()
    f.port = port
    f.ctx = ssl.create_default_context(cafile=str(loopback_pki / "ca.crt"))
    yield f
    f.stop()
    upstream.stop()


def honest(f, body: bytes = b"\x08\x01heartbeat", source: str | None = None) -> httpx.Response:
    """One Fleet request on a fresh connection, as a site after a reconnect."""
    transport = httpx.HTTPTransport(verify=f.ctx, local_address=source)
    with httpx.Client(transport=transport, base_url=f"https://127.0.0.1:{f.port}", timeout=10) as c:
        return c.post("/v1/fleet/send-node-heartbeat", content=body)


def tls_socket(f, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", f.port), timeout=10, source_address=(source, 0))
    return f.ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return out


def test_a_body_crosses_the_front_intact_over_tls(live):
    body = os.urandom(3 * 1024 * 1024 + 7)
    r = honest(live, body)
    assert r.status_code == 200
    assert r.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    assert r.headers["content-length"] == str(len(r.content))


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_deadline(live):
    s = tls_socket(live, "127.0.0.2")
    t0 = time.time()
    head = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    got = b""
    s.settimeout(0.2)
    for byte in head:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            break
        try:
            got += s.recv(4096)
            if got:
                break
        except TimeoutError:
            pass
        except (ssl.SSLError, OSError):
            break
        assert honest(live).status_code == 200 if byte == ord("v") else True  # others are served meanwhile
    got += read_all(s, 5)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert time.time() - t0 < 4
    s.close()
    assert any("127.0.0.2:" in x and " 408 " in x and "request\\x20head" in x for x in live.access.lines)


def test_connections_per_address_are_capped_and_other_addresses_are_served(live):
    held = [tls_socket(live, "127.0.0.3") for _ in range(3)]
    extra = tls_socket(live, "127.0.0.3")
    reply = read_all(extra, 5)
    assert reply.startswith(b"HTTP/1.1 503 "), reply
    assert b"more than 3 connections at once from this address" in reply
    assert honest(live).status_code == 200
    for s in held:
        s.close()
    extra.close()
    assert sum("127.0.0.3:" in x and " 503 " in x for x in live.access.lines) == 1


def test_the_total_cap_answers_503_until_idle_connections_time_out(live):
    held = [tls_socket(live, f"127.0.1.{i}") for i in range(1, 13)]  # 12: the total cap, one per address
    time.sleep(0.2)
    r = honest(live)
    assert r.status_code == 503  # uvicorn's limit_concurrency; Flower's client retries 503
    time.sleep(1.5)  # their request heads are overdue: each got 408 and was closed
    assert honest(live).status_code == 200
    for s in held:
        assert read_all(s, 2).startswith(b"HTTP/1.1 408 ")
        s.close()
    assert any("Exceeded\\x20concurrency\\x20limit" in x and " 503 " in x for x in live.access.lines)


def test_a_tls_handshake_that_never_starts_is_dropped(live):
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=10, source_address=("127.0.0.4", 0))
    t0 = time.time()
    raw.settimeout(5)
    try:
        assert raw.recv(100) == b""
    except ConnectionResetError:
        pass
    assert time.time() - t0 < 3
    raw.close()


def test_a_declared_200_mb_body_is_refused_before_it_is_sent(live):
    s = tls_socket(live, "127.0.0.5")
    s.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
    reply = read_all(s, 5)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in reply.lower()
    s.close()


def test_aborted_uploads_are_one_line_each_and_never_a_traceback(live, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    for i in range(20):
        s = tls_socket(live, "127.0.0.6")
        s.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                  + b"u" * 300_000)
        time.sleep(0.05)
        if i % 2:  # half of them reset the connection, half close it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.time() + 10
    while sum(" 499 " in x for x in live.access.lines) < 20 and time.time() < deadline:
        time.sleep(0.1)
    assert honest(live).status_code == 200
    lines = [x for x in live.access.lines if "127.0.0.6:" in x]
    assert len(lines) == 20, lines
    assert all(" 499 " in x and "client\\x20disconnected\\x20after" in x for x in lines)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Traceback" not in caplog.text
    # The honest request's own line is written after its reply reaches the client: wait for it.
    def missing_from_file() -> list[str]:
        written = set(live.access.path.read_text().splitlines())
        return [x for x in list(live.access.lines) if x not in written]

    deadline = time.time() + 10
    while (missing_from_file() or len(live.access.lines) < 21) and time.time() < deadline:
        time.sleep(0.05)
    assert not missing_from_file(), missing_from_file()  # the file has every line the front logged
    assert len(live.access.path.read_text().splitlines()) >= 21  # the 20 aborted uploads and the honest request


# ------------------------------------------------------------------ authentication first, bodies before slots


def signed_headers(key, timestamp: str | None = None, signer=None) -> list[tuple[bytes, bytes]]:
    """Flower's SuperNode authentication headers (flwr/supernode/node_auth_http_interceptor.py)."""
    import base64
    import datetime as dt

    from flwr.supercore.primitives.asymmetric import sign_message

    timestamp = timestamp or dt.datetime.now(dt.UTC).isoformat()
    signature = sign_message(signer or key, timestamp.encode("ascii"))
    return [(b"flwr-public-key", base64.b64encode(front.node_key_bytes(key.public_key()))),
            (b"flwr-timestamp", timestamp.encode()), (b"flwr-signature", base64.b64encode(signature))]


@pytest.fixture(scope="module")
def node_keys():
    from cryptography.hazmat.primitives.asymmetric import ec

    return [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]


def test_a_request_signed_by_an_admitted_key_is_forwarded(node_keys):
    link = SuperLink()
    admitted = {front.node_key_bytes(k.public_key()) for k in node_keys[:2]}
    sent = via_asgi(link, "POST", PATH.encode(), headers=signed_headers(node_keys[1]), chunks=[b"m" * 10],
                    keys=admitted)
    assert sent.status == 200 and len(link.requests) == 1
    assert link.requests[0][0].headers["flwr-timestamp"]  # Flower's headers go on: the SuperLink checks them too


def test_a_small_request_validly_signed_by_a_key_not_admitted_gets_flowers_own_answer(node_keys):
    """Node registration/activation by a key that was not registered: the SuperLink answers
    (Flower's "[code: 2004] Failed to activate SuperNode", which `fedshield client` explains)."""
    link = SuperLink(status=400)
    admitted = {front.node_key_bytes(node_keys[0].public_key())}
    sent = via_asgi(link, "POST", b"/v1/fleet/activate-node", headers=signed_headers(node_keys[2]),
                    chunks=[b"k" * 300], keys=admitted)
    assert sent.status == 400 and len(link.requests) == 1


def _unauthenticated(keys):
    import base64
    import datetime as dt

    stale = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=400)).isoformat()
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)).isoformat()
    good = signed_headers(keys[0])
    return {
        "no headers": [],
        "an unknown key, validly signed, with a body over 64 KiB": signed_headers(keys[2]),
        "a signature by another key": signed_headers(keys[0], signer=keys[2]),
        "a stale timestamp": signed_headers(keys[0], stale),
        "a timestamp from the future": signed_headers(keys[0], future),
        "a naive timestamp": signed_headers(keys[0], "2026-12-02T10:00:00"),
        "not base64": [(b"flwr-public-key", b"%%%"), *good[1:]],
        "a repeated key header": [good[0], *good],
        "a signature of another timestamp": [*good[:2], signed_headers(keys[0], stale)[2]],
        "an RSA key": [(b"flwr-public-key", base64.b64encode(_rsa_pem())), *good[1:]],
        "not a key": [(b"flwr-public-key", base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n")), *good[1:]],
    }


def _rsa_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("case", [
    "no headers", "an unknown key, validly signed, with a body over 64 KiB", "a signature by another key",
    "a stale timestamp",
    "a timestamp from the future", "a naive timestamp", "not base64", "a repeated key header",
    "a signature of another timestamp", "an RSA key", "not a key"])
def test_an_unauthenticated_request_is_refused_before_its_body_is_read(node_keys, case):
    """Issue 21 item 3: 48 x 6 MiB unauthenticated bodies grew the SuperLink by 640 MB. With
    the admitted keys, the front checks Flower's SuperNode signature on the request head:
    401, the body is never read, the SuperLink never sees it."""
    link = SuperLink()
    access = AccessLog()
    admitted = {front.node_key_bytes(k.public_key()) for k in node_keys[:2]}
    sent = via_asgi(link, "POST", PATH.encode(), headers=_unauthenticated(node_keys)[case],
                    chunks=[b"x" * 20_000] * 4, keys=admitted, access=access)
    assert sent.status == 401 and sent.chunks_read == 0 and link.requests == []
    assert header(sent.headers, b"connection") == [b"close"]
    [line] = access.lines
    assert " 401 in=0 " in line and "SuperNode" in line


def _drive(app, calls):
    """Run ASGI calls on `app` concurrently: each (address, receive) -> its status."""

    async def one(address, receive):
        status = []

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {"type": "http", "method": "POST", "raw_path": PATH.encode(), "path": PATH, "query_string": b"",
                 "headers": [(b"content-length", b"30")], "client": (address, 4000)}
        await app(scope, receive, send)
        return status[0]

    return asyncio.gather(*(one(a, r) for a, r in calls))


def test_uploads_at_once_from_one_address_are_capped_and_others_are_served():
    """A slow uploader's connections cannot all sit in body reads: the third upload at once
    from one address gets 503 (Flower retries it), another address is served meanwhile."""
    limits = FrontLimits(max_uploads_per_address=2)
    link = SuperLink()

    async def go():
        release = asyncio.Event()
        started = []

        def stalled():
            calls = iter([{"type": "http.request", "body": b"s" * 15, "more_body": True}])

            async def receive():
                message = next(calls, None)
                if message is not None:
                    started.append(1)
                    return message
                await release.wait()
                return {"type": "http.request", "body": b"s" * 15, "more_body": False}

            return receive

        def whole():
            async def receive():
                return {"type": "http.request", "body": b"h" * 30, "more_body": False}

            return receive

        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream, limits=limits)
            held = asyncio.ensure_future(_drive(app, [("198.51.100.9", stalled()), ("198.51.100.9", stalled())]))
            while len(started) < 2:
                await asyncio.sleep(0)
            refused = await _drive(app, [("198.51.100.9", whole()), ("192.0.2.1", whole())])
            release.set()
            return refused, await held

    refused, held = asyncio.run(go())
    assert refused == [503, 200] and held == [200, 200]
    assert len(link.requests) == 3


def test_a_body_slower_than_the_minimum_rate_after_the_grace_gets_408():
    """A client under the test's control: each 100-byte piece arrives 1 s later (on the app's
    clock); at 100 B/s it falls behind a 1,000 B/s minimum once the 10 s grace is over."""
    now = [0.0]

    def clock():
        return now[0]

    async def later(n):
        now[0] += 1.0
        return None

    link, access = SuperLink(), AccessLog()
    limits = FrontLimits(body_grace_s=10.0, min_body_bytes_per_s=1000, body_idle_timeout_s=30, body_timeout_s=300)

    async def go():
        pieces = [b"p" * 100] * 100
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream, limits=limits, access=access, clock=clock)
            status = []

            async def receive():
                await later(0)
                return {"type": "http.request", "body": pieces.pop(), "more_body": bool(pieces)}

            async def send(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            scope = {"type": "http", "method": "POST", "raw_path": PATH.encode(), "path": PATH, "query_string": b"",
                     "headers": [(b"content-length", b"10000")], "client": ("198.51.100.3", 1)}
            await app(scope, receive, send)
            return status, len(pieces)

    status, left = asyncio.run(go())
    assert status == [408] and link.requests == []
    assert 80 <= left <= 90  # cut just after the grace, not at the 300 s deadline
    assert "slower\\x20than\\x201000\\x20bytes/s" in access.lines[-1]


def test_a_fast_body_within_the_grace_is_not_cut_by_the_rate():
    now = [0.0]
    limits = FrontLimits(body_grace_s=10.0, min_body_bytes_per_s=10**6)

    async def later(n):
        now[0] += 0.5  # 20 pieces in 10 s: within the grace, whatever the rate
        return None

    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"q" * 10] * 19, limits=limits, receive_hook=later)
    assert sent.status == 200


def test_bodies_beyond_the_buffer_budget_get_503_before_they_are_read():
    limits = FrontLimits(max_buffered_bytes=1000)
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"b" * 600] * 2, limits=limits)
    assert sent.status == 503 and sent.chunks_read == 0 and link.requests == []
    assert via_asgi(link, "POST", PATH.encode(), chunks=[b"b" * 500] * 2, limits=limits).status == 200


def test_a_large_body_waits_in_a_file_and_the_front_holds_little_memory(tmp_path):
    """A 6 MiB body read whole before forwarding costs the front at most its in-memory
    threshold in Python memory (the rest waits in an unlinked file), and is intact."""
    import tracemalloc

    piece = os.urandom(64 * 1024)
    count = 96  # 6 MiB
    digest = hashlib.sha256(piece * count).hexdigest()
    got = hashlib.sha256()

    class Sink(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            async for chunk in request.stream:
                got.update(chunk)
            return httpx.Response(200, stream=Stream(b"ok"))

    async def go():
        async with httpx.AsyncClient(transport=Sink()) as upstream:
            app = fleet_app(UPSTREAM, upstream, limits=FrontLimits(memory_body_bytes=256 * 1024), spool_dir=tmp_path)
            left = [count]

            async def receive():
                left[0] -= 1
                return {"type": "http.request", "body": piece, "more_body": left[0] > 0}

            async def send(message):
                pass

            scope = {"type": "http", "method": "POST", "raw_path": PATH.encode(), "path": PATH, "query_string": b"",
                     "headers": [(b"content-length", str(count * len(piece)).encode())], "client": ("198.51.100.4", 1)}
            await app(scope, receive, send)

    tracemalloc.start()
    try:
        asyncio.run(go())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.hexdigest() == digest
    assert peak < 2 * 1024 * 1024, peak
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_slow_uploads_do_not_starve_honest_sites_of_superlink_connections(loopback_pki, tmp_path):
    """Issue 21 item 3, over loopback TLS: slow uploads, more than the SuperLink connections
    the front has (2 here, 64 by default), each stalled mid-body; an honest request is still
    served (the old front gave each stalled body an upstream connection: the honest one
    waited for the pool and got 503)."""
    upstream = Upstream(loopback_pki)
    limits = FrontLimits(upstream_connections=2, upstream_pool_timeout_s=5.0, max_per_address=4)
    port = free_port()
    f = FleetFront("127.0.0.1", port, loopback_pki / "server.crt", loopback_pki / "server.key", upstream.port,
                   loopback_pki / "ca.crt", limits=limits, access_log=tmp_path / "access.log")
    f.start()
    f.port = port
    f.ctx = ssl.create_default_context(cafile=str(loopback_pki / "ca.crt"))
    slow = []
    try:
        for i in range(6):
            s = tls_socket(f, f"127.0.3.{i + 1}")
            s.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"s" * 10)
            slow.append(s)
        replies = [honest(f) for _ in range(3)]
        assert [r.status_code for r in replies] == [200, 200, 200]
    finally:
        for s in slow:
            s.close()
        f.stop()
        upstream.stop()


def test_a_closed_connection_is_freed_without_waiting_for_a_full_collection(live):
    """A closed connection's protocol (its transport, TLS and request buffers) is freed by
    reference counting: a cycle through its logger kept 48 refused 6 MiB uploads' buffers
    (+33 MB) until a full garbage collection, which a front under load rarely reaches."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for _ in range(4):
            s = tls_socket(live, "127.0.0.7")
            s.sendall(b"POST /v1/control/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert read_all(s, 5).startswith(b"HTTP/1.1 403 ")
            s.close()
        deadline = time.time() + 10
        while sum("127.0.0.7:" in x for x in live.access.lines) < 4 and time.time() < deadline:
            time.sleep(0.05)

        def alive() -> int:
            return sum(isinstance(o, front._FrontProtocol) for o in gc.get_objects())

        while alive() > 0 and time.time() < deadline:  # connection_lost runs on the front's thread
            time.sleep(0.05)
        assert alive() == 0
    finally:
        gc.enable()

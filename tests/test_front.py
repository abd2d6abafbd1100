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
import ssl
import urllib.parse

import httpx
import pytest

from deploy import front
from deploy.front import MAX_BODY_BYTES, FleetFront, fleet_app
from deploy.processes import free_port

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
             scope_extra: dict | None = None, drop: tuple[str, ...] = ()) -> Sent:
    """Call the app as uvicorn does: `raw_path` is the request target's bytes before `?`."""
    chunks = list(chunks or [])
    sent = Sent()

    async def go() -> None:
        async with link.client() as upstream:
            app = fleet_app(UPSTREAM, upstream, limit)
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                "scheme": "https", "path": urllib.parse.unquote(raw_path.decode("latin-1")),
                "raw_path": raw_path, "query_string": query, "root_path": "",
                "headers": [(b"host", b"fl.example.org:9092"), *(headers or [])],
                "client": ("203.0.113.7", 50000), "server": ("0.0.0.0", 9092), **(scope_extra or {}),
            }
            for key in drop:
                scope.pop(key)
            pending = list(chunks)

            async def receive():
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
                                           (b"content-encoding", b"gzip")])
    sent = via_asgi(link, "POST", PATH.encode(), chunks=[b"q"])
    assert sent.body == packed
    assert header(sent.headers, b"content-encoding") == [b"gzip"]
    assert header(sent.headers, b"content-length") == [str(len(packed)).encode()]


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
    assert link.requests == []
    r = via_http(SuperLink(), "POST", PATH, content=b"x" * (LIMIT + 1), limit=LIMIT)
    assert r.status_code == 413


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit():
    link = SuperLink()
    chunks = [b"y" * 100] * 50  # 5,000 bytes, no Content-Length (chunked on the wire)
    sent = via_asgi(link, "POST", PATH.encode(), chunks=chunks, limit=LIMIT)
    assert sent.status == 413
    assert sent.chunks_read == LIMIT // 100 + 1  # stopped at the chunk that crossed 1,024
    assert link.requests == []

    async def gen():
        for c in chunks:
            yield c

    r = via_http(link, "POST", PATH, content=gen(), limit=LIMIT)
    assert r.status_code == 413
    assert link.requests == []


def test_a_body_that_lies_about_its_length_is_cut_at_the_limit():
    """A small Content-Length followed by a long body: counted as it streams, not trusted."""
    link = SuperLink()
    sent = via_asgi(link, "POST", PATH.encode(), headers=[(b"content-length", b"10")],
                    chunks=[b"z" * 600, b"z" * 600, b"z" * 600], limit=LIMIT)
    assert sent.status == 413
    assert sent.chunks_read == 2
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


def test_the_default_limit_admits_a_full_minilm_update_with_margin():
    assert MAX_BODY_BYTES >= 2 * 90.9e6  # the largest legitimate message today (bench/RESULTS.md)
    assert MAX_BODY_BYTES <= 1 << 30
    with pytest.raises(ValueError, match="max_body_bytes"):
        fleet_app(UPSTREAM, httpx.AsyncClient(), 0)


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
    from deploy import pki

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

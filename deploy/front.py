"""The coordinator's public boundary: a TLS front that forwards only Flower Fleet API requests.

Why it exists (flwr 1.41, read from its source): one uvicorn port of `flower-superlink`
serves the Fleet API (`/v1/fleet/*`, the sites), the Control API (`/v1/control/*`: start
runs, register nodes, pull artifacts) and the Runtime API (`/v1/runtime/*`: the ServerApp's
messages), and the open-source build does not authenticate Control API callers (NoOp
plugin). Publishing that port would let any site, or anyone who reaches it, submit runs or
register keys. So `fedshield server` binds the SuperLink to loopback and publishes only
this front. It is not a transport: requests, SuperNode signatures (`flwr-public-key`,
`flwr-signature`, `flwr-timestamp` headers) and replies are Flower's own and are checked by
the SuperLink; the front only decides what may pass.

What passes, and nothing else:
- method POST (every Fleet RPC in 1.41 is a unary POST);
- a raw request path (the bytes on the wire, ASGI `raw_path`, never the decoded path) that
  is exactly `/v1/fleet` followed by one or more `/segment`s of `[A-Za-z0-9_-]`: no empty
  segment (no `//`, no trailing `/`), no dot segment, no percent-encoding, nothing outside
  ASCII, so that no normalisation downstream can turn an allowed path into a Control or
  Runtime API one;
- no query string;
- a body of at most `max_body_bytes` (below).
Anything else gets 403 (413 for a body over the limit) and never reaches the SuperLink.
A SuperLink that cannot be reached (or does not answer in time) gives 503.

Forwarding is byte for byte: the body as received; the request headers in their order and
spelling, less the hop-by-hop ones (RFC 9110 7.6.1: Connection and the headers it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*), Host and Content-Length
(the new hop sets its own) and Expect (the front has the whole body before it forwards);
and back, the SuperLink's status, headers (less the same) and undecoded body (its
Content-Encoding, if any, stays with it).

Body limit: checked while the body streams in (`Request.stream()`), never after buffering
it whole. A Content-Length over the limit is refused before a byte of the body is read; a
chunked body is refused as soon as what arrived passes the limit. The front then holds at
most the limit per request in memory, and the SuperLink never sees the refused request.

The ASGI app (`fleet_app`) is separate from the server that runs it (`FleetFront`: uvicorn
with the coordinator's certificate, in a thread of `fedshield server`), so that the
allow-list is tested in-process with an in-memory client (tests/test_front.py).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from privacy.errors import FedShieldError

# Used with fullmatch (a `$` would also match before a trailing newline).
FLEET_PATH = re.compile(r"/v1/fleet(/[A-Za-z0-9_-]+)+")

# The largest legitimate message today is a full all-MiniLM-L6-v2 update (training.trainable=all):
# 90.9 MB (bench/RESULTS.md). Flower 1.41 normally sends arrays as objects of at most 5 MiB each
# (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, one object per push-object request), so Fleet requests are
# usually far smaller; the limit bounds what one request can make the front hold in memory, and
# 256 MiB is 2.8x that largest message, so even a whole message in one request passes.
MAX_BODY_BYTES = 256 * 1024 * 1024

HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"host", b"content-length", b"expect",
})

REFUSED = "fedshield coordinator: only the Flower Fleet API is served here\n"


def fleet_path(scope: dict) -> str | None:
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


def fleet_app(upstream: str, client: httpx.AsyncClient, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The front as an ASGI app.

    Parameters
    ----------
    upstream : str
        The SuperLink's base URL, e.g. ``https://127.0.0.1:PORT``; the allowed raw path is
        appended to it as is.
    client : httpx.AsyncClient
        What reaches the SuperLink (its TLS verification and timeouts are the caller's). The
        caller owns it and closes it.
    max_body_bytes : int
        The largest request body forwarded (default `MAX_BODY_BYTES`).
    """
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: must be a positive int")
    base = upstream.rstrip("/")

    async def forward(request: Request) -> Response:
        path = fleet_path(request.scope)
        if path is None or request.method != "POST":
            return PlainTextResponse(REFUSED, 403)
        body = await read_body(request, max_body_bytes)
        if isinstance(body, Response):
            return body
        out = httpx.Request("POST", base + path, headers=end_to_end_headers(request.headers.raw), content=body)
        try:
            reply = await client.send(out, stream=True)
            try:
                content = b"".join([chunk async for chunk in reply.aiter_raw()])
            finally:
                await reply.aclose()
        except httpx.HTTPError:
            return PlainTextResponse("fedshield coordinator: SuperLink unavailable\n", 503)
        response = Response(content, status_code=reply.status_code)  # sets Content-Length
        response.raw_headers.extend(end_to_end_headers(reply.headers.raw))
        return response

    async def refuse(request: Request, exc: Exception) -> Response:  # noqa: ARG001
        return PlainTextResponse(REFUSED, 403)

    # One catch-all POST route; `forward` checks the raw path and the method again itself. What
    # the route does not match (another method: 405; a path such as `*`: 404) is refused alike,
    # and never redirected (Starlette would answer 307 to a path it can "fix" with a slash).
    app = Starlette(routes=[Route("/{path:path}", forward, methods=["POST"])],
                    exception_handlers={404: refuse, 405: refuse})
    app.router.redirect_slashes = False
    return app


async def read_body(request: Request, limit: int) -> bytes | Response:
    """The whole body, or a 400/413 response as soon as it is known to be malformed or too big."""
    declared = request.headers.getlist("content-length")
    if declared:
        if len(set(declared)) != 1 or not declared[0].isdigit():
            return PlainTextResponse("fedshield coordinator: malformed Content-Length\n", 400)
        if int(declared[0]) > limit:
            return too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        return PlainTextResponse("fedshield coordinator: the request body was cut off\n", 400)
    return b"".join(chunks)


def too_large(limit: int) -> Response:
    return PlainTextResponse(f"fedshield coordinator: request body over the limit of {limit} bytes\n", 413)


class FleetFront:
    """`fleet_app` on a TLS listener (uvicorn, the coordinator's certificate) in a thread.

    The SuperLink is reached at ``https://127.0.0.1:upstream_port``, verified with
    `upstream_ca` (the per-job loopback CA).
    """

    def __init__(self, host: str, port: int, certfile: Path, keyfile: Path, upstream_port: int,
                 upstream_ca: Path, max_body_bytes: int = MAX_BODY_BYTES, upstream_timeout_s: float = 600.0):
        import uvicorn

        ctx = ssl.create_default_context(cafile=str(upstream_ca))
        self.client = httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(upstream_timeout_s, connect=10.0))
        self.app = fleet_app(f"https://127.0.0.1:{upstream_port}", self.client, max_body_bytes)
        config = uvicorn.Config(self.app, host=host, port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile),
                                log_level="warning", access_log=False, lifespan="off",
                                server_header=False, date_header=False)  # the SuperLink's own come back
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fleet-front", daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            async with self.client:  # closed on the loop that used it
                await self.server.serve()

        with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
            runner.run(serve())

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise FedShieldError("could not listen on the coordinator address (in use? permission?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

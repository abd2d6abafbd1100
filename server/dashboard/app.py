"""`fedshield dashboard`'s web app (Starlette): a read-only page over one run directory.

Routes, and nothing else:
    GET /                 the page (static/index.html)
    GET /api/summary      the run's summary as JSON (summary.py `RunSummary.to_json`)
    GET /api/events       server-sent events: a `summary` event at once and whenever a watched
                          file's size or mtime changes (polled every POLL_S seconds)
    GET /static/<name>    one of the files shipped in static/, by exact name

The run directory's files reach the browser only through the summary: there is no file
route, and an asset name is looked up in the list of static/'s files made at start, never
joined to a path, so `..`, `%2e%2e` or an absolute path can only be a 404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fedshield.privacy.errors import FedShieldError
from fedshield.server.dashboard.summary import RunWatcher

STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 1.0  # how often the event stream stats the run's files
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies and the browser from timing out
MEDIA = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
         ".txt": "text/plain"}
# The page loads only its own assets and talks only to its own origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SharedWatcher:
    """One `RunWatcher` for every browser tab: its caches are rebuilt under a lock."""

    def __init__(self, run_dir: Path) -> None:
        self.watcher = RunWatcher(run_dir)
        self.lock = threading.Lock()

    def signature(self) -> object:
        return self.watcher.signature()

    def payload(self) -> dict[str, Any]:
        with self.lock:
            try:
                return {"summary": self.watcher.summary().to_json(), "error": None}
            except FedShieldError as exc:  # e.g. config.yaml replaced by something unreadable
                return {"summary": None, "error": str(exc)}


def create_app(run_dir: str | Path, stopping: threading.Event | None = None) -> Starlette:
    """The dashboard of `run_dir` (a run directory: FedShieldError otherwise). `stopping`,
    once set, ends every event stream at its next poll, so that the server's graceful
    shutdown does not wait for browsers that never hang up."""
    shared = SharedWatcher(Path(run_dir))
    stopping = stopping or threading.Event()
    assets = {p.name: p for p in STATIC.iterdir() if p.is_file()}

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    async def summary(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(shared.payload), headers=HEADERS)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            last: object = None
            quiet = 0.0
            while not stopping.is_set():
                signature = await anyio.to_thread.run_sync(shared.signature)
                if signature != last:
                    last, quiet = signature, 0.0
                    data = json.dumps(await anyio.to_thread.run_sync(shared.payload))
                    yield f"event: summary\ndata: {data}\n\n"
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                await anyio.sleep(POLL_S)
                quiet += POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    async def asset(request: Request) -> Response:
        path = assets.get(str(request.path_params["name"]))
        if path is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"), headers=HEADERS)

    routes = [Route("/", page), Route("/api/summary", summary), Route("/api/events", events),
              Route("/static/{name}", asset)]
    return Starlette(routes=routes)

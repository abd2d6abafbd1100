"""The Fleet front under attack: does it keep serving honest sites, and what does it cost?

    .venv/bin/python bench/front_load.py [--slow 250] [--bodies 3] [--body-mb 200] [--phase-s 20]

On loopback only, a real `deploy.front.FleetFront` (its own process, default limits, so
that its RSS is its own) in front of a stand-in SuperLink (its own process: uvicorn with
TLS, reads every body as it streams and drops it, answers a 64-byte reply), while:

  honest   a site: one small Fleet request (`send-node-heartbeat`, 22 bytes) at a time on a
           fresh TLS connection (as after a reconnect), from 127.0.0.1, all along;
  slow     N connections (default 250, each from its own loopback address 127.0.1.x /
           127.0.2.x: a botnet, so the per-address cap does not help and the total cap and
           the header deadline must) that complete TLS and then send a request head one
           byte a second, never finishing it; cut ones reconnect after 1 s;
  bodies   B uploads (default 3) of 200 MB each, from 127.0.0.2.., sent as fast as loopback
           TLS allows, each with its Content-Length.

Phases, in one run, side by side (the machine is shared and noisy):

  1 baseline       honest alone
  2 slow           honest + the slow connections
  3 slow+bodies    honest + slow + the bodies, at the default body limit (refused: 413)
  4 bodies-stream  honest + slow + the bodies with the limit raised to 256 MiB (a second
                   front process: the bodies stream through to the stand-in SuperLink)
  5 = 4 before     phase 4 against the front as it was before (`--old-ref`, default
                   1decbf3: every body read whole, then forwarded), for the memory it cost

For each: honest requests, their success rate and latency (p50/p95/max), the front's RSS
at the start and its peak (psutil, sampled every 0.1 s; growth = peak - start), the slow connections the front
held and for how long at most, what happened to the bodies. The attackers run in a process
of their own (asyncio) so that they do not share the honest client's interpreter.

Bounded: every loop has a deadline; every process it starts is stopped (by pid) at the end.

    .venv/bin/python bench/front_load.py --uploads [--slow-uploads 80] [--addresses 5] [--phase-s 15]

Issue 21 item 3 (slow uploads starve honest sites), the front of this checkout against the
front as it was (`--old-ref`, default c57ace7: bodies streamed on as they arrived, each
holding one of the 64 SuperLink connections), both with the admitted keys of
`fedshield server` where they take them. Phases, each with an honest site sending signed
heartbeats (Flower's own SuperNode headers, an admitted key) one at a time on fresh
connections, and the front's RSS sampled:

  A baseline       honest alone
  B slow-unauth    80 uploads (Content-Length 6 MiB) from 5 addresses, unsigned, sending
                   their body a byte a second; reconnect when cut
  C slow-signed    the same, each signed by an admitted key (a hostile registered site)
  D fast-unauth    48 unsigned 6 MiB bodies sent as fast as loopback allows, from 5 addresses
                   (RSS after: 3 s after the phase)
  E = D again      whether what D left is held for reuse or grows with each wave

A reduced variant of the reported run: a stand-in SuperLink (reads and drops each body),
so "rounds train normally" is shown by honest requests served, not by real rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

HEARTBEAT = b"\x0a\x02\x08\x01\x11\x00\x00\x00\x00\x00\x00\x3e\x40" + b"\x00" * 9  # 22 bytes


# ------------------------------------------------------------------ the pieces, each its own process


def serve_upstream(pki: Path, port: int) -> None:
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while True:
            m = await receive()
            if m["type"] == "http.disconnect" or not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/protobuf"), (b"content-length", b"64")]})
        await send({"type": "http.response.body", "body": b"\x08" * 64})

    uvicorn.run(app, host="127.0.0.1", port=port, ssl_certfile=str(pki / "server.crt"),
                ssl_keyfile=str(pki / "server.key"), log_level="critical", access_log=False, lifespan="off")


def serve_front(pki: Path, port: int, upstream: int, body_mb: float, log: Path, old: str = "") -> None:
    if old:  # the front as it was before (a file from `git show REF:deploy/front.py`)
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_front", old)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_front"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        front = module.FleetFront("127.0.0.1", port, pki / "server.crt", pki / "server.key", upstream, pki / "ca.crt",
                                  max_body_bytes=int(body_mb * 2**20))
        front.start()
        print("ready", flush=True)
        sys.stdin.read()
        front.stop()
        return
    from fedshield.deploy.front import MIB, FleetFront, FrontLimits

    limits = FrontLimits() if body_mb <= 0 else FrontLimits(max_body_bytes=int(body_mb * MIB))
    front = FleetFront("127.0.0.1", port, pki / "server.crt", pki / "server.key", upstream, pki / "ca.crt",
                       limits=limits, access_log=log)
    front.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    front.stop()


def attack(pki: Path, port: int, slow: int, bodies: int, body_mb: float, seconds: float, out: Path) -> None:
    """The slow connections and the big bodies, for `seconds`; results as JSON in `out`."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    stop_at = time.monotonic() + seconds
    held: list[float] = []
    stats = {"slow_opened": 0, "slow_cut": 0, "slow_refused_at_connect": 0, "bodies": []}

    async def slow_one(i: int) -> None:
        source = f"127.0.{1 + i // 250}.{2 + i % 250}"
        head = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: fl\r\nContent-Length: 1\r\nX-Pad: " + b"a" * 4000
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1", local_addr=(source, 0)), 15)
            except (OSError, TimeoutError):
                stats["slow_refused_at_connect"] += 1
                await asyncio.sleep(1)
                continue
            stats["slow_opened"] += 1
            t0 = time.monotonic()
            try:
                for b in head:
                    if time.monotonic() >= stop_at:
                        break
                    writer.write(bytes([b]))
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(1024), 1.0)
                    except TimeoutError:
                        continue
                    stats["slow_cut"] += 1  # an answer (408/503) or EOF: the front cut it
                    del data
                    break
            except (OSError, ssl.SSLError):
                stats["slow_cut"] += 1
            held.append(time.monotonic() - t0)
            writer.close()
            await asyncio.sleep(1)

    async def body_one(i: int) -> None:
        size = int(body_mb * 1024 * 1024)
        t0 = time.monotonic()
        result = {"sent_mb": 0.0, "status": None, "seconds": None}
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1",
                                                           local_addr=(f"127.0.0.{2 + i}", 0))
            writer.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: fl\r\nContent-Type: application/protobuf\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)

            async def status() -> None:
                line = await reader.readline()
                result["status"] = int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None

            answer = asyncio.create_task(status())
            chunk = b"\x00" * (1 << 20)
            sent = 0
            while sent < size and not answer.done() and time.monotonic() < stop_at + 60:
                writer.write(chunk[: size - sent])
                await writer.drain()
                sent += min(len(chunk), size - sent)
            result["sent_mb"] = round(sent / 2**20, 1)
            await asyncio.wait_for(answer, 60)
            writer.close()
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            result["error"] = type(exc).__name__
        result["seconds"] = round(time.monotonic() - t0, 1)
        stats["bodies"].append(result)

    async def main() -> None:
        tasks = [asyncio.create_task(slow_one(i)) for i in range(slow)]
        await asyncio.sleep(min(3.0, seconds / 4) if slow else 0)  # the slow ones first, then the bodies
        tasks += [asyncio.create_task(body_one(i)) for i in range(bodies)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    stats["slow_held_max_s"] = round(max(held), 1) if held else None
    out.write_text(json.dumps(stats))


# ------------------------------------------------------------------ slow uploads (issue 21 item 3)


def signed_headers(key_pem: Path) -> bytes:
    """Flower's SuperNode authentication headers, as flwr/supernode/node_auth_http_interceptor.py makes them."""
    import base64
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    ts = dt.datetime.now(dt.UTC).isoformat()
    return (b"flwr-public-key: " + base64.b64encode(public_key_to_bytes(key.public_key())) + b"\r\n"
            + b"flwr-timestamp: " + ts.encode() + b"\r\n"
            + b"flwr-signature: " + base64.b64encode(sign_message(key, ts.encode())) + b"\r\n")


def upload_attack(pki: Path, port: int, mode: str, count: int, addresses: int, seconds: float, key: Path,
                  out: Path) -> None:
    """`count` uploads from `addresses` loopback addresses for `seconds`: `slow-*` send a
    6 MiB body a byte a second, `fast` sends it at once; `*-signed` sign their heads."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    stop_at = time.monotonic() + seconds
    stats = {"opened": 0, "answers": {}, "body_bytes_sent": 0}
    size = 6 * 2**20

    async def one(i: int) -> None:
        source = f"127.0.4.{1 + i % addresses}"
        rounds = 0
        while time.monotonic() < stop_at and (mode.startswith("slow") or rounds == 0):
            rounds += 1
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1", local_addr=(source, 0)), 15)
            except (OSError, TimeoutError):
                await asyncio.sleep(1)
                continue
            stats["opened"] += 1
            auth = signed_headers(key) if mode.endswith("signed") else b""
            writer.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: fl\r\nContent-Type: application/protobuf\r\n"
                         + auth + b"Content-Length: %d\r\n\r\n" % size)
            answer = asyncio.ensure_future(reader.readline())
            try:
                if mode == "fast":
                    chunk = b"\x00" * 2**20
                    for _ in range(6):
                        if answer.done():
                            break
                        writer.write(chunk)
                        await writer.drain()
                        stats["body_bytes_sent"] += len(chunk)
                    line = await asyncio.wait_for(answer, 60)
                else:
                    line = b""
                    while time.monotonic() < stop_at and not answer.done():
                        writer.write(b"\x00")
                        await writer.drain()
                        stats["body_bytes_sent"] += 1
                        try:
                            line = await asyncio.wait_for(asyncio.shield(answer), 1.0)
                        except TimeoutError:
                            continue
                status = line.split()[1].decode() if line.startswith(b"HTTP/1.1") else "cut"
            except (OSError, ssl.SSLError, TimeoutError, IndexError):
                status = "cut"
            if time.monotonic() < stop_at or status != "cut":
                stats["answers"][status] = stats["answers"].get(status, 0) + 1
            answer.cancel()
            writer.close()
            await asyncio.sleep(1)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(main())
    out.write_text(json.dumps(stats))


def serve_front_keys(pki: Path, port: int, upstream: int, key: Path, log: Path, old: str) -> None:
    from cryptography.hazmat.primitives import serialization

    if old:
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_front", old)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_front"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        front = module.FleetFront("127.0.0.1", port, pki / "server.crt", pki / "server.key", upstream, pki / "ca.crt",
                                  access_log=log)
    else:
        from fedshield.deploy.front import FleetFront, node_key_bytes

        public = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
        front = FleetFront("127.0.0.1", port, pki / "server.crt", pki / "server.key", upstream, pki / "ca.crt",
                           access_log=log, authorized_keys={node_key_bytes(public)}, spool_dir=log.parent)
    front.start()
    print("ready", flush=True)
    sys.stdin.read()
    front.stop()


def honest_signed(port: int, ctx: ssl.SSLContext, seconds: float, key: Path) -> list[float | None]:
    """As `honest`, each request signed by the admitted key."""
    import httpx

    out: list[float | None] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        headers = {"content-type": "application/protobuf"}
        for line in signed_headers(key).decode().strip().split("\r\n"):
            name, value = line.split(": ", 1)
            headers[name] = value
        t0 = time.monotonic()
        try:
            with httpx.Client(verify=ctx, timeout=10) as c:
                r = c.post(f"https://127.0.0.1:{port}/v1/fleet/send-node-heartbeat", content=HEARTBEAT, headers=headers)
            out.append(time.monotonic() - t0 if r.status_code == 200 else None)
        except httpx.HTTPError:
            out.append(None)
        time.sleep(0.1)
    return out


def uploads_main(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedshield.deploy import pki as pki_mod
    from fedshield.deploy.processes import free_port

    tmp = Path(tempfile.mkdtemp(prefix="front-uploads-"))
    pki = tmp / "pki"
    pki_mod.init_pki(pki, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    key = tmp / "node.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    started: list[subprocess.Popen] = []
    rows = []
    old = old_front(args.old_ref, tmp)
    try:
        up = free_port()
        start(["--serve-upstream", str(pki), str(up)], started)
        fronts = [("this front", "")] + ([(f"front at {args.old_ref}", old)] if old else [])
        for label, source in fronts:
            port = free_port()
            p = start(["--serve-front-keys", str(pki), str(port), str(up), str(key),
                       str(tmp / f"access-{len(rows)}.log"), source], started, stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "the front did not start"
            time.sleep(1)
            honest_signed(port, ctx, 1.0, key)  # warm-up
            for phase, mode, count in (("A baseline", "", 0), ("B slow-unauth", "slow", args.slow_uploads),
                                       ("C slow-signed", "slow-signed", args.slow_uploads),
                                       ("D fast-unauth 6 MiB", "fast", 48), ("E = D again", "fast", 48)):
                sampler = Sampler(p.pid)
                sampler.start()
                result = tmp / f"uploads-{len(rows)}.json"
                attacker = None
                if count:
                    attacker = start(["--upload-attack", str(pki), str(port), mode, str(count), str(args.addresses),
                                      str(args.phase_s), str(key), str(result)], started)
                    time.sleep(3)  # the uploads first
                lat = honest_signed(port, ctx, args.phase_s, key)
                if attacker is not None:
                    attacker.wait(timeout=args.phase_s + 120)
                time.sleep(3)
                after = psutil.Process(p.pid).memory_info().rss
                sampler.done.set()
                sampler.join()
                stats = json.loads(result.read_text()) if result.exists() else {}
                ok = [x for x in lat if x is not None]
                ms = sorted(1000 * x for x in ok)
                rows.append({"front": label, "phase": phase, "honest": len(lat),
                             "ok_pct": round(100 * len(ok) / max(1, len(lat)), 1),
                             "p50_ms": round(statistics.median(ms), 1) if ms else None,
                             "max_ms": round(ms[-1], 1) if ms else None,
                             "rss_start_mb": round(sampler.start_rss / 2**20, 1),
                             "rss_peak_mb": round(sampler.peak / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
                             "attack": stats})
                print(json.dumps(rows[-1]), flush=True)
                time.sleep(2)
            p.stdin.close()
            p.wait(timeout=30)
    finally:
        stop(started)
    print("\n| front | phase | honest requests | served | p50 ms | max ms | front RSS MB start / peak / after | "
          "attack answers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["attack"].get("answers", {}).items())) or "-"
        print(f"| {r['front']} | {r['phase']} | {r['honest']} | {r['ok_pct']}% | {r['p50_ms']} | {r['max_ms']} | "
              f"{r['rss_start_mb']} / {r['rss_peak_mb']} / {r['rss_after_mb']} | {answers} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


# ------------------------------------------------------------------ the bench


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = self.start_rss = self.proc.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return


def honest(port: int, ctx: ssl.SSLContext, seconds: float) -> list[float | None]:
    """Latency of each honest request (None: failed), one after the other, fresh connections."""
    import httpx

    out: list[float | None] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            with httpx.Client(verify=ctx, timeout=10) as c:
                r = c.post(f"https://127.0.0.1:{port}/v1/fleet/send-node-heartbeat", content=HEARTBEAT,
                           headers={"content-type": "application/protobuf"})
            out.append(time.monotonic() - t0 if r.status_code == 200 else None)
        except httpx.HTTPError:
            out.append(None)
        time.sleep(0.1)
    return out


def old_front(ref: str, tmp: Path) -> str:
    """deploy/front.py as it was at git `ref`, written under `tmp` for a side-by-side run;
    "" (and a line saying why) if there is no ref or it cannot be read."""
    if not ref:
        return ""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:deploy/front.py"], capture_output=True, text=True)
    if shown.returncode != 0:
        print(f"--old-ref {ref}: {shown.stderr.strip()}; skipping the old front", flush=True)
        return ""
    (tmp / "old_front.py").write_text(shown.stdout)
    return str(tmp / "old_front.py")


def stop(started: list[subprocess.Popen]) -> None:
    """End the bench's processes: stdin closed, SIGTERM newest first, killed after 15 s."""
    for p in started:
        if p.stdin and not p.stdin.closed:
            p.stdin.close()
    for p in reversed(started):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start(args: list[str], started: list[subprocess.Popen], **kw) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, __file__, *args], **kw)
    started.append(p)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slow", type=int, default=250)
    ap.add_argument("--bodies", type=int, default=3)
    ap.add_argument("--body-mb", type=float, default=200.0)
    ap.add_argument("--phase-s", type=float, default=20.0)
    ap.add_argument("--old-ref", default="1decbf3",
                    help="also run phase 4 against deploy/front.py as of this git ref (the buffering front; "
                         "'' to skip)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--uploads", action="store_true", help="the slow-uploads scenario (issue 21 item 3) instead")
    ap.add_argument("--slow-uploads", type=int, default=80)
    ap.add_argument("--addresses", type=int, default=5)
    args = ap.parse_args()
    if args.uploads:
        if args.old_ref == "1decbf3":
            args.old_ref = "c57ace7"
        return uploads_main(args)
    from fedshield.deploy import pki as pki_mod
    from fedshield.deploy.processes import free_port

    tmp = Path(tempfile.mkdtemp(prefix="front-load-"))
    pki = tmp / "pki"
    pki_mod.init_pki(pki, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    started: list[subprocess.Popen] = []
    rows = []
    try:
        up = free_port()
        start(["--serve-upstream", str(pki), str(up)], started)
        fronts = {}
        old = old_front(args.old_ref, tmp)
        for label, mb, source in (("default", 0.0, ""), ("256MiB", 256.0, ""), ("old-256MiB", 256.0, old)):
            if label.startswith("old") and not source:
                continue
            port = free_port()
            p = start(["--serve-front", str(pki), str(port), str(up), str(mb), str(tmp / f"access-{label}.log"),
                       source], started, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "the front did not start"
            fronts[label] = (port, p)
        time.sleep(2)
        honest(fronts["default"][0], ctx, 1.0)  # warm-up (imports, first handshakes)

        phases = [("1 baseline", "default", 0, 0), ("2 slow", "default", args.slow, 0),
                  ("3 slow+bodies (413)", "default", args.slow, args.bodies),
                  ("4 bodies-stream (256 MiB)", "256MiB", args.slow, args.bodies)]
        if "old-256MiB" in fronts:
            phases.append((f"5 = 4, front at {args.old_ref}", "old-256MiB", args.slow, args.bodies))
        for name, label, slow, bodies in phases:
            port, proc = fronts[label]
            sampler = Sampler(proc.pid)
            sampler.start()
            result = tmp / f"attack-{name[0]}.json"
            attacker = None
            if slow or bodies:
                attacker = start(["--attack", str(pki), str(port), str(slow), str(bodies), str(args.body_mb),
                                  str(args.phase_s), str(result)], started)
                time.sleep(2)
            lat = honest(port, ctx, args.phase_s)
            stats = {}
            if attacker is not None:
                attacker.wait(timeout=args.phase_s + 180)
                stats = json.loads(result.read_text()) if result.exists() else {}
            sampler.done.set()
            sampler.join()
            ok = [x for x in lat if x is not None]
            ms = sorted(1000 * x for x in ok)
            rows.append({
                "phase": name, "honest": len(lat), "ok_pct": round(100 * len(ok) / max(1, len(lat)), 1),
                "p50_ms": round(statistics.median(ms), 1) if ms else None,
                "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1) if ms else None,
                "max_ms": round(ms[-1], 1) if ms else None,
                "rss_start_mb": round(sampler.start_rss / 2**20, 1), "rss_peak_mb": round(sampler.peak / 2**20, 1),
                **stats,
            })
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(12)  # the previous phase's connections time out before the next one
    finally:
        stop(started)
    base = rows[0]
    print(f"\n{'phase':28} {'honest':>6} {'ok %':>6} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} "
          f"{'RSS MB':>7} {'peak':>7} {'growth':>7}  slow held max / cut / bodies")
    for r in rows:
        bodies = ", ".join(f"{b.get('status')} after {b.get('sent_mb')} MB in {b.get('seconds')} s"
                           for b in r.get("bodies", []))
        print(f"{r['phase']:28} {r['honest']:>6} {r['ok_pct']:>6} {r['p50_ms']!s:>7} {r['p95_ms']!s:>7} "
              f"{r['max_ms']!s:>7} {r['rss_start_mb']:>7} {r['rss_peak_mb']:>7} "
              f"{r['rss_peak_mb'] - r['rss_start_mb']:>+7.1f}  "
              f"{r.get('slow_held_max_s', '-')} s / {r.get('slow_cut', '-')} / {bodies or '-'}")
    ratio = [r["p50_ms"] / base["p50_ms"] for r in rows[1:] if r["p50_ms"] and base["p50_ms"]]
    if ratio:
        print("honest p50 latency vs baseline: " + ", ".join(f"{x:.2f}x" for x in ratio))
    lines = {p.name: sum(1 for _ in open(p)) for p in sorted(tmp.glob("access-*.log"))}
    print(f"access-log lines: {lines}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-upstream":
        serve_upstream(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-front":
        serve_front(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), Path(sys.argv[6]),
                    sys.argv[7])
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-front-keys":
        serve_front_keys(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]),
                         sys.argv[7])
    elif len(sys.argv) > 1 and sys.argv[1] == "--upload-attack":
        upload_attack(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]),
                      float(sys.argv[7]), Path(sys.argv[8]), Path(sys.argv[9]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--attack":
        attack(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]),
               float(sys.argv[7]), Path(sys.argv[8]))
    else:
        sys.exit(main())

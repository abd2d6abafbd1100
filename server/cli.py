"""`fedshield server`: the coordinator on Flower's deployment runtime.

    fedshield server --pki pki/ --site-keys pki/ [--address 0.0.0.0:9092] [--config FILE] [key=value ...]

What it starts, and why (flwr 1.41, read from its source):

1. `flower-superlink` (subprocess) with TLS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`,
   never `--insecure`), `--enable-supernode-auth`, `--disable-runtime-dependency-installation`
   (the SuperLink would otherwise `uv sync` app dependencies: a download), bound to
   127.0.0.1 only. In 1.41 one uvicorn port serves the Fleet API (sites), the Control API
   (start runs, register nodes, pull artifacts) and the Runtime API (the ServerApp's
   messages), and the open-source build has no Control API authentication (NoOp plugin).
   Exposing that port would let any site that reaches it submit runs or register keys.
   So the SuperLink listens on loopback with a throw-away loopback certificate, and
2. a Fleet-only TLS front (`FleetFront`, in this process) listens on `--address` with the
   coordinator's certificate and forwards only `/v1/fleet/*` requests, byte for byte, to
   the SuperLink. It is not a transport: requests, node signatures and replies are
   Flower's own; it only refuses every other path (403). This is the one port sites need.
3. Site admission: `--enable-supernode-auth` makes the SuperLink refuse every SuperNode
   whose public key was not registered through the Control API. The deprecated
   `--auth-list-public-keys` CSV is rejected by 1.41 ("no longer supported"), so each key
   given with `--site-keys` is registered with `flwr supernode register KEY.pub` (the
   supported path) before the run starts. Nothing else is admitted.
4. The run: `flwr run APP fedshield --stream`. APP is a private Flower app folder holding
   only a generated pyproject.toml: the components (`server.app:app`, `client.app:app`) and
   the whole resolved fedshield config as flat dotted keys in `[tool.flwr.app.config]`
   (Flower only accepts `--run-config` keys that the app declares, so declaring them all is
   how the resolved config reaches `context.run_config`). The FAB thus carries no code:
   the coordinator and every site run the fedshield they installed and audited, not code
   shipped by the coordinator. The SuperLink starts the ServerApp (`flwr-serverapp` via
   its SuperExec) which runs `server.app.run_federation`, writing the same run directory as
   a simulation (`output.dir`/`output.run_name`).
5. FLWR_HOME is a private folder (0700) next to the run directory
   (`<output.dir>/.<run_name>.flower/`): Flower's config.toml, the loopback certificate,
   the app folder and the SuperLink log. Telemetry is off (FLWR_TELEMETRY_ENABLED=0).

On Ctrl-C / SIGTERM every child (SuperLink, its SuperExec and ServerApp, `flwr run`) is
terminated and the command exits 130.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported anywhere

import argparse
import datetime as dt
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from deploy.processes import stop_process_groups
from privacy.errors import FedShieldError

CONNECTION = "fedshield"
# Only plain Fleet endpoint paths: no dot-segments, no percent-encoding, no empty segments,
# so that no normalisation downstream can turn an allowed path into a Control API one.
FLEET_PATH = re.compile(r"^/v1/fleet(/[A-Za-z0-9_-]+)+$")
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
               "upgrade", "proxy-authorization", "proxy-connection", "trailer", "content-encoding"}


class Interrupted(Exception):
    pass


def flwr_bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (never another one)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FedShieldError(f"{name}: not found next to {sys.executable}; is flwr 1.41 installed?")
    return found


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    })
    return env


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise FedShieldError(f"--address {address!r}: expected HOST:PORT, e.g. 0.0.0.0:9092")
    return host.strip("[]") or "0.0.0.0", int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ inputs


def check_pki(pki: Path) -> dict[str, Path]:
    from cryptography import x509

    from deploy.pki import PKIError, load_certificates

    files = {n: pki / n for n in ("ca.crt", "server.crt", "server.key")}
    for name, p in files.items():
        if not p.is_file():
            raise PKIError(f"{p}: not found (make it with `fedshield certs init --out {pki} ...`)")
    ca = load_certificates(files["ca.crt"])[0]
    cert = load_certificates(files["server.crt"])[0]
    now = dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{files['server.crt']}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                       "issue a new one with `fedshield certs init --force`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # InvalidSignature is not a ValueError
        raise PKIError(f"{files['server.crt']}: not signed by {files['ca.crt']}; sites would refuse it") from None
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(files["server.key"].read_bytes(), None)
    except (ValueError, TypeError):
        raise PKIError(f"{files['server.key']}: not a PEM private key") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise PKIError(f"{files['server.key']}: does not belong to {files['server.crt']}")
    _ = x509  # noqa
    return files


def collect_site_keys(items: list[str]) -> list[Path]:
    from deploy.pki import load_site_public_key

    keys: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            keys.extend(sorted(p.glob("*.pub")))
        elif p.is_file():
            keys.append(p)
        else:
            raise FedShieldError(f"--site-keys {item}: no such file or folder")
    if not keys:
        raise FedShieldError(f"--site-keys {' '.join(items)}: no site public keys (*.pub) found")
    seen: dict[bytes, Path] = {}
    from cryptography.hazmat.primitives import serialization

    for k in keys:
        pub = load_site_public_key(k)
        der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if der in seen:
            raise FedShieldError(f"{k}: the same key as {seen[der]}; every site needs its own key pair")
        seen[der] = k
    return keys


def resolve_config(args: argparse.Namespace):
    import conf

    cfg = conf.load_config_file(args.config, args.overrides) if args.config else conf.load_config(args.overrides)
    for key in ("task.model", "task.data_path", "task.test_path", "output.dir"):
        section, leaf = key.split(".")
        value = str(cfg[section][leaf])
        if value and not Path(value).expanduser().is_absolute():
            cfg[section][leaf] = str(Path(value).expanduser().resolve())
        elif value:
            cfg[section][leaf] = str(Path(value).expanduser())
    if not cfg.output.run_name:
        cfg.output.run_name = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise conf.ConfigError(f"output.run_name={cfg.output.run_name!r}: {run_dir} already holds a run; choose another name")
    return cfg, run_dir


def write_app(app_dir: Path, cfg) -> None:
    """A Flower app folder with only a pyproject.toml: the components + the resolved config.

    The config travels as one YAML string (`server.app.RUN_CONFIG_YAML_KEY`): Flower's run
    config holds only scalars, and the YAML keeps lists (task.labels) and nulls intact.
    """
    import json

    import conf
    from server.app import RUN_CONFIG_YAML_KEY

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\nrequires = [\"setuptools>=68\"]\nbuild-backend = \"setuptools.build_meta\"\n\n"
        "[project]\nname = \"fedshield-run\"\nversion = \"0.1.0\"\n"
        "description = \"fedshield run: the code is the fedshield package installed at each party\"\n"
        "license = \"Apache-2.0\"\ndependencies = []\n\n"
        "[tool.flwr.app]\npublisher = \"fedshield\"\n\n"
        "[tool.flwr.app.components]\nserverapp = \"server.app:app\"\nclientapp = \"client.app:app\"\n\n"
        # a JSON string is a valid TOML basic string (same escapes)
        f"[tool.flwr.app.config]\n{json.dumps(RUN_CONFIG_YAML_KEY)} = {json.dumps(conf.to_yaml(cfg))}\n"
    )


def write_flower_config(home: Path, port: int, ca: Path) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )


# ------------------------------------------------------------------ the Fleet-only front


class FleetFront:
    """TLS listener on the public address that forwards only Fleet API requests."""

    def __init__(self, host: str, port: int, certfile: Path, keyfile: Path, upstream_port: int, upstream_ca: Path):
        import httpx
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, Response
        from starlette.routing import Route

        ctx = ssl.create_default_context(cafile=str(upstream_ca))
        upstream = f"https://127.0.0.1:{upstream_port}"
        self.client: httpx.AsyncClient | None = None
        self.refused = 0

        async def forward(request: Request) -> Response:
            path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
            if not FLEET_PATH.match(path) or request.method != "POST" or request.url.query:
                self.refused += 1
                return PlainTextResponse("fedshield coordinator: only the Flower Fleet API is served here\n", 403)
            if self.client is None:
                self.client = httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(600.0, connect=10.0))
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            body = await request.body()
            try:
                r = await self.client.request("POST", upstream + path, content=body, headers=headers,
                                              params=request.query_params)
            except httpx.HTTPError:
                return PlainTextResponse("fedshield coordinator: SuperLink unavailable\n", 503)
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
            return Response(content=r.content, status_code=r.status_code, headers=out)

        app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])
        config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile),
                                log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fleet-front", daemon=True)

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


# ------------------------------------------------------------------ children


class Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        stop_process_groups(self.procs)  # the children and what they started (SuperExec, ServerApp)


def wait_tls(port: int, ca: Path, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FedShieldError(f"the SuperLink stopped at start (exit {proc.returncode}): {last_error(log)} (log: {log})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s, ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                return
        except OSError:
            time.sleep(0.3)
    raise FedShieldError(f"the SuperLink did not come up in {timeout:.0f}s (log: {log})")


def last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "?"
    for ln in reversed(lines):
        if "ERROR" in ln or "rror" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "?"


def run(cmd: list[str], env: dict, what: str) -> str:
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise FedShieldError(f"{what}: no answer within 120 s (is the SuperLink up? see its log)") from None
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise FedShieldError(f"{what}: {msg[-1] if msg else 'failed'} (exit {r.returncode})")
    return r.stdout


# ------------------------------------------------------------------ command


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield server",
        description="Coordinator: a TLS SuperLink that admits only registered sites, and the fedshield ServerApp.")
    parser.add_argument("--pki", required=True, help="folder with ca.crt, server.crt, server.key (fedshield certs init)")
    parser.add_argument("--site-keys", required=True, nargs="+", help="site public keys (*.pub files or folders of them)")
    parser.add_argument("--address", default="0.0.0.0:9092", help="where sites connect (default 0.0.0.0:9092)")
    parser.add_argument("--config", help="a YAML config file")
    parser.add_argument("--verbose", action="store_true", help="also show the SuperLink's log")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides and presets")
    args = parser.parse_args(argv)

    pki = Path(args.pki).expanduser().resolve()
    files = check_pki(pki)
    host, port = parse_address(args.address)
    keys = collect_site_keys(args.site_keys)
    cfg, run_dir = resolve_config(args)

    home = Path(cfg.output.dir) / f".{cfg.output.run_name}.flower"
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    from deploy.pki import init_pki

    internal = home / "loopback-pki"
    init_pki(internal, "localhost", ["127.0.0.1"], days=30, ca_days=30, force=True)
    write_app(home / "app", cfg)
    link_port = free_port()
    write_flower_config(home, link_port, internal / "ca.crt")
    env = flower_env(home)
    log = home / "superlink.log"

    children = Children()
    front: FleetFront | None = None
    failure = ""

    def on_signal(signum, frame):  # noqa: ARG001
        raise Interrupted()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log, "ab") as log_f:
            superlink = children.start([
                flwr_bin("flower-superlink"),
                "--ssl-ca-certfile", str(internal / "ca.crt"),
                "--ssl-certfile", str(internal / "server.crt"),
                "--ssl-keyfile", str(internal / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(link_port),
            ], env, stdout=log_f, stderr=subprocess.STDOUT, cwd=str(home))
        wait_tls(link_port, internal / "ca.crt", superlink, log)
        print(f"SuperLink up (loopback 127.0.0.1:{link_port}, TLS, SuperNode authentication on; log {log})", flush=True)

        from deploy.pki import load_site_public_key, public_key_fingerprint

        for k in keys:
            run([flwr_bin("flwr"), "supernode", "register", str(k), CONNECTION, "--name", k.stem[:64]], env,
                f"registering site key {k}")
            print(f"admitted site key {k.stem}: SHA256:{public_key_fingerprint(load_site_public_key(k))}", flush=True)

        front = FleetFront(host, port, files["server.crt"], files["server.key"], link_port, internal / "ca.crt")
        front.start()
        print(f"listening for sites on {host}:{port} (TLS, Fleet API only); waiting for "
              f"{cfg.federation.num_sites} sites, {cfg.federation.rounds} rounds", flush=True)

        flwr_run = children.start(
            [flwr_bin("flwr"), "run", str(home / "app"), CONNECTION, "--stream"], env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert flwr_run.stdout is not None
        for line in flwr_run.stdout:
            if _APP_ERROR.search(line):
                failure = _APP_ERROR.search(line).group(1).strip()
            if args.verbose or not _noise(line):
                print(line.rstrip(), flush=True)
            if (run_dir / "report.md").is_file() and _finished(run_dir):
                break
    except Interrupted:
        print("interrupted: stopping the SuperLink and the ServerApp", file=sys.stderr, flush=True)
        _shutdown(front, children)
        print(f"run directory (partial): {run_dir}", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _shutdown(front, children)
    if not (run_dir / "report.md").is_file():
        raise FedShieldError(f"the run did not complete: {failure or last_error(log)} (SuperLink log: {log})")
    print(f"\nrun directory: {run_dir}", flush=True)
    return 0


def _finished(run_dir: Path) -> bool:
    """report.md is the last thing run_federation writes."""
    return (run_dir / "report.md").stat().st_size > 0


_APP_ERROR = re.compile(r"(?:FedShieldError|ConfigError|DataError|PKIError|LedgerError|BudgetExceeded|ModelError|TrainingError): (.+)$")
_TRACEBACK = re.compile(r"^(Traceback |  File |    |\s*\^+\s*$|\d\d/\d\d/\d{4} .*:(ERROR|INFO|WARNING):)")


def _noise(line: str) -> bool:
    """Flower's duplicate log lines and tracebacks (kept in full with --verbose)."""
    return bool(_TRACEBACK.match(line)) or any(s in line for s in ("uvicorn", "Using SuperLink", "DEBUG"))


def _shutdown(front: FleetFront | None, children: Children) -> None:
    if front is not None:
        front.stop()
    children.stop()

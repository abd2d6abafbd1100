"""`fedshield server`: the coordinator on Flower's deployment runtime.

    fedshield server --pki pki/ [--connection-keys pki/] [--address 0.0.0.0:9092] [--config FILE] [key=value ...]

What it starts, and why (flwr 1.41, read from its source):

1. `flower-superlink` (subprocess) with TLS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`,
   never `--insecure`), `--enable-supernode-auth`, `--disable-runtime-dependency-installation`
   (the SuperLink would otherwise `uv sync` app dependencies: a download), bound to
   127.0.0.1 only. In 1.41 one uvicorn port serves the Fleet API (sites), the Control API
   (start runs, register nodes, pull artifacts) and the Runtime API (the ServerApp's
   messages), and the open-source build has no Control API authentication (NoOp plugin).
   Exposing that port would let any site that reaches it submit runs or register keys.
   So the SuperLink listens on loopback with a throw-away loopback certificate, and
2. the Fleet-only TLS front (`deploy.front.FleetFront`, in this process) listens on
   `--address` with the coordinator's certificate and forwards only Fleet API requests
   (POST, plain `/v1/fleet/...` paths, a Content-Length up to `--max-body-mb`, default
   Flower's 5 MiB array chunk + 1 MiB: the largest request a site sends, see
   deploy/front.py), signed by an admitted connection key (checked on the request head,
   401 otherwise) and read whole before it goes on to the SuperLink. It is not a transport:
   requests, node signatures and replies are Flower's own; it refuses everything else
   (403), bounds what one client can hold (timeouts, `--max-connections`,
   `--max-connections-per-address`) and writes one access-log line per request to
   `<flower home>/front-access.log`. This is the one port sites need.
3. Site admission: `--enable-supernode-auth` makes the SuperLink refuse every SuperNode
   whose public key was not registered through the Control API. The deprecated
   `--auth-list-public-keys` CSV is rejected by 1.41 ("no longer supported"), so each
   site's connection key (not its ledger signing key) is registered with Flower's Control
   API (`flwr supernode register`'s Python API, all keys in one process:
   `deploy.processes.register_connection_keys`) before the run starts: by default every
   site enrolled in `<pki>/enrolment.json` (`fedshield certs sign NAME.csr`:
   `<pki>/sites/NAME.pub`, certificate valid, key not revoked); with
   `--connection-keys`, the keys given (`NAME.pub`, made by `fedshield certs site NAME`),
   each under its file's NAME. Nothing else is admitted. The ServerApp then admits a HELLO
   under a name only from the node whose key is bound to that name, and the front refuses
   a revoked key at once (deploy/enrolment.py; run config `server.app.ENROLMENT_KEY`,
   `REVOKED_KEY`). The old spelling `--site-keys` still works, with a note.
4. The run: `flwr run APP fedshield --stream`. APP is a private Flower app folder holding
   only a generated pyproject.toml: the components (`fedshield.server.app:app`, `fedshield.client.app:app`) and
   the whole resolved fedshield config as flat dotted keys in `[tool.flwr.app.config]`
   (Flower only accepts `--run-config` keys that the app declares, so declaring them all is
   how the resolved config reaches `context.run_config`). The FAB thus carries no code:
   the coordinator and every site run the fedshield they installed and audited, not code
   shipped by the coordinator. The SuperLink starts the ServerApp (`flwr-serverapp` via
   its SuperExec) which runs `server.app.run_federation`, writing the same run directory as
   a simulation (`output.dir`/`output.run_name`).
5. FLWR_HOME is a private folder (0700) next to the run directory
   (`<output.dir>/.<run_name>.flower/`): Flower's config.toml, the loopback certificate,
   the app folder and the SuperLink log. The children's environment is
   `deploy.processes.flower_env` (telemetry off, offline, no dependency installation).

Before anything starts, and before any folder is made, the inputs are checked, each failure
one line (exit 2), cheapest first: the certificates, that `--address` can be bound, the
connection keys, the config (schema, keys, values), the task's data files loaded as the
ServerApp loads them (`task.pipeline.pool_and_test`), the model folder
(`task.model.text_model_path`: config.json, weights, tokenizer; a head already in it has one
output per class: `task.model.check_model_head`), and that `federation.min_sites` is not more than the
sites admitted. A bad override thus costs a second, not a SuperLink start and a half-made run.

`--resume RUN` (a run folder, or a run's name under `output.dir`; a bare `--resume`: the run
`output.run_name` names, else the newest run under `output.dir`, as `fedshield simulate`)
continues that run from its last checkpoint, with the config it started with (its run
directory's config.yaml; `output.*` overrides still apply): the manifest then carries
`server.app.RESUME_KEY`, and the ServerApp resumes (server/app.py, server/checkpoint.py).

On Ctrl-C / SIGTERM every child (SuperLink, its SuperExec and ServerApp, `flwr run`) is
terminated and the command exits 130; they are stopped too when the start fails. If this
command is killed outright (SIGKILL, OOM killer, a crash), its children die with it
(`deploy.processes.Children`: PR_SET_PDEATHSIG and a watchdog): no orphan SuperLink keeps
the port or a ServerApp its run.
"""

from __future__ import annotations

import os
import re

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import argparse
import datetime as dt
import queue
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config is loaded on demand (a light start for --help)
    from fedshield.conf.config import Config

from fedshield.deploy.front import MIB, FleetFront, FrontLimits, max_body_bytes, node_key_bytes
from fedshield.deploy.processes import (
    Children,
    Interrupted,
    add_deprecated_alias,
    check_can_listen,
    flower_env,
    flwr_bin,
    free_port,
    interrupts_raise,
    last_error,
    parse_host_port,
    register_connection_keys,
)
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.signing import fingerprint
from fedshield.server.run_dir import RUN_STOPPED
from fedshield.server.tracking import require as require_tracking

CONNECTION = "fedshield"


# ------------------------------------------------------------------ inputs


def check_pki(pki: Path) -> dict[str, Path]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    from fedshield.deploy.pki import PKIError, load_certificates

    files = {n: pki / n for n in ("ca.crt", "server.crt", "server.key")}
    for p in files.values():
        if not p.is_file():
            raise PKIError(f"{p}: not found (make it with `fedshield certs init --out {pki} ...`)")
    ca = load_certificates(files["ca.crt"])[0]
    cert = load_certificates(files["server.crt"])[0]
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{files['server.crt']}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                       "issue a new one with `fedshield certs init --force`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{files['server.crt']}: not signed by {files['ca.crt']}; sites would refuse it") from None
    try:
        key = serialization.load_pem_private_key(files["server.key"].read_bytes(), None)
    except (ValueError, TypeError):
        raise PKIError(f"{files['server.key']}: not a PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PKIError(f"{files['server.key']}: does not belong to {files['server.crt']}")
    return files


def collect_connection_keys(items: list[str]) -> list[Path]:
    """The sites' connection public keys (*.pub) in files and folders; each loads, none repeats."""
    from fedshield.deploy.pki import load_connection_public_key

    keys: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            keys.extend(sorted(p.glob("*.pub")))
        elif p.is_file():
            keys.append(p)
        else:
            raise FedShieldError(f"--connection-keys {item}: no such file or folder")
    if not keys:
        raise FedShieldError(f"--connection-keys {' '.join(items)}: no connection public keys (*.pub) found")
    seen: dict[str, Path] = {}
    for k in keys:
        fp = fingerprint(load_connection_public_key(k))
        if fp in seen:
            raise FedShieldError(f"{k}: the same connection key as {seen[fp]}; every site needs its own key pair")
        seen[fp] = k
    return keys


def admitted_sites(pki: Path, connection_keys: list[str] | None) -> tuple[list[tuple[str, Path]], list[str], Path]:
    """The sites to register: (name, NAME.pub) each, lines for those left out (revoked, expired),
    and the registry whose deny-list applies (`<pki>/enrolment.json`). With `--connection-keys`,
    those keys under their file names; without, the sites enrolled by `fedshield certs sign`."""
    from fedshield.deploy.enrolment import REGISTRY
    from fedshield.deploy.pki import enrolled_keys, hand_collected

    registry = pki / REGISTRY
    if connection_keys:
        admitted, left_out = hand_collected(collect_connection_keys(connection_keys), pki)
    else:
        admitted, left_out = enrolled_keys(pki)
        if not admitted and not left_out:
            raise FedShieldError(f"--pki {pki}: no site is enrolled ({registry}); enrol each site with "
                                 "`fedshield certs sign NAME.csr --pki ...`, or pass --connection-keys")
    if not admitted:
        raise FedShieldError(f"no site can be admitted: {left_out[0]}" + (f" (and {len(left_out) - 1} more)"
                                                                           if len(left_out) > 1 else ""))
    return admitted, left_out, registry


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path]:
    from fedshield import conf
    from fedshield.conf.config import Config

    resume = getattr(args, "resume", False)
    overrides = list(args.overrides)
    cfg = Config.from_yaml(args.config, overrides) if args.config else Config.load(overrides)
    if resume:  # the run's own config, as it was written when the run started (only output.* may change)
        from fedshield.server.run_dir import run_to_resume

        found = run_to_resume(resume, cfg.output.dir, cfg.output.run_name)
        named = ("output.dir=", "output.run_name=")  # they named the run, now found
        out = [o for o in overrides if o.startswith("output.") and not o.startswith(named)]
        # the run's folder, wherever RUN named it
        cfg = Config.from_yaml(found / "config.yaml", out).with_values(
            {"output.dir": str(found.parent), "output.run_name": found.name})
    # The coordinator's paths as absolute ones: the ServerApp runs in another working directory.
    paths = {"task.model": cfg.task.model, "task.data_path": cfg.task.data_path,
             "task.test_path": cfg.task.test_path, "output.dir": cfg.output.dir}
    cfg = cfg.with_values({key: str(Path(value).expanduser() if Path(value).expanduser().is_absolute()
                                    else Path(value).expanduser().resolve()) for key, value in paths.items() if value})
    if resume:  # the run's own folder, which must hold it
        from fedshield.server.run_dir import existing_run_dir

        return cfg, existing_run_dir(cfg)
    if not cfg.output.run_name:
        cfg = cfg.with_values({"output.run_name": time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)})
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise conf.ConfigError(f"output.run_name={cfg.output.run_name!r}: {run_dir} already holds a run; "
                               "choose another name, or continue it with --resume")
    return cfg, run_dir


def check_inputs(cfg: Config, admitted: int) -> str:
    """The run's model folder and data, checked as the ServerApp will load them, and the
    site counts against the keys admitted; a one-line summary, or a FedShieldError."""
    from fedshield import conf
    from fedshield.task.pipeline import check_task

    require_tracking(cfg.output.tracking)
    if cfg.federation.min_sites > admitted:
        raise conf.ConfigError(f"federation.min_sites={cfg.federation.min_sites}: only {admitted} connection "
                               f"key{'s are' if admitted != 1 else ' is'} admitted (--connection-keys)")
    from fedshield.task.pipeline import model_digest

    pool, test, folder = check_task(cfg)
    # The digest the plan names (sites check their own copy against it: docs/site-operator.md).
    model = f"; model {folder}, digest {model_digest(cfg)}" if folder is not None else ""
    return (f"task {cfg.task.name}: {len(pool)} training and {len(test)} test records, classes "
            f"{', '.join(test.class_names)}{model}")


def check_address(host: str, port: int) -> None:
    """--address can be bound now, before anything starts."""
    check_can_listen(host, port, f"--address {host}:{port}")


def write_app(app_dir: Path, cfg: Config, resume: bool = False, identity: tuple[Path, Path] | None = None) -> None:
    """A Flower app folder with only a pyproject.toml: the components + the resolved config.

    The config travels as one YAML string (`server.app.RUN_CONFIG_YAML_KEY`): Flower's run
    config holds only scalars, and the YAML keeps lists (task.labels) and nulls intact.
    `resume`: the ServerApp continues the run from its checkpoint (`server.app.RESUME_KEY`).
    `identity`: (the registry that binds names to keys, the one whose deny-list applies), for
    the ServerApp's name binding (`server.app.ENROLMENT_KEY`, `REVOKED_KEY`).
    """
    import json

    from fedshield.server.app import ENROLMENT_KEY, RESUME_KEY, REVOKED_KEY, RUN_CONFIG_YAML_KEY

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\nrequires = [\"setuptools>=68\"]\nbuild-backend = \"setuptools.build_meta\"\n\n"
        "[project]\nname = \"fedshield-run\"\nversion = \"0.1.0\"\n"
        "description = \"fedshield run: the code is the fedshield package installed at each party\"\n"
        "license = \"Apache-2.0\"\ndependencies = []\n\n"
        "[tool.flwr.app]\npublisher = \"fedshield\"\n\n"
        "[tool.flwr.app.components]\n"
        "serverapp = \"fedshield.server.app:app\"\nclientapp = \"fedshield.client.app:app\"\n\n"
        # a JSON string is a valid TOML basic string (same escapes)
        f"[tool.flwr.app.config]\n{json.dumps(RUN_CONFIG_YAML_KEY)} = {json.dumps(cfg.to_yaml())}\n"
        + (f"{json.dumps(RESUME_KEY)} = true\n" if resume else "")
        + (f"{json.dumps(ENROLMENT_KEY)} = {json.dumps(str(identity[0]))}\n"
           f"{json.dumps(REVOKED_KEY)} = {json.dumps(str(identity[1]))}\n" if identity else "")
    )


def write_flower_config(home: Path, port: int, ca: Path) -> None:
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )


# ------------------------------------------------------------------ children


def wait_tls(port: int, ca: Path, proc: subprocess.Popen[Any], log: Path, timeout: float = 60.0) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FedShieldError(f"the SuperLink stopped at start (exit {proc.returncode}): {last_error(log)} "
                                 f"(log: {log})")
        try:
            with (socket.create_connection(("127.0.0.1", port), timeout=2) as s,
                  ctx.wrap_socket(s, server_hostname="127.0.0.1")):
                return
        except OSError:
            time.sleep(0.3)
    raise FedShieldError(f"the SuperLink did not come up in {timeout:.0f}s (log: {log})")


# ------------------------------------------------------------------ command


SERVER_EXAMPLES = """examples:
  fedshield server --pki pki/ task=news-topics federation.num_sites=3 federation.rounds=10
  fedshield server --pki pki/ --connection-keys keys/ --address 0.0.0.0:9092 --config run.yaml
  fedshield server --pki pki/ --resume                  continue the newest run under output.dir
  fedshield server --pki pki/ --resume runs/RUN         continue that run (a folder, or a run name)

--resume [RUN]: RUN is a run folder or a run's name under output.dir; without RUN, the run
output.run_name names, else the newest run under output.dir (as `fedshield simulate`).
The certificates, the port, the config, the model folder and the data are checked before
anything starts or any folder is made.
"""


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield server",
        description="Coordinator: a TLS SuperLink that admits only registered sites, and the fedshield ServerApp.",
        epilog=SERVER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pki", required=True,
                        help="folder with ca.crt, server.crt, server.key (fedshield certs init)")
    keys_flag = parser.add_mutually_exclusive_group()
    keys_flag.add_argument("--connection-keys", nargs="+", metavar="PUB",
                           help="the sites' connection public keys (NAME.pub from `fedshield certs site NAME`, "
                                "or folders of *.pub): only these sites are admitted, each under its file's "
                                "NAME (default: the sites enrolled in PKI/enrolment.json by `fedshield certs sign`)")
    add_deprecated_alias(keys_flag, "--site-keys", "--connection-keys", nargs="+")
    parser.add_argument("--address", default="0.0.0.0:9092", help="where sites connect (default 0.0.0.0:9092)")
    parser.add_argument("--config", help="a YAML config file")
    parser.add_argument("--max-body-mb", type=float, default=None, metavar="MB",
                        help=f"largest request body a site may send, in MiB (default: Flower's array chunk size "
                             f"+ 1 MiB = {max_body_bytes() / MIB:g}; raise it only if sites change "
                             "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)")
    parser.add_argument("--max-connections", type=int, default=FrontLimits.max_connections,
                        help="connections at once in total (default %(default)s; 503 beyond)")
    parser.add_argument("--max-connections-per-address", type=int, default=FrontLimits.max_per_address,
                        help="connections at once from one source address (default %(default)s; 503 beyond; "
                             "raise it for many sites behind one NAT)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                        help="continue RUN (a run folder or name; default: output.run_name, else the newest run "
                             "under output.dir) from its last checkpoint, with the config it started with")
    parser.add_argument("--verbose", action="store_true", help="also show the SuperLink's log")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides and presets")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: the flag, then an override
        args.overrides.insert(0, args.resume)
        args.resume = True

    pki = Path(args.pki).expanduser().resolve()
    files = check_pki(pki)
    host, port = parse_host_port(args.address, "--address", "0.0.0.0:9092", default_host="0.0.0.0")
    limits = front_limits(args)
    check_address(host, port)  # a busy port is reported before the data and the model are read
    admitted, left_out, registry = admitted_sites(pki, args.connection_keys)
    cfg, run_dir = resolve_config(args)
    summary = check_inputs(cfg, len(admitted))
    print(f"checked: {summary}", flush=True)
    for why in left_out:
        print(f"warning: {why}", file=sys.stderr, flush=True)
    if cfg.federation.num_sites > len(admitted):
        print(f"warning: federation.num_sites={cfg.federation.num_sites} but {len(admitted)} connection keys are "
              f"admitted: the run waits federation.round_timeout_s for sites that cannot come", file=sys.stderr)

    home = Path(cfg.output.dir) / f".{cfg.output.run_name}.flower"
    try:
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise FedShieldError(f"output.dir={cfg.output.dir!r}: cannot make {home} ({exc.strerror})") from None
    from fedshield.deploy.enrolment import LiveEnrolment, save_enrolment
    from fedshield.deploy.pki import bindings, init_pki, load_connection_public_key

    internal = home / "loopback-pki"
    init_pki(internal, "localhost", ["127.0.0.1"], days=30, ca_days=30, force=True)
    bound = registry  # enrolment: the live registry; hand-collected keys: their names, written for this run
    if args.connection_keys:
        bound = home / "connection-keys.json"
        save_enrolment(bound, bindings(admitted))
    write_app(home / "app", cfg, resume=bool(args.resume), identity=(bound, registry))
    link_port = free_port()
    write_flower_config(home, link_port, internal / "ca.crt")
    env = flower_env(home)
    log = home / "superlink.log"

    children = Children()
    front: FleetFront | None = None
    said: list[str] = []  # the lines of the ServerApp's output that state why it stopped
    shown: set[str] = set()  # every line printed from it (stripped)
    interrupted = False
    try:
        with interrupts_raise():
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
            print(f"SuperLink up (loopback 127.0.0.1:{link_port}, TLS, SuperNode authentication on; log {log})",
                  flush=True)

            register_connection_keys([(k, name[:64]) for name, k in admitted], env, CONNECTION)  # one process for all
            for name, k in admitted:
                print(f"admitted connection key {name}: {fingerprint(load_connection_public_key(k))}", flush=True)

            front = FleetFront(host, port, files["server.crt"], files["server.key"], link_port, internal / "ca.crt",
                               limits=limits, access_log=home / "front-access.log",
                               authorized_keys={node_key_bytes(load_connection_public_key(k)) for _, k in admitted},
                               spool_dir=home,
                               refuse=LiveEnrolment(registry).refuses)  # revoked keys: 403 at once
            front.start()
            print(f"listening for sites on {host}:{port} (TLS, Fleet API only, bodies up to "
                  f"{limits.max_body_bytes / MIB:g} MiB; access log {home / 'front-access.log'}); waiting for "
                  f"{cfg.federation.num_sites} sites, {cfg.federation.rounds} rounds", flush=True)

            flwr_run = children.start(
                [flwr_bin("flwr"), "run", str(home / "app"), CONNECTION, "--stream"], env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert flwr_run.stdout is not None
            for line in run_output(flwr_run.stdout, run_dir):
                if RUN_STOPPED in line or _APP_ERROR.search(line):
                    said.append(line)
                if args.verbose or not _noise(line):
                    print(line.rstrip(), flush=True)
                    shown.add(line.strip())
    except Interrupted:
        print("interrupted: stopping the SuperLink and the ServerApp", file=sys.stderr, flush=True)
        interrupted = True
    finally:  # also when starting failed (a refused key, a port in use): no SuperLink left behind
        _shutdown(front, children)
    if interrupted:
        print(f"run directory (partial): {run_dir}", file=sys.stderr)
        return 130
    if not (run_dir / "report.md").is_file():
        failure = run_failure(said) or f"the ServerApp said no cause; the SuperLink log's last error: {last_error(log)}"
        raise FedShieldError(f"the run did not complete: {failure} (SuperLink log: {log})")
    for line in last_round_lines(run_dir, shown):
        print(line, flush=True)
    print(f"\nrun directory: {run_dir}", flush=True)
    return 0


def last_round_lines(run_dir: Path, shown: set[str]) -> list[str]:
    """The last round's outcome lines (who failed, who dropped out of secure aggregation)
    from the run's metrics.jsonl, those the streamed log did not carry: Flower uploads the
    ServerApp's log in batches, and a run's last batch can end after the stream does."""
    from fedshield.server.run_dir import read_jsonl

    try:
        last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    except (OSError, ValueError, IndexError):
        return []

    def seen(text: str) -> bool:  # a streamed line carries Flower's log prefix before ours
        return any(text in s for s in shown)

    lines = [f"  {site}: dropped out of secure aggregation at {stage}"
             for site, stage in sorted((last.get("secagg_dropped") or {}).items())]
    lines += [f"  {site}: failed (why: report.md)" for site in last.get("failed_sites") or []
              if not seen(f"{site}: failed")]
    return [line for line in lines if not seen(line.strip())]


def front_limits(args: argparse.Namespace) -> FrontLimits:
    body = max_body_bytes() if args.max_body_mb is None else int(args.max_body_mb * MIB)
    if args.max_body_mb is not None and not (0 < args.max_body_mb <= 4096):
        raise FedShieldError(f"--max-body-mb {args.max_body_mb:g}: expected more than 0 and at most 4096")
    for flag, value in (("--max-connections", args.max_connections),
                        ("--max-connections-per-address", args.max_connections_per_address)):
        if value < 1:
            raise FedShieldError(f"{flag} {value}: expected a positive number")
    if args.max_connections_per_address > args.max_connections:
        raise FedShieldError(f"--max-connections-per-address {args.max_connections_per_address}: "
                             f"more than --max-connections {args.max_connections}")
    return FrontLimits(max_body_bytes=body, max_connections=args.max_connections,
                       max_per_address=args.max_connections_per_address)


# After report.md, how long the ServerApp's streamed log may still take to arrive: `flwr run
# --stream` fetches the log in batches, so the last round's lines (who failed, who dropped out
# of secure aggregation) can come after the report is written. Bounded: the output is not
# waited on past these, whether or not `flwr run` exits.
DRAIN_IDLE_S, DRAIN_MAX_S = 30.0, 120.0


def run_output(stream: Iterable[str], run_dir: Path) -> Iterator[str]:
    """The lines of `flwr run --stream` until it ends, or until the run's report is written and
    the log has caught up (no line for DRAIN_IDLE_S, DRAIN_MAX_S at most): a reader thread, so
    that waiting for a line never outlasts those bounds."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="flwr-run-output", daemon=True).start()
    finished_at: float | None = None
    last_line = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        now = time.monotonic()
        if line is None:
            return
        if line:
            last_line = now
            yield line
        if finished_at is None and (run_dir / "report.md").is_file() and _finished(run_dir):
            finished_at = now
        if finished_at is not None and (now - last_line > DRAIN_IDLE_S or now - finished_at > DRAIN_MAX_S):
            return


def _finished(run_dir: Path) -> bool:
    """report.md is the last thing run_federation writes."""
    return (run_dir / "report.md").stat().st_size > 0


# The last line of a Python traceback, `[module.]ExceptionName: message`, at the start of a
# line (or after Flower's log level): not a site's failure that the ServerApp printed.
_APP_ERROR = re.compile(
    r"^\s*(?:[A-Z]+\s*:\s*)?(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:Error|Exception|Exceeded|Interrupt)): (.+)$")


def run_failure(lines: Iterable[str]) -> str:
    """Why the ServerApp stopped, from its output: its own last line (server.run_dir.RUN_STOPPED,
    fedshield's one-line cause), else the last exception a traceback in it names; "" if none.
    Never a line of the SuperLink's log: that log is about the SuperLink, and its last error
    is usually an unrelated one (a site's dropped connection)."""
    stated, raised = "", ""
    for line in lines:
        line = line.strip()
        if RUN_STOPPED in line:
            stated = line.split(RUN_STOPPED, 1)[1].strip()
        elif m := _APP_ERROR.search(line):
            raised = f"{m.group(1)}: {m.group(2).strip()}"
    return stated or raised


_TRACEBACK = re.compile(r"^(Traceback |  File |    |\s*\^+\s*$|\d\d/\d\d/\d{4} .*:(ERROR|INFO|WARNING):)")


def _noise(line: str) -> bool:
    """Flower's duplicate log lines and tracebacks (kept in full with --verbose)."""
    return bool(_TRACEBACK.match(line)) or any(s in line for s in ("uvicorn", "Using SuperLink", "DEBUG"))


def _shutdown(front: FleetFront | None, children: Children) -> None:
    if front is not None:
        front.stop()
    children.stop()

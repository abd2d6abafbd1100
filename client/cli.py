"""`fedshield client`: a site's agent, a Flower SuperNode that only connects outbound.

    fedshield client --server fl.example.org:9092 --ca ca.crt --connection-key st-marys.key \\
        --data /secure/notes.csv [--name st-marys] [--state-dir DIR] [privacy.budget_epsilon=3 ...]

Two keys, not to be confused: the site's **connection key** (`--connection-key`, made by
`fedshield certs site NAME`, an OpenSSH ECDSA P-384 key) authenticates its SuperNode to the
coordinator, which admits its public half (`NAME.pub`, `fedshield server --connection-keys`);
the site's **ledger signing key** (P-256, `<state-dir>/site.key`, made on first start by
client/site.py) signs its privacy ledger entries, which an auditor checks with
`fedshield audit --ledger-keys`. Both fingerprints print as `SHA256:<hex>`
(`privacy.signing.fingerprint`). `--key` is the old spelling of `--connection-key`.

Before anything connects, every input is checked and a problem ends in one line (exit 2):
the data file is read with the task's text-file loader (missing, unreadable, empty, a
malformed row, a label outside `--labels`: named by file and line), the connection key must
be an OpenSSH ECDSA key (what flower-supernode loads), the CA must parse, overrides must be keys a
site may set (`client.app.SITE_OVERRIDABLE`). Then a TLS pre-flight with Python's `ssl`
module verifies the coordinator's chain against `--ca` and its host name, so a wrong CA,
an expired certificate or another host's certificate is one clear line, not Flower's retry
loop. A plaintext (`--insecure`) connection is refused outright: sites always use TLS.

Then `flower-supernode` runs (subprocess, this environment's copy) with
`--root-certificates CA`, `--auth-supernode-private-key KEY` (SuperNode authentication),
`--node-config "site-name=... data-path=... state-dir=..."` (read by client/app.py; the
path and rows never leave the site), its local Runtime API on a free 127.0.0.1 port, and no
runtime dependency installation (the SuperNode default in 1.41; the flag that would turn it
on is never passed). FLWR_HOME is `<state-dir>/.flower` (0700); the environment is
`deploy.processes.flower_env` (telemetry off, offline).

When is the job over? A 1.41 SuperNode has no "stop after N runs" flag: it serves runs
until its SuperLink goes away. `fedshield server` stops its SuperLink when the run ends,
so the SuperNode runs with `--max-wait-time` (`--reconnect-s`, default 120 s): once the
coordinator has been unreachable that long, the SuperNode gives up and this command ends
(exit 0 if it had joined). A coordinator that comes back within that window (a restart to
resume) is rejoined. If the coordinator refuses the site's connection key (not registered), Flower
exits with code 305 after its retries; this command says so in one line (exit 2).
Ctrl-C / SIGTERM stops the SuperNode and its ClientApp processes (exit 130).
"""

from __future__ import annotations

import os

import deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import argparse
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from deploy.processes import (
    Interrupted,
    add_deprecated_alias,
    flower_env,
    flwr_bin,
    free_port,
    interrupts_raise,
    parse_host_port,
    stop_process_groups,
)
from privacy.errors import FedShieldError
from privacy.signing import fingerprint

NOT_REGISTERED = ("Failed to activate SuperNode", "[code: 2004]")


def tls_preflight(host: str, port: int, ca: Path, timeout: float) -> None:
    """Verify the coordinator's certificate chain and host name with `ca`, as the SuperNode will."""
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            code = getattr(exc, "verify_code", 0)
            why = getattr(exc, "verify_message", str(exc))
            if code == 10:
                raise FedShieldError(f"coordinator {host}:{port}: its TLS certificate has expired; "
                                     "the coordinator must renew it (fedshield certs init --force)") from None
            if code == 62 or "hostname" in why.lower() or "IP address mismatch" in why:
                raise FedShieldError(f"coordinator {host}:{port}: its TLS certificate is for another host "
                                     f"({why}); connect with the name in its certificate") from None
            if code in (2, 18, 19, 20, 21):
                raise FedShieldError(f"coordinator {host}:{port}: its TLS certificate is not signed by {ca} "
                                     "(wrong CA file for this coordinator?)") from None
            raise FedShieldError(f"coordinator {host}:{port}: TLS certificate refused: {why}") from None
        except ssl.SSLError as exc:
            raise FedShieldError(f"coordinator {host}:{port}: TLS handshake failed ({exc.reason or exc}); "
                                 "is it a fedshield coordinator with TLS?") from None
        except (ConnectionRefusedError, TimeoutError, OSError) as exc:
            last = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, socket.gaierror):
                raise FedShieldError(f"coordinator {host}:{port}: unknown host ({last})") from None
        if time.time() > deadline:
            raise FedShieldError(f"coordinator {host}:{port}: not reachable for {timeout:.0f}s ({last}); "
                                 "is it running, and is outbound TCP to it allowed?")
        time.sleep(2.0)


def check_ca(ca: Path) -> None:
    from deploy.pki import load_certificates

    if not ca.is_file():
        raise FedShieldError(f"--ca {ca}: no such file")
    load_certificates(ca)
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise FedShieldError(f"--ca {ca}: not usable as a CA file ({exc.reason})") from None


def check_data(path: Path, labels: list[str] | None, text_column: str, label_column: str):
    import conf
    from task.pipeline import read_text_file

    cfg = conf.load_config(["task=text-file", f"task.data_path={path}",
                            f"task.text_column={text_column}", f"task.label_column={label_column}"])
    return read_text_file(cfg.task, str(path), labels=labels)


def check_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    if not items:
        return out
    import conf
    from client.app import SITE_OVERRIDABLE

    for item in items:
        key, value = conf.parse_override(item)
        if key not in SITE_OVERRIDABLE:
            raise conf.ConfigError(f"{key!r}: a site can set only {', '.join(SITE_OVERRIDABLE)}")
        out[key] = value
    if out:  # values are checked by the schema, before anything connects
        conf.load_config([f"{k}={v}" for k, v in out.items()] + ["task=text-file", "task.data_path=x.csv"])
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    # A TOML literal string ('...'): backslashes stay as written (Flower's parser takes
    # '...' or "..." values with no quote of the same kind inside).
    if "'" in s or "\n" in s:
        raise FedShieldError(f"{s!r}: single quotes and newlines are not allowed here")
    return f"'{s}'"


def node_config(name: str, data: Path, state: Path, overrides: dict[str, object]) -> str:
    items = {"site-name": name, "data-path": str(data), "state-dir": str(state), **overrides}
    return " ".join(f"{k}={_toml(v)}" for k, v in items.items())


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield client",
        description="Site agent: a Flower SuperNode (outbound TLS only) training on this site's own data.")
    parser.add_argument("--server", required=True, help="the coordinator, HOST:PORT (e.g. fl.example.org:9092)")
    parser.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt)")
    key_flag = parser.add_mutually_exclusive_group(required=True)
    key_flag.add_argument("--connection-key", metavar="KEY",
                          help="this site's connection key, NAME.key from `fedshield certs site NAME` "
                               "(SuperNode authentication; not the ledger signing key in --state-dir)")
    add_deprecated_alias(key_flag, "--key", "--connection-key")
    parser.add_argument("--data", required=True, help="this site's CSV or JSONL file (text + label columns)")
    parser.add_argument("--name", help="site name (default: the connection key file's name)")
    parser.add_argument("--state-dir", help="privacy state: ledger, ledger signing key, caches "
                                            "(default ./fedshield-site-<name>)")
    parser.add_argument("--labels",
                        help="the task's classes, comma-separated: rows with other labels are refused up front")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to wait for the coordinator at start")
    parser.add_argument("--reconnect-s", type=float, default=120.0,
                        help="end when the coordinator has been gone this long (the run is over)")
    parser.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show every SuperNode log line")
    parser.add_argument("overrides", nargs="*", help="privacy overrides, e.g. privacy.budget_epsilon=3")
    args = parser.parse_args(argv)

    if args.insecure:
        raise FedShieldError("--insecure: refused; a fedshield site only connects with TLS "
                             "(give the coordinator's --ca)")
    host, port = parse_host_port(args.server, "--server", "fl.example.org:9092")
    key_path = Path(args.connection_key).expanduser().resolve()
    from deploy.pki import check_site_name, load_connection_private_key

    key = load_connection_private_key(key_path)
    name = check_site_name(args.name or key_path.stem)
    if key_path.stat().st_mode & 0o077:
        print(f"warning: {key_path} is readable by others; chmod 600 it", file=sys.stderr)
    ca = Path(args.ca).expanduser().resolve()
    check_ca(ca)
    data = Path(args.data).expanduser().resolve()
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    site_data = check_data(data, labels, args.text_column, args.label_column)
    overrides = check_overrides(args.overrides)
    state = Path(args.state_dir or f"fedshield-site-{name}").expanduser().resolve()
    try:
        state.mkdir(parents=True, exist_ok=True)
        home = state / ".flower"
        home.mkdir(exist_ok=True)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise FedShieldError(f"--state-dir {state}: {exc.strerror}") from None
    print(f"site {name}: {len(site_data)} records in {data} ({', '.join(site_data.class_names)}); "
          f"connection key {fingerprint(key)}; state {state}", flush=True)

    tls_preflight(host, port, ca, args.connect_timeout)
    print(f"coordinator {host}:{port}: TLS certificate verified with {ca}", flush=True)

    cmd = [
        flwr_bin("flower-supernode"),
        "--superlink", f"{host}:{port}",
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key_path),
        "--node-config", node_config(name, data, state, overrides),
        "--host", "127.0.0.1", "--port", str(free_port()),
        "--max-wait-time", str(args.reconnect_s),
    ]
    seen = {"joined": False, "refused": False, "gone": False}
    log_path = state / "supernode.log"

    def pump(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(log_path, "a", encoding="utf-8") as log_f:
            for line in proc.stdout:
                log_f.write(line)
                log_f.flush()
                if "SuperNode ID:" in line and not seen["joined"]:
                    seen["joined"] = True
                    print(f"site {name}: admitted by the coordinator; waiting for rounds", flush=True)
                    continue
                if any(s in line for s in NOT_REGISTERED):
                    seen["refused"] = True
                if "Giving up reconnection" in line and seen["joined"]:
                    seen["gone"] = True  # the SuperNode logs this but keeps its process alive
                if args.verbose or _worth_showing(line):
                    print(line.rstrip(), flush=True)

    procs: list[subprocess.Popen] = []
    try:
        with interrupts_raise():  # from before the SuperNode starts: it never outlives this command
            procs.append(subprocess.Popen(cmd, env=flower_env(home), cwd=str(state), start_new_session=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1))
            proc = procs[0]
            reader = threading.Thread(target=pump, args=(proc,), daemon=True)
            reader.start()
            while proc.poll() is None and not seen["gone"]:
                time.sleep(0.2)
            reader.join(timeout=5)
    except Interrupted:
        print(f"site {name}: interrupted; stopping the SuperNode (its ledger is on disk: {state})", file=sys.stderr)
        return 130
    finally:
        stop_process_groups(procs)
    if seen["refused"]:
        raise FedShieldError(
            f"the coordinator refused connection key {key_path.name} ({fingerprint(key)}): "
            f"it is not registered there; send {key_path.stem}.pub to the coordinator operator")
    if not seen["joined"]:
        raise FedShieldError(f"site {name}: the SuperNode stopped before joining (exit {proc.returncode}); "
                             f"see {log_path}")
    print(f"site {name}: the coordinator closed the federation; done (ledger: {state / 'ledger.jsonl'})", flush=True)
    return 0


def _worth_showing(line: str) -> bool:
    if "uvicorn" in line or "retrying in" in line or "DEBUG" in line:
        return False
    return any(s in line for s in ("ERROR", "WARNING", "declin", "fedshield", "round", "Giving up"))

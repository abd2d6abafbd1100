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
`--node-config "site-name=... data-path=... state-dir=... connection-key=..."` (read by
client/app.py; the path and rows never leave the site; the connection key signs the HELLO,
`client.app.prove_connection`), its local Runtime API on a free 127.0.0.1 port, and no
runtime dependency installation (the SuperNode default in 1.41; the flag that would turn it
on is never passed). FLWR_HOME is `<state-dir>/.flower` (0700); the environment is
`deploy.processes.flower_env` (telemetry off, offline).

When is the job over? A 1.41 SuperNode has no "stop after N runs" flag: it serves runs
until its SuperLink goes away. `fedshield server` stops its SuperLink when the run ends,
so the SuperNode runs with `--max-wait-time` (`--reconnect-s`, default 120 s): once the
coordinator has been unreachable that long, the SuperNode gives up and this command ends.
If the coordinator said the run completed (its DONE, after its report) and then went away,
this command ends as soon as the SuperNode first fails to reach it, without waiting that
long: the coordinator stops its SuperLink when the run ends, there is nothing to rejoin.
To rejoin a coordinator that was restarted (a new SuperLink, a resumed run), start this
command again with the same state folder.

How did it end? Exit codes:
- 0: the run completed: the site sent its reply to the plan's last round. What the site
  trained and answered comes from the SuperNode's log (`Receiving: train message`, `Sent
  successfully`) and the site's ledger (one signed entry per round trained); the plan's
  `federation.rounds` and run id from the site's own disk (the Flower app the SuperNode
  installed, `<state>/.flower/apps/*/pyproject.toml`, holds the whole resolved plan).
- 3 (`EXIT_COORDINATOR_LOST`): the coordinator went away before that: one line saying after
  which round, that the ledger is kept and the ε spent stays spent, and to start the
  command again when the coordinator is back (a resumed run is rejoined). With
  `federation.fraction_train` < 1 a site not picked for the last rounds ends here too, and
  the line says so.
- 2: a problem the site can fix, one line (bad input, wrong CA, refused key, ...).
- 130: Ctrl-C / SIGTERM: the SuperNode and its ClientApp processes are stopped first.

Refused at activation. Flower answers `[code: 2004] Failed to activate SuperNode` both when
the connection key is not registered and when the key's previous session is still online
at the SuperLink (a site restarted after a crash, before its heartbeat expired: up to
2 x 30 s); the site sees only the code. This command tells them apart with what it knows:
another `flower-supernode` with this key still running on this machine is named; if this
state folder was admitted by this coordinator and last seen connected less than
`STALE_SESSION_S` ago (`<state>/.flower/agent.json`), it waits and retries every 10 s until
that session has expired; otherwise the key is not registered (exit 2, with what to send
to the coordinator operator). One agent per state folder: a second `fedshield client` on
the same folder (the same ledger) is refused at once (`agent.lock`).

If this command is killed outright (SIGKILL, OOM killer), a watchdog sends the SuperNode
and its SuperExec and ClientApp processes SIGTERM together (`deploy.processes.Children`);
the SuperNode then signs off at the coordinator (deactivates) and exits: nothing keeps
training, or holds the site's session, after the agent is gone. The SuperNode writes its
log to `<state>/supernode.log` itself (this command follows the file), so that it can
still do so when this command is gone.
"""

from __future__ import annotations

import os

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import argparse
import contextlib
import dataclasses
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fedshield.deploy.processes import (
    Children,
    Interrupted,
    add_deprecated_alias,
    flower_env,
    flwr_bin,
    free_port,
    interrupts_raise,
    parse_host_port,
)
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.signing import fingerprint

if TYPE_CHECKING:  # imported where used, at run time: `--help` stays fast
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedshield.task.data import LabeledData

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
    from fedshield.deploy.pki import load_certificates

    if not ca.is_file():
        raise FedShieldError(f"--ca {ca}: no such file")
    load_certificates(ca)
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise FedShieldError(f"--ca {ca}: not usable as a CA file ({exc.reason})") from None


# What a deployed site's data file can be for (its own task.name): the built-in tasks.
SITE_TASKS = ("news-topics", "text-file", "tabular", "image", "text-generation")


def check_data(path: Path, labels: list[str] | None, text_column: str, label_column: str,
               task: str = "") -> LabeledData:
    """The site's data read as the records of `task` (the site's own task.name; "" = a file
    of texts and labels), before anything connects: a missing file, a corrupt row or image,
    a label outside `labels` is one line now. A table's column schema comes with the plan, so
    here it is read for its label column only (the full read is at the first message)."""
    from fedshield.conf.config import Config
    from fedshield.task.pipeline import TaskSpec, read_site_file, read_text_file

    name = task or "text-file"
    if name in ("news-topics", "text-file"):
        config = Config.load(["task=text-file", f"task.data_path={path}",
                              f"task.text_column={text_column}", f"task.label_column={label_column}"])
        return read_text_file(TaskSpec.of(config.task), str(path), labels=labels)
    if name == "tabular":
        from fedshield.task.tabular import read_labels

        return read_labels(path, label_column, labels)
    config = Config.load([f"task={name}", f"task.data_path={path}", f"task.text_column={text_column}",
                          f"task.label_column={label_column}"])
    return read_site_file(TaskSpec.of(config.task), str(path), labels=labels)


def check_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    if not items:
        return out
    from fedshield import conf
    from fedshield.client.app import SITE_OVERRIDABLE

    for item in items:
        key, value = conf.parse_override(item)
        if key not in SITE_OVERRIDABLE:
            raise conf.ConfigError(f"{key!r}: a site can set only {', '.join(SITE_OVERRIDABLE)}")
        out[key] = [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else value
    if "task.name" in out and out["task.name"] not in SITE_TASKS:
        raise conf.ConfigError(f"task.name={out['task.name']!r}: what this site's data is for; one of "
                               f"{', '.join(SITE_TASKS)} (a plug-in: task.plugin)")
    checked = {k: v for k, v in out.items() if k != "task.name"}  # the task's own keys come with the plan
    if checked:  # values are checked by the schema, before anything connects
        task = ["task.name=plugin"] if "task.plugin" in out else ["task=text-file", "task.data_path=x.csv"]
        conf.load_config([f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in checked.items()] + task)
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A list (task.deidentify_patterns=[...]) as a JSON array: YAML reads it back exactly
    # (client/app.py), backslashes of a regex included.
    s = json.dumps([str(v) for v in value]) if isinstance(value, (list, tuple)) else str(value)
    # A TOML literal string ('...'): backslashes stay as written (Flower's parser takes
    # '...' or "..." values with no quote of the same kind inside).
    if "'" in s or "\n" in s:
        raise FedShieldError(f"{s!r}: single quotes and newlines are not allowed here")
    return f"'{s}'"


def node_config(name: str, data: Path, state: Path, overrides: dict[str, object]) -> str:
    items = {"site-name": name, "data-path": str(data), "state-dir": str(state), **overrides}
    return " ".join(f"{k}={_toml(v)}" for k, v in items.items())


def model_digest_main(argv: list[str]) -> int:
    """`fedshield model-digest [DIR]`: the digest of a model folder, as a coordinator's plan
    names it (task.model_digest); no DIR: the bundled all-MiniLM-L6-v2."""
    parser = argparse.ArgumentParser(
        prog="fedshield model-digest",
        description="Print the digest of a model folder (config.json, weights, tokenizer files): a site's copy "
                    "must have the digest of the coordinator's model, or the site declines (kind model).",
        epilog="""examples:
  fedshield model-digest                          the bundled all-MiniLM-L6-v2
  fedshield model-digest /opt/models/clinical-bert  a site's own copy (compare with the coordinator's)
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="", help="a from_pretrained model folder (default: the bundled)")
    args = parser.parse_args(argv)
    from fedshield.task.model import text_model_path
    from fedshield.task.model_digest import folder_digest

    folder = text_model_path(args.folder)  # checked: config.json, weights, tokenizer (one line if not)
    print(f"{folder_digest(folder)}  {folder}")
    return 0


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield client",
        description="Site agent: a Flower SuperNode (outbound TLS only) training on this site's own data.",
        epilog="""examples:
  fedshield client --server fl.example.org:9092 --ca ca.crt --connection-key st-marys.key --data /secure/notes.csv
  fedshield client --server fl.example.org:9092 --ca ca.crt --connection-key st-marys.key \\
      --data /secure/notes.csv --state-dir /var/lib/fedshield privacy.budget_epsilon=3
""", formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        help="the task's classes, comma-separated: rows with other labels are refused up front, and "
                             "a plan with other classes is declined (whatever the rows)")
    parser.add_argument("--ledger-witness", metavar="FILE",
                        help="an append-only file (best on another volume) where the site witnesses the head of its "
                             "ledger; books older than it are refused")
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
    # A thin layer over the Python API (`fedshield.SiteAgent`, docs/api.md).
    agent = SiteAgent(
        server=args.server, ca=args.ca, connection_key=args.connection_key, data=args.data, name=args.name,
        state_dir=args.state_dir, labels=args.labels.split(",") if args.labels else None,
        ledger_witness=args.ledger_witness, text_column=args.text_column, label_column=args.label_column,
        connect_timeout=args.connect_timeout, reconnect_s=args.reconnect_s, verbose=args.verbose,
        overrides=tuple(args.overrides))
    return agent.run()


@dataclasses.dataclass(frozen=True)
class SiteCheck:
    """What `SiteAgent.check()` found, before connecting anywhere."""

    name: str
    records: int
    classes: tuple[str, ...]
    connection_key_fingerprint: str  # SHA256:<hex>, what the coordinator's operator admits
    state_dir: Path


@dataclasses.dataclass(frozen=True)
class _Prepared:
    name: str
    host: str
    port: int
    key_path: Path
    key: ec.EllipticCurvePrivateKey  # the connection key (fedshield certs csr)
    ca: Path
    data: Path
    records: int
    classes: tuple[str, ...]
    overrides: dict[str, object]
    state: Path


@dataclasses.dataclass(frozen=True)
class SiteAgent:
    """The site agent as a callable: what `fedshield client` runs, for a hospital's own
    service to embed. The arguments are the command's options (`fedshield client --help`);
    `labels` and `overrides` take sequences (a string is split at commas / taken as one).

        agent = SiteAgent(server="fl.example.org:9092", ca="ca.crt", connection_key="st-marys.key",
                          data="/secure/notes.csv", overrides=["privacy.budget_epsilon=3"])
        agent.check()       # every input checked, nothing connected: a FedShieldError names the problem
        code = agent.run()  # 0 the run completed, 3 the coordinator was lost, 130 stopped

    `run` blocks until the job is over; `stop` (a threading.Event) set from another thread
    ends it as Ctrl-C does (the SuperNode is stopped first, the ledger stays). Problems the
    site can fix raise `FedShieldError` (the command's exit 2) with one line.
    """

    server: str
    ca: str | Path
    connection_key: str | Path
    data: str | Path
    name: str | None = None
    state_dir: str | Path | None = None
    labels: Sequence[str] | None = None
    ledger_witness: str | Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    connect_timeout: float = 120.0
    reconnect_s: float = 120.0
    verbose: bool = False
    overrides: Sequence[str] = ()

    def __post_init__(self) -> None:  # lists given become tuples: the agent cannot change after it is made
        for name in ("labels", "overrides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    def check(self) -> SiteCheck:
        """Every check `fedshield client` makes before it connects; nothing is written."""
        p = self._prepare()
        return SiteCheck(p.name, p.records, p.classes, fingerprint(p.key), p.state)

    def run(self, stop: threading.Event | None = None) -> int:
        """Check, connect, serve the coordinator's run until it is over; the exit code."""
        p = self._prepare()
        try:
            return _run_site(self, p, stop)
        except FedShieldError as exc:
            raise _naming_site(p.name, exc) from None

    def _prepare(self) -> _Prepared:
        host, port = parse_host_port(self.server, "--server", "fl.example.org:9092")
        key_path = Path(self.connection_key).expanduser().resolve()
        from fedshield.deploy.pki import check_site_name, load_connection_private_key

        key = load_connection_private_key(key_path)
        name = check_site_name(self.name or key_path.stem)
        try:
            return self._check_inputs(name, host, port, key_path, key)
        except FedShieldError as exc:
            raise _naming_site(name, exc) from None

    def _check_inputs(self, name: str, host: str, port: int, key_path: Path,
                      key: ec.EllipticCurvePrivateKey) -> _Prepared:
        if key_path.stat().st_mode & 0o077:
            print(f"warning: {key_path} is readable by others; chmod 600 it", file=sys.stderr)
        ca = Path(self.ca).expanduser().resolve()
        check_ca(ca)
        data = Path(self.data).expanduser().resolve()
        given = self.labels.split(",") if isinstance(self.labels, str) else self.labels
        labels = [x.strip() for x in given if x.strip()] if given else None
        overrides = check_overrides([self.overrides] if isinstance(self.overrides, str) else list(self.overrides))
        own_task = str(overrides.get("task.name", ""))
        if own_task in ("tabular", "image") and not labels:  # client/app.py takes only texts' classes from a plan
            raise FedShieldError(f"task.name={own_task}: declare this site's classes with --labels "
                                 "(e.g. --labels no,yes)")
        site_data = check_data(data, labels, self.text_column, self.label_column, own_task)
        if overrides.get("task.model"):  # the site's own model copy: a wrong folder is one line now, not a decline
            from fedshield.task.model import check_model_folder

            check_model_folder(str(overrides["task.model"]))
        if labels:  # the site's own classes: client/app.py takes a plan with exactly these
            overrides["labels"] = ",".join(labels)
        # The site's own columns: client/app.py reads its file with these, never with the plan's.
        overrides["text-column"], overrides["label-column"] = self.text_column, self.label_column
        if self.ledger_witness:
            witness = Path(self.ledger_witness).expanduser().resolve()
            if not witness.parent.is_dir() or witness.is_dir():
                raise FedShieldError(f"--ledger-witness {witness}: not a file in an existing folder")
            overrides["ledger-witness"] = str(witness)
        state = Path(self.state_dir or f"fedshield-site-{name}").expanduser().resolve()
        return _Prepared(name, host, port, key_path, key, ca, data, len(site_data), tuple(site_data.class_names),
                         overrides, state)


def _naming_site(name: str, exc: FedShieldError) -> FedShieldError:
    """Every failure names the site, once; its class stays (a caller may catch ConfigError)."""
    if str(exc).startswith(f"site {name}:"):
        return exc
    try:
        return type(exc)(f"site {name}: {exc}")
    except TypeError:  # a subclass with another signature
        return FedShieldError(f"site {name}: {exc}")


def _pause(seconds: float, stop: threading.Event | None) -> None:
    """Sleep; an embedding service's `stop` ends the agent as a signal would."""
    if stop is None:
        time.sleep(seconds)
    elif stop.wait(seconds):
        raise Interrupted()


def _run_site(opts: SiteAgent, p: _Prepared, stop: threading.Event | None) -> int:
    name, host, port, key_path, key, ca, data, state = p.name, p.host, p.port, p.key_path, p.key, p.ca, p.data, p.state
    overrides = p.overrides
    try:
        state.mkdir(parents=True, exist_ok=True)
        home = state / ".flower"
        home.mkdir(exist_ok=True)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise FedShieldError(f"--state-dir {state}: {exc.strerror}") from None
    print(f"site {name}: {p.records} records in {data} ({', '.join(p.classes)}); "
          f"connection key {fingerprint(key)}; state {state}", flush=True)

    tls_preflight(host, port, ca, opts.connect_timeout)
    print(f"coordinator {host}:{port}: TLS certificate verified with {ca}", flush=True)

    lock = lock_state(state, name)
    agent = AgentRecord(home / AGENT_FILE, f"{host}:{port}", fingerprint(key))
    cmd = [
        flwr_bin("flower-supernode"),
        "--superlink", f"{host}:{port}",
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key_path),
        # connection-key: client.app.NODE_CONNECTION_KEY (the HELLO is signed with it)
        "--node-config", node_config(name, data, state, {**overrides, "connection-key": str(key_path)}),
        "--host", "127.0.0.1", "--port", "0",
        "--max-wait-time", str(opts.reconnect_s),
    ]
    log_path = state / "supernode.log"
    session = SupernodeLog()
    children = Children(pdeathsig=None)  # deploy/processes.py: why the watchdog alone
    try:
        # From before the SuperNode starts: it never outlives this command. Signal handlers
        # can only be set in the main thread; an agent embedded in another thread is ended
        # through `stop` (or by its process ending: the watchdog).
        in_main = threading.current_thread() is threading.main_thread()
        with interrupts_raise() if in_main else contextlib.nullcontext():
            while True:
                attempt = SupernodeLog()
                cmd[cmd.index("--port") + 1] = str(free_port())
                # The SuperNode writes its log itself (not into a pipe to this process): if this
                # process dies, the SuperNode still logs, signs off at the coordinator and exits.
                with open(log_path, "ab") as log_f:
                    offset = log_f.tell()
                    proc = children.start(cmd, flower_env(home), cwd=str(state), stdout=log_f,
                                          stderr=subprocess.STDOUT)
                done = threading.Event()
                reader = threading.Thread(target=_follow, args=(log_path, offset, attempt, name, opts.verbose, done),
                                          daemon=True)
                reader.start()
                last_note, lost, started = 0.0, 0, time.time()
                while proc.poll() is None and not attempt.gone:
                    _pause(0.2, stop)
                    if attempt.joined and time.time() - last_note > AGENT_NOTE_S:
                        agent.seen()  # roughly the SuperNode's last heartbeat, for a restart's wait
                        last_note = time.time()
                    if attempt.lost > lost:  # the SuperNode lost the coordinator and retries
                        lost = attempt.lost
                        if coordinator_closed(state, home, started):
                            break  # it said the run completed, then went away: nothing to reconnect for
                children.stop()
                done.set()
                reader.join(timeout=5)
                session.merge(attempt)
                if not attempt.refused or session.joined:
                    break
                wait = rejoin_wait(agent, key_path, name)  # FedShieldError: not registered
                children = Children(pdeathsig=None)
                _pause(wait, stop)
    except Interrupted:
        print(f"site {name}: interrupted; stopping the SuperNode (its ledger is on disk: {state})", file=sys.stderr)
        return 130
    finally:
        children.stop()
        lock.close()
    if not session.joined:
        raise FedShieldError(f"site {name}: the SuperNode stopped before joining (exit {proc.returncode}); "
                             f"see {log_path}")
    agent.left()
    return finish(name, state, home, session)


# ------------------------------------------------------------------ how the job ended

EXIT_COORDINATOR_LOST = 3
AGENT_FILE = "agent.json"
AGENT_NOTE_S = 10.0
# flwr 1.41: a node's online_until is its last heartbeat + HEARTBEAT_PATIENCE (2) x the
# interval the SuperNode asks for (HEARTBEAT_DEFAULT_INTERVAL, 30 s); activation is refused
# (code 2004) until then. Plus a margin.
STALE_SESSION_S = 2 * 30.0 + 10.0
REJOIN_RETRY_S = 10.0
RUN_CONFIG_YAML_KEY = "fedshield-config-yaml"  # server.app.RUN_CONFIG_YAML_KEY (client may not import server)

_RUN = re.compile(r"\[RUN (\d+)(?:, ROUND \d+)?\]")
_KIND = re.compile(r"(Receiving|Sending): (\S+) message")


class SupernodeLog:
    """What the SuperNode's log says about this session: admitted? refused? how many train
    instructions of which (Flower) run came in, and how many train replies went out. (The
    round number is in the instruction's plan, not in Flower's log: fedshield's messages
    carry no group id.)"""

    def __init__(self) -> None:
        self.joined = self.refused = self.gone = False
        self.lost = 0  # the SuperNode's failed attempts to reach the coordinator (it retries)
        self.received: dict[int, int] = {}
        self.replied: dict[int, int] = {}
        self._run: int | None = None
        self._sending = ""

    def feed(self, line: str) -> str | None:
        """Reads one line; returns an event worth printing ("joined") or None."""
        if "SuperNode ID:" in line and not self.joined:
            self.joined = True
            return "joined"
        if any(s in line for s in NOT_REGISTERED):
            self.refused = True
        if "Giving up reconnection" in line and self.joined:
            self.gone = True  # the SuperNode logs this but keeps its process alive
        if "Connection attempt failed" in line and self.joined:
            self.lost += 1
        if m := _RUN.search(line):
            self._run, self._sending = int(m.group(1)), ""
        elif (m := _KIND.search(line)) and self._run is not None:
            if m.group(1) == "Receiving" and m.group(2) == "train":
                self.received[self._run] = self.received.get(self._run, 0) + 1
            elif m.group(1) == "Sending":
                self._sending = m.group(2)
        elif "Sent successfully" in line and self._run is not None and self._sending == "train":
            self.replied[self._run] = self.replied.get(self._run, 0) + 1
            self._sending = ""
        return None

    def merge(self, other: SupernodeLog) -> None:
        self.joined |= other.joined
        self.refused = other.refused
        self.gone = other.gone
        for run, n in other.received.items():
            self.received[run] = self.received.get(run, 0) + n
        for run, n in other.replied.items():
            self.replied[run] = self.replied.get(run, 0) + n


def _follow(path: Path, offset: int, seen: SupernodeLog, name: str, verbose: bool, done: threading.Event) -> None:
    """Read the SuperNode's log as it grows (from `offset`), until `done` and its end."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        pending = ""
        while True:
            chunk = f.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    if seen.feed(line) == "joined":
                        print(f"site {name}: admitted by the coordinator; waiting for rounds", flush=True)
                    elif verbose or _worth_showing(line):
                        print(line.rstrip(), flush=True)
            elif done.is_set():
                if pending:
                    seen.feed(pending)
                return
            else:
                time.sleep(0.2)


@dataclasses.dataclass(frozen=True)
class Plan:
    run_id: str  # fedshield's run id: output.run_name (what the site's ledger entries name)
    rounds: int
    fraction_train: float


def installed_plan(home: Path) -> Plan | None:
    """The plan of the run this site took part in, as on its own disk: the newest Flower app
    the SuperNode installed (FLWR_HOME/apps/*/pyproject.toml, whose run config holds the
    whole resolved config, server/cli.py `write_app`). None if there is none."""
    import tomllib

    import yaml

    try:
        apps = sorted((home / "apps").glob("*/pyproject.toml"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for app in apps:
        try:
            text = tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"][RUN_CONFIG_YAML_KEY]
            cfg = yaml.safe_load(text)
            fed = cfg["federation"]
            return Plan(str(cfg["output"]["run_name"]), int(fed["rounds"]), float(fed.get("fraction_train", 1.0)))
        except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError, yaml.YAMLError):
            continue
    return None


def rounds_trained(ledger: Path, site: str, run_id: str) -> int:
    """The last round of `run_id` this site spent privacy on (its ledger's dp-sgd entries; 0 if none)."""
    last = 0
    try:
        lines = ledger.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a torn last line: the ledger's own recovery deals with it
        if isinstance(e, dict) and e.get("run_id") == run_id and e.get("site") == site \
                and e.get("release") == "dp-sgd" and isinstance(e.get("round"), int):
            last = max(last, e["round"])
    return last


def coordinator_closed(state: Path, home: Path, since: float) -> bool:
    """The coordinator told this site, in this session (`since`: when its SuperNode started),
    that the run completed (client.app's DONE handler writes the marker after the
    coordinator's report). A SuperNode that then loses the coordinator has nothing left to
    reconnect for: `fedshield server` stops its SuperLink when the run ends."""
    from fedshield.client.site import done_path

    plan = installed_plan(home)
    if plan is None:
        return False
    try:
        return done_path(state, plan.run_id).stat().st_mtime >= since
    except OSError:
        return False


def finish(name: str, state: Path, home: Path, session: SupernodeLog) -> int:
    """Exit 0 only if the run this site joined completed; else one line and exit 3.

    Completed: every train instruction that came in was answered, and the last one was the
    plan's last round. The round comes from the site's ledger (DP runs: one signed entry
    per round trained, resumed runs included); without entries (privacy.mode=none), from
    the number of train instructions of this session."""
    from fedshield.client.site import done_path

    ledger = state / "ledger.jsonl"
    kept = f"its ledger is kept ({ledger}); the ε it spent stays spent"
    if not session.received:
        print(f"site {name}: the coordinator went away before this site trained a round ({kept}). "
              f"If a run was under way, start this command again when the coordinator is back",
              file=sys.stderr, flush=True)
        return EXIT_COORDINATOR_LOST
    run = max(session.received, key=lambda r: session.received[r])
    answered = session.replied.get(run, 0) >= session.received[run]
    plan = installed_plan(home)
    if plan is not None and answered and done_path(state, plan.run_id).is_file():
        print(f"site {name}: the run completed ({plan.run_id}: the coordinator said so after its report); "
              f"done (ledger: {ledger})", flush=True)
        return 0
    last = (rounds_trained(ledger, name, plan.run_id) if plan else 0) or session.received[run]
    if not answered:
        last -= 1  # trained, maybe, but the reply never left
    if plan is not None and answered and last >= plan.rounds:
        print(f"site {name}: the run completed ({plan.run_id}, {plan.rounds} rounds, this site's last reply "
              f"sent); done (ledger: {ledger})", flush=True)
        return 0
    of = f" of {plan.rounds}" if plan else " (the plan's number of rounds is not on this site's disk)"
    maybe = (f"; with federation.fraction_train={plan.fraction_train:g} this site may just not have been picked "
             "for the last rounds: ask the coordinator operator") if plan and plan.fraction_train < 1 else ""
    print(f"site {name}: lost the coordinator during the run, after round {max(last, 0)}{of} ({kept}). "
          f"Start this command again when the coordinator is back, to rejoin a resumed run{maybe}",
          file=sys.stderr, flush=True)
    return EXIT_COORDINATOR_LOST


# ------------------------------------------------------------------ restarts


class AgentRecord:
    """This state folder's memory of the coordinators it was admitted by
    (`<state>/.flower/agent.json`: per HOST:PORT, the connection key's fingerprint, when it
    joined, when it was last seen connected, whether it left cleanly)."""

    def __init__(self, path: Path, server: str, key: str) -> None:
        self.path, self.server, self.key = path, server, key

    def read(self) -> dict[str, Any]:
        """This coordinator's entry (a JSON object as written by `_write`), {} if none or another key's."""
        try:
            entry = json.loads(self.path.read_text()).get(self.server, {})
        except (OSError, ValueError, AttributeError):
            return {}
        return entry if isinstance(entry, dict) and entry.get("key") == self.key else {}

    def _write(self, **fields: object) -> None:
        try:
            data = json.loads(self.path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        entry = {**(self.read() or {"key": self.key}), **fields}
        data[self.server] = entry
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a convenience for restarts, never a reason to stop

    def seen(self) -> None:
        now = time.time()
        self._write(**({} if self.read().get("connected") else {"joined": now}), connected=True, last_seen=now)

    def left(self) -> None:
        self._write(connected=False, last_seen=time.time())


def rejoin_wait(agent: AgentRecord, key_path: Path, name: str) -> float:
    """After Flower's "[code: 2004] Failed to activate SuperNode": seconds to wait before
    trying again, or a FedShieldError that says which of its two causes it is.

    Flower 1.41 answers 2004 both for a key that is not registered (`No SuperNode found with
    the given public key`) and for a node that is still online (`could not be activated`:
    the earlier session of this key, until its heartbeat expires); the site sees only the
    code, the reason is in the coordinator's log. So: a SuperNode of this key still running
    on this machine is named; if this state folder was admitted by this coordinator and its
    last session may still be open there, wait (up to STALE_SESSION_S after it was last seen)
    and retry; otherwise it is "not registered"."""
    fp = agent.key
    stray = running_supernodes(key_path)
    if stray:
        raise FedShieldError(
            f"site {name}: the coordinator refused this site's connection: another SuperNode with connection key "
            f"{key_path.name} is still running on this machine (pid {', '.join(map(str, stray))}); stop it, "
            "then start this command again")
    record = agent.read()
    until = float(record.get("last_seen", 0)) + STALE_SESSION_S
    if record and time.time() < until:
        wait = min(REJOIN_RETRY_S, max(1.0, until - time.time()))
        print(f"site {name}: the coordinator still holds this site's previous session (connection key {fp}); it "
              f"expires by {time.strftime('%H:%M:%S', time.localtime(until))}; trying again in {wait:.0f} s",
              file=sys.stderr, flush=True)
        return wait
    if record:
        raise FedShieldError(
            f"site {name}: the coordinator refused connection key {key_path.name} ({fp}), which it admitted before: "
            f"it is not registered there any more (a new job without {key_path.stem}.pub?), or another "
            "machine is connected with this key; ask the coordinator operator")
    raise FedShieldError(
        f"site {name}: the coordinator refused connection key {key_path.name} ({fp}): it is not registered there; "
        f"send {key_path.stem}.pub to the coordinator operator. (If this key was connected from another state "
        "folder or machine in the last minute, that session is still open there: start again in a minute.)")


def running_supernodes(key_path: Path) -> list[int]:
    """pids of flower-supernode processes on this machine that use `key_path` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-supernode") for a in argv[:2]) and str(key_path).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def lock_state(state: Path, name: str) -> TextIO:
    """One agent per state folder (two would spend one ledger's budget twice): an exclusive
    lock on `<state>/.flower/agent.lock`, released by the kernel however this process ends."""
    import fcntl

    path = state / ".flower" / "agent.lock"
    f = open(path, "a+")  # noqa: SIM115 - held for the life of the command
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise FedShieldError(f"site {name}: another fedshield client is running with state folder {state} "
                             f"(pid {other}); one agent per state folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _worth_showing(line: str) -> bool:
    if "uvicorn" in line or "retrying in" in line or "DEBUG" in line:
        return False
    return any(s in line for s in ("ERROR", "WARNING", "declin", "fedshield", "round", "Giving up"))

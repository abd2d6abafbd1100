"""Flower processes of the `fedshield server` and `fedshield client` commands.

The helpers both agent commands need, each written once:

- `flwr_bin`: a Flower console script (`flower-superlink`, `flower-supernode`, `flwr`) from
  this interpreter's environment, never another installation found first on PATH.
- `flower_env`: the environment every Flower child gets: its own FLWR_HOME, telemetry off
  (FLWR_TELEMETRY_ENABLED=0, read by flwr at import time), Hugging Face offline, no runtime
  dependency installation (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: the SuperLink's
  SuperExec would otherwise `uv sync` app dependencies, a download; the SuperNode never
  installs unless `--allow-runtime-dependency-installation` is passed, and we never pass
  it), and this venv's bin first on PATH (the SuperLink/SuperNode start `flower-superexec`
  by name).
- `parse_host_port` (one HOST:PORT parser; the error names the flag), `free_port`.
- `interrupts_raise` / `Interrupted`: SIGINT and SIGTERM become an exception for the span
  of a `with` block, and the previous handlers come back after it.
- `Children`: the Flower processes of one agent command. Flower's SuperLink and SuperNode
  start processes of their own (SuperExec, ServerApp, ClientApp; the SuperLink starts its
  SuperExec in a new session), so each child runs in its own session and is stopped as a
  process group (`stop_process_groups`), and every child dies with the command, however the
  command ends (SIGKILL included): the kernel sends the direct child SIGTERM when the command
  dies (PR_SET_PDEATHSIG, set between fork and exec), and a watchdog process
  (deploy/watchdog.py) that holds the read end of a pipe only the command can write to
  stops the children, their sessions and all their descendants when that pipe closes.
  Children are reaped: `stop` waits for each (and for the watchdog).
  PDEATHSIG reaches the direct child alone, first: measured with flwr 1.41, a SuperNode
  that gets its SIGTERM that way, ahead of its SuperExec, does not sign off at the
  SuperLink before Flower's 5 s force-exit (its runtime API waits for the SuperExec's
  connection), while one signalled together with its SuperExec by the watchdog does. So
  `fedshield client` starts its SuperNode with `pdeathsig=None` (the watchdog alone);
  `fedshield server`'s SuperLink and `flwr run` keep it.
- `run_flower_cli` (a `flwr ...` command with a timeout and a one-line error), `last_error`
  (the line of a Flower log worth quoting).
- `register_connection_keys`: the sites' connection keys registered with the SuperLink in
  one process, through the Python API that `flwr supernode register` calls
  (`read_superlink_connection`, `init_http_client_from_connection`, `RegisterNode`), one
  Control API connection for all of them. One `flwr supernode register` per key costs a
  Python start and Flower's imports each time: 67 keys took 240 s (10,000 would take
  ~9 h); measured before/after in bench/RESULTS.md ("Registering connection keys").
- `add_deprecated_alias`: an old flag spelling kept working (scripts exist), hidden from
  `--help`, with a one-line note on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal, TypedDict, Unpack, overload

from fedshield.privacy.errors import FedShieldError

CLI_TIMEOUT_S = 120.0  # a `flwr` command against a local SuperLink answers in seconds


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived inside `interrupts_raise()`."""


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted`; the old handlers are back after it.

    Callers catch `Interrupted` outside the block, so that their clean-up (stopping children)
    runs with the previous handlers again.
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        raise Interrupted()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def add_deprecated_alias(container: argparse._ActionsContainer, old: str, new: str,
                         nargs: int | str | None = None) -> None:
    """`old` as a hidden spelling of the option `new` (same destination); using it prints a
    one-line deprecation note to stderr. `container`: a parser or an argument group."""

    class Alias(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
            print(f"note: {option_string} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    container.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Alias, help=argparse.SUPPRESS,
                           nargs=nargs)


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
    """The environment of a Flower child whose FLWR_HOME is `home`."""
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


def parse_host_port(value: str, flag: str, example: str, default_host: str | None = None) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); an empty HOST is `default_host` or an error
    that names `flag`."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or (default_host or "")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise FedShieldError(f"{flag} {value!r}: expected HOST:PORT, e.g. {example}")
    return host, int(port)


def check_can_listen(host: str, port: int, flags: str) -> None:
    """host:port can be bound now (as the server that follows will, SO_REUSEADDR), so that a
    busy port or an unknown host is one line before anything starts; `flags` names them."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise FedShieldError(f"{flags}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise FedShieldError(f"{flags}: cannot listen there ({exc.strerror})") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]  # (host, port) for IPv4, (host, port, flow, scope) for IPv6
        return port


def last_error(log: Path) -> str:
    """The last line of `log` that reports an error, else its last line ("?" if none)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "?"
    for ln in reversed(lines):
        if "ERROR" in ln or "rror" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else "?"


def run_flower_cli(cmd: list[str], env: dict[str, str], what: str, timeout_s: float = CLI_TIMEOUT_S) -> str:
    """Run a Flower CLI command; its stdout, or a one-line FedShieldError that starts with `what`."""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FedShieldError(f"{what}: no answer within {timeout_s:.0f} s (is the SuperLink up? see its log)") from None
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise FedShieldError(f"{what}: {msg[-1] if msg else 'failed'} (exit {r.returncode})")
    return r.stdout


# Runs in the Flower child's environment (its FLWR_HOME), imports only flwr; reads
# "PATH<TAB>NAME" lines on stdin; one "PATH<TAB>NODE_ID" line per key on stdout; on a
# failure one line on stderr naming the key, exit 1.
_REGISTER_SCRIPT = """
import sys
from pathlib import Path
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import RegisterNodeRequest
path = "-"
try:
    items = [line.split("\\t", 1) for line in sys.stdin.read().splitlines() if line]
    client = init_http_client_from_connection(read_superlink_connection(sys.argv[1]))
    try:
        for path, name in items:
            reply = client.RegisterNode(request=RegisterNodeRequest(public_key=try_load_public_key(Path(path)),
                                                                    name=name))
            if not reply.node_id:
                raise RuntimeError("SuperNode couldn't be registered")
            print(f"{path}\\t{reply.node_id}", flush=True)
    finally:
        client.close()
except BaseException as exc:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{path}: {text[:300]}", file=sys.stderr)
    sys.exit(1)
"""
REGISTER_TIMEOUT_PER_KEY_S = 0.5  # measured ~0.01 s a key in one process; generous for a loaded host


def register_connection_keys(keys: list[tuple[Path, str]], env: dict[str, str], connection: str,
                             timeout_s: float | None = None) -> dict[Path, int]:
    """Register each (public key file, SuperNode name) with the SuperLink of `connection` (a
    connection in `env`'s FLWR_HOME config.toml), all in one process; the node id of each.

    Raises a one-line FedShieldError that names the key that failed (or that nothing
    answered within `timeout_s`: `CLI_TIMEOUT_S` plus `REGISTER_TIMEOUT_PER_KEY_S` a key).
    """
    timeout_s = timeout_s if timeout_s is not None else CLI_TIMEOUT_S + REGISTER_TIMEOUT_PER_KEY_S * len(keys)
    for path, name in keys:
        if "\t" in str(path) or "\n" in str(path) or "\t" in name or "\n" in name:
            raise FedShieldError(f"registering connection key {path!r}: a tab or newline in its path or name")
    lines = "".join(f"{path}\t{name}\n" for path, name in keys)
    try:
        r = subprocess.run([sys.executable, "-c", _REGISTER_SCRIPT, connection], input=lines, env=env,
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FedShieldError(f"registering {len(keys)} connection keys: no answer within {timeout_s:.0f} s "
                             "(is the SuperLink up? see its log)") from None
    ids: dict[Path, int] = {}
    for line in r.stdout.splitlines():
        key_path, _, node_id = line.rpartition("\t")
        if key_path and node_id.isdigit():
            ids[Path(key_path)] = int(node_id)
    if r.returncode != 0 or len(ids) != len(keys):
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise FedShieldError(f"registering connection key {msg[-1] if msg else 'failed'} (exit {r.returncode}; "
                             f"{len(ids)} of {len(keys)} registered)")
    return ids


def stop_process_groups(procs: list[subprocess.Popen[Any]], grace_s: float = 10.0) -> None:
    """SIGTERM every live child's group (newest first), wait up to `grace_s` in all,
    then SIGKILL the groups still there."""
    for p in reversed(procs):
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ children that die with their parent

WATCHDOG = Path(__file__).with_name("watchdog.py")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 10.0


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up here (in the parent), so that the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    prctl: Callable[..., int] = fn  # a C function: argtypes above check the arguments at the call
    return prctl


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn`: the child gets `sig` when the thread that started it ends (the
    command's main thread: call `Popen` from it), and exits at once if its parent is gone
    already (the parent died between fork and prctl). None where there is no prctl."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class ChildOptions(TypedDict, total=False):
    """The `subprocess.Popen` options `Children.start` passes on (the ones its callers use)."""

    cwd: str | Path
    stdout: int | IO[Any] | None
    stderr: int | IO[Any] | None
    bufsize: int


class Children:
    """The Flower processes of an agent command (module docstring).

    `start` runs a command in a session of its own, with PR_SET_PDEATHSIG (`pdeathsig`; None:
    the watchdog alone), registered with the watchdog (started with the first child);
    `stop` closes the watchdog's pipe and waits for it (it stops the children, their
    sessions and descendants: SIGTERM, SIGKILL after `grace_s`), then stops what is left of
    the children's groups itself (in case the watchdog is gone) and reaps the children.
    """

    def __init__(self, grace_s: float = STOP_GRACE_S, pdeathsig: int | None = signal.SIGTERM) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.grace_s = grace_s
        self.pdeathsig = pdeathsig
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None

    def _guard(self) -> int:
        if self._pipe is None:
            read, write = os.pipe()  # both ends non-inheritable: no child gets the write end
            try:
                self.watchdog = subprocess.Popen(
                    [sys.executable, "-I", str(WATCHDOG), str(read), str(self.grace_s)], pass_fds=(read,),
                    start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            finally:
                os.close(read)
            self._pipe = write
        return self._pipe

    @overload
    def start(self, cmd: list[str], env: dict[str, str] | None = None, *, text: Literal[True],
              **kw: Unpack[ChildOptions]) -> subprocess.Popen[str]: ...

    @overload
    def start(self, cmd: list[str], env: dict[str, str] | None = None, *, text: Literal[False] = False,
              **kw: Unpack[ChildOptions]) -> subprocess.Popen[bytes]: ...

    def start(self, cmd: list[str], env: dict[str, str] | None = None, *, text: bool = False,
              **kw: Unpack[ChildOptions]) -> subprocess.Popen[str] | subprocess.Popen[bytes]:
        """`cmd` as a child (class docstring); `text` and `kw` as `subprocess.Popen` takes them."""
        pipe = self._guard()
        preexec = die_with_parent(self.pdeathsig) if self.pdeathsig else None
        p = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=preexec, text=text, **kw)
        self.procs.append(p)
        os.write(pipe, f"{p.pid} {'d' if preexec else '-'}\n".encode())
        return p

    def stop(self) -> None:
        if self._pipe is not None:
            # While the process tree is whole: the watchdog reads it and stops all of it, also
            # what left the children's groups (Flower's SuperExec, its ServerApp). Signalling
            # the children here first would orphan their descendants before it looked.
            os.write(self._pipe, b"stop\n")  # an orderly stop: the watchdog sends every SIGTERM
            os.close(self._pipe)
            self._pipe = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=self.grace_s + 5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
            self.watchdog = None
        stop_process_groups(self.procs, self.grace_s)  # what is left (no watchdog?), and reaps the children

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

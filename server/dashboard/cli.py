"""`fedshield status RUN_DIR` and `fedshield dashboard RUN_DIR` (server/dashboard/__init__.py
says what is where). Neither writes anything into the run directory."""

from __future__ import annotations

import argparse
import ipaddress

from fedshield.conf import ConfigError
from fedshield.deploy.processes import check_can_listen
from fedshield.privacy.errors import FedShieldError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield status", description="The state of a run, finished or still running, in one short block.",
        epilog="example: fedshield status runs/20260101-120000-ab12")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (fedshield simulate or fedshield server)")
    args = parser.parse_args(argv)
    from fedshield.server.dashboard.summary import read_summary

    print(read_summary(args.run_dir).text())
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """The dashboard can listen on host:port now: one line otherwise, before anything starts."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be 1..65535")
    try:
        check_can_listen(host, port, f"--host {host} --port {port}")
    except FedShieldError as exc:
        raise ConfigError(str(exc)) from None


def dashboard_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield dashboard",
        description="Serve a read-only live view of a run directory in the browser: rounds with accuracy and "
                    "macro-F1, ε per site against its budget, sites trained / declined / dropped, SecAgg+ "
                    "dropouts, the poisoning defences' verdicts and the ledger's verification. The page updates "
                    "by itself while the run writes the directory (server-sent events). It serves its own page "
                    "and the run's summary, never the run's files.",
        epilog="examples:\n  fedshield dashboard runs/20260101-120000-ab12\n"
               "  fedshield dashboard runs/my-run --port 9000\n"
               "  fedshield dashboard runs/my-run --host 0.0.0.0   # on purpose: anyone who reaches this "
               "machine sees the run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (fedshield simulate or fedshield server)")
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default {DEFAULT_HOST}, this machine only). Any other "
                             "address must be given here explicitly: the page has no login, so anyone who "
                             "can reach it sees the run's accuracy, ε and site names")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    host = args.host if args.host is not None else DEFAULT_HOST
    from fedshield.server.dashboard.summary import RunWatcher

    run_dir = RunWatcher(args.run_dir).run_dir  # a missing or non-run directory: one line, before listening
    check_listen(host, args.port)
    import threading
    from types import FrameType

    import uvicorn

    from fedshield.server.dashboard.app import create_app

    stopping = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            stopping.set()  # open event streams end at their next poll: shutdown need not cut them
            super().handle_exit(sig, frame)

    app = create_app(run_dir, stopping)
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard of {run_dir} at http://{shown}:{args.port}/ (read-only; Ctrl-C stops it)", flush=True)
    if not _is_loopback(host):
        print(f"note: --host {host} is not loopback: anyone who can reach this machine can see the page",
              flush=True)
    Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5)).run()
    return 0

"""The `fedshield` command (also `python -m fedshield`).

This module is the composition root: each subcommand's code lives in the package it
belongs to (server/, client/, privacy/, simulations/), and only this dispatcher knows
them all. It sits in simulations/ because that is the one package allowed to depend on
every other (nothing imports simulations). The commands are thin layers over the Python API
(docs/api.md), whose objects live in the rooms they belong to (conf.config.Config,
simulations.simulate.simulate, privacy.audit.audit_and_report, client.cli.SiteAgent) and
which `fedshield.api` gathers: the API may import simulations, never the reverse.

Errors a user can cause end in one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import argparse
import sys
from collections.abc import Callable

USAGE = """usage: fedshield COMMAND [options] [key=value ...]
       fedshield --version

commands:
  simulate   run a federation of virtual sites on this machine (Flower simulation runtime)
  sweep      one simulation per ε value: accuracy vs privacy table and plot
  server     coordinator: a TLS SuperLink with site authentication + the ServerApp
  client     site agent: a SuperNode that trains on local data with a local budget
  model-digest  the digest of a model folder, as a plan names it (a site checks its copy)
  certs      CA, server certificate, connection keys, enrolment (init | site | csr | sign | revoke | show)
  audit      verify a privacy ledger and recompute ε independently
  bundle     a wheelhouse for an offline site install: fedshield, every pinned dependency, INSTALL.txt
  status     a run's state in one short block: rounds, accuracy, ε vs budget, sites, ledger check
  dashboard  a read-only live view of a run in the browser (127.0.0.1:8765 by default)

`fedshield COMMAND --help` tells more. Config overrides: key=value (e.g. federation.rounds=3),
presets: task=heart-disease|image|news-topics|tabular|text-file|text-generation, privacy=none|dp-sgd.
"""


SIMULATE_EXAMPLES = """examples:
  fedshield simulate                                        the default run (news topics, 8 sites, DP-SGD)
  fedshield simulate task=heart-disease federation.rounds=3 privacy.target_epsilon=4
  fedshield simulate --config my-run.yaml federation.num_sites=20
  fedshield simulate --resume                               continue the newest run under output.dir
  fedshield simulate --resume runs/20260101-120000-ab12     continue that run (a folder, or a run name)

--resume [RUN]: RUN is a run folder or a run's name under output.dir; without RUN, the run
output.run_name names, else the newest run under output.dir. The run continues with the
config it started with (its config.yaml); only output.* overrides may change.
"""


def resume_arg(args: argparse.Namespace) -> None:
    """`--resume key=value` is the bare flag and then an override (argparse took it as RUN)."""
    if isinstance(args.resume, str) and "=" in args.resume:
        args.overrides.insert(0, args.resume)
        args.resume = True


def simulate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedshield simulate", description="Simulate a federation of virtual sites.",
                                     epilog=SIMULATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML config file (defaults: conf/schema.py)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                        help="continue RUN (a run folder or name; default: the newest run under output.dir) from "
                             "its last completed round, with the config it started with")
    parser.add_argument("overrides", nargs="*", help="key=value overrides and presets")
    args = parser.parse_args(argv)
    resume_arg(args)

    # A thin layer over the Python API (docs/api.md): the same Config, the same simulate().
    # The config is checked before torch, Flower or Ray is imported: a typo costs a fraction
    # of a second (bench/RESULTS.md), not the import of the ML stack.
    from fedshield.conf.config import Config

    config = Config.from_yaml(args.config, args.overrides) if args.config else Config.load(args.overrides)
    if args.resume:
        from fedshield.server.run_dir import run_to_resume

        run_dir = run_to_resume(args.resume, config.output.dir, config.output.run_name)
        config = Config.from_run(run_dir)
        # Other overrides apply over the run's own config (the checkpoint refuses any change
        # but output.*); output.dir and output.run_name named the run, now found.
        rest = [o for o in args.overrides if not o.startswith(("output.dir=", "output.run_name="))]
        if rest:
            config = config.with_overrides(*rest)
    from fedshield.simulations.simulate import simulate

    result = simulate(config, resume=bool(args.resume), verbose=args.verbose)
    print()
    print(result.table())
    print(f"\nrun directory: {result.run_dir}")
    return 0


def _lazy(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return int(importlib.import_module(module).__dict__[func](argv))

    return run


COMMANDS = {
    "simulate": simulate_main,
    "sweep": _lazy("fedshield.simulations.sweep", "sweep_main"),
    "server": _lazy("fedshield.server.cli", "server_main"),
    "client": _lazy("fedshield.client.cli", "client_main"),
    "model-digest": _lazy("fedshield.client.cli", "model_digest_main"),
    "certs": _lazy("fedshield.deploy.pki", "certs_main"),
    "audit": _lazy("fedshield.privacy.cli", "audit_main"),
    "bundle": _lazy("fedshield.deploy.bundle", "bundle_main"),
    "status": _lazy("fedshield.server.dashboard.cli", "status_main"),
    "dashboard": _lazy("fedshield.server.dashboard.cli", "dashboard_main"),
    "audit-empirical": _lazy("fedshield.simulations.empirical", "empirical_main"),
}
HIDDEN = {"audit-empirical"}  # internal: reached as `fedshield audit --empirical`, never named to users


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from fedshield._version import __version__

        print(f"fedshield {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS or command in HIDDEN:
        public = ", ".join(c for c in COMMANDS if c not in HIDDEN)
        print(f"error: unknown command {command!r}; one of: {public}", file=sys.stderr)
        return 2
    from fedshield.privacy.errors import FedShieldError

    if command == "audit" and "--empirical" in rest:  # runs a simulation: lives in simulations/
        command, rest = "audit-empirical", [a for a in rest if a != "--empirical"]
    try:
        return int(COMMANDS[command](rest) or 0)
    except FedShieldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped cleanly; the run directory keeps what was done", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`fedshield simulate`: many virtual sites on one machine (or a Ray cluster).

The very ServerApp and ClientApp of deployment run on one of two engines
(`simulation.engine`, said on the run's first line):
- `batched` (simulations/batched.py): the virtual sites shared among worker processes (Ray
  actors on the cluster `simulation.ray_address` names), behind a Grid of their own; a
  round's local trainings run together, vectorised across sites;
- `flower`: Flower's simulation runtime (Ray backend), one message per site to a Ray actor.
`auto` (the default) takes the fastest that supports the config. Everything that can be
wrong with the config or the data is checked here, before either starts: every virtual
site's share is computed and its δ < 1/n verified.
"""

from __future__ import annotations

import os

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from fedshield import conf
from fedshield._version import __version__
from fedshield.conf.config import Config
from fedshield.server.run_dir import existing_run_dir, new_run_dir, read_jsonl
from fedshield.server.tracking import require as require_tracking
from fedshield.simulations.result import RunResult

# torch, transformers, Flower and Ray are imported inside the functions that need them:
# importing this module (the CLI does, after the config is checked) stays a fraction of a
# second, so the run's first line comes at once.


def check_sites(cfg: Config) -> list[tuple[str, int]]:
    """(site, records) for every virtual site; refuses a δ that is not below 1/n."""
    from fedshield import protocol
    from fedshield.task.sites import check_delta, virtual_sites

    sizes = [(name, len(data)) for name, data in virtual_sites(cfg)]
    for name, _ in sizes:  # names from a data file's site column become folder names
        if not protocol.SITE_NAME.match(name):
            raise conf.ConfigError(
                f"task.site_column: site name {name[:70]!r} is not valid ({protocol.SITE_NAME_RULE})")
    name, smallest = min(sizes, key=lambda s: s[1])
    check_delta(cfg, name, smallest)
    return sizes


def backend_config(cfg: Config) -> dict[str, Any]:
    sim = cfg.simulation
    resources = {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus}
    if sim.ray_address:
        return {"client_resources": resources, "init_args": {}}
    # address="local": always a fresh Ray instance of this run's own, never a cluster that
    # happens to run on the machine (RAY_ADDRESS, another simulation): the sites' resources
    # are what this config says, and two simulations side by side do not collide.
    init_args: dict[str, Any] = {"address": "local", "num_cpus": sim.num_cpus or os.cpu_count() or 1}
    if not sim.client_gpus:
        init_args["num_gpus"] = 0  # keep Ray off any GPU the sites were not given
    return {"client_resources": resources, "init_args": init_args}


def _connect_ray(address: str) -> None:
    """Attach to an existing Ray cluster; Flower's backend then reuses this connection."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except Exception as exc:
        raise conf.ConfigError(f"simulation.ray_address={address!r}: cannot connect to Ray: {exc}") from None


def _only_what_new_run_dir_wrote(run_dir: Path) -> bool:
    """The run folder holds no file but its config: no round, no site state, no ledger."""
    return all(p == run_dir / "config.yaml" for p in run_dir.rglob("*") if not p.is_dir())


def engine_of(cfg: Config) -> str:
    """The engine this config runs on: `simulation.engine`, or with `auto` the fastest that
    supports it: batched (on this machine, or on the Ray cluster simulation.ray_address names)."""
    engine = cfg.simulation.engine
    return "batched" if engine == "auto" else engine


def run_header(cfg: Config, resume: bool = False) -> str:
    """The run's first line, printed before anything slow (checks, imports, Ray)."""
    privacy = cfg.privacy.mode + (f", target ε={cfg.privacy.target_epsilon:g} at δ={cfg.privacy.delta:g}"
                                       if cfg.privacy.mode != "none" else "")
    what = "resuming" if resume else "simulating"
    engine = engine_of(cfg) + (" (auto)" if cfg.simulation.engine == "auto" else "")
    return (f"fedshield {__version__}: {what} {cfg.federation.num_sites} sites x {cfg.federation.rounds} rounds "
            f"(task {cfg.task.name}, privacy {privacy}, engine {engine})")


def run_simulation(cfg: Config, verbose: bool = False, resume: bool = False) -> Path:
    """Run (or with `resume`, continue from its checkpoint) the simulated federation.

    The model folder, the data files and every site's share are checked before anything
    is made: a failed check leaves no run directory and starts no Ray.
    """
    print(run_header(cfg, resume), flush=True)
    require_tracking(cfg.output.tracking)  # before any work: a missing package is one line
    from fedshield.task.pipeline import check_task

    check_task(cfg)  # the model folder (config.json, weights header, tokenizer, head size) and the data
    sizes = check_sites(cfg)
    if resume:  # a run that cannot be continued is refused before Ray starts
        from fedshield.server.app import run_config_yaml
        from fedshield.server.checkpoint import config_digest, load

        run_dir = existing_run_dir(cfg)
        load(run_dir, run_dir.name, config_digest(run_config_yaml(cfg)))
        made_here = False  # a resumed run's folder is never removed
    else:
        named = Path(cfg.output.dir).expanduser().resolve() / cfg.output.run_name
        made_here = not cfg.output.run_name or not named.exists()  # an empty folder of the user's stays
        run_dir = new_run_dir(cfg)
    try:
        return _run_in_run_dir(cfg, run_dir, sizes, verbose=verbose, resume=resume)
    except BaseException:
        # A start that failed before any round or site wrote anything leaves no empty run behind.
        if made_here and run_dir.is_dir() and _only_what_new_run_dir_wrote(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_in_run_dir(cfg: Config, run_dir: Path, sizes: list[tuple[str, int]], *, verbose: bool,
                    resume: bool) -> Path:
    from fedshield.server.app import say

    smallest, largest = min(n for _, n in sizes), max(n for _, n in sizes)
    held = f"{smallest} records each" if smallest == largest else f"{smallest} to {largest} records"
    engine = engine_of(cfg)
    starting = "starting the batched engine" if engine == "batched" else "starting Flower's simulation runtime"
    say(f"checked: model and data ({len(sizes)} sites, {held}); {starting}")
    if not verbose:
        # run_simulation's deprecation notice and "federated evaluation skipped" are
        # deliberate choices here (see README); fedshield prints its own progress.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        # Ray workers inherit the driver's environment: keep library warnings out of the
        # progress lines there too (errors still come through).
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        if engine == "batched":
            _run_batched(cfg, run_dir, resume=resume)
        else:
            _run_flower(cfg, run_dir, verbose=verbose, resume=resume)
    finally:
        # Frozen-prefix caches are derived from (simulated) private data and large; the
        # sites' ledgers and keys stay.
        for cache in (run_dir / "sites").glob("*/cache"):
            shutil.rmtree(cache, ignore_errors=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if len(rows) != cfg.federation.rounds + 1:
        raise conf.ConfigError(f"simulation ended early: {len(rows) - 1} of {cfg.federation.rounds} rounds ran; "
                               f"see the log above (continue it with output.run_name={run_dir.name} --resume)")
    # The run is complete: the sites' kept last replies (for a restarted coordinator) go.
    for kept in (run_dir / "sites").glob("*/runs/*.release.npz"):
        kept.unlink(missing_ok=True)
    return run_dir


def _run_batched(cfg: Config, run_dir: Path, *, resume: bool) -> None:
    from fedshield.client.app import app as client_app
    from fedshield.client.app import train_steps_of
    from fedshield.server.app import build_server_app, say
    from fedshield.simulations.batched import run_batched, worker_count

    sim, num_sites = cfg.simulation, cfg.federation.num_sites
    server_app = build_server_app(cfg, run_dir, resume=resume)
    if not sim.ray_address:
        run_batched(server_app, client_app, num_sites, train_steps_of(client_app),
                    workers=worker_count(num_sites, sim.num_cpus, sim.client_cpus))
        return
    # On a Ray cluster: one worker actor per client_cpus of simulation.num_cpus (0: of the
    # cluster's CPUs), each holding client_cpus and client_gpus.
    import ray

    _connect_ray(sim.ray_address)
    try:
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        resources = {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus}
        workers = worker_count(num_sites, sim.num_cpus, sim.client_cpus, cpus_here=cluster_cpus)
        say(f"the batched engine: {workers} worker actor(s) of {sim.client_cpus:g} CPU on the Ray cluster at "
            f"{sim.ray_address} ({cluster_cpus} CPUs)")
        run_batched(server_app, client_app, num_sites, train_steps_of(client_app), workers=workers,
                    actor_resources=resources)
    finally:
        ray.shutdown()


def _run_flower(cfg: Config, run_dir: Path, *, verbose: bool, resume: bool) -> None:
    from flwr.simulation import run_simulation as flower_run_simulation

    from fedshield.client.app import app as client_app
    from fedshield.server.app import build_server_app

    config = backend_config(cfg)
    if cfg.simulation.ray_address:
        _connect_ray(cfg.simulation.ray_address)
    try:
        flower_run_simulation(
            server_app=build_server_app(cfg, run_dir, resume=resume),
            client_app=client_app,
            num_supernodes=cfg.federation.num_sites,
            backend_config=config,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def simulate(config: Config, *, resume: bool = False, verbose: bool = False) -> RunResult:
    """Run the simulated federation of `config` (`fedshield.simulate`, `fedshield simulate`).

    `resume`: continue the run that `config.output` names from its last completed round;
    `config` must be that run's (`Config.from_run(run_dir)`): the checkpoint refuses any other.
    """
    # A quiet run silences Flower's logger and Python's warnings (run_simulation): for a
    # caller's process (the Python API), only while it runs.
    flwr_logger = logging.getLogger("flwr")
    level, python_warnings = flwr_logger.level, os.environ.get("PYTHONWARNINGS")
    try:
        with warnings.catch_warnings():
            run_dir = run_simulation(config, verbose=verbose, resume=resume)
    finally:
        flwr_logger.setLevel(level)
        if python_warnings is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = python_warnings
    return RunResult.read(run_dir)

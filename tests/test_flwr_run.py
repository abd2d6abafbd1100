"""`flwr run .`, Flower's own runner, run the way the README says it.

The command is the README's line ("Configuration"), sized down: the tiny model, fewer sites
(`num-supernodes` and `federation.num_sites` alike) and rounds, one CPU per ClientApp. It
runs as a subprocess from the repository root, with HOME and FLWR_HOME in a temporary
folder and no Flower, Ray or .venv variable inherited: whatever it needs has to come from
the README's line (`flwr.env` and the flags). Flower's local SuperLink outlives `flwr run`
(it is started detached): every process that carries this test's FLWR_HOME is stopped at
the end, by pid.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.conf.flower import declared_defaults, encode, toml_value
from fedshield.server.run_dir import read_jsonl
from tests.helpers import tiny_overrides

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find Flower's processes"),
]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
SITES, ROUNDS = 3, 2
ENV_PREFIX = [".", "./flwr.env"]


def readme_command() -> list[str]:
    """The README's `flwr run` line: `. ./flwr.env && flwr run . ...`, as flwr's argv."""
    lines = [ln for ln in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if ln.startswith(". ./flwr.env && flwr run .")]
    assert len(lines) == 1, "the README has one `. ./flwr.env && flwr run .` line"
    prefix, sep, rest = lines[0].partition("&&")
    assert shlex.split(prefix) == ENV_PREFIX and sep
    return shlex.split(rest, comments=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_of(flwr_home: Path) -> dict[int, dict[str, str]]:
    """pid -> environment of every process started with this FLWR_HOME (the CLI, the
    SuperLink, its SuperExec, the simulation, Ray)."""
    mark = f"FLWR_HOME={flwr_home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in environ:
            env = dict(v.decode(errors="replace").partition("=")[::2] for v in environ if b"=" in v)
            found[int(entry.name)] = {"cmdline": cmdline, **env}
    return found


def stop_processes_of(flwr_home: Path) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        pids = processes_of(flwr_home)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            time.sleep(0.5)
            pids = processes_of(flwr_home)
        if not pids:
            return


def clean_env(home: Path, flwr_home: Path) -> dict[str, str]:
    """This process's environment without Flower's, Ray's or the venv's settings, so that
    the README's line has to bring them; HOME and FLWR_HOME private; free local ports (the
    local SuperLink's 39091/39093 by default) so that no other SuperLink is reused."""
    drop = {str(VENV_BIN), str(Path(sys.executable).parent)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p not in drop)
    env.update({
        "HOME": str(home),
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def test_readme_flwr_run_line_starts_the_default_number_of_sites() -> None:
    argv = readme_command()
    assert argv[:3] == ["flwr", "run", "."]
    assert "--federation-config" in argv, "Flower's local federation has 2 SuperNodes otherwise"
    federation = argv[argv.index("--federation-config") + 1]
    assert federation == f"num-supernodes={Config.load().federation.num_sites}"
    assert "--stream" in argv, "without it `flwr run` returns as soon as the run is submitted"


def run_config_values(cfg: Config) -> dict[str, bool | int | float | str]:
    return {k: encode(v) for k, v in cfg.to_flat().items()}


@pytest.mark.timeout(600)
def test_flwr_run_as_the_readme_says(tiny_bert, synthetic_csv, tmp_path) -> None:
    if not (VENV_BIN / "flwr").exists():
        pytest.skip(f"no {VENV_BIN / 'flwr'}: the README's line needs the checkout's .venv")
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path,
                                          **{"federation.num_sites": SITES, "federation.rounds": ROUNDS}))
    # Flat keys on the command line, as the README says (`--run-config "privacy.target_epsilon=4"`):
    # those of this config that differ from the declared defaults (conf/flower.py's encoding).
    declared = declared_defaults()
    flat = {k: v for k, v in run_config_values(cfg).items() if v != declared[k]}
    assert {"task.name", "task.model", "federation.rounds", "privacy.delta"} <= set(flat)
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
    argv = [f"num-supernodes={SITES} client-resources-num-cpus=1" if a.startswith("num-supernodes=") else a
            for a in readme_command()] + ["--run-config", run_config]
    home, flwr_home = tmp_path / "home", tmp_path / "home" / ".flwr"
    home.mkdir()
    env = clean_env(home, flwr_home)

    def sh(flwr_argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        command = f"{shlex.join(ENV_PREFIX)} && {shlex.join(flwr_argv)}"
        return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)

    try:
        t0 = time.time()
        r = sh(argv, timeout=480)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        started = re.search(r"Successfully started run (\d+)", out)
        assert started, out[-4000:]
        status = sh(["flwr", "list", "--run-id", started.group(1), "--format", "json"], timeout=60)
        runs = json.loads(status.stdout)["runs"]
        assert [run["status"] for run in runs] == ["finished:completed"], status.stdout + out[-4000:]
        print(f"flwr run: {time.time() - t0:.0f}s for {SITES} sites x {ROUNDS} rounds")

        # Flower's processes got the README's environment (telemetry off, no installs).
        superlinks = [p for p in processes_of(flwr_home).values() if "flower-superlink" in p["cmdline"]]
        assert len(superlinks) == 1, "flwr run started one local SuperLink, still running"
        link = superlinks[0]
        for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
            assert link.get(key) == value, f"the local SuperLink runs with {key}={link.get(key)!r}"
        assert str(VENV_BIN / "flower-superlink") in link["cmdline"], link["cmdline"]

        # Nothing was installed: no runtime environment, no uv, no new venv anywhere.
        log = (flwr_home / "local-superlink" / "superlink.log").read_text(encoding="utf-8", errors="replace")
        assert not (flwr_home / "runtime-envs").exists()
        assert not (home / ".cache" / "uv").exists()
        assert not list(home.rglob("pyvenv.cfg"))
        for text in (out, log):
            assert "uv sync" not in text and "Installing application dependencies" not in text

        # The run directory: metrics for every round, and every configured site took part.
        run_dirs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
        assert len(run_dirs) == 1, run_dirs
        run_dir = run_dirs[0]
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
        said = "\n".join(ln for ln in out.splitlines() if re.match(r"\s*(site|round|\d+ sites)", ln))
        assert all(row["trained"] == SITES for row in rows[1:]), said
        sites = json.loads((run_dir / "privacy" / "sites.json").read_text())
        assert len(sites) == SITES and all(s["epsilon"] > 0 for s in sites.values()), sites
        ran = conf.from_yaml((run_dir / "config.yaml").read_text())
        assert ran.federation.num_sites == SITES and ran.task.model == str(tiny_bert)
        assert ran.privacy.delta == cfg.privacy.delta != conf.load_config().privacy.delta
    finally:
        stop_processes_of(flwr_home)
    assert not processes_of(flwr_home), "Flower processes left running"

"""fedshield as a site installs it: the wheel that `python -m build` makes, and the
air-gapped path, `fedshield bundle` then `pip install --no-index --find-links` into a fresh
venv, then a one-round job from the installed wheel (not the checkout).

Both build through pip and its configured registries (build isolation fetches setuptools;
the bundle downloads every dependency, from pip's cache when it holds them). The install
itself runs pip with no index and no configuration: only the bundle's wheels exist for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import fedshield

ROOT = Path(__file__).resolve().parents[1]
VERSION = fedshield.__version__

pytestmark = pytest.mark.e2e


def room_files(root: Path) -> set[str]:
    """What the wheel must hold: every file of every room (fedshield/<room> links to the
    folder at the root), modules, presets and any data file alike, as fedshield/<room>/<path>."""
    # The package's own modules (fedshield/__init__.py, api.py, rules.py, ...) and the rooms.
    expected = {f"fedshield/{p.name}" for p in (root / "fedshield").glob("*.py") if not p.is_symlink()}
    for link in (root / "fedshield").iterdir():
        if not link.is_symlink():
            continue
        target = link.resolve()
        if target.is_file():
            expected.add(f"fedshield/{link.name}")
            continue
        for path in target.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                expected.add(f"fedshield/{link.name}/{path.relative_to(target).as_posix()}")
    return expected


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"fedshield-{VERSION}.dist-info/entry_points.txt").decode()
        top_level = whl.read(f"fedshield-{VERSION}.dist-info/top_level.txt").decode().split()
    assert {n.split("/")[0] for n in names} == {"fedshield", f"fedshield-{VERSION}.dist-info"}
    assert top_level == ["fedshield"]
    modules = {n for n in names if not n.startswith(f"fedshield-{VERSION}.dist-info/")}
    assert modules == room_files(ROOT)  # every room, every preset, nothing else (no tests/, bench/)
    assert {"fedshield/conf/task/news-topics.yaml", "fedshield/conf/privacy/dp-sgd.yaml",
            "fedshield/conf/preset/cross-device.yaml", "fedshield/deploy/watchdog.py"} <= modules
    assert "fedshield = fedshield.simulations.cli:main" in entry_points


def test_python_m_build_makes_an_sdist_and_from_it_a_wheel_of_real_files_under_fedshield(tmp_path):
    """`python -m build`: the sdist (setuptools reads the rooms through fedshield/<room>),
    then the wheel built from that sdist alone, as a packager's pipeline does."""
    source = tmp_path / "src"  # a copy: the build writes *.egg-info and build/ into its source
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", ".*_cache"))
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert sorted(p.name for p in dist.iterdir()) == [f"fedshield-{VERSION}-py3-none-any.whl",
                                                     f"fedshield-{VERSION}.tar.gz"]
    with tarfile.open(dist / f"fedshield-{VERSION}.tar.gz") as sdist:
        members = {m.name for m in sdist.getmembers()}
        assert not [m.name for m in sdist.getmembers() if m.issym()]  # the links became files
    assert f"fedshield-{VERSION}/fedshield/server/app.py" in members
    check_wheel(dist / f"fedshield-{VERSION}-py3-none-any.whl")


def test_the_bundles_wheel_leaves_out_what_a_stale_build_folder_holds(tmp_path):
    """setuptools copies whatever `build/lib` holds into the wheel: a module deleted since an
    earlier build would ship. `fedshield bundle` builds from a clean copy of the inputs."""
    from fedshield.deploy.bundle import build_wheel

    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", ".*_cache"))
    stale = source / "build" / "lib" / "fedshield" / "server" / "deleted_long_ago.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('stale')\n")
    (tmp_path / "out").mkdir()
    wheel = build_wheel(source, tmp_path / "out")
    assert wheel.name == f"fedshield-{VERSION}-py3-none-any.whl"
    check_wheel(wheel)  # exactly the rooms' files: not deleted_long_ago.py
    assert not (source / "fedshield.egg-info").exists()  # the checkout is left as it was


def offline_env(bin_dir: Path) -> dict[str, str]:
    """The site machine: no PYTHONPATH to the checkout, no pip configuration or index (this
    machine's pip config names local wheel folders, which would hide a missing wheel)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    # No .pyc compiled at install (they are at first import): compiling 2 GB of wheels was
    # much of the install's time on a 2-core machine, and it is not what is under test.
    env["PIP_NO_COMPILE"] = "1"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command[:3]} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.timeout(2700)
def test_the_bundle_installs_offline_into_a_fresh_venv_and_runs_a_one_round_job(tmp_path):
    """The quality bar, step by step. The job is `fedshield simulate federation.rounds=1`
    plus the cheapest overrides that keep its meaning (the installed wheel's own presets,
    bundled model and bundled data, Flower's simulation runtime, a run directory with metrics
    and a signed ledger): `task=news-topics privacy=dp-sgd` name the defaults, so the presets
    are read from the installed wheel; 2 sites instead of 8 and 16 tokens instead of 128,
    because encoding all 2,225 articles at 128 tokens took 12 min on this shared 2-core
    machine (about 4 min with these)."""
    bundle, venv, runs = tmp_path / "bundle", tmp_path / "fedshield-venv", tmp_path / "runs"
    bin_dir = tmp_path / "bin"  # `python3` in INSTALL.txt: this interpreter's Python
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    times: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        # The checkout under test makes the bundle (PYTHONPATH: this tree, however fedshield is installed).
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        run([sys.executable, "-m", "fedshield.simulations.cli", "bundle", str(bundle)], tmp_path, env, 1800)
        times["bundle"] = time.monotonic() - t0
        check_wheel(bundle / f"fedshield-{VERSION}-py3-none-any.whl")
        assert any(p.name.startswith("torch-2.13.0") for p in bundle.glob("*.whl"))

        site = offline_env(bin_dir)
        run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], bundle, site, 300)
        # INSTALL.txt's own line, verbatim, from the folder that holds the bundle.
        install = [line.strip() for line in (bundle / "INSTALL.txt").read_text().splitlines()
                   if line.strip().startswith("python3 -m venv")]
        assert install == ["python3 -m venv fedshield-venv && fedshield-venv/bin/pip install --no-index "
                           f"--find-links bundle fedshield=={VERSION}"]
        t0 = time.monotonic()
        run(["bash", "-c", install[0]], tmp_path, site, 1800)
        times["venv + offline install"] = time.monotonic() - t0

        python, command = venv / "bin" / "python", venv / "bin" / "fedshield"
        where = run([str(python), "-c", "import fedshield; print(fedshield.__version__, fedshield.__file__)"],
                    tmp_path, site, 300).stdout.split()
        assert where[0] == VERSION
        assert Path(where[1]).is_relative_to(venv / "lib")  # the installed wheel, not the checkout
        assert run([str(command), "--version"], tmp_path, site, 300).stdout.strip() == f"fedshield {VERSION}"

        shown = run([str(python), "-m", "pip", "show", "-f", "fedshield"], tmp_path, site, 300).stdout
        files = [line.strip() for line in shown.split("\nFiles:\n", 1)[1].splitlines() if line.startswith("  ")]
        assert "../../../bin/fedshield" in files
        strays = [f for f in files if not f.startswith(("fedshield/", f"fedshield-{VERSION}.dist-info/"))
                  and f != "../../../bin/fedshield"]
        assert not strays, f"top-level files other than fedshield: {strays}"

        t0 = time.monotonic()
        run([str(command), "simulate", "federation.rounds=1", "task=news-topics", "privacy=dp-sgd",
             "federation.num_sites=2", "task.max_length=16", f"output.dir={runs}"], tmp_path, site, 1800)
        times["simulate"] = time.monotonic() - t0
        (run_dir,) = runs.iterdir()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and rows[-1]["trained"] == 2
        ledger = [json.loads(line) for line in (run_dir / "privacy" / "ledger.jsonl").read_text().splitlines()]
        assert {(e["site"], e["release"], e["round"]) for e in ledger if e["release"] == "dp-sgd"} == {
            ("site-0", "dp-sgd", 1), ("site-1", "dp-sgd", 1)}
    finally:
        # Half a GB of wheels, a 2 GB venv, a 90 MB model: gone whatever happened (pytest keeps tmp dirs).
        for folder in (bundle, venv, runs):
            shutil.rmtree(folder, ignore_errors=True)
        print("install e2e: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))

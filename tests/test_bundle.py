"""`fedshield bundle` without a download: what it reads from fedshield's wheel metadata,
the pip command it runs (the CUDA flag's index and pin), what it builds from, and a whole
bundle made by the real pip from a local folder of wheels (no index).
tests/test_install.py makes the real bundle and installs it offline (e2e)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedshield.deploy import bundle
from fedshield.deploy.bundle import BundleError
from fedshield.simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal valid pure-Python wheel: enough for pip to resolve and download it."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{dist}.dist-info/METADATA", metadata)
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                 "Tag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_the_runtime_requirements_leave_out_the_extras_and_keep_other_markers():
    metadata = ("Metadata-Version: 2.4\nName: fedshield\nVersion: 1.0\n"
                "Requires-Dist: torch==2.13.0\n"
                'Requires-Dist: uvloop>=0.19; sys_platform != "win32"\n'
                'Requires-Dist: pytest<10,>=9; extra == "test"\n'
                'Requires-Dist: ruff==0.17.6; python_version >= "3.11" and extra == "test"\n\nREADME\n')
    assert bundle.runtime_requirements(metadata) == ("torch==2.13.0", 'uvloop>=0.19; sys_platform != "win32"')


def test_the_wheel_is_read_from_its_metadata_and_must_be_fedshields(tmp_path):
    wheel = fake_wheel(tmp_path, "fedshield", "9.1", ["torch==2.13.0", 'mypy; extra == "test"'])
    info = bundle.read_fedshield_wheel(wheel)
    assert (info.name, info.version, info.requires) == ("fedshield", "9.1", ("torch==2.13.0",))

    with pytest.raises(BundleError, match=r"a wheel of other-thing, not of fedshield"):
        bundle.read_fedshield_wheel(fake_wheel(tmp_path, "other-thing", "1.0"))
    junk = tmp_path / "fedshield-1.0-py3-none-any.whl"
    junk.write_text("not a zip")
    with pytest.raises(BundleError, match=r"fedshield-1.0-py3-none-any.whl: not a readable wheel"):
        bundle.read_fedshield_wheel(junk)


def test_the_default_takes_torch_from_pips_configured_index(tmp_path):
    wheel = tmp_path / "fedshield-1.0-py3-none-any.whl"
    command = bundle.download_command(wheel, tmp_path / "out", ["torch==2.13.0", "numpy<3"])
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--only-binary=:all:" in command and command[-1] == str(wheel)
    # No index named: pip's own configuration (here, a local CPU wheel) decides.
    assert not [a for a in command if "index" in a or a.startswith("torch")]


def test_the_cuda_flag_pins_torchs_cuda_build_and_adds_pytorchs_index_for_it(tmp_path):
    wheel = tmp_path / "fedshield-1.0-py3-none-any.whl"
    command = bundle.download_command(wheel, tmp_path / "out", ["torch==2.13.0; python_version>='3.11'", "numpy<3"],
                                      cuda="cu126", python_version="3.12", platform="manylinux_2_28_x86_64")
    # `torch==2.13.0+cu126` matches only the CUDA build: pip cannot fall back to a CPU wheel.
    assert command[-2:] == [str(wheel), "torch==2.13.0+cu126"]
    i = command.index("--extra-index-url")
    assert command[i + 1] == "https://download.pytorch.org/whl/cu126"
    assert command[command.index("--python-version") + 1] == "3.12"
    assert command[command.index("--platform") + 1] == "manylinux_2_28_x86_64"

    with pytest.raises(BundleError, match=r"--cuda 'cuda12': must be a PyTorch CUDA tag such as cu126"):
        bundle.download_command(wheel, tmp_path, ["torch==2.13.0"], cuda="cuda12")
    with pytest.raises(BundleError, match=r"requires 'torch>=2.13': --cuda needs an exact pin"):
        bundle.download_command(wheel, tmp_path, ["torch>=2.13"], cuda="cu126")


def test_the_install_line_quotes_a_folder_name_for_the_shell():
    assert bundle.install_command("site bundle", "1.0").endswith("--find-links 'site bundle' fedshield==1.0")


def test_fedshields_own_torch_pin_is_exact_so_the_cuda_flag_can_use_it():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert bundle.exact_pin(deps, "torch") == "2.13.0"


def test_the_build_copies_pyproject_the_readme_the_package_and_the_rooms_it_links(tmp_path):
    inputs = bundle.build_inputs(ROOT)
    rooms = {p.name for p in (ROOT / "fedshield").iterdir() if p.is_symlink()}
    assert set(inputs) == {"pyproject.toml", "README.md", "fedshield"} | rooms
    assert {"server", "client", "privacy", "conf", "protocol.py"} <= rooms


def test_the_source_checkout_is_found_and_an_installed_wheel_is_not_one(tmp_path):
    assert bundle.source_root() == ROOT
    site_packages = tmp_path / "site-packages" / "fedshield" / "__init__.py"
    site_packages.parent.mkdir(parents=True)
    site_packages.touch()
    assert bundle.source_root(site_packages) is None
    other = tmp_path / "other"
    (other / "fedshield").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "not-fedshield"\n')
    assert bundle.source_root(other / "fedshield" / "__init__.py") is None


def test_an_installed_fedshield_without_wheel_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundle, "source_root", lambda package_file=None: None)
    assert main(["bundle", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "installed from a wheel" in err and "--wheel PATH" in err
    assert not (tmp_path / "b").exists()


def test_a_folder_that_holds_anything_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.whl").touch()
    monkeypatch.setattr(bundle, "run_pip", lambda *a: pytest.fail("no pip before the checks"))
    assert main(["bundle", str(out), "--cuda", "cu126"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    (out / "old.whl").unlink()
    assert main(["bundle", str(out), "--cuda", "12.6"]) == 2
    assert "--cuda '12.6': must be a PyTorch CUDA tag" in capsys.readouterr().err
    assert main(["bundle", str(tmp_path / "no" / "b")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_pips_failure_becomes_one_line_with_its_cause(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    command = [sys.executable, "-m", "pip", "download", "--no-index", "--find-links", str(empty),
               "--dest", str(tmp_path), "no-such-package==1.0"]
    with pytest.raises(BundleError) as raised:
        bundle.run_pip(command, "downloading the dependencies", verbose=False)
    message = str(raised.value)
    assert message.startswith("downloading the dependencies failed: ERROR: ")
    assert "no-such-package==1.0" in message and "\n" not in message

    offline = [sys.executable, "-c", "import sys; sys.stderr.write('WARNING: Retrying after NewConnectionError'"
               "'(Failed to establish a new connection)\\nERROR: No matching distribution found for torch\\n');"
               "sys.exit(1)"]
    with pytest.raises(BundleError, match=r"found for torch \(pip reached no package index"):
        bundle.run_pip(offline, "downloading the dependencies", verbose=False)


def test_a_bundle_from_a_local_folder_of_wheels_has_the_wheels_their_sums_and_the_install_line(
        tmp_path, monkeypatch, capsys):
    # pip with no index and no configuration: only the wheels in `index` exist for it.
    index = tmp_path / "index"
    index.mkdir()
    fake_wheel(index, "dep-a", "1.0", ["dep-b>=2"])
    fake_wheel(index, "dep-b", "2.5")
    fake_wheel(index, "dep-b", "3.0")
    fake_wheel(index, "dep-c", "1.0")  # only an extra's requirement: not in the bundle
    ours = fake_wheel(tmp_path, "fedshield", "7.0", ["dep-a==1.0", 'dep-c; extra == "test"'])
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))

    out = tmp_path / "site-bundle"
    assert main(["bundle", str(out), "--wheel", str(ours)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["INSTALL.txt", "SHA256SUMS", "dep_a-1.0-py3-none-any.whl", "dep_b-3.0-py3-none-any.whl",
                     "fedshield-7.0-py3-none-any.whl"]
    assert not list(tmp_path.glob(".site-bundle.partial-*"))  # the staging folder became the bundle
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}" for n in names if n.endswith(".whl")]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out).returncode == 0

    line = ("python3 -m venv fedshield-venv && fedshield-venv/bin/pip install --no-index --find-links site-bundle "
            "fedshield==7.0")
    install = (out / "INSTALL.txt").read_text()
    assert f"\n  {line}\n" in install and "  dep-a==1.0\n" in install and "dep-c" not in install
    assert "no torch wheel" in install
    assert capsys.readouterr().out.rstrip().endswith(line)

"""`fedshield bundle DIR`: a wheelhouse for an air-gapped site install.

A site's machine often reaches no package index. The bundle is made on a machine that does
(the coordinator's, a build host) and carried over: fedshield's own wheel, every dependency
as a wheel, pinned as fedshield's metadata pins them and resolved by pip exactly as the
offline install will resolve them, a SHA256SUMS file of the wheels, and INSTALL.txt with the
one offline command (`pip install --no-index --find-links DIR fedshield==V`).

- fedshield's wheel is built from the source checkout this fedshield runs from, or taken
  from `--wheel PATH` (an installed wheel carries no source to build from). The build runs
  on a fresh copy of the build's inputs: setuptools copies whatever its `build/lib` holds
  into the wheel, so building in the checkout would ship modules since deleted (measured).
- Dependencies: `pip download --only-binary=:all:` of that wheel: only wheels (a site may
  have no compiler), for this interpreter and platform or `--python-version/--platform`.
- torch: the CPU build by default, from pip's configured index (this machine's pip config
  serves the CPU wheel of the pinned release); `--cuda TAG` pins `torch==V+TAG` and adds
  https://download.pytorch.org/whl/TAG, where PyTorch serves its CUDA builds, so that no
  other build can be chosen.

The wheels go to a staging folder next to DIR that becomes DIR only when everything is
there: a failed bundle leaves nothing half-made that an install would pick up.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from fedshield.privacy.errors import FedShieldError

PYTORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
CUDA_TAG = re.compile(r"cu\d{3}")  # PyTorch's index names: cu118, cu126, cu128, ...
INSTALL_FILE = "INSTALL.txt"
SUMS_FILE = "SHA256SUMS"
# pip's lines that mean it reached no index (urllib3 / socket errors it logs before giving up).
NO_NETWORK = re.compile(r"NewConnectionError|Failed to establish|Name or service not known|"
                        r"Temporary failure in name resolution|Network is unreachable|ConnectTimeout")


class BundleError(FedShieldError):
    """The bundle could not be made; the message says what and where."""


@dataclass(frozen=True)
class WheelInfo:
    """What fedshield's wheel says about itself (its METADATA)."""

    path: Path
    name: str
    version: str
    requires: tuple[str, ...]  # runtime Requires-Dist, extras' requirements left out


def normalise(name: str) -> str:
    """A distribution name as packaging indexes compare it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise BundleError(f"unreadable requirement {requirement!r} in fedshield's wheel metadata")
    return normalise(match.group(1))


def runtime_requirements(metadata: str) -> tuple[str, ...]:
    """The Requires-Dist lines of a METADATA text that every install needs: those whose
    marker names an extra (`; extra == "test"`) belong to an optional extra."""
    requires = Parser().parsestr(metadata).get_all("Requires-Dist") or []
    return tuple(r.strip() for r in requires if "extra" not in r.partition(";")[2])


def read_wheel(path: Path) -> WheelInfo:
    """Name, version and runtime requirements from a wheel's *.dist-info/METADATA."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise BundleError(f"{path}: not a wheel (no single *.dist-info/METADATA inside)")
            metadata = wheel.read(names[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a readable wheel ({exc})") from None
    fields = Parser().parsestr(metadata)
    name, version = fields.get("Name"), fields.get("Version")
    if not name or not version:
        raise BundleError(f"{path}: its METADATA has no Name or Version")
    return WheelInfo(path, name, version, runtime_requirements(metadata))


def read_fedshield_wheel(path: Path) -> WheelInfo:
    info = read_wheel(path)
    if normalise(info.name) != "fedshield":
        raise BundleError(f"{path}: a wheel of {info.name}, not of fedshield")
    return info


def exact_pin(requires: Sequence[str], name: str) -> str:
    """The version that `name==V` pins among the requirements (the CUDA flag re-pins torch
    to its local build `V+TAG`, which must be the very release fedshield pins)."""
    for requirement in requires:
        if requirement_name(requirement) == normalise(name):
            match = re.fullmatch(r"\s*[A-Za-z0-9._-]+\s*==\s*([0-9][A-Za-z0-9.!]*)\s*(;.*)?", requirement)
            if not match:
                raise BundleError(f"fedshield's wheel requires {requirement!r}: --cuda needs an exact pin (==)")
            return match.group(1)
    raise BundleError(f"fedshield's wheel does not require {name}: nothing for --cuda to choose")


def check_cuda_tag(cuda: str) -> None:
    if not CUDA_TAG.fullmatch(cuda):
        raise BundleError(f"--cuda {cuda!r}: must be a PyTorch CUDA tag such as cu126 (cu and three digits)")


def torch_source(requires: Sequence[str], cuda: str | None) -> tuple[list[str], list[str]]:
    """(extra requirements, extra pip options) that choose the torch build.

    None: pip's configured index, whichever build it serves for the pin (on this project's
    machines and PyTorch's CPU index, the `+cpu` build). A CUDA tag: the pin `torch==V+TAG`,
    which only PyTorch's index for that tag serves, so pip cannot fall back to another build.
    """
    if cuda is None:
        return [], []
    check_cuda_tag(cuda)
    version = exact_pin(requires, "torch")
    return [f"torch=={version}+{cuda}"], ["--extra-index-url", PYTORCH_INDEX.format(tag=cuda)]


def download_command(wheel: Path, dest: Path, requires: Sequence[str], cuda: str | None = None,
                     python_version: str | None = None, platform: str | None = None) -> list[str]:
    """The `pip download` that fills the wheelhouse: fedshield's wheel and everything it
    requires, wheels only, resolved by pip as the offline install will."""
    extra_requirements, index_options = torch_source(requires, cuda)
    target: list[str] = []
    if python_version:
        target += ["--python-version", python_version]
    if platform:
        target += ["--platform", platform]
    return [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--dest", str(dest), *target, *index_options, str(wheel), *extra_requirements]


def source_root(package_file: Path | None = None) -> Path | None:
    """The source checkout that fedshield's `__init__.py` (this one's by default) lies in, or
    None for an installed wheel: the folder above the package must hold fedshield's
    pyproject.toml."""
    if package_file is None:
        from fedshield import _version  # the package's own folder, without its API (the contracts)

        package_file = Path(_version.__file__)
    root = package_file.resolve().parent.parent
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if project.get("project", {}).get("name") == "fedshield" else None


def checkout() -> Path:
    """The source checkout to build fedshield's wheel from; one line when there is none."""
    root = source_root()
    if root is None:
        from fedshield import _version

        raise BundleError(f"fedshield here is installed from a wheel ({Path(_version.__file__).parent}), not a "
                          "source checkout: nothing to build its wheel from; pass --wheel PATH (fedshield's .whl)")
    return root


def build_inputs(root: Path) -> list[str]:
    """The top-level entries of the checkout that the wheel build reads: pyproject.toml,
    the readme, licence files, fedshield/ and the room folders its links point to."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    readme = project.get("readme")
    names = {"pyproject.toml", "fedshield"}
    if isinstance(readme, dict):
        readme = readme.get("file")
    if isinstance(readme, str):
        names.add(Path(readme).parts[0])
    names.update(p.name for pattern in ("LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*") for p in root.glob(pattern))
    for link in (root / "fedshield").iterdir():
        if link.is_symlink():
            target = link.resolve()
            if not target.is_relative_to(root):
                raise BundleError(f"{link} points outside the checkout ({target}): cannot build from a copy")
            names.add(target.relative_to(root).parts[0])
    return sorted(names)


def build_wheel(root: Path, dest: Path, verbose: bool = False) -> Path:
    """fedshield's wheel from a clean copy of the checkout's build inputs (see the module
    docstring: a stale `build/lib` would otherwise leak into it)."""
    with tempfile.TemporaryDirectory(prefix="fedshield-build-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in build_inputs(root):
            source = root / name
            if source.is_dir():
                shutil.copytree(source, copy / name, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(source, copy / name)
        before = set(dest.glob("*.whl"))
        run_pip([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                 "--wheel-dir", str(dest), str(copy)], f"building fedshield's wheel from {root}", verbose)
    built = sorted(set(dest.glob("fedshield-*.whl")) - before)
    if len(built) != 1:
        raise BundleError(f"building fedshield's wheel from {root} made {len(built)} wheels, expected one")
    return built[0]


def run_pip(command: list[str], what: str, verbose: bool) -> None:
    """Runs pip; on failure one line: what failed and pip's own last error line."""
    if verbose:
        print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, stdout=None if verbose else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    if verbose:
        sys.stderr.write(result.stderr)
    if result.returncode == 0:
        return
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    cause = (errors or lines or [f"pip exited with status {result.returncode}"])[-1]
    if any(NO_NETWORK.search(line) for line in lines):
        cause += " (pip reached no package index: the bundle is made on a machine with one)"
    elif not verbose:
        cause += " (--verbose shows pip's output)"
    raise BundleError(f"{what} failed: {cause}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(folder: Path) -> list[Path]:
    """SHA256SUMS in `sha256sum -c` format, one line per wheel, sorted by name."""
    wheels = sorted(folder.glob("*.whl"))
    (folder / SUMS_FILE).write_text("".join(f"{sha256(w)}  {w.name}\n" for w in wheels), encoding="utf-8")
    return wheels


def install_command(bundle_name: str, version: str) -> str:
    """The one offline install line, run from the folder that holds the bundle."""
    return (f"python3 -m venv fedshield-venv && fedshield-venv/bin/pip install --no-index "
            f"--find-links {shlex.quote(bundle_name)} fedshield=={version}")


def target_description(python_version: str | None, platform: str | None) -> str:
    python = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"Python {python} on {platform or sysconfig.get_platform()}"


def torch_description(wheels: Sequence[Path]) -> str:
    """Which torch build the wheelhouse holds: a CUDA build brings nvidia-* wheels."""
    torch = [w.name for w in wheels if w.name.startswith("torch-")]
    if not torch:
        return "no torch wheel"
    cuda = any(w.name.startswith("nvidia_") for w in wheels) or any(re.search(r"\+cu\d", t) for t in torch)
    return f"{', '.join(torch)} ({'a CUDA build' if cuda else 'CPU build'})"


def write_install(folder: Path, bundle_name: str, info: WheelInfo, wheels: Sequence[Path], target: str,
                  torch: str) -> str:
    command = install_command(bundle_name, info.version)
    size_mb = sum(w.stat().st_size for w in wheels) / 1e6
    text = f"""fedshield {info.version}: an offline install bundle ({len(wheels)} wheels, {size_mb:.0f} MB)
made by `fedshield bundle` for {target}; torch: {torch}.

On the site machine (no network needed), in the folder that holds `{bundle_name}/`, check
the wheels and install (python3 must be the Python above):

  (cd {shlex.quote(bundle_name)} && sha256sum -c --quiet {SUMS_FILE})
  {command}

Then `fedshield-venv/bin/fedshield --help`; docs/site-operator.md tells the rest.

fedshield's own requirements (its wheel's metadata); pip resolved the rest of the
{len(wheels)} wheels from these, as the install above will:
""" + "".join(f"  {r}\n" for r in info.requires)
    (folder / INSTALL_FILE).write_text(text, encoding="utf-8")
    return command


def staging_folder(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: exists and is not an empty folder; a wheelhouse must hold only what this "
                          "bundle resolved (pip would pick up any other wheel there)")
    if not out.parent.is_dir():
        raise BundleError(f"{out.parent}: no such folder (the bundle's parent must exist)")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def make_bundle(out: Path, wheel: Path | None = None, cuda: str | None = None, python_version: str | None = None,
                platform: str | None = None, verbose: bool = False) -> str:
    """Writes the bundle into `out` (new or empty); returns the offline install command."""
    out = out.absolute()
    # Every check that needs no work comes first: a bad flag costs no download.
    if wheel is None:
        checkout()
    else:
        read_fedshield_wheel(wheel)
    if cuda is not None:
        check_cuda_tag(cuda)
    staging = staging_folder(out)
    try:
        if wheel is not None:
            built = Path(shutil.copy2(wheel, staging / wheel.name))
        else:
            root = checkout()
            print(f"building fedshield's wheel from {root}", flush=True)
            built = build_wheel(root, staging, verbose)
        info = read_fedshield_wheel(built)
        print(f"downloading fedshield {info.version}'s dependencies as wheels (pip download; torch alone is "
              "hundreds of MB, a CUDA build several GB)", flush=True)
        run_pip(download_command(built, staging, info.requires, cuda, python_version, platform),
                "downloading the dependencies", verbose)
        wheels = write_sums(staging)
        torch = torch_description(wheels)
        command = write_install(staging, out.name, info, wheels, target_description(python_version, platform), torch)
        if out.exists():
            out.rmdir()  # empty (staging_folder checked): the finished bundle takes its place
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"{out}: fedshield {info.version} and {len(wheels) - 1} dependency wheels (torch: {torch}), "
          f"{SUMS_FILE}, {INSTALL_FILE}")
    if cuda is None and "CUDA" in torch:
        print("note: pip's index served torch's CUDA build; for the CPU build add PyTorch's CPU index: "
              "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu fedshield bundle ...")
    print(f"offline install, from {out.parent}:\n  {command}")
    return command


def bundle_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield bundle",
        description="Write a wheelhouse for an offline (air-gapped) site install: fedshield's wheel, every "
                    "dependency as a wheel, SHA256SUMS and INSTALL.txt with the one install command.",
        epilog="""examples:
  fedshield bundle fedshield-bundle/                   for a site like this machine
  fedshield bundle fedshield-bundle/ --cuda cu126 --python-version 3.12 --platform manylinux_2_28_x86_64
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="the bundle folder to write (new, or empty)")
    parser.add_argument("--wheel", type=Path,
                        help="fedshield's wheel to ship (default: build it from this source checkout)")
    parser.add_argument("--cuda", metavar="TAG",
                        help="torch's CUDA build for PyTorch's tag TAG (e.g. cu126), from "
                             "https://download.pytorch.org/whl/TAG (default: the CPU build from pip's index)")
    parser.add_argument("--python-version", help="the site's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--platform", help="the site's platform tag, e.g. manylinux_2_28_x86_64 (default: this one)")
    parser.add_argument("--verbose", action="store_true", help="show pip's output")
    args = parser.parse_args(argv)
    make_bundle(args.dir, args.wheel, args.cuda, args.python_version, args.platform, args.verbose)
    return 0

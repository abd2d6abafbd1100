"""The code gates, part of every test run (the README's `.venv/bin/python -m pytest`, which
.ci/run calls): the dependency rule (import-linter, contracts in pyproject's
[tool.importlinter]), ruff, and mypy --strict on the packages pyproject's [tool.mypy] lists.

Each tool runs as a subprocess of this venv, with its own configuration from pyproject, so
that running it by hand gives the same answer. Caches (.mypy_cache, .ruff_cache) are
ignored by git; import-linter takes 0.3 s without one.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LINTER = PYPROJECT["tool"]["importlinter"]
CONTRACTS = {c["name"]: c for c in LINTER["contracts"]}
# The rooms: folders (and protocol.py) at the repository root, linked as fedshield/<room>.
ROOMS = sorted(p.name.removesuffix(".py") for p in (ROOT / "fedshield").iterdir() if p.is_symlink())


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path: a copy of the sources is
    # analysed instead of the editable install.
    return _run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd)


def test_import_contracts_are_kept() -> None:
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in r.stdout


def test_every_room_is_linked_into_the_package_and_shipped_and_ruled() -> None:
    """A new room at the root must be linked as fedshield/<room>, shipped by setuptools and
    be the source of a contract (or be `simulations`, which may import anything)."""
    assert set(ROOMS) == {"client", "conf", "deploy", "privacy", "protocol", "server", "simulations", "strategies",
                          "task"}
    for room in ROOMS:
        link = ROOT / "fedshield" / (room + (".py" if room == "protocol" else ""))
        assert link.resolve() == (ROOT / link.name).resolve(), f"fedshield/{link.name} must link to ../{link.name}"
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert {f"fedshield.{r}" for r in ROOMS if r != "protocol"} <= packages
    assert {p for p in packages if p.count(".") == 1} == {f"fedshield.{r}" for r in ROOMS if r != "protocol"}
    assert all(p == "fedshield" or p.startswith("fedshield.") for p in packages)
    sources = {m for c in CONTRACTS.values() for m in c.get("source_modules", [])}
    assert sources >= {f"fedshield.{r}" for r in ROOMS} - {"fedshield.simulations"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_nothing_imports_a_room_by_its_bare_name() -> None:
    """`import server` would work in the source tree (the root is on the path) but not from
    the wheel, which holds only `fedshield`: every import of ours is `fedshield.<room>`."""
    bare = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "fedshield", "build"} or "site-packages" in rel.parts:
            continue
        bare += [f"{rel}:{line}: import {name}" for line, name in _imports(path) if name.split(".")[0] in ROOMS]
    assert not bare, "\n".join(bare)


def _copy_sources(dest: Path) -> Path:
    pkg = dest / "fedshield"
    shutil.copytree(ROOT / "fedshield", pkg, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


SERVER = "server may import task, privacy, protocol, strategies, deploy, conf"


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("server/app.py", "from fedshield.client import app", ["client and server never import each other", SERVER]),
        ("task/model.py", "from fedshield import protocol", ["task may import privacy, conf"]),
        ("client/app.py", "from omegaconf import DictConfig", ["only conf reads OmegaConf"]),
        ("privacy/errors.py", "from fedshield.conf import ConfigError", ["privacy imports nothing of ours but rules"]),
        ("protocol.py", "from fedshield.task import data", ["protocol may import privacy"]),
        ("rules.py", "from fedshield.privacy import errors", ["rules imports nothing of ours"]),
        # The Python API sits above every room, the command included.
        ("client/cli.py", "from fedshield import api", ["client may import task, privacy, protocol, deploy, conf"]),
        ("simulations/cli.py", "import fedshield.api", ["simulations (the command) does not import the API"]),
    ],
)
def test_a_forbidden_import_fails_the_contract(tmp_path: Path, module: str, line: str, broken: list[str]) -> None:
    src = _copy_sources(tmp_path)
    with open(src / "fedshield" / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}  # the forbidden import\n")
    r = _lint_imports(src)
    assert r.returncode != 0, r.stdout + r.stderr
    for name in broken:
        assert f"{name} BROKEN" in r.stdout, r.stdout


# strategies/ modules outside the coordinator's stack of wrappers (strategies/stack.py).
NOT_STACK = {"__init__", "flower", "ledger_check", "secagg", "site_dp"}


def test_every_module_of_the_coordinators_stack_is_short() -> None:
    """One behaviour per wrapper (docs/coordinator.md §14): no module of the stack over
    STACK_MAX_LINES lines, and a new module in strategies/ is in the stack or named outside it."""
    tree = ast.parse((ROOT / "strategies" / "stack.py").read_text(encoding="utf-8"))
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("STACK_MODULES", "STACK_MAX_LINES")}
    modules, cap = set(consts["STACK_MODULES"]), consts["STACK_MAX_LINES"]
    assert cap <= 250
    present = {p.stem for p in (ROOT / "strategies").glob("*.py")}
    assert present - NOT_STACK == modules, "list a new strategies/ module in stack.STACK_MODULES or NOT_STACK"
    lines = {m: len((ROOT / "strategies" / f"{m}.py").read_text(encoding="utf-8").splitlines()) for m in modules}
    long = {m: n for m, n in sorted(lines.items()) if n > cap}
    assert not long, f"over {cap} lines: {long}"


def test_ruff() -> None:
    r = _run([sys.executable, "-m", "ruff", "check", "--no-fix", "--output-format", "concise", "."])
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    """mypy --strict on the files pyproject's [tool.mypy] names: the whole package, every room."""
    assert PYPROJECT["tool"]["mypy"]["files"] == ["fedshield"] and PYPROJECT["tool"]["mypy"]["strict"]
    r = _run([sys.executable, "-m", "mypy"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_version_is_said_once_for_each_reader() -> None:
    """pyproject's static version (Flower's `flwr run .` needs one there) and
    fedshield.__version__ (what `fedshield --version` prints) are the same."""
    import fedshield

    assert fedshield.__version__ == PYPROJECT["project"]["version"]


def test_flowers_run_config_declares_every_schema_key_with_its_default() -> None:
    """`flwr run . --run-config "KEY=VALUE"` takes only keys pyproject declares: the table
    [tool.flwr.app.config] is the schema's leaf keys and defaults (conf/flower.py), so that
    the two cannot drift. On a schema change: `python -m fedshield.conf.flower` prints it."""
    from fedshield.conf.flower import declared_defaults
    from fedshield.server.app import RUN_CONFIG_YAML_KEY

    declared = dict(PYPROJECT["tool"]["flwr"]["app"]["config"])
    assert declared.pop(RUN_CONFIG_YAML_KEY) == ""  # the older one-YAML-string form, kept
    expected = declared_defaults()
    assert list(declared) == list(expected), "regenerate with `python -m fedshield.conf.flower`"
    for key, value in expected.items():
        assert declared[key] == value and type(declared[key]) is type(value), key

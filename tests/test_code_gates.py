"""The code gates, part of every test run (the README's `.venv/bin/python -m pytest`, which
.ci/run calls): the dependency rule (import-linter, contracts in pyproject's
[tool.importlinter]), ruff, and mypy --strict on privacy/ and protocol.py.

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
OURS = [*LINTER["root_packages"], "protocol"]


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


def test_the_contracts_cover_every_package_we_ship() -> None:
    """A new top-level package must join the rule: it has to be a root package and the
    source of a contract (or be `simulations`, which may import anything)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    shipped = {p for p in setuptools["packages"] if "." not in p} | set(setuptools["py-modules"])
    assert shipped == set(OURS)
    sources = {m for c in CONTRACTS.values() for m in c.get("source_modules", [])}
    assert sources >= set(OURS) - {"simulations", "protocol"}


def test_protocol_imports_nothing_of_ours_but_privacy_errors() -> None:
    """The contract's clause for protocol.py, read from its imports (import-linter takes
    packages only as roots; see pyproject)."""
    tree = ast.parse((ROOT / "protocol.py").read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"protocol.py:{node.lineno}: relative import"
            base = node.module or ""
            imported += [f"{base}.{a.name}" if base in OURS else base for a in node.names]
    ours = [m for m in imported if m.split(".")[0] in OURS]
    assert all(m == "privacy.errors" for m in ours), f"protocol.py imports {ours}"


def _copy_sources(dest: Path) -> Path:
    for name in LINTER["root_packages"]:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "protocol.py", dest / "protocol.py")
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


SERVER = "server may import task, privacy, protocol, strategies, deploy, conf"


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("server/app.py", "from client import app", ["client and server never import each other", SERVER]),
        ("task/model.py", "import protocol", ["task may import privacy, conf"]),
        ("privacy/errors.py", "from conf import ConfigError", ["privacy imports nothing of ours"]),
    ],
)
def test_a_forbidden_import_fails_the_contract(tmp_path: Path, module: str, line: str, broken: list[str]) -> None:
    src = _copy_sources(tmp_path)
    with open(src / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}  # the forbidden import\n")
    r = _lint_imports(src)
    assert r.returncode != 0, r.stdout + r.stderr
    for name in broken:
        assert f"{name} BROKEN" in r.stdout, r.stdout


def test_ruff() -> None:
    r = _run([sys.executable, "-m", "ruff", "check", "--no-fix", "--output-format", "concise", "."])
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_on_privacy_and_protocol() -> None:
    r = _run([sys.executable, "-m", "mypy", "--strict", "privacy", "protocol.py"])
    assert r.returncode == 0, r.stdout + r.stderr

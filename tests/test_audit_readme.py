"""The README's and docs/*.md's `fedshield audit` examples, run as written on a run of the
default config (8 sites of MiniLM on BBC News, PLD accountant, target ε 8 at δ 1e-5) with
`federation.rounds=2` only, to fit the suite: the noise is calibrated for the 2 planned rounds,
so each site ends at PLD ε just under 8 while dp-accounting's RDP opinion is above 8, the
case in which the audit once failed the default run."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Example lines that do not audit a run of the default config, and why.
NOT_ON_THE_DEFAULT_RUN = {
    "--empirical": "a canary audit runs a simulation of its own (tests/test_canary.py runs it)",
    "federation-ledger.jsonl": "the site-level DP ledger exists only with privacy.unit=site (tests/test_site_dp.py)",
}


# default_run: tests/conftest.py (shared with the tracking and dashboard e2e tests)


def _fedshield(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedshield", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _examples() -> list[str]:
    """Every `fedshield audit` command line in the docs' code blocks, without its comment."""
    lines = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            lines += [line.split("  #")[0].strip() for line in block.splitlines()
                      if line.startswith(".venv/bin/fedshield audit")]
    return lines


def _as_run(line: str, run: Path, keys: Path) -> list[str]:
    """The example with the default run in place of its placeholders: runs/<run>, the keys an
    auditor got from the sites, a site's state folder, and two of the run's site names."""
    line = (line.replace("runs/<run>", str(run)).replace("keys-from-sites/", f"{keys}/")
            .replace("/var/lib/fedshield", str(run / "sites" / "site-0"))
            .replace("st-marys=", "site-0=").replace("bank-1=", "site-1="))
    return shlex.split(line)[2:]  # after ".venv/bin/fedshield audit"


@pytest.mark.timeout(1800)
def test_the_docs_audit_examples_on_a_default_config_run(default_run, tmp_path):
    run = default_run
    keys = tmp_path / "keys-from-sites"  # each site's site.pub, as an auditor gets it from the site
    keys.mkdir()
    for state in sorted((run / "sites").iterdir()):
        shutil.copy(state / "site.pub", keys / f"{state.name}.pub")
    sites = json.loads((run / "privacy" / "sites.json").read_text())
    worst = max(s["epsilon"] for s in sites.values())
    assert 7 < worst < 8  # at the target: the PLD verdict is under 8

    examples = _examples()
    skipped = [line for line in examples if any(k in line for k in NOT_ON_THE_DEFAULT_RUN)]
    ran = [line for line in examples if line not in skipped]
    assert len(ran) >= 5 and len(skipped) == 3, examples  # a new example is run, or named above
    for line in ran:
        args = _as_run(line, run, keys)
        done = _fedshield("audit", *args)
        # The one example with budgets: site-1's 4 is below what it spent, which the audit must say.
        want = 1 if "site-1=4" in args else 0
        assert done.returncode == want, f"{line}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if want:
            assert "site site-1: ε=" in done.stderr and "is past its budget 4 (δ=1e-05, pld)" in done.stderr
        elif "--json" in args:
            assert json.loads(done.stdout)["ok"] is True
        else:
            assert "audit: PASSED" in done.stdout and "rdp (opinion): " in done.stdout

    # --max-epsilon is judged by the ledger's own accountant (PLD), not by the RDP opinion.
    passed = _fedshield("audit", str(run), "--max-epsilon", "8")
    assert passed.returncode == 0, passed.stderr
    opinion = float(re.search(r"rdp \(opinion\): ([\d.]+)", passed.stdout).group(1))
    assert opinion > 8  # what the old verdict compared, and failed on
    below = _fedshield("audit", str(run), "--max-epsilon", "7")
    assert below.returncode == 1 and "is above --max-epsilon 7" in below.stderr and "pld)" in below.stderr

    # The plots are not blank; report.md states what ran.
    from PIL import Image

    for png in (run / "audit" / "epsilon.png", run / "plots" / "epsilon.png"):
        img = Image.open(io.BytesIO(png.read_bytes())).convert("L")
        assert len(set(img.getdata())) > 20, png
    report = (run / "report.md").read_text()
    assert "σ (DP-SGD noise multiplier)" in report and "config.yaml sha256 `" in report
    assert all(f"\n| {r} | " in report for r in range(3))

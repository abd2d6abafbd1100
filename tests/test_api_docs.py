"""docs/api.md's examples are checks: every ```python block runs, in order, in one namespace,
in an empty folder (a block after `<!-- not run: ... -->` is only compiled). Then the
quality bar of issue 16: ε per site from `fedshield.simulate` equals the ledger's, as the
sites signed it and as the audit recomputes it, and the audit verifies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"
_BLOCK = re.compile(r"^(<!-- not run[^\n]*-->\n)?```python\n(.*?)^```$", re.S | re.M)
_SECTION = re.compile(r"^## (.+)$", re.M)


def _blocks() -> list[tuple[str, bool, str]]:
    """(section title, runs?, code) for every ```python block of docs/api.md, in order."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        titles = _SECTION.findall(text, 0, m.start())
        out.append((titles[-1] if titles else "", m.group(1) is None, m.group(2)))
    return out


def _run(blocks: list[tuple[str, bool, str]], folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": "docs_api"}
    for i, (title, runs, code) in enumerate(blocks):
        compiled = compile(code, f"docs/api.md block {i + 1} ({title})", "exec")
        if runs:
            exec(compiled, namespace)
    return namespace


def test_every_example_compiles_and_the_config_examples_run(tmp_path, monkeypatch):
    blocks = _blocks()
    assert [t for t, _, _ in blocks][:1] == ["Config"] and len(blocks) >= 6
    assert sum(not runs for _, runs, _ in blocks) == 1  # only the thread that needs a coordinator
    for i, (_, _, code) in enumerate(blocks):
        compile(code, f"docs/api.md block {i + 1}", "exec")
    ns = _run([b for b in blocks if b[0] == "Config"], tmp_path, monkeypatch)
    assert ns["config"].federation.rounds == 1 and (tmp_path / "heart.yaml").is_file()


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_the_examples_run_a_simulation_and_an_audit_from_python(tmp_path, monkeypatch):
    import fedshield
    from fedshield.server.run_dir import read_jsonl

    ns = _run(_blocks(), tmp_path, monkeypatch)
    result, report = ns["result"], ns["report"]
    assert isinstance(result, fedshield.RunResult) and isinstance(report, fedshield.AuditResult)
    assert result.run_dir.parent == tmp_path / "runs" and [r.round for r in result.rounds] == [0, 1]
    assert set(result.epsilon) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}

    # ε per site: the run's ledger, each site's own books (what it signed) and the audit agree.
    ledger = read_jsonl(result.run_dir / "privacy" / "ledger.jsonl")
    for site, eps in result.epsilon.items():
        mine = [e for e in ledger if e["site"] == site]
        own = read_jsonl(result.run_dir / "sites" / site / "ledger.jsonl")
        assert eps == mine[-1]["epsilon"] == own[-1]["epsilon"] == result.final.epsilon[site]
        assert [e["hash"] for e in own] == [e["hash"] for e in mine]
        assert report.sites[site].recorded_epsilon == eps
        assert report.epsilon[site] == pytest.approx(eps, rel=1e-6)
        assert 0 < eps <= result.config.privacy.target_epsilon
    assert report.ok and report.key_source == "given" and report.verify.signatures_checked
    assert result.config == fedshield.Config.from_run(result.run_dir)
    assert result.paths.model is not None and (result.paths.model / "config.json").is_file()

    # The command prints from the same audit.
    from fedshield.simulations.cli import main

    assert main(["audit", str(result.run_dir), "--ledger-keys", str(result.paths.ledger_keys), "--json",
                 "--out", str(tmp_path / "cli-audit")]) == 0
    assert ns["checked"].records == 40  # the embedded site agent's example ran too


def test_the_cli_run_directory_reads_back(tmp_path):
    """A run directory as `fedshield simulate` leaves it reads into the same RunResult fields."""
    import fedshield

    run = tmp_path / "runs" / "r1"
    (run / "privacy").mkdir(parents=True)
    (run / "config.yaml").write_text(fedshield.Config.load(["federation.rounds=1"]).to_yaml())
    rows = [{"round": r, "accuracy": 0.5 + r / 10, "macro_f1": 0.4, "per_class": {}, "epsilon": {"a": r * 1.5},
             "epsilon_max": r * 1.5, "epsilon_mean": r * 1.5, "trained": r, "declined": 0, "rejected": 0,
             "failed": 0, "empty": False, "elapsed_s": 1.0, "site_level_epsilon": None} for r in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "privacy" / "sites.json").write_text(json.dumps({"a": {
        "records": 100, "epsilon": 1.5, "delta": 1e-5, "budget": 8.0, "accountant": "pld",
        "neighbouring": "add-remove", "not_trained": ["round 1: declined: budget"]}}))
    result = fedshield.RunResult.read(run)
    assert result.epsilon == {"a": 1.5} and result.final_accuracy == pytest.approx(0.6)
    assert result.sites["a"].not_trained == ("round 1: declined: budget",) and result.paths.model is None
    assert result.final.epsilon["a"] == 1.5 and result.site_level_epsilon is None
    assert result.table().splitlines()[2].split()[:2] == ["1", "0.6000"]
    with pytest.raises(TypeError):
        result.final.epsilon["a"] = 0.0  # type: ignore[index]

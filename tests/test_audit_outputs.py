"""What `fedshield audit` outputs is true: the verdict uses the ledger's own accountant (a PLD
ledger just under the bound passes although its RDP opinion is above it), the ε plot shows
data for pld, rdp and prv ledgers, the columns are labelled, and the text describing the
accountants is rendered from the constants the code uses. Ledgers are built in code with
signed entries (as in tests/test_events.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedshield.privacy.accountant import PLD_RECORD_INTERVAL, Spend, epsilon, epsilon_dp_accounting_rdp
from fedshield.privacy.audit import audit, audit_and_report
from fedshield.privacy.cli import audit_main
from fedshield.privacy.events import Mechanism, Neighbouring, PrivacyEvent, entry_fields, release_event
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.report import epsilon_figure
from fedshield.privacy.signing import generate_site_key, load_private_key

DELTA = 1e-5
BOUND = 8.0
# The default run's history in small: the count, the feature sum, two rounds of DP-SGD. At
# σ = 2.85 its PLD ε is ~7.98 (under 8) and its RDP ε ~8.70 (above 8).
SIGMA, Q, STEPS = 2.85, 0.5, 40
HISTORY = [Spend(10.0, 1.0, 1), Spend(4.0, 1.0, 1), Spend(SIGMA, Q, STEPS), Spend(SIGMA, Q, STEPS)]


def _ledger(root: Path, accountant: str, sites: dict[str, float]) -> tuple[Path, Path]:
    """A ledger of `sites` (name -> the DP-SGD σ of its rounds), each site's chain signed by its
    own key; returns (ledger, keys folder of <site>.pub)."""
    keys = root / "keys"
    keys.mkdir(parents=True)
    ledger = Ledger(root / "ledger.jsonl")
    for site, sigma in sites.items():
        (keys / f"{site}.pub").write_bytes(generate_site_key(root / f"{site}.key"))
        key = load_private_key(root / f"{site}.key")
        spends = [(release_event(Mechanism.GAUSSIAN_COUNT, 10.0, 1.0, "add-remove"), "record-count", 0),
                  (release_event(Mechanism.GAUSSIAN_FEATURE_SUM, 4.0, 5.0, "add-remove"), "feature-mean", 0),
                  *((PrivacyEvent(Mechanism.DP_SGD, sigma, Q, STEPS, Neighbouring.ADD_REMOVE, 1.0), "dp-sgd", r)
                    for r in (1, 2))]
        for event, release, rnd in spends:
            ledger.append(entry_fields(event, site=site, run_id="run-1", round=rnd, delta=DELTA,
                                       accountant=accountant, release=release), key)
    return ledger.path, keys


@pytest.fixture(scope="module")
def pld_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _ledger(tmp_path_factory.mktemp("pld"), "pld", {"site-0": SIGMA, "site-1": SIGMA})


def test_the_verdict_uses_the_ledgers_own_accountant_not_the_looser_rdp_opinion(pld_ledger, capsys):
    ledger, keys = pld_ledger
    pld, rdp = epsilon(HISTORY, DELTA, "pld"), epsilon_dp_accounting_rdp(HISTORY, DELTA)
    assert pld < BOUND < rdp  # the case of the default run: RDP's opinion above, PLD's verdict under

    result = audit(ledger, keys, max_epsilon=BOUND)
    assert result.ok, result.flags
    site = result.sites["site-0"]
    assert site.verdict_accountant == "pld" and site.verdict_epsilon == pytest.approx(pld, rel=1e-12)
    assert site.opinions == {"rdp": pytest.approx(rdp, rel=1e-12)}

    assert audit_main([str(ledger), "--ledger-keys", str(keys), "--max-epsilon", str(BOUND)]) == 0
    out = capsys.readouterr().out
    assert f"rdp (opinion): {rdp:.4f}" in out and "audit: PASSED" in out

    # Below the verdict's ε it fails, and says which accountant's ε it judged.
    limit = round(pld - 0.5, 1)
    assert audit_main([str(ledger), "--ledger-keys", str(keys), "--max-epsilon", str(limit)]) == 1
    err = capsys.readouterr().err
    assert f"ε={pld:.6g} (δ=1e-05, pld) is above --max-epsilon {limit:g}" in err


def test_a_budget_is_judged_by_the_own_accountant_too(pld_ledger):
    ledger, keys = pld_ledger
    assert audit(ledger, keys, budgets={"site-0": BOUND, "site-1": BOUND}).ok
    over = audit(ledger, keys, budgets={"site-0": 7.5})
    assert not over.ok and over.sites["site-0"].over_budget and "(δ=1e-05, pld)" in over.first_problem


def test_an_under_reported_entry_still_fails_whatever_the_verdict(tmp_path):
    """The recorded ε is still held to the recomputation (an honest PLD entry equals it)."""
    import json

    from fedshield.privacy.ledger import entry_hash
    from fedshield.privacy.signing import sign

    ledger, keys = _ledger(tmp_path, "pld", {"site-0": SIGMA})
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    last = lines[-1]
    last["epsilon"] = last["epsilon"] * 0.9
    last["hash"] = entry_hash(last)
    import base64

    last["signature"] = base64.b64encode(sign(load_private_key(tmp_path / "site-0.key"),
                                              last["hash"].encode())).decode()
    ledger.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = audit(ledger, keys, max_epsilon=BOUND)
    assert not result.ok and "is below the recomputed PLD" in result.first_problem


def _png_is_not_blank(png: bytes) -> bool:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    lo, hi = img.getextrema()
    colours = len(set(img.getdata()))
    return hi - lo > 100 and colours > 20


@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_the_epsilon_plot_shows_every_accountants_ledger(tmp_path, accountant):
    """Two sites: a band (min-max) and a median line of data, the budget as a line; the PNG
    written beside audit.md (and into audit.html) is not blank."""
    sigmas = {"site-0": 3.0, "site-1": 3.5}
    ledger, keys = _ledger(tmp_path, accountant, sigmas)
    result = audit_and_report(ledger, keys, budgets={"site-0": 9.0, "site-1": 9.0}, max_epsilon=9.5,
                              report_dir=tmp_path / "audit")
    assert result.ok, result.flags
    fig = epsilon_figure(result)
    assert fig is not None
    ax = fig.axes[0]
    band = [c for c in ax.collections if len(c.get_paths()) and len(c.get_paths()[0].vertices) > 2]
    assert band, "no min-max band"
    data = [line for line in ax.lines if len(line.get_xdata()) == 4]  # one point per spend
    assert data, "no line with the sites' spends"
    median = [float(y) for y in data[0].get_ydata()]
    assert all(y > 0 for y in median) and median == sorted(median)  # cumulative ε, never down
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "budget 9" in labels and "--max-epsilon 9.5" in labels
    assert sum("median" in t for t in labels) == 2 and not any(t.startswith("site-") for t in labels)
    png = (tmp_path / "audit" / "epsilon.png").read_bytes()
    assert _png_is_not_blank(png)
    assert "data:image/png;base64," in (tmp_path / "audit" / "audit.html").read_text()


def test_columns_are_labelled_and_the_text_comes_from_the_constants(pld_ledger, tmp_path):
    ledger, keys = pld_ledger
    result = audit_and_report(ledger, keys, report_dir=tmp_path)
    md = (tmp_path / "audit.md").read_text()
    assert ("| site | mechanism | σ (noise multiplier) | q (sample rate) | clip C | steps | entries | δ | "
            "relation (neighbouring) |") in md
    assert "| site-0 | dp-sgd-poisson-gaussian | 2.85 | 0.5 | 1 | 80 | 2 | 1e-05 | add-remove |" in md
    assert "| site-0 | gaussian-feature-sum | 4 | 1 | 5 | 1 | 1 | 1e-05 | add-remove |" in md
    assert "| site-0 | gaussian-count | 10 | 1 | 1 | 1 | 1 | 1e-05 | add-remove |" in md
    # What the site recorded and what the audit recomputed, at the interval the code uses.
    assert f"interval {PLD_RECORD_INTERVAL:g}" in md
    assert "Opacus; fedshield records the larger" not in md and "interval 1e-4" not in md
    assert "Accountant recorded by the sites, pld (add-remove): dp-accounting's PLD" in md
    assert f"rdp (opinion): {result.sites['site-0'].opinions['rdp']:.4f}" in md
    html = (tmp_path / "audit.html").read_text()
    assert "<th>σ (noise multiplier)</th>" in html and "<th>clip C</th>" in html


def test_the_recorded_accountant_is_described_from_its_constants():
    from fedshield.privacy.accountant import OPACUS_RDP_ORDERS, PLD_DISCRETIZATION, describe_recorded

    assert f"interval {PLD_RECORD_INTERVAL:g}" in describe_recorded("pld")
    assert "REPLACE_ONE" in describe_recorded("rdp", "replace-one")
    assert f"{len(OPACUS_RDP_ORDERS)} orders" in describe_recorded("rdp")
    assert f"interval {PLD_DISCRETIZATION:g}" in describe_recorded("prv")


def test_every_interval_the_auditor_guide_names_is_the_constant_it_names():
    """docs/auditor.md writes "interval 1e-3 (`PLD_RECORD_INTERVAL`)": the number is the code's."""
    import re

    from fedshield.privacy import accountant

    text = (Path(__file__).resolve().parent.parent / "docs" / "auditor.md").read_text(encoding="utf-8")
    named = re.findall(r"interval ([0-9.e-]+),? \(?`([A-Z_]+)`", text)
    assert {name for _, name in named} == {"PLD_RECORD_INTERVAL", "PLD_DISCRETIZATION"}
    assert len(named) == len(re.findall(r"interval [0-9]", text))  # every interval stated names its constant
    for number, name in named:
        assert float(number) == getattr(accountant, name), (number, name)


def test_the_final_table_shows_the_first_every_tenth_and_the_last_round(tmp_path):
    import json

    import fedshield

    run = tmp_path / "r"
    (run / "privacy").mkdir(parents=True)
    (run / "config.yaml").write_text(fedshield.Config.load(["federation.rounds=41"]).to_yaml())
    rows = [{"round": r, "accuracy": 0.5, "macro_f1": 0.4, "epsilon": {"a": r / 10}, "epsilon_max": r / 10,
             "epsilon_mean": r / 10} for r in range(42)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = fedshield.RunResult.read(run).table().splitlines()
    assert [int(line.split()[0]) for line in lines[1:-1]] == [0, 10, 20, 30, 40, 41]
    assert lines[-1] == f"full table: {run.resolve() / 'report.md'} (42 rounds)"
    short = fedshield.RunResult.read(run)
    assert len(type(short)(short.run_dir, short.config, short.rounds[:3], short.sites, short.paths)
               .table().splitlines()) == 4  # nothing left out: no pointer


def test_the_runs_epsilon_plot_is_a_band_a_median_and_the_budget_not_a_line_per_site(tmp_path, monkeypatch):
    """8 sites spending alike: one band, one median line and the budget, not 8 lines under an
    8-entry legend; a site absent from a round (joined late) is left out there, not drawn at 0."""
    import matplotlib.pyplot as plt

    from fedshield.server.plots import plot_run

    (tmp_path / "plots").mkdir()
    sites = [f"site-{k}" for k in range(8)]
    rows = [{"round": r, "accuracy": 0.5, "macro_f1": 0.4,
             "epsilon": {s: r * (1 + k / 100) for k, s in enumerate(sites) if r or s != "site-7"}} for r in range(5)]
    saved = []
    monkeypatch.setattr(plt, "close", lambda fig: saved.append(fig))  # keep the figures to look at them
    plot_run(tmp_path, rows, {s: {"budget": 8.0} for s in sites})
    ax = saved[-1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ε: min-max across 8 sites", "ε: median site", "budget 8"]
    (median,) = [line for line in ax.lines if len(line.get_xdata()) == 5]
    assert [float(y) for y in median.get_ydata()] == pytest.approx([r * 1.035 for r in range(5)])
    assert _png_is_not_blank((tmp_path / "plots" / "epsilon.png").read_bytes())
    for fig in saved:
        fig.clf()

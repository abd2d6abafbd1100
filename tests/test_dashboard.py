"""`fedshield status` and `fedshield dashboard` (server/dashboard/) on a run directory built
here as the coordinator writes one: the summary, the web app's routes (Starlette's
TestClient) and the commands' errors. The real browser on a real run:
tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fedshield.conf.config import Config
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.signing import generate_site_key, load_private_key
from fedshield.server.dashboard.app import create_app
from fedshield.server.dashboard.summary import RunWatcher, read_summary
from fedshield.server.run_dir import append_jsonl, new_run_dir
from fedshield.simulations.cli import main

SITES = ("site-0", "site-1", "site-2")


def _row(rnd: int, eps: float, **kw: object) -> dict:
    row = {"round": rnd, "accuracy": 0.5 + rnd / 10, "macro_f1": 0.4 + rnd / 10, "per_class": {},
           "epsilon": {s: eps for s in SITES}, "epsilon_max": eps, "epsilon_mean": eps, "site_level_epsilon": None,
           "sampled": list(SITES) if rnd else [], "trained": 3 if rnd else 0, "declined": 0, "declined_sites": [],
           "decline_kinds": {}, "rejected": 0, "failed": 0, "rejected_reasons": {}, "update_norms": {},
           "clipped": 0, "clipped_sites": [], "failed_sites": [], "left_out_sites": [], "breach_sites": [],
           "withstood": None, "skipped": "", "empty": False, "late_sites": {}, "secagg_dropped": None,
           "elapsed_s": 10.0 * rnd}
    row.update(kw)
    return row


def _spend(ledger: Ledger, key_path: Path, site: str, rnd: int) -> None:
    ledger.append(dict(run_id="run-1", round=rnd, site=site, noise_multiplier=1.1, sample_rate=0.05, steps=40,
                       max_grad_norm=1.0, delta=1e-5, accountant="rdp", budget_epsilon=8.0),
                  load_private_key(key_path))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run of 3 sites and 4 planned rounds, 2 done: round 2 with a budget decline, a
    rejected update, a clipped one and a SecAgg+ dropout; a signed ledger with keys."""
    cfg = Config.load(["federation.num_sites=3", "federation.rounds=4", f"output.dir={tmp_path / 'runs'}",
                            "output.run_name=r1", "federation.strategy=fedmedian"])
    run = new_run_dir(cfg)
    for site in SITES:
        pub = generate_site_key(tmp_path / site / "site.key")
        (run / "privacy" / "ledger-keys" / f"{site}.pub").write_bytes(pub)
        for rnd in (1, 2):
            if (site, rnd) != ("site-1", 2):
                _spend(Ledger(tmp_path / site / "ledger.jsonl"), tmp_path / site / "site.key", site, rnd)
    lines = [json.loads(x) for s in SITES for x in (tmp_path / s / "ledger.jsonl").read_text().splitlines()]
    for e in sorted(lines, key=lambda e: (e["round"], e["site"])):
        append_jsonl(run / "privacy" / "ledger.jsonl", e)
    append_jsonl(run / "metrics.jsonl", _row(0, 0.0))
    append_jsonl(run / "metrics.jsonl", _row(1, 1.5))
    append_jsonl(run / "metrics.jsonl", _row(
        2, 2.5, trained=1, declined=1, declined_sites=["site-1"], decline_kinds={"site-1": "budget"}, rejected=1,
        rejected_reasons={"site-2": "its update norm 80 is past federation.update_norm_bound=10"},
        clipped=1, clipped_sites=["site-0"], withstood=1, secagg_dropped={"site-0": "collect-masked"}))
    return run


def test_summary_reads_rounds_sites_defences_and_the_verified_ledger(run_dir: Path) -> None:
    s = read_summary(run_dir)
    assert (s.name, s.strategy, s.rounds_planned, s.sites_expected, s.connected) == ("r1", "fedmedian", 4, 3, 3)
    assert [r.round for r in s.rounds] == [0, 1, 2] and not s.finished
    last = s.rounds[-1]
    assert last.accuracy == pytest.approx(0.7) and last.macro_f1 == pytest.approx(0.6)
    assert dict(last.declined) == {"site-1": "budget"}
    assert dict(last.dropped) == {"site-2": "rejected: its update norm 80 is past federation.update_norm_bound=10"}
    assert dict(last.secagg_dropped) == {"site-0": "collect-masked"}
    assert "1 update(s) clipped to the norm bound (site-0)" in last.defence and "withstood f=1" in last.defence
    sites = {x.site: x for x in s.sites}
    assert sites["site-1"].declined == 1 and sites["site-1"].last_problem == "round 2: declined (budget)"
    assert sites["site-2"].dropped == 1 and sites["site-2"].trained == 1
    assert sites["site-0"].budget == 8.0  # the budget the site signed into its entries
    assert sites["site-1"].epsilon < sites["site-0"].epsilon  # one spend fewer, as its own ledger states
    assert s.audit.state == "verified" and s.audit.entries == 5 and s.audit.sites == 3
    text = s.text()
    assert "rounds    2 of 4" in text and "accuracy 0.7000, macro-F1 0.6000" in text
    assert "1 declined (budget), 1 dropped" in text and "audit     verified" in text


def test_a_tampered_ledger_and_a_line_still_being_written(run_dir: Path) -> None:
    watcher = RunWatcher(run_dir)
    assert watcher.summary().audit.state == "verified"
    key = run_dir / "privacy" / "ledger-keys" / "site-0.pub"
    pub = key.read_bytes()
    key.unlink()  # a site's key gone: its signatures cannot be checked
    audit = watcher.summary().audit
    assert audit.state == "failed" and "site-0" in audit.detail
    key.write_bytes(pub)
    assert watcher.summary().audit.state == "verified"
    ledger = run_dir / "privacy" / "ledger.jsonl"
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    entries[1]["epsilon"] = 0.001  # edited after signing
    ledger.write_text("".join(json.dumps(e) + "\n" for e in entries))
    audit = watcher.summary().audit
    assert audit.state == "failed" and "hash does not match" in audit.detail
    with open(run_dir / "metrics.jsonl", "a") as f:  # half a line: the writer is mid-append
        f.write('{"round": 3, "accu')
    assert [r.round for r in watcher.summary().rounds] == [0, 1, 2]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text(lines[0] + "not json\n" + "".join(lines[1:3]))
    s = watcher.summary()
    assert [r.round for r in s.rounds] == [0] and s.problems == (
        f"{run_dir / 'metrics.jsonl'}: line 2 is not JSON; the rounds after it are not shown",)
    assert "note      " in s.text()


def test_the_ledger_is_verified_again_only_when_it_changes(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedshield.server.dashboard import summary as module

    calls = []
    real = module.verify_ledger
    monkeypatch.setattr(module, "verify_ledger", lambda *a: calls.append(1) or real(*a))
    watcher = RunWatcher(run_dir)
    watcher.summary()
    append_jsonl(run_dir / "metrics.jsonl", _row(3, 3.0))  # a new round, the ledger as it was
    assert [r.round for r in watcher.summary().rounds][-1] == 3
    assert len(calls) == 1
    with open(run_dir / "privacy" / "ledger.jsonl", "a") as f:
        f.write("\n")  # a new size: verified again
    watcher.summary()
    assert len(calls) == 2


def test_web_app_page_api_asset_and_nothing_else(run_dir: Path) -> None:
    client = TestClient(create_app(run_dir))
    page = client.get("/")
    assert page.status_code == 200 and "/static/dashboard.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    data = client.get("/api/summary").json()
    assert data["error"] is None and [r["round"] for r in data["summary"]["rounds"]] == [0, 1, 2]
    assert data["summary"]["audit"]["state"] == "verified"
    js = client.get("/static/uPlot.iife.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/uPlot.LICENSE.txt").status_code == 200
    for path in ("/static/%2e%2e%2fsummary.py", "/static/..%2f..%2fconfig.yaml", "/static/%2Fetc%2Fpasswd",
                 "/config.yaml", "/metrics.jsonl", "/privacy/ledger.jsonl", "/static/", "/api/../config.yaml"):
        assert client.get(path).status_code == 404, path
    assert client.post("/api/summary").status_code == 405


def test_status_command_and_its_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r1: running") and "rounds    2 of 4" in out
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run directory" in err
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text("federation: {rounds: [1\n")  # YAML's own message spans lines
    assert main(["status", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml: not a config fedshield wrote" in err


def test_dashboard_command_refuses_before_listening(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["dashboard", str(run_dir), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["dashboard", str(run_dir), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid" in capsys.readouterr().err


class _Node:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.public_key = node_id, f"key-{node_id}".encode()


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_nodes(self) -> list[_Node]:
        return [_Node(n) for n in self.nodes]


class _Enrolment:
    def name_of(self, key: bytes | None) -> str | None:
        return {b"key-7": "st-marys"}.get(key or b"")


def test_the_coordinator_says_each_site_as_it_connects(capsys: pytest.CaptureFixture[str]) -> None:
    from fedshield.server.app import announce_connected

    announced: set[int] = set()
    grid = _Grid([7])
    announce_connected(grid, [7], announced, 3, _Enrolment())  # type: ignore[arg-type]
    announce_connected(grid, [7], announced, 3, _Enrolment())  # type: ignore[arg-type]  # said once
    grid.nodes = [7, 9]
    announce_connected(grid, [7, 9], announced, 3, _Enrolment())  # type: ignore[arg-type]
    announce_connected(grid, [7, 9, 11], announced, 3, None)  # type: ignore[arg-type]  # no registry: node ids
    assert capsys.readouterr().out.splitlines() == [
        "site st-marys connected (1 of 3)", "site on node 9 connected (2 of 3)", "site on node 11 connected (3 of 3)"]


def test_the_summary_reads_what_the_coordinators_round_log_writes(tmp_path: Path) -> None:
    """The writer (server/app.py RoundLog) and the reader agree on metrics.jsonl's format."""
    from fedshield.server.app import RoundLog
    from fedshield.server.settings import CoordinatorSettings
    from fedshield.strategies.report import RoundReport, SiteReply

    cfg = Config.load(["federation.num_sites=3", "federation.strategy=krum", "federation.num_malicious=0",
                            "federation.update_norm_bound=3", "privacy=none", f"output.dir={tmp_path}",
                            "output.run_name=live"])
    run = new_run_dir(cfg)
    sites = {1: {"site": "a", "n": 5}, 2: {"site": "b", "n": 5}, 3: {"site": "c", "n": 5}}
    log = RoundLog(run, CoordinatorSettings.from_config(cfg), sites)
    fresh = read_summary(run)
    assert fresh.rounds == () and fresh.audit.state == "empty" and "no round evaluated yet" in fresh.text()
    metrics = {"accuracy": 0.5, "macro_f1": 0.25, "per_class": {}}
    log.on_evaluated(0, metrics)
    log.on_round(RoundReport(1, ["a", "b", "c"], [
        SiteReply("a", 1, "trained", num_examples=5, update_norm=40.0, clipped=True, selected=False),
        SiteReply("b", 2, "declined", "its budget is spent", decline_kind="budget"),
        SiteReply("c", 3, "rejected", "claims 1000000000 records; it declared 5 at discovery"),
    ], rule="krum", withstood=0))
    log.on_evaluated(1, metrics)
    s = read_summary(run)
    last = s.rounds[-1]
    assert (last.round, last.sampled, last.trained) == (1, 3, 1)
    assert dict(last.declined) == {"b": "budget"}
    assert dict(last.dropped) == {"c": "rejected: claims 1000000000 records; it declared 5 at discovery"}
    assert last.defence == "1 update(s) clipped to the norm bound (a); krum left out a; krum withstood f=0"
    assert s.privacy_mode == "none" and s.budget is None and "ε " not in s.text()

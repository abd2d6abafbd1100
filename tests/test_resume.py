"""kill -9 of the coordinator mid-run, then `--resume`: the run ends as if nothing happened.

One uninterrupted simulation and one killed (its whole process group: the driver, Ray and
the workers, as a machine crash would) once round 3's replies are all in, then continued with
`fedshield simulate output.run_name=RUN --resume`. The final model, every site's ε and
every site's ledger must equal the uninterrupted run's: the checkpoint restored the model,
FedAdam's moments and the sampler; a round the sites had already trained for is re-sent
from their kept replies, not spent twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


def fedshield(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedshield.simulations.cli", "simulate", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def kept_round(site_dir: Path, run_id: str) -> int | None:
    """The round of the reply a virtual site keeps for `run_id` (client/site.py save_release)."""
    path = site_dir / "runs" / f"{run_id}.release.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return int(json.loads(bytes(data["__release__"]).decode())["round"])
    except (OSError, ValueError, KeyError):  # not written yet (it is replaced whole, atomically)
        return None


def spent_after(run: Path, server_round: int) -> bool:
    """Whether a virtual site's own ledger holds a spend of a round after `server_round`
    (a line torn by the kill counts as one: it can only be the newest)."""
    for ledger in (run / "sites").glob("*/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            if not line.strip():
                continue
            try:
                if json.loads(line)["round"] > server_round:
                    return True
            except (ValueError, KeyError, TypeError):
                return True
    return False


def own_ledgers(run: Path) -> dict[str, list[tuple]]:
    out = {}
    for ledger in sorted((run / "sites").glob("*/ledger.jsonl")):
        entries = [json.loads(x) for x in ledger.read_text().splitlines()]
        out[ledger.parent.name] = [(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"], e["epsilon"])
                                   for e in entries]
    return out


# `python -c HOLD_AFTER_REPLIES ROUND MARKER simulate ...`: the simulation CLI whose coordinator,
# once it has taken in every reply of round ROUND (and its books accepted them), touches
# MARKER and waits there for ever, to be killed.
HOLD_AFTER_REPLIES = """
import sys, threading
from pathlib import Path
from fedshield.strategies.reply_gate import ReplyGate
hold_round, marker = int(sys.argv[1]), Path(sys.argv[2])
sort_replies = ReplyGate.sort_replies
def holding(self, server_round, replies):
    out = sort_replies(self, server_round, replies)
    if server_round == hold_round:
        marker.touch()
        threading.Event().wait()
    return out
ReplyGate.sort_replies = holding
from fedshield.simulations.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_killed_coordinator_resumes_to_the_same_model_and_epsilon(tiny_bert, synthetic_csv, tmp_path):
    overrides = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.rounds": 4, "federation.strategy": "fedadam", "federation.fraction_train": 0.7,
        "training.local_epochs": 1, "privacy.target_epsilon": 6})
    whole = fedshield(*overrides, "output.run_name=whole")
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out[-3000:]

    run = tmp_path / "runs" / "crashed"
    # The kill comes once round 3's sites (the same seed samples as the whole run's) have
    # trained it, kept their replies and the coordinator has taken every reply in, before it
    # aggregates and checkpoints round 3: the resumed run re-sends round 3 and gets those
    # replies back, never a second spend. (A kill in the middle of a site's training leaves
    # its spend standing and the round declined, by design: tests/test_site_spend.py.)
    # The coordinator holds there (HOLD_AFTER_REPLIES), so that no round-4 spend can race
    # the kill on a loaded machine; it is killed as before, process group and all.
    held = tmp_path / "held-at-round-3"
    crashed = subprocess.Popen(
        [sys.executable, "-c", HOLD_AFTER_REPLIES, "3", str(held), "simulate", *overrides, "output.run_name=crashed"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and crashed.poll() is None and not held.exists():
        time.sleep(0.05)
    assert crashed.poll() is None, "the run ended before it could be killed: " + crashed.communicate()[0][-3000:]
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait(timeout=60)
    assert held.exists(), "round 3's replies never all came in"
    third = rows(tmp_path / "runs" / "whole")[3]["sampled"]
    assert all(kept_round(run / "sites" / s, "crashed") == 3 for s in third)
    assert not spent_after(run, 3)
    assert len(rows(run)) == 3 and (run / "checkpoint.npz").is_file() and not (run / "report.md").exists()

    resumed = fedshield(f"output.dir={tmp_path / 'runs'}", "output.run_name=crashed", "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming after round 2 of 4" in out  # round 3 is asked again, of the sites that kept it

    a, b = tmp_path / "runs" / "whole", run
    assert [r["round"] for r in rows(b)] == [0, 1, 2, 3, 4]
    outcome = ("sampled", "trained", "declined", "rejected", "failed")
    assert [[r[k] for k in outcome] for r in rows(b)] == [[r[k] for k in outcome] for r in rows(a)]
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    sa, sb = (json.loads((r / "privacy" / "sites.json").read_text()) for r in (a, b))
    assert {k: v["epsilon"] for k, v in sa.items()} == {k: v["epsilon"] for k, v in sb.items()}
    assert own_ledgers(a) == own_ledgers(b)  # not one spend more at any site
    entries = [json.loads(x) for x in (b / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert len({e["hash"] for e in entries}) == len(entries)  # the run's copy holds each spend once


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    from fedshield.simulations.cli import main

    assert main(["simulate", f"output.dir={tmp_path}", "output.run_name=nothing-here", "--resume"]) == 2
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("federation:\n  rounds: 2\n")
    assert main(["simulate", f"output.dir={tmp_path}", "output.run_name=half", "--resume"]) == 2


def test_a_resume_goes_on_with_the_sites_that_rejoin_and_names_the_one_that_did_not(
        tiny_bert, synthetic_csv, tmp_path, monkeypatch, capsys):
    """docs/coordinator.md §11: a site that does not come back is left out, not a reason to
    stop. The first run stops after round 1 (its sites' training fails: federation.max_empty_rounds=1),
    with each site's record-count release in the run's ledger; site-2 then loses its state
    folder, so it comes back with another ledger key and cannot rejoin."""
    import fedshield.client.app
    from fedshield.simulations.cli import main
    from tests.test_hostile_sites import never_trains

    overrides = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "federation.rounds": 2, "federation.max_empty_rounds": 1, "training.local_epochs": 1,
        "privacy.target_epsilon": 6, "output.save_model": False, "output.run_name": "partial"})
    real = fedshield.client.app.app
    monkeypatch.setattr(fedshield.client.app, "app", never_trains())
    assert main(["simulate", *overrides]) == 2
    run = tmp_path / "runs" / "partial"
    ledger = [json.loads(x) for x in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert {e["site"] for e in ledger} == {"site-0", "site-1", "site-2"}  # their count releases
    shutil.rmtree(run / "sites" / "site-2")
    monkeypatch.setattr(fedshield.client.app, "app", real)
    capsys.readouterr()
    assert main(["simulate", f"output.dir={tmp_path / 'runs'}", "output.run_name=partial", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "site site-2: did not rejoin the resumed run; not asked again" in out
    assert [r["round"] for r in rows(run)] == [0, 1, 2] and rows(run)[-1]["trained"] == 2
    assert "site-2" not in rows(run)[-1]["sampled"]
    assert "site site-2: did not rejoin the resumed run" in (run / "report.md").read_text()
    kept = [json.loads(x) for x in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]
    gone = [e for e in ledger if e["site"] == "site-2"]
    assert [e for e in kept if e["site"] == "site-2"] == gone
    summary = json.loads((run / "privacy" / "sites.json").read_text())  # still in the run's books
    assert summary["site-2"]["epsilon"] == gone[-1]["epsilon"] and summary["site-2"]["records"] is None
    assert summary["site-2"]["not_trained"][-1] == "after round 1: did not rejoin the resumed run"

"""`fedshield client`: how a site knows how its job ended, and how it rejoins after a restart.

The pieces of client/cli.py that decide an exit code or a wait, driven with the lines a
flwr 1.41 SuperNode logs and with state folders as the site leaves them on disk; no
SuperNode is started here (tests/test_deployment.py runs the real thing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshield.client import cli
from fedshield.client.cli import (
    AgentRecord,
    SupernodeLog,
    finish,
    installed_plan,
    lock_state,
    rejoin_wait,
    rounds_trained,
)
from fedshield.conf.config import Config
from fedshield.privacy.errors import FedShieldError

# As flower-supernode 1.41 logs a session of a fedshield run (flwr/supernode/
# start_client_internal.py; fedshield's messages carry no group id, so no ROUND).
SESSION = """\
\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
\x1b[92mINFO \x1b[0m:      SuperNode ID: 4242
INFO :
INFO :      [RUN 77]
INFO :      Receiving: query message (ID: aa)
INFO :      [RUN 77]
INFO :      Sending: query message (ID: ab)
INFO :      Sent successfully
INFO :      [RUN 77]
INFO :      Receiving: train message (ID: b1)
INFO :      [RUN 77]
INFO :      Sending: train message (ID: b2)
INFO :      Sent successfully
INFO :      [RUN 77]
INFO :      Receiving: train message (ID: c1)
"""
REPLY = "INFO :      [RUN 77]\nINFO :      Sending: train message (ID: c2)\nINFO :      Sent successfully\n"


def feed(text: str, log: SupernodeLog | None = None) -> SupernodeLog:
    log = log or SupernodeLog()
    for line in text.splitlines(keepends=True):
        log.feed(line)
    return log


def test_the_supernode_log_says_what_came_in_and_went_out():
    log = feed(SESSION)
    assert log.joined and not log.refused and not log.gone
    assert log.received == {77: 2}
    assert log.replied == {77: 1}  # the second train instruction came in, its reply never went out
    feed(REPLY, log)
    assert log.replied == {77: 2}
    log.feed("WARNING :   Giving up reconnection after 5.00 seconds and 3 tries.\n")
    assert log.gone
    refused = feed("ERROR :     Failed to initialize the connection to the SuperLink.\n"
                   "[code: 2004] Failed to activate SuperNode.\n")
    assert refused.refused and not refused.joined


def state_folder(tmp_path: Path, rounds: int, fraction: float = 1.0, trained: int = 0) -> tuple[Path, Path]:
    """A site's state folder: the Flower app its SuperNode installed for run `job-7`, and
    one dp-sgd ledger entry per round trained."""
    from fedshield.server.cli import write_app

    state = tmp_path / "state"
    home = state / ".flower"
    cfg = Config.load(["task=text-file", "task.data_path=x.csv", f"federation.rounds={rounds}",
                            f"federation.fraction_train={fraction}", "output.run_name=job-7"])
    write_app(home / "apps" / "fedshield.fedshield-run.0.1.0.0123456789", cfg)
    entries = [{"run_id": "job-7", "site": "st-marys", "release": "feature-mean", "round": 0}]
    entries += [{"run_id": "job-7", "site": "st-marys", "release": "dp-sgd", "round": r} for r in range(1, trained + 1)]
    entries += [{"run_id": "job-6", "site": "st-marys", "release": "dp-sgd", "round": 9}]
    (state / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"torn')
    return state, home


def test_the_plan_comes_from_the_app_the_supernode_installed(tmp_path):
    from fedshield.server.app import RUN_CONFIG_YAML_KEY

    assert cli.RUN_CONFIG_YAML_KEY == RUN_CONFIG_YAML_KEY
    state, home = state_folder(tmp_path, rounds=5, fraction=0.5, trained=3)
    assert installed_plan(home) == cli.Plan("job-7", 5, 0.5)
    assert installed_plan(tmp_path / "nothing") is None
    assert rounds_trained(state / "ledger.jsonl", "st-marys", "job-7") == 3
    assert rounds_trained(state / "ledger.jsonl", "st-johns", "job-7") == 0


def test_a_coordinator_that_said_done_and_went_away_is_not_waited_for(tmp_path):
    """The agent ends at the SuperNode's first failed reconnection only if the coordinator
    told this site, in this session, that the run completed (its DONE marker, written after
    the coordinator's report); otherwise the SuperNode retries for --reconnect-s."""
    import os
    import time

    from fedshield.client.site import done_path

    log = feed(SESSION)
    assert log.lost == 0
    log.feed("WARNING :   Connection attempt failed, retrying in 0.84 seconds\n")
    assert log.lost == 1 and not log.gone
    state, home = state_folder(tmp_path, rounds=2, trained=2)
    since = time.time()
    assert not cli.coordinator_closed(state, home, since)  # no DONE: a lost coordinator, retried
    marker = done_path(state, "job-7")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("job-7\n")
    os.utime(marker, (since - 60, since - 60))
    assert not cli.coordinator_closed(state, home, since)  # a DONE of an earlier session
    os.utime(marker, (since + 1, since + 1))
    assert cli.coordinator_closed(state, home, since)
    assert not cli.coordinator_closed(state, tmp_path / "no-app", since)


def test_exit_0_only_when_the_last_round_was_answered(tmp_path, capsys):
    state, home = state_folder(tmp_path, rounds=2, trained=2)
    log = feed(SESSION)
    assert finish("st-marys", state, home, log) == cli.EXIT_COORDINATOR_LOST == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("site st-marys: lost the coordinator during the run, after round 1 of 2 (its ledger is kept")
    assert "the ε it spent stays spent" in err and "Start this command again" in err
    assert len(err.splitlines()) == 1
    feed(REPLY, log)
    assert finish("st-marys", state, home, log) == 0
    assert capsys.readouterr().out.startswith("site st-marys: the run completed (job-7, 2 rounds")


def test_a_resumed_run_counts_the_rounds_trained_before_the_restart(tmp_path, capsys):
    state, home = state_folder(tmp_path, rounds=3, trained=3)
    log = feed("INFO :      SuperNode ID: 1\nINFO :      [RUN 80]\nINFO :      Receiving: train message (ID: x)\n"
               + REPLY.replace("77", "80"))  # this session saw round 3 only
    assert finish("st-marys", state, home, log) == 0
    state2, home2 = state_folder(tmp_path / "b", rounds=3, trained=2)
    assert finish("st-marys", state2, home2, log) == 3
    assert "after round 2 of 3" in capsys.readouterr().err


def test_a_site_never_given_a_round_does_not_claim_success(tmp_path, capsys):
    state, home = state_folder(tmp_path, rounds=2)
    assert finish("st-johns", state, home, feed("INFO :      SuperNode ID: 9\n")) == 3
    assert "went away before this site trained a round" in capsys.readouterr().err


def test_without_dp_entries_the_train_instructions_are_counted(tmp_path, capsys):
    state, home = state_folder(tmp_path, rounds=2, trained=0)
    assert finish("st-marys", state, home, feed(SESSION + REPLY)) == 0


def test_with_site_sampling_the_line_says_the_site_may_not_have_been_picked(tmp_path, capsys):
    state, home = state_folder(tmp_path, rounds=3, fraction=0.5, trained=1)
    assert finish("city-bank", state, home, feed(SESSION)) == 3
    assert "fraction_train=0.5 this site may just not have been picked" in capsys.readouterr().err


# ------------------------------------------------------------------ restarts


def test_refused_without_history_is_not_registered(tmp_path):
    agent = AgentRecord(tmp_path / "agent.json", "fl.example.org:9092", "SHA256:ab")
    with pytest.raises(FedShieldError, match=r"^site rogue: the coordinator refused connection key rogue.key "
                                             r"\(SHA256:ab\): it is not registered there; send rogue.pub"):
        rejoin_wait(agent, tmp_path / "rogue.key", "rogue")


def test_refused_right_after_a_crash_waits_for_the_old_session_to_expire(tmp_path, capsys):
    agent = AgentRecord(tmp_path / "agent.json", "fl.example.org:9092", "SHA256:ab")
    agent.seen()  # the crashed agent's last note
    wait = rejoin_wait(agent, tmp_path / "st-marys.key", "st-marys")
    assert 1.0 <= wait <= cli.REJOIN_RETRY_S
    assert "still holds this site's previous session" in capsys.readouterr().err
    other = AgentRecord(tmp_path / "agent.json", "fl.example.org:9092", "SHA256:cd")  # another key: no history
    with pytest.raises(FedShieldError, match="it is not registered there;"):
        rejoin_wait(other, tmp_path / "st-marys.key", "st-marys")


def test_refused_long_after_the_last_session_is_not_registered_any_more(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"fl.example.org:9092": {"key": "SHA256:ab", "connected": False,
                                                        "last_seen": time.time() - cli.STALE_SESSION_S - 1}}))
    agent = AgentRecord(path, "fl.example.org:9092", "SHA256:ab")
    with pytest.raises(FedShieldError, match=r"which it admitted before: it is not registered there any more"):
        rejoin_wait(agent, tmp_path / "st-marys.key", "st-marys")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_stray_supernode_of_this_key_is_named(tmp_path):
    fake = tmp_path / "flower-supernode"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    fake.chmod(0o755)
    key = tmp_path / "st-marys.key"
    p = subprocess.Popen([str(fake), "--auth-supernode-private-key", str(key)])
    try:
        deadline = time.time() + 10
        while p.pid not in cli.running_supernodes(key) and time.time() < deadline:
            time.sleep(0.05)
        agent = AgentRecord(tmp_path / "agent.json", "fl.example.org:9092", "SHA256:ab")
        with pytest.raises(FedShieldError, match=rf"is still running on this machine \(pid {p.pid}\)"):
            rejoin_wait(agent, key, "st-marys")
    finally:
        p.kill()
        p.wait()


def test_one_agent_per_state_folder(tmp_path):
    (tmp_path / ".flower").mkdir()
    held = lock_state(tmp_path, "st-marys")
    try:
        with pytest.raises(FedShieldError, match=rf"another fedshield client is running with state folder "
                                                 rf".* \(pid {os.getpid()}\)"):
            lock_state(tmp_path, "st-marys")
    finally:
        held.close()
    lock_state(tmp_path, "st-marys").close()  # released with its holder


def test_the_agent_record_keeps_other_coordinators(tmp_path):
    path = tmp_path / "agent.json"
    a = AgentRecord(path, "a:1", "SHA256:ab")
    b = AgentRecord(path, "b:2", "SHA256:ab")
    a.seen()
    b.seen()
    a.left()
    data = json.loads(path.read_text())
    assert data["a:1"]["connected"] is False and data["b:2"]["connected"] is True
    path.write_text("{not json")
    assert a.read() == {}  # a damaged record is ignored, never fatal
    a.seen()
    assert a.read()["connected"] is True


def test_a_site_the_coordinator_told_the_run_is_over_exits_0_though_not_picked_last(tmp_path, capsys):
    """With site sampling a site may sit out the last round: the coordinator's DONE message
    (written by the ClientApp as <state>/runs/<run>.done) is what tells it the run completed."""
    from fedshield.client.site import SiteState

    state, home = state_folder(tmp_path, rounds=3, fraction=0.5, trained=1)
    log = feed(SESSION + REPLY)
    assert finish("city-bank", state, home, log) == 3
    capsys.readouterr()
    SiteState(state, "city-bank").mark_done("job-7")
    assert finish("city-bank", state, home, log) == 0
    assert "the run completed (job-7: the coordinator said so" in capsys.readouterr().out

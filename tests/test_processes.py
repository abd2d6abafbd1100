"""deploy/processes.py: the helpers both agent commands share, and the old flag spellings."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedshield.deploy import pki
from fedshield.deploy.processes import (
    Interrupted,
    flower_env,
    flwr_bin,
    interrupts_raise,
    last_error,
    parse_host_port,
    run_flower_cli,
)
from fedshield.privacy.errors import FedShieldError


def test_one_host_port_parser_names_the_flag():
    assert parse_host_port("fl.example.org:9092", "--server", "fl.example.org:9092") == ("fl.example.org", 9092)
    assert parse_host_port("[::1]:9092", "--server", "x:1") == ("::1", 9092)
    assert parse_host_port(":9092", "--address", "0.0.0.0:9092", default_host="0.0.0.0") == ("0.0.0.0", 9092)
    for bad in (":9092", "fl.example.org", "fl.example.org:", "h:0", "h:65536", "h:x1"):
        with pytest.raises(FedShieldError, match=r"^--server '.*': expected HOST:PORT, e.g. fl.example.org:9092$"):
            parse_host_port(bad, "--server", "fl.example.org:9092")
    with pytest.raises(FedShieldError, match="^--address 'x:99999'"):
        parse_host_port("x:99999", "--address", "0.0.0.0:9092", default_host="0.0.0.0")


def test_flower_children_get_a_private_home_and_no_telemetry_or_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = flower_env(tmp_path / "home")
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"].split(os.pathsep)[:2] == [str(Path(sys.executable).parent), "/usr/bin"]
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "1"  # this process's own environment is untouched


def test_flower_scripts_come_from_this_environment():
    assert flwr_bin("flower-supernode") == str(Path(sys.executable).parent / "flower-supernode")
    with pytest.raises(FedShieldError, match=r"^no-such-flower-tool: not found next to"):
        flwr_bin("no-such-flower-tool")


def test_signals_raise_inside_the_block_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted):
        with interrupts_raise():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises at once, in the main thread
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_last_error_and_flower_cli_errors_are_one_line(tmp_path):
    log = tmp_path / "superlink.log"
    log.write_text("INFO start\nERROR :     bind failed: address in use\nINFO still here\n")
    assert last_error(log) == "ERROR :     bind failed: address in use"
    assert last_error(tmp_path / "missing.log") == "?"
    assert run_flower_cli([sys.executable, "-c", "print('ok')"], dict(os.environ), "probe") == "ok\n"
    with pytest.raises(FedShieldError, match=r"^registering x: Invalid key file \(exit 3\)$"):
        fail = "import sys; print('a\\nInvalid key file', file=sys.stderr); sys.exit(3)"
        run_flower_cli([sys.executable, "-c", fail], dict(os.environ), "registering x")
    with pytest.raises(FedShieldError, match=r"^slow: no answer within 1 s"):
        run_flower_cli([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), "slow", timeout_s=1)


# ------------------------------------------------------------------ the old spellings of the key flags


def test_server_site_keys_is_the_old_spelling_of_connection_keys(tmp_path, capsys):
    from fedshield.server.cli import server_main

    pki.init_pki(tmp_path / "pki", "fl.example.org", [])
    with pytest.raises(FedShieldError, match=r"^--connection-keys .*nothing.pub: no such file or folder"):
        server_main(["--pki", str(tmp_path / "pki"), "--site-keys", str(tmp_path / "nothing.pub")])
    assert capsys.readouterr().err == "note: --site-keys is deprecated; use --connection-keys\n"
    with pytest.raises(FedShieldError, match=r"^--connection-keys .*nothing.pub"):
        server_main(["--pki", str(tmp_path / "pki"), "--connection-keys", str(tmp_path / "nothing.pub")])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # not both
        server_main(["--pki", str(tmp_path / "pki"), "--site-keys", "a.pub", "--connection-keys", "b.pub"])
    assert "not allowed with" in capsys.readouterr().err


def test_server_refuses_the_same_connection_key_twice(tmp_path):
    from fedshield.server.cli import collect_connection_keys

    pki.connection_key_pair("a", tmp_path)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.pub").write_bytes((tmp_path / "a.pub").read_bytes())
    with pytest.raises(FedShieldError, match=r"b.pub: the same connection key as .*a.pub"):
        collect_connection_keys([str(tmp_path / "a.pub"), str(tmp_path / "copy")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedShieldError, match=r"no connection public keys \(\*\.pub\) found"):
        collect_connection_keys([str(tmp_path / "empty")])


def test_client_key_is_the_old_spelling_of_connection_key(tmp_path, capsys):
    from fedshield.client.cli import client_main

    args = ["--server", "fl.example.org:9092", "--ca", "ca.crt", "--data", "d.csv"]
    with pytest.raises(FedShieldError, match=r"^connection key '.*missing.key': not found$"):
        client_main([*args, "--key", str(tmp_path / "missing.key")])
    assert capsys.readouterr().err == "note: --key is deprecated; use --connection-key\n"
    with pytest.raises(FedShieldError, match=r"^connection key '.*missing.key': not found$"):
        client_main([*args, "--connection-key", str(tmp_path / "missing.key")])
    assert capsys.readouterr().err == ""
    with pytest.raises(FedShieldError, match=r"^--server 'fl.example.org': expected HOST:PORT"):
        client_main(["--server", "fl.example.org", "--ca", "c", "--data", "d", "--connection-key", "k"])


def test_audit_site_keys_is_the_old_spelling_of_ledger_keys(tmp_path, capsys, monkeypatch):
    from fedshield.privacy.cli import audit_main

    seen = []

    def fake_audit(path, ledger_keys_dir, budgets, max_epsilon=None):
        seen.append(ledger_keys_dir)
        raise FedShieldError("stop here")

    import fedshield.privacy.audit
    monkeypatch.setattr(fedshield.privacy.audit, "audit", fake_audit)
    assert audit_main([str(tmp_path), "--site-keys", str(tmp_path / "keys")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "note: --site-keys is deprecated; use --ledger-keys"
    assert audit_main([str(tmp_path), "--ledger-keys", str(tmp_path / "keys2")]) == 2
    assert "deprecated" not in capsys.readouterr().err
    assert seen == [tmp_path / "keys", tmp_path / "keys2"]


# ------------------------------------------------------------------ children die with their parent

PARENT = r'''
import signal, subprocess, sys, time
from fedshield.deploy.processes import Children

children = Children(grace_s=2, pdeathsig=PDEATHSIG)
code = """
import subprocess, sys, time
same = subprocess.Popen(["sleep", "300"])                            # stays in the child's session
away = subprocess.Popen(["sleep", "301"], start_new_session=True)    # as Flower starts its SuperExec
print(same.pid, away.pid, flush=True)
time.sleep(300)
"""
child = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
grandchildren = child.stdout.readline().split()
time.sleep(1)  # the tree has been up a moment, as Flower's has (deploy/watchdog.py: what it can miss)
print(children.watchdog.pid, child.pid, *grandchildren, flush=True)
time.sleep(300)
'''

# A subreaper stands in for init: the orphans come to it and it reaps them, so that "gone"
# means exited and reaped, whatever this machine's PID 1 does with zombies.
HARNESS = r'''
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
parent = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
pids = [int(x) for x in parent.stdout.readline().split()]
os.kill(parent.pid, signal.SIGKILL)
parent.wait()
t0 = time.time()

def alive(p):
    try:
        state = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")

while time.time() - t0 < 15 and any(alive(p) for p in pids):
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    time.sleep(0.05)
print(f"{time.time() - t0:.2f}", *[p for p in pids if alive(p)])
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
@pytest.mark.parametrize("pdeathsig", ["signal.SIGTERM", "None"], ids=["pdeathsig+watchdog", "watchdog-alone"])
def test_children_and_grandchildren_die_when_the_parent_is_killed(pdeathsig):
    """kill -9 of a wrapper-like parent: its child (own session, like the SuperLink), a
    grandchild in the child's session and one in a session of its own (like Flower's
    SuperExec) are all gone within seconds, and so is the watchdog."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = PARENT.replace("PDEATHSIG", pdeathsig)
    r = subprocess.run([sys.executable, "-c", HARNESS, parent], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    elapsed, *left = r.stdout.split()
    assert left == [], f"still running after {elapsed}s: {left}"
    assert float(elapsed) < 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")
def test_stop_reaps_the_children_and_what_left_their_session(tmp_path):
    import subprocess

    from fedshield.deploy.processes import Children

    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '302'], start_new_session=True); "
            "print(p.pid, flush=True); time.sleep(300)")
    with Children(grace_s=2) as children:
        child = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        away = int(child.stdout.readline())
        watchdog = children.watchdog
        assert watchdog is not None and watchdog.poll() is None
    assert child.returncode is not None and watchdog.returncode == 0  # both reaped
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{away}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"pid {away} (a grandchild in its own session) survived stop()")


def test_the_watchdog_never_signals_a_reused_pid(monkeypatch):
    from fedshield.deploy import watchdog

    tables = iter([{10: (1, 10, 500), 11: (10, 10, 501)}, {10: (1, 10, 500), 11: (1, 11, 999)}])
    monkeypatch.setattr(watchdog, "read_table", lambda: next(tables))
    w = watchdog.Watch()
    w.register(10)
    assert w.known == {10: 500, 11: 501}
    w.scan()  # pid 11 now belongs to another process (another start time): forgotten
    assert w.known == {10: 500}

"""deploy/processes.py: the helpers both agent commands share, and the old flag spellings."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from deploy import pki
from deploy.processes import (
    Interrupted,
    flower_env,
    flwr_bin,
    interrupts_raise,
    last_error,
    parse_host_port,
    run_flower_cli,
)
from privacy.errors import FedShieldError


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
    from server.cli import server_main

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
    from server.cli import collect_connection_keys

    pki.connection_key_pair("a", tmp_path)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.pub").write_bytes((tmp_path / "a.pub").read_bytes())
    with pytest.raises(FedShieldError, match=r"b.pub: the same connection key as .*a.pub"):
        collect_connection_keys([str(tmp_path / "a.pub"), str(tmp_path / "copy")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedShieldError, match=r"no connection public keys \(\*\.pub\) found"):
        collect_connection_keys([str(tmp_path / "empty")])


def test_client_key_is_the_old_spelling_of_connection_key(tmp_path, capsys):
    from client.cli import client_main

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
    import privacy.audit
    from privacy.cli import audit_main

    seen = []

    def fake_audit(path, ledger_keys_dir, budgets):
        seen.append(ledger_keys_dir)
        raise FedShieldError("stop here")

    monkeypatch.setattr(privacy.audit, "audit", fake_audit)
    assert audit_main([str(tmp_path), "--site-keys", str(tmp_path / "keys")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "note: --site-keys is deprecated; use --ledger-keys"
    assert audit_main([str(tmp_path), "--ledger-keys", str(tmp_path / "keys2")]) == 2
    assert "deprecated" not in capsys.readouterr().err
    assert seen == [tmp_path / "keys", tmp_path / "keys2"]

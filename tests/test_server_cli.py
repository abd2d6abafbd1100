"""`fedshield server` checks its inputs before anything starts, and leaves nothing behind when one fails.

No Flower process is started here: every case fails (or is stopped) before the SuperLink
would start, and the test checks that no folder was made (not the run directory, not the
private Flower home).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedshield.conf.config import Config
from fedshield.deploy import pki
from fedshield.deploy.front import MAX_BODY_BYTES, MIB
from fedshield.deploy.processes import free_port
from fedshield.privacy.errors import FedShieldError
from tests.helpers import synthetic_rows, tiny_overrides, write_csv


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("coordinator-pki")
    pki.init_pki(d, "fl.example.org", ["127.0.0.1"])
    pki.connection_key_pair("st-marys", d / "keys")
    pki.connection_key_pair("st-johns", d / "keys")
    return d, d / "keys"


def run(coordinator, tiny_bert, tmp_path, *extra_args, **overrides):
    from fedshield.server.cli import server_main

    d, keys = coordinator
    data = write_csv(tmp_path / "server.csv", synthetic_rows(40, seed=1))
    over = tiny_overrides(tiny_bert, data, tmp_path, **{"federation.num_sites": 2, "output.run_name": "job",
                                                       **overrides})
    over = [o for o in over if not o.startswith("simulation.")]
    return server_main(["--pki", str(d), "--connection-keys", str(keys), "--address", f"127.0.0.1:{free_port()}",
                        *extra_args, *over])


def nothing_made(tmp_path: Path) -> bool:
    return not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"task.data_path": "/nonexistent/site.csv"}, r"/nonexistent/site.csv.*no such file"),
    ({"task.test_path": "/nonexistent/test.csv"}, r"/nonexistent/test.csv.*no such file"),
    ({"task.model": "/nonexistent/model"}, r"^task.model='/nonexistent/model': no such folder"),
    ({"federation.num_sites": 3, "federation.min_sites": 3},
     r"^federation.min_sites=3: only 2 connection keys are admitted"),
    ({"federation.rounds": 0}, r"federation.rounds"),
])
def test_a_bad_input_is_one_line_before_anything_starts(coordinator, tiny_bert, tmp_path, override, message):
    with pytest.raises(FedShieldError, match=message):
        run(coordinator, tiny_bert, tmp_path, **override)
    assert nothing_made(tmp_path)


def test_a_model_folder_without_weights_is_refused_up_front(coordinator, tiny_bert, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(FedShieldError, match=r"broken-model"):
        run(coordinator, tiny_bert, tmp_path, **{"task.model": str(broken)})
    assert nothing_made(tmp_path)


def inputs_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the config, data or model would be read (they come after the cheap checks)."""
    import fedshield.server.cli as cli

    def read(*args: object) -> None:
        raise AssertionError("the data and model were read before a cheaper check failed")

    monkeypatch.setattr(cli, "resolve_config", read)
    monkeypatch.setattr(cli, "check_inputs", read)


def test_a_missing_certificate_is_refused_before_the_data_and_model_are_read(coordinator, tiny_bert, tmp_path,
                                                                             monkeypatch):
    import shutil

    d, _ = coordinator
    partial = tmp_path / "pki"
    shutil.copytree(d, partial)
    (partial / "server.key").unlink()
    inputs_never_read(monkeypatch)
    with pytest.raises(FedShieldError, match=rf"^{partial / 'server.key'}: not found \(make it with `fedshield certs"):
        run((partial, d / "keys"), tiny_bert, tmp_path)
    assert nothing_made(tmp_path)


def test_an_address_in_use_is_refused_before_anything_starts(coordinator, tiny_bert, tmp_path, monkeypatch):
    from fedshield.server.cli import server_main

    inputs_never_read(monkeypatch)
    d, keys = coordinator
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = write_csv(tmp_path / "server.csv", synthetic_rows(40, seed=1))
        over = [o for o in tiny_overrides(tiny_bert, data, tmp_path, **{"federation.num_sites": 2})
                if not o.startswith("simulation.")]
        with pytest.raises(FedShieldError, match=rf"^--address 127.0.0.1:{port}: cannot listen there"):
            server_main(["--pki", str(d), "--connection-keys", str(keys), "--address", f"127.0.0.1:{port}", *over])
    assert nothing_made(tmp_path)


@pytest.mark.parametrize(("args", "message"), [
    (["--max-body-mb", "0"], r"^--max-body-mb 0: expected more than 0"),
    (["--max-connections", "0"], r"^--max-connections 0: expected a positive number"),
    (["--max-connections", "4", "--max-connections-per-address", "8"], r"more than --max-connections 4"),
])
def test_front_limit_flags_are_checked(coordinator, tiny_bert, tmp_path, args, message):
    with pytest.raises(FedShieldError, match=message):
        run(coordinator, tiny_bert, tmp_path, *args)
    assert nothing_made(tmp_path)


def test_the_body_limit_defaults_to_the_derived_one():
    import argparse

    from fedshield.server.cli import front_limits

    args = argparse.Namespace(max_body_mb=None, max_connections=256, max_connections_per_address=16)
    assert front_limits(args).max_body_bytes == MAX_BODY_BYTES == 6 * MIB
    args.max_body_mb = 96.5
    assert front_limits(args).max_body_bytes == int(96.5 * MIB)


def test_resume_needs_the_runs_folder_and_tells_the_serverapp(coordinator, tiny_bert, tmp_path):
    import tomllib

    from fedshield.server.app import RESUME_KEY, RUN_CONFIG_YAML_KEY
    from fedshield.server.cli import write_app

    with pytest.raises(FedShieldError, match=r"output.run_name='job': .* holds no run to resume"):
        run(coordinator, tiny_bert, tmp_path, "--resume")
    assert nothing_made(tmp_path)
    with pytest.raises(FedShieldError, match=r"already holds a run; choose another name, or continue it with --resume"):
        (tmp_path / "runs" / "job").mkdir(parents=True)
        (tmp_path / "runs" / "job" / "config.yaml").write_text("{}")
        run(coordinator, tiny_bert, tmp_path)
    cfg = Config.load(["task=text-file", "task.data_path=x.csv"])
    for resume in (False, True):
        write_app(tmp_path / f"app-{resume}", cfg, resume=resume)
        config = tomllib.loads((tmp_path / f"app-{resume}" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
        assert RUN_CONFIG_YAML_KEY in config["config"]
        assert config["config"].get(RESUME_KEY, False) is resume


def test_a_run_that_did_not_complete_is_explained_by_the_serverapps_own_cause():
    from fedshield.server.cli import run_failure
    from fedshield.server.run_dir import RUN_STOPPED

    traceback = ["Traceback (most recent call last):", '  File "server/app.py", line 371, in run_federation',
                 "server.checkpoint.CheckpointError: cannot resume job: the run's ledger does not verify: x"]
    assert run_failure(traceback) == "CheckpointError: cannot resume job: the run's ledger does not verify: x"
    # The ServerApp's own line states the cause, whatever traceback Flower prints after it.
    said = [f"{RUN_STOPPED}rounds 1-3 trained nothing (3 in a row; federation.max_empty_rounds=3)",
            *traceback[:2], "server.app.EmptyRoundsError: rounds 1-3 trained nothing", "RuntimeError: exit"]
    assert run_failure(said) == "rounds 1-3 trained nothing (3 in a row; federation.max_empty_rounds=3)"
    assert run_failure(["INFO : [ROUND 1/3]", "round   1/3 | acc 0.500"]) == ""  # no cause: said so, not guessed
    # A site's failure the ServerApp printed is not the ServerApp's own.
    assert run_failure(["  st-marys: failed: RuntimeError: out of memory"]) == ""
    assert run_failure(["ERROR :     ValueError: bad"]) == "ValueError: bad"


def test_a_model_head_of_another_size_than_the_tasks_classes_is_one_line_up_front(coordinator, tiny_bert, tmp_path):
    """Issue 21 item 10: tiny_bert carries a 2-output head; a 3-class task made the ServerApp
    raise a size-mismatch RuntimeError after the SuperLink started."""
    rows = synthetic_rows(60, seed=2)
    rows = [(text, "sports" if i % 3 == 0 else label) for i, (text, label) in enumerate(rows)]
    data = write_csv(tmp_path / "three.csv", rows)
    with pytest.raises(FedShieldError) as err:
        run(coordinator, tiny_bert, tmp_path, **{"task.data_path": str(data)})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"task.model={str(tiny_bert)!r}: its classification head has 2 outputs")
    assert "3 classes" in msg
    assert nothing_made(tmp_path)


def test_the_serverapps_last_lines_are_read_after_its_report_and_a_silent_stream_is_not_waited_on(
        tmp_path, monkeypatch):
    """`flwr run --stream` fetches the ServerApp's log in batches: the last round's lines can
    come after report.md (a SecAgg+ dropout line was lost so). They are read until the stream
    ends; a stream that stays open and silent after the report is left after the idle bound."""
    import os
    import threading

    import fedshield.server.cli as cli

    monkeypatch.setattr(cli, "DRAIN_IDLE_S", 0.3)
    (tmp_path / "report.md").write_text("# done\n")  # written before the last lines arrive
    assert list(cli.run_output(iter(["round 1\n", "  city-bank: dropped out\n"]), tmp_path)) == [
        "round 1\n", "  city-bank: dropped out\n"]

    read, write = os.pipe()
    os.write(write, b"round 1\n")
    stream = os.fdopen(read, "r")
    got: list[str] = []
    done = threading.Event()

    def consume():
        got.extend(cli.run_output(stream, tmp_path))
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    assert done.wait(30), "run_output waited on a silent stream after the report"
    assert got == ["round 1\n"]
    os.close(write)


def test_the_last_rounds_outcome_is_printed_even_when_the_streamed_log_ends_first(tmp_path):
    """Flower uploads the ServerApp's log in batches: the last round's lines can miss the
    stream. `fedshield server` prints them from metrics.jsonl, once."""
    import json

    from fedshield.server.cli import last_round_lines

    rows = [{"round": 0}, {"round": 1, "secagg_dropped": {"city-bank": "collect"}, "failed_sites": ["city-bank"]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert last_round_lines(tmp_path, set()) == ["  city-bank: dropped out of secure aggregation at collect",
                                                 "  city-bank: failed (why: report.md)"]
    streamed = {"INFO :        city-bank: dropped out of secure aggregation at collect",
                "INFO :        city-bank: failed: Error: Node Unavailable"}
    assert last_round_lines(tmp_path, streamed) == []  # the stream carried them: not twice
    assert last_round_lines(tmp_path / "nothing", set()) == []

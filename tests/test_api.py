"""The typed Python API (fedshield/api.py, docs/api.md) without a simulation: Config, the
audit, the site agent's checks, the lazy package top, `fedshield --version`. The
simulation from Python runs in tests/test_api_docs.py (e2e)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import fedshield
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.signing import generate_site_key, load_private_key
from fedshield.simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ Config


def test_config_is_typed_and_immutable():
    config = fedshield.Config.load(["task=heart-disease", "federation.rounds=2"])
    assert config.task.name == "tabular" and config.federation.num_sites == 4  # the preset's
    assert config.federation.rounds == 2 and isinstance(config.privacy.target_epsilon, float)
    with pytest.raises(dataclasses.FrozenInstanceError, match="with_overrides"):
        config.privacy = config.privacy  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.privacy.target_epsilon = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del config.task
    with pytest.raises(TypeError, match="Config.load"):
        fedshield.Config()
    labelled = fedshield.Config.load(["task=text-file", "task.data_path=x.csv", "task.labels=[neg,pos]"])
    assert labelled.task.labels == ("neg", "pos")  # a tuple: nothing inside can change either
    # The OmegaConf object for the rooms is a copy: changing it changes nothing here.
    cfg = config.to_omegaconf()
    cfg.federation.rounds = 9
    assert config.federation.rounds == 2 and cfg.federation.rounds == 9


def test_changed_copies_leave_the_original_alone():
    config = fedshield.Config.load(["federation.rounds=3"])
    fewer = config.with_overrides("federation.rounds=1", "privacy.target_epsilon=4")
    assert (fewer.federation.rounds, fewer.privacy.target_epsilon) == (1, 4.0)
    assert (config.federation.rounds, config.privacy.target_epsilon) == (3, 8.0)
    odd = config.with_values({"output.dir": "/data/runs #2: ok", "federation.rounds": 5})
    assert odd.output.dir == "/data/runs #2: ok" and odd.federation.rounds == 5  # no parsing: '#' is no comment
    # A group preset sets its keys over the config's, as on the command line.
    assert config.with_overrides("task=heart-disease").federation.rounds == 20
    assert fedshield.Config.load(preset="cross-device") == fedshield.Config.load(["preset=cross-device"])
    assert config.changed() == {"federation.rounds": 3}
    assert repr(config) == "Config(federation.rounds=3)"


def test_yaml_dict_and_pickle_round_trips(tmp_path):
    config = fedshield.Config.load(["task=heart-disease", "privacy.noise_multiplier=1.5"]).with_values(
        {"output.dir": str(tmp_path / "runs #1")})
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    again = fedshield.Config.from_yaml(path)
    assert again == config and hash(again) == hash(config) and again.to_yaml() == config.to_yaml()
    assert fedshield.Config.from_dict(config.to_dict()) == config
    assert fedshield.Config.from_dict({"federation.rounds": 2, "privacy": {"delta": 1e-6}}).privacy.delta == 1e-6
    assert pickle.loads(pickle.dumps(config)) == config
    assert fedshield.Config.from_yaml(path, ["federation.rounds=1"]).federation.rounds == 1


@pytest.mark.parametrize("overrides, expected", [
    (["federation.roundz=3"], "override: unknown key 'federation.roundz' (did you mean 'federation.rounds'?)"),
    (["federation.rounds=many"], "override: federation.rounds='many': Value 'many' of type 'str' could not be"),
    (["privacy.delta=2"], "config: privacy.delta=2.0: must be in (0, 1)"),
    (["task=nope"], "task='nope': no such preset; allowed: "),
])
def test_a_bad_key_or_value_is_the_commands_one_line(overrides, expected, capsys):
    with pytest.raises(fedshield.ConfigError) as raised:
        fedshield.Config.load(overrides)
    message = str(raised.value)
    assert message.startswith(expected) and "\n" not in message
    assert main(["simulate", *overrides]) == 2  # the command: the same line, before any work
    assert capsys.readouterr().err == f"error: {message}\n"


def test_config_refuses_what_is_not_an_override(tmp_path):
    with pytest.raises(fedshield.ConfigError, match=r"Config.load: 3: expected a 'key=value' string"):
        fedshield.Config.load([3])  # type: ignore[list-item]
    assert fedshield.Config.load("federation.rounds=2").federation.rounds == 2  # one string: one override
    with pytest.raises(fedshield.ConfigError, match="not found"):
        fedshield.Config.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(fedshield.ConfigError, match="expected a mapping"):
        fedshield.Config.from_dict(["federation.rounds=2"])  # type: ignore[arg-type]
    with pytest.raises(fedshield.ConfigError, match="expected a fedshield.Config"):
        fedshield.simulate({"federation": {"rounds": 1}})  # type: ignore[arg-type]


def test_from_run_names_the_run_folder_and_read_refuses_other_folders(tmp_path):
    run = tmp_path / "elsewhere" / "my-run"
    run.mkdir(parents=True)
    run.joinpath("config.yaml").write_text(fedshield.Config.load(["federation.rounds=2"]).to_yaml())
    config = fedshield.Config.from_run(run)
    assert (config.output.dir, config.output.run_name, config.federation.rounds) == (str(run.parent), "my-run", 2)
    with pytest.raises(fedshield.FedShieldError, match="no rounds in metrics.jsonl"):
        fedshield.RunResult.read(run)
    run.joinpath("metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(fedshield.FedShieldError, match=r"metrics.jsonl: not a metrics file fedshield wrote \(KeyError"):
        fedshield.RunResult.read(run)
    with pytest.raises(fedshield.FedShieldError, match="not a run directory"):
        fedshield.RunResult.read(tmp_path)


# ------------------------------------------------------------------ audit


def _site_books(tmp_path: Path, rounds: int = 3) -> Path:
    """A site's state folder with a signed ledger of `rounds` DP-SGD spends."""
    state = tmp_path / "state"
    (state / "site.pub").parent.mkdir(parents=True, exist_ok=True)
    (state / "site.pub").write_bytes(generate_site_key(state / "site.key"))
    key = load_private_key(state / "site.key")
    ledger = Ledger(state / "ledger.jsonl")
    for rnd in range(1, rounds + 1):
        ledger.append(dict(run_id="run-1", round=rnd, site="alpha", noise_multiplier=1.1, sample_rate=0.05,
                           steps=40, max_grad_norm=1.0, delta=1e-5, accountant="pld"), key)
    return state


def test_audit_from_python_is_what_the_command_prints(tmp_path, capsys):
    state = _site_books(tmp_path)
    result = fedshield.audit(state, site_books=True, report_dir=tmp_path / "report")
    assert isinstance(result, fedshield.AuditResult) and result.ok and result.books_checked
    recorded = json.loads((state / "ledger.jsonl").read_text().splitlines()[-1])["epsilon"]
    assert result.sites["alpha"].recorded_epsilon == recorded
    assert result.epsilon["alpha"] == pytest.approx(recorded, rel=1e-6)  # recomputed from (σ, q, steps)
    assert result.report_markdown == tmp_path / "report" / "audit.md" and result.report_markdown.is_file()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = False  # type: ignore[misc]

    assert main(["audit", "--site", str(state), "--json", "--out", str(tmp_path / "r2")]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the "site books: ..." line
    assert printed["sites"]["alpha"]["recomputed_epsilon"] == result.epsilon["alpha"] and printed["ok"]


def test_books_cut_short_fail_the_audit_with_the_books_first(tmp_path, capsys):
    state = _site_books(tmp_path)
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (state / "ledger.jsonl").write_text("".join(lines[:-1]))  # the chain alone still verifies
    assert fedshield.audit(state, write_report=False).ok
    result = fedshield.audit(state, site_books=True, write_report=False)
    assert not result.ok and result.first_problem.startswith("site books: ")
    assert result.report_markdown is None and not (state / "audit").exists()
    assert main(["audit", "--site", str(state), "--out", str(tmp_path / "r")]) == 1
    assert f"AUDIT FAILED: {result.first_problem}" in capsys.readouterr().err


def test_audit_refuses_bad_input_with_one_line(tmp_path):
    with pytest.raises(fedshield.FedShieldError, match="not found"):
        fedshield.audit(tmp_path / "nowhere")
    state = _site_books(tmp_path, rounds=1)
    with pytest.raises(fedshield.FedShieldError, match=r"budgets\['alpha'\]=-1: expected a finite number > 0"):
        fedshield.audit(state, budgets={"alpha": -1})
    with pytest.raises(fedshield.FedShieldError, match="max_epsilon=inf"):
        fedshield.audit(state, max_epsilon=float("inf"))
    over = fedshield.audit(state, budgets={"alpha": 0.01}, write_report=False)
    assert not over.ok and over.sites["alpha"].over_budget and "past its budget" in over.first_problem


# ------------------------------------------------------------------ site agent


def test_site_agent_checks_before_connecting_and_keeps_the_error_class(tmp_path):
    from fedshield.deploy.pki import certs_main

    assert certs_main(["init", "--out", str(tmp_path / "pki"), "--server-name", "localhost"]) == 0
    assert certs_main(["site", "st-marys", "--out", str(tmp_path / "keys")]) == 0
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "chest pain,cardiac\nankle sprain,other\n" * 5)
    common = dict(server="localhost:9092", ca=tmp_path / "pki" / "ca.crt",
                  connection_key=tmp_path / "keys" / "st-marys.key", data=data)
    checked = fedshield.SiteAgent(**common, labels="cardiac, other", state_dir=tmp_path / "state").check()
    assert (checked.name, checked.records, checked.classes) == ("st-marys", 10, ("cardiac", "other"))
    assert checked.connection_key_fingerprint.startswith("SHA256:") and checked.state_dir == tmp_path / "state"
    assert not (tmp_path / "state").exists()  # check() writes nothing

    with pytest.raises(fedshield.ConfigError, match=r"^site st-marys: 'federation.rounds': a site can set only"):
        fedshield.SiteAgent(**common, overrides=["federation.rounds=3"]).check()
    with pytest.raises(fedshield.FedShieldError, match=r"^site st-marys: .*notes.csv"):
        fedshield.SiteAgent(**common, labels=["cardiac"]).check()
    with pytest.raises(fedshield.FedShieldError, match="--server"):
        fedshield.SiteAgent(**{**common, "server": "no-port"}).check()
    agent = fedshield.SiteAgent(**common, labels=["cardiac", "other"], overrides=["privacy.budget_epsilon=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.server = "elsewhere"  # type: ignore[misc]
    assert agent.labels == ("cardiac", "other") and agent.overrides == ("privacy.budget_epsilon=3",)
    assert hash(agent) == hash(dataclasses.replace(agent))  # a value: lists given became tuples


# ------------------------------------------------------------------ the package's top


def test_import_fedshield_is_light_offline_and_names_the_api():
    heavy = "[m for m in ('torch', 'flwr', 'ray', 'transformers', 'dp_accounting') if m in sys.modules]"
    code = ("import os, sys, fedshield\n"
            "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
            f"assert 'fedshield.api' not in sys.modules and not {heavy}, {heavy}\n"
            "fedshield.Config, fedshield.simulate, fedshield.SiteAgent\n"
            f"assert not {heavy}, {heavy}\n"  # the API's names: loaded, its runs' machinery not yet
            "assert fedshield.audit is __import__('fedshield.api').api.audit\n"
            "print(sorted(set(fedshield.__all__) - set(dir(fedshield))))\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fedshield.simulat  # noqa: B018


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fedshield {fedshield.__version__}\n"
    out = subprocess.run([sys.executable, "-m", "fedshield", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert (out.returncode, out.stdout) == (0, f"fedshield {fedshield.__version__}\n")

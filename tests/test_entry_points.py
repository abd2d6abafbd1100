"""What every entry point does before any work: nothing phones home, and Flower's run
config becomes the config its writer meant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = [f"fedshield.{m}" for m in
                ("simulations.cli", "simulations.simulate", "server.app", "server.cli", "client.app", "client.cli",
                 "api")]
SWITCHES = ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_importing_an_entry_point_turns_off_every_phone_home_before_flower_reads_it(module):
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES and not k.startswith("FLWR_")}
    code = (f"import {module}\n"
            "import os, flwr.supercore.telemetry as t\n"
            "print(t.FLWR_TELEMETRY_ENABLED, *(os.environ.get(k) for k in "
            f"{SWITCHES[1:]!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # Flower read FLWR_TELEMETRY_ENABLED when it was imported: "0" means it was set first.
    assert out.stdout.split() == ["0", "1", "0", "1"]


def test_the_clientapp_module_leaves_opacus_transformers_and_dp_accounting_to_the_messages_that_use_them():
    """Flower 1.41 starts one `flwr-clientapp` process per message, and each imports the
    ClientApp module before it reads its message: a HELLO, a SecAgg+ stage or the end of
    the run must not pay for Opacus (1.3 s), transformers' models or dp-accounting."""
    code = "import sys, fedshield.client.app\nprint(*sorted({m.split('.')[0] for m in sys.modules}))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.split())
    assert "torch" in loaded and "flwr" in loaded  # the check sees the imports
    heavy = loaded & {"opacus", "transformers", "dp_accounting", "scipy"}
    assert not heavy, heavy


def test_flowers_run_config_the_yaml_wins_over_the_declared_default():
    from fedshield import conf
    from fedshield.server.app import RUN_CONFIG_YAML_KEY, config_from_run_config

    yaml = conf.to_yaml(conf.load_config(["federation.rounds=3", "privacy.target_epsilon=4"]))
    cfg = config_from_run_config({"federation.rounds": 40, RUN_CONFIG_YAML_KEY: yaml})
    assert cfg.federation.rounds == 3 and cfg.privacy.target_epsilon == 4
    cfg = config_from_run_config({"federation.rounds": 7, RUN_CONFIG_YAML_KEY: ""})
    assert cfg.federation.rounds == 7
    with pytest.raises(conf.ConfigError, match="unknown key"):
        config_from_run_config({"federation.roundz": 7})


def test_flowers_flat_run_config_maps_back_onto_the_config():
    """Flower passes every declared key (pyproject's [tool.flwr.app.config]) on every run; those
    that differ from their default override, null and lists travel as strings (conf/flower.py)."""
    from fedshield import conf
    from fedshield.conf.config import Config
    from fedshield.conf.flower import declared_defaults
    from fedshield.server.app import RUN_CONFIG_YAML_KEY, config_from_run_config

    declared = {RUN_CONFIG_YAML_KEY: "", **declared_defaults()}
    assert config_from_run_config(declared) == Config.load()
    cfg = config_from_run_config({**declared, "privacy.target_epsilon": 4, "task.labels": "[neg,pos]",
                                  "federation.update_norm_bound": "2.5", "privacy.noise_multiplier": 1.1,
                                  "task.name": "text-file", "task.data_path": "notes.csv"})
    assert cfg.privacy.target_epsilon == 4 and list(cfg.task.labels) == ["neg", "pos"]
    assert cfg.federation.update_norm_bound == 2.5 and cfg.privacy.noise_multiplier == 1.1
    assert cfg.task.name == "text-file" and cfg.task.data_path == "notes.csv"
    assert config_from_run_config({**declared, "federation.update_norm_bound": "null"}).federation.update_norm_bound \
        is None
    # The YAML form still works: a declared default does not undo it; a changed dotted key wins.
    yaml = conf.to_yaml(conf.load_config(["federation.rounds=3", "privacy.target_epsilon=4"]))
    cfg = config_from_run_config({**declared, RUN_CONFIG_YAML_KEY: yaml, "privacy.target_epsilon": 2.0})
    assert cfg.federation.rounds == 3 and cfg.privacy.target_epsilon == 2
    with pytest.raises(conf.ConfigError, match=r"privacy.target_epsilon"):
        config_from_run_config({**declared, "privacy.target_epsilon": "lots"})

"""Config: defaults, presets, overrides, and one clear line for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

import conf
from simulations.cli import main

GROUPS = "task, federation, training, privacy, simulation, output"


def test_defaults_are_the_documented_default_run():
    cfg = conf.load_config()
    assert cfg.task.name == "news-topics"
    assert cfg.federation.num_sites == 8
    assert cfg.privacy.mode == "dp-sgd"
    assert cfg.privacy.target_epsilon == 8.0
    assert cfg.privacy.delta == 1e-5


def test_presets_apply_before_plain_overrides_whatever_the_order():
    cfg = conf.load_config(["privacy.target_epsilon=2", "task=heart-disease", "privacy=dp-sgd"])
    assert cfg.task.name == "heart-disease"
    assert cfg.federation.partition == "natural"
    assert cfg.privacy.target_epsilon == 2.0


def test_privacy_none_preset():
    assert conf.load_config(["privacy=none"]).privacy.mode == "none"


@pytest.mark.parametrize(
    "override, must_mention",
    [
        (["federation.num_site=3"], ["federation.num_site", "federation.num_sites"]),
        (["privacy.target_epsilon=0"], ["privacy.target_epsilon", "> 0"]),
        (["privacy.target_epsilon=-1"], ["privacy.target_epsilon"]),
        (["privacy.delta=1.5"], ["privacy.delta", "(0, 1)"]),
        (["federation.fraction_train=1.5"], ["federation.fraction_train", "(0, 1]"]),
        (["federation.partition=random"], ["federation.partition", "iid, dirichlet, natural"]),
        (["training.trainable=some"], ["training.trainable", "all, last_layers, lora"]),
        (["training.batch_size=abc"], ["training.batch_size"]),
        (["task=nope"], ["task", "heart-disease", "news-topics", "text-file"]),
        (["bogus=1"], ["bogus", GROUPS, "presets: task=heart-disease|news-topics|text-file, privacy=dp-sgd|none"]),
        (["foo.bar=1"], ["foo.bar", "no group 'foo'", GROUPS]),
        (["fedration.rounds=3"], ["did you mean 'federation.rounds'?", GROUPS]),
        (["site.data_path=x.csv"], ["site.data_path", GROUPS]),  # no such section: sites set their own
        (["federation=3"], ["federation", "is a group", "federation.KEY=value"]),
        (["federation.rounds"], ["key=value"]),
        (["task=text-file"], ["task.data_path"]),
        (["federation.partition=natural"], ["federation.partition", "site column"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_key_and_allowed(override, must_mention):
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config(override)
    msg = str(err.value)
    assert "\n" not in msg
    for word in must_mention:
        assert word in msg


def test_groups_and_preset_folders():
    assert ", ".join(conf.GROUPS) == GROUPS
    folders = {p.parent.name for p in Path(conf.CONF_DIR).glob("*/*.yaml")}
    assert set(conf.PRESET_GROUPS) == folders
    assert all(conf.presets(group) for group in conf.PRESET_GROUPS)


def test_flat_round_trip_matches_flower_run_config_style():
    cfg = conf.load_config(["federation.rounds=3", "privacy.noise_multiplier=1.1"])
    again = conf.load_config(base=conf.to_flat(cfg))
    assert again == cfg
    assert conf.from_yaml(conf.to_yaml(cfg)) == cfg


def test_cli_prints_one_line_and_exits_2_before_any_work(capsys, tmp_path):
    code = main(["simulate", "privacy.target_epsilon=-3", f"output.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "privacy.target_epsilon" in err
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_missing_data_file_is_named(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    code = main(["simulate", "task=text-file", f"task.data_path={missing}", f"output.dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and err.count("\n") == 1

"""Config: defaults, presets, overrides, and one clear line for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedshield import conf
from fedshield.simulations.cli import main

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
    assert cfg.task.name == "tabular" and cfg.task.site_column == "dataset"  # the preset is a tabular task
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
        (["bogus=1"], ["bogus", GROUPS,
                       "presets: task=heart-disease|news-topics|tabular|text-file, privacy=dp-sgd|none"]),
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


# Floats: OmegaConf reads inf and nan as floats, and NaN fails every comparison silently.
FINITE_KEYS = [
    "task.test_fraction", "federation.fraction_train", "federation.dirichlet_alpha",
    "federation.proximal_mu", "federation.server_learning_rate", "federation.round_timeout_s",
    "training.learning_rate", "privacy.target_epsilon", "privacy.delta", "privacy.noise_multiplier",
    "privacy.max_grad_norm", "privacy.center_noise_multiplier", "privacy.center_clip_norm",
    "privacy.budget_epsilon", "privacy.min_noise_multiplier", "simulation.client_cpus", "simulation.client_gpus",
    "federation.trim_fraction", "federation.update_norm_bound", "privacy.count_noise_multiplier",
    "privacy.site_clip_norm", "privacy.site_noise_multiplier", "privacy.site_target_epsilon", "privacy.site_delta",
    "federation.secagg_clip_range", "federation.secagg_max_dropout_fraction", "federation.secagg_timeout_s",
    "federation.secagg_reconstruction_threshold",
]  # fmt: skip


def test_every_float_key_is_checked_finite():
    floats = [k for k, v in conf.to_flat(conf.load_config()).items() if isinstance(v, float)]
    nullable = ["privacy.noise_multiplier", "privacy.center_clip_norm", "privacy.budget_epsilon",
                "privacy.min_noise_multiplier", "federation.update_norm_bound", "privacy.site_noise_multiplier",
                "federation.secagg_reconstruction_threshold"]
    assert sorted(floats + nullable) == sorted(FINITE_KEYS)


@pytest.mark.parametrize("key", FINITE_KEYS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config([f"{key}={value}"])
    msg = str(err.value)
    assert "\n" not in msg and f"{key}={value}" in msg and "must be" in msg


@pytest.mark.parametrize(
    "override",
    [
        "federation.proximal_mu=0", "simulation.client_gpus=0", "privacy.max_grad_norm=1e6",
        "training.learning_rate=1e-9", "federation.round_timeout_s=1e9", "federation.dirichlet_alpha=1e3",
        "privacy.noise_multiplier=100", "federation.server_learning_rate=1e-6", "simulation.client_cpus=0.25",
    ],
)  # fmt: skip
def test_finite_boundaries_are_accepted(override):
    conf.load_config([override])


@pytest.mark.parametrize(
    "override, must_mention",
    [
        (["privacy.max_grad_norm=inf"], ["privacy.max_grad_norm=inf", "a finite number > 0"]),
        (["federation.num_sites=1000000"], ["federation.num_sites=1000000", "between 1 and 10,000"]),
        (["federation.num_sites=10001"], ["federation.num_sites=10001", "between 1 and 10,000"]),
        (["federation.num_sites=0"], ["federation.num_sites=0"]),
        (["federation.min_sites=9"], ["federation.min_sites=9", "federation.num_sites=8"]),
        (["federation.num_sites=3", "federation.min_sites=4"], ["federation.min_sites=4", "between 1 and"]),
        (["federation.min_sites=0"], ["federation.min_sites=0"]),
        (["federation.seed=-1"], ["federation.seed=-1", "from 0 to 4294967295"]),
        (["federation.seed=4294967296"], ["federation.seed=4294967296"]),
        (["task.split_seed=-5"], ["task.split_seed=-5", "from 0 to"]),
        (["output.dir="], ["output.dir=''", "not empty"]),
        (["output.dir=' '"], ["output.dir=' '", "not empty"]),
    ],
)
def test_absurd_values_are_refused(override, must_mention):
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config(override)
    msg = str(err.value)
    assert "\n" not in msg
    for word in must_mention:
        assert word in msg


@pytest.mark.parametrize(
    "override",
    [
        ["federation.num_sites=10000"], ["federation.num_sites=1"],
        ["federation.num_sites=10000", "federation.min_sites=10000"], ["federation.min_sites=8"],
        ["federation.seed=0"], ["federation.seed=4294967295"], ["task.split_seed=0"],
    ],
)  # fmt: skip
def test_count_and_seed_boundaries_are_accepted(override):
    conf.load_config(override)


@pytest.mark.parametrize(
    "name",
    [
        "..", ".", "../..", "../x", "a/b", "/abs", "a\\b", ".hidden", "-flag", "has space", "tab\tx",
        "x\n", "caf\u00e9", "a\x00b", "semi;colon", "a:b", "x" * 129,
    ],
)  # fmt: skip
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config(base={"output": {"run_name": name}})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config: output.run_name=")
    assert "plain folder name" in msg and "letters, digits, '-', '_' and '.'" in msg


@pytest.mark.parametrize(
    "name",
    [
        "", "20261201-074921-68b9", "deploy", "job-7", "default-eps8-idle", "target_epsilon-4",
        "target_epsilon-inf_seed-1", "learning_rate-1e-05", "run.v2", "_tmp", "x" * 128,
    ],
)  # fmt: skip
def test_run_names_in_use_are_accepted(name):
    assert conf.load_config([f"output.run_name={name}"]).output.run_name == name


@pytest.mark.parametrize("key", ["task.model", "task.data_path", "task.test_path", "output.dir"])
def test_paths_with_nul_or_control_characters_are_refused(key):
    section, leaf = key.split(".")
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config(base={section: {leaf: "runs\x00/x"}})
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "NUL" in msg


def test_run_name_cannot_leave_output_dir(capsys, tmp_path):
    out = tmp_path / "a" / "b" / "runs"
    code = main(["simulate", "output.run_name=../..", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "output.run_name='../..'" in err
    assert not any(tmp_path.iterdir())  # nothing was made, inside or outside output.dir


def test_max_empty_rounds_is_at_least_one():
    assert conf.load_config([]).federation.max_empty_rounds == 3
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config(["federation.max_empty_rounds=0"])
    assert "federation.max_empty_rounds=0" in str(err.value) and "\n" not in str(err.value)
    assert conf.load_config(["federation.max_empty_rounds=1"]).federation.max_empty_rounds == 1


@pytest.mark.parametrize("item", [
    "task.name=news\x1b[31mtopics", "output.run_name=x\x00y", "output.run_name=a\nb", "task.labels=[a,b\x07]",
    "task.model=\x7f", "federation.rounds=3\r", "federation.rou\x1bnds=3",
])  # fmt: skip
def test_overrides_with_control_characters_are_refused_in_one_line_naming_the_key(item):
    with pytest.raises(conf.ConfigError) as err:
        conf.load_config([item])
    msg = str(err.value)
    key = item.split("=", 1)[0].encode("unicode_escape").decode("ascii")
    assert "\n" not in msg and f"override {key}=" in msg and "control character" in msg
    assert all(c.isprintable() for c in msg)


def test_cli_refuses_a_control_character_in_an_override_in_one_line(capsys):
    code = main(["simulate", "task.name=news\x1b[2Jtopics"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "task.name" in err and "\x1b" not in err


def test_a_config_file_or_run_config_that_is_not_a_mapping_gets_one_line(tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- federation.rounds=3\n- privacy.target_epsilon=4\n")
    with pytest.raises(conf.ConfigError) as refused:
        conf.load_config_file(listed)
    assert str(refused.value) == f"config file {str(listed)!r}: not a mapping of keys (got a list)"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert conf.load_config_file(empty) == conf.load_config()  # an empty file: the defaults
    from fedshield.server.app import RUN_CONFIG_YAML_KEY, config_from_run_config

    with pytest.raises(conf.ConfigError, match=f"{RUN_CONFIG_YAML_KEY}: a YAML mapping"):
        config_from_run_config({RUN_CONFIG_YAML_KEY: "- a\n- b\n"})

"""Plug-in tasks (task/plugin.py): a researcher's own model and data, named by an entry point
(group `fedshield.tasks`) or by `task.plugin=module:factory`, run like a built-in task (DP,
ledger, audit); a deployed site runs only plug-ins it allowed itself."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedshield import protocol
from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.task import plugin as plugins
from fedshield.task.plugin import PluginData, PluginError

# A plug-in as a researcher writes it: its own model (a frozen random projection, a trained
# head), its own data (two Gaussian blobs), and the names of what trains.
PLUGIN_SOURCE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Blobs:
    class_names = ["left", "right"]

    def build_model(self, seed):
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        return model

    def datasets(self):
        g = torch.Generator().manual_seed(5)
        y = torch.arange(400) % 2
        x = torch.randn(400, 6, generator=g) * 0.5
        x[:, 0] += torch.where(y == 1, 2.0, -2.0)
        return TensorDataset(x[:320], y[:320]), (x[320:], y[320:])

    def trainable(self, model):
        return ["2.weight", "2.bias"]


def make():
    return Blobs()


def raises():
    raise RuntimeError("no GPU here")


class NoTrainable:
    class_names = ["a", "b"]

    def build_model(self, seed):
        return torch.nn.Linear(2, 2)

    def datasets(self):
        empty = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
        return empty, empty


def lacks():
    return NoTrainable()


def float_labels():
    b = Blobs()
    b.datasets = lambda: ((torch.zeros(4, 6), torch.zeros(4)), (torch.zeros(2, 6), torch.zeros(2, dtype=torch.long)))
    return b


def batchnorm():
    b = Blobs()
    b.build_model = lambda seed: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return b


not_callable = 3
'''

ENTRY_POINT = "blobs-test"


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """The plug-in module in a folder on sys.path (and PYTHONPATH: Ray workers inherit it),
    with a tiny installed distribution whose entry point names it (group fedshield.tasks)."""
    root = tmp_path / "site-packages"
    root.mkdir()
    (root / "blobs_plugin.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist = root / "blobs_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fedshield.tasks]\n{ENTRY_POINT} = blobs_plugin:make\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root) + ":" + str(Path.cwd()))
    plugins.load_plugin.cache_clear()
    yield root
    plugins.load_plugin.cache_clear()
    sys.modules.pop("blobs_plugin", None)


def factory_error(plugin: str) -> str:
    with pytest.raises(PluginError) as err:
        plugins.load_plugin("plugin", plugin)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_bad_factory_string_is_one_line_at_load(plugin_path):
    with pytest.raises(ConfigError, match=r"task.plugin='blobs_plugin': must be module:factory"):
        Config.load(["task.name=plugin", "task.plugin=blobs_plugin"])
    with pytest.raises(ConfigError, match=r"task.plugin='x:y': only with task.name=plugin"):
        Config.load(["task.plugin=x:y"])
    assert "cannot import module 'no_such_module'" in factory_error("no_such_module:make")
    assert "module 'blobs_plugin' has no 'nothing'" in factory_error("blobs_plugin:nothing")
    assert "int object is not callable" in factory_error("blobs_plugin:not_callable")


def test_a_factory_that_raises_is_one_line(plugin_path):
    assert factory_error("blobs_plugin:raises") == (
        "task.plugin='blobs_plugin:raises': the factory raised RuntimeError: no GPU here")


def test_a_factory_returning_the_wrong_things_names_what_is_missing(plugin_path):
    assert "NoTrainable, which lacks trainable" in factory_error("blobs_plugin:lacks")
    assert "the label tensor (the last) must be 1-d integer" in factory_error("blobs_plugin:float_labels")


def test_a_model_opacus_cannot_train_is_refused_before_the_run(plugin_path, tmp_path):
    from fedshield.task.pipeline import check_task

    cfg = Config.load(["task.name=plugin", "task.plugin=blobs_plugin:batchnorm", f"output.dir={tmp_path}"])
    with pytest.raises(PluginError, match=r"not trainable with DP-SGD: .*BatchNorm"):
        check_task(cfg)


def test_an_unknown_task_name_lists_the_installed_plugins(plugin_path):
    from fedshield.task.pipeline import check_task

    with pytest.raises(PluginError, match=rf"task.name='blob': must be one of news-topics, .*plugin \(with "
                                          rf"task.plugin=module:factory\) or an installed plug-in \(entry points "
                                          rf"fedshield.tasks: .*{ENTRY_POINT}"):
        check_task(Config.load(["task.name=blob"]))


def test_a_plugin_runs_through_the_task_pipeline(plugin_path):
    from fedshield.task.pipeline import build_view, encode, pool_and_test

    for named in (["task.name=plugin", "task.plugin=blobs_plugin:make"], [f"task.name={ENTRY_POINT}"]):
        cfg = Config.load(named)
        pool, test = pool_and_test(cfg)
        assert isinstance(pool, PluginData) and len(pool) == 320 and len(test) == 80
        assert pool.class_names == ["left", "right"]
        view = build_view(cfg)
        # Only what trainable() names trains and travels; the rest is frozen, same on every copy.
        assert view.trainable_names == ["2.weight", "2.bias"]
        assert [n for n, p in view.model.named_parameters() if p.requires_grad] == ["2.weight", "2.bias"]
        assert build_view(cfg).fingerprint == view.fingerprint
        data = encode(cfg, view, pool.subset(np.arange(5)))
        assert [tuple(t.shape) for t in data.tensors] == [(5, 6), (5,)]
        assert view.module(data.tensors[0]).shape == (5, 2)


def deployed(tmp_path, **own) -> Context:
    node = {"site-name": "lab-a", "data-path": str(tmp_path / "unused.csv"), "state-dir": str(tmp_path / "state"),
            **own}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def hello(cfg: Config, context: Context) -> protocol.SiteHello | protocol.Decline | protocol.Rejected | protocol.Failed:
    import fedshield.client.app as site

    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="run-1", run_dir="/coordinator/runs/run-1",
                                frozen_fingerprint="", class_names=["left", "right"])
    return protocol.read_hello(site.hello(protocol.instruction(protocol.HELLO, plan, 1), context))


@pytest.mark.usefixtures("flower_task_identity")
def test_a_site_declines_a_plan_naming_a_plugin_it_does_not_allow(plugin_path, tmp_path):
    # Not installed at the site: declined (policy), nothing imported.
    got = hello(Config.load(["task.name=someone-elses-task"]), deployed(tmp_path))
    assert isinstance(got, protocol.Decline) and got.kind == "policy"
    assert "task.name='someone-elses-task': no such task is installed at this site" in got.reason
    # module:factory: only the one the site set itself; the plan's module is never imported.
    sys.modules.pop("blobs_plugin", None)
    plan = Config.load(["task.name=plugin", "task.plugin=blobs_plugin:make"])
    got = hello(plan, deployed(tmp_path))
    assert isinstance(got, protocol.Decline) and got.kind == "policy" and "runs no module:factory" in got.reason
    got = hello(plan, deployed(tmp_path, **{"task.plugin": "blobs_plugin:raises"}))
    assert isinstance(got, protocol.Decline) and got.kind == "policy"
    assert "allows only its own task.plugin='blobs_plugin:raises'" in got.reason
    assert "blobs_plugin" not in sys.modules
    assert list((tmp_path / "state").glob("ledger*")) == []
    # Allowed (its own setting, or an installed entry point): the site joins with the plug-in's records.
    for cfg, own in ((plan, {"task.plugin": "blobs_plugin:make"}), (Config.load([f"task.name={ENTRY_POINT}"]), {})):
        got = hello(cfg, deployed(tmp_path, **own))
        assert isinstance(got, protocol.SiteHello) and got.site == "lab-a", got


@pytest.mark.usefixtures("flower_task_identity")
def test_a_deployed_site_trains_its_plugin_with_dp_and_spends_before_it_replies(plugin_path, tmp_path):
    import fedshield.client.app as site
    from fedshield.task.pipeline import build_view, view_fingerprint

    cfg = Config.load([f"task.name={ENTRY_POINT}", "privacy.delta=1e-5", "training.batch_size=32",
                       "training.optimizer=sgd", "federation.rounds=2"])
    view = build_view(cfg)  # the coordinator's copy: the plan carries its frozen weights' fingerprint
    weights = view.trainable_state()
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="run-1", run_dir="/coordinator/runs/run-1",
                                frozen_fingerprint=view_fingerprint(view), class_names=["left", "right"])
    plan[protocol.SERVER_ROUND] = 1
    msg = Message(content=RecordDict({protocol.PLAN: plan, protocol.ARRAYS: protocol.to_array_record(weights)}),
                  message_type=protocol.TRAIN, dst_node_id=1)
    reply = protocol.read_train_reply(site.train(msg, deployed(tmp_path)),
                                      {k: (v.shape, v.dtype) for k, v in weights.items()})
    assert isinstance(reply, protocol.TrainReply), reply
    assert set(reply.arrays) == {"2.weight", "2.bias"}  # only what trainable() names leaves the site
    assert any(not np.array_equal(reply.arrays[k], weights[k]) for k in weights)
    released = [e["release"] for e in reply.ledger_entries]
    assert released == ["record-count", "dp-sgd"]  # the count (add-remove) and the round, both signed
    assert reply.num_examples == reply.ledger_entries[0]["released_count"]  # the weight is the noisy count


@pytest.mark.e2e
def test_an_entry_point_plugin_trains_two_sites_two_rounds_with_dp_and_its_ledger_audits(plugin_path, tmp_path):
    import fedshield
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation

    cfg = Config.load([
        f"task.name={ENTRY_POINT}", "federation.num_sites=2", "federation.rounds=2",
        "training.optimizer=sgd", "training.learning_rate=0.5", "training.batch_size=32",
        "training.local_epochs=1", "privacy.delta=1e-3", "privacy.noise_multiplier=1.0",
        "simulation.client_cpus=1", f"output.dir={tmp_path / 'runs'}",
    ])
    run = run_simulation(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["trained"] == 2
    assert set(rows[-1]["per_class"]) == {"left", "right"}
    assert rows[-1]["accuracy"] >= 0.75  # two separated blobs: chance is 0.5
    own = read_jsonl(run / "sites" / "site-0" / "ledger.jsonl")
    assert [e["release"] for e in own] == ["record-count", "dp-sgd", "dp-sgd"]  # no feature mean: no pooler
    result = fedshield.audit(run, write_report=False)
    assert result.ok, result.flags
    assert (run / "model" / "model.safetensors").is_file()

"""The site's DP trainer: weights really change, and the ε it reports is exactly what
Opacus' accountant and Google's dp-accounting compute for what ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend, epsilon, epsilon_dp_accounting_rdp, epsilon_opacus
from fedshield.task.model import frozen_fingerprint, make_train_view
from fedshield.task.pipeline import build_model, build_view, encode, pool_and_test
from fedshield.task.trainer import LocalPlan, batches_per_epoch, poisson_rate, round_steps, train_local
from tests.helpers import tiny_overrides


@pytest.fixture()
def cfg(tiny_bert, synthetic_csv, tmp_path):
    return Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path))


def _dataset(cfg, view):
    pool, _ = pool_and_test(cfg)
    return encode(cfg, view, pool.subset(np.arange(64)))


def _train(cfg, trainable, dp=True, grad_sample_mode="hooks", last_layers=1):
    cfg = cfg.with_values({"training.trainable": trainable, "training.last_layers": last_layers})
    view = build_view(cfg)
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    frozen_before = frozen_fingerprint(view.model, view.trainable_names)
    data = _dataset(cfg, view)
    plan = LocalPlan(epochs=1, batch_size=16, max_physical_batch_size=8, learning_rate=0.01,
                     optimizer="sgd", dp=dp, noise_multiplier=1.0, max_grad_norm=1.0,
                     grad_sample_mode=grad_sample_mode)
    result = train_local(view.module, data, plan, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    after = view.trainable_state()
    return view, before, after, frozen_before, result, len(data)


@pytest.mark.parametrize("trainable", ["all", "last_layers", "lora"])
def test_dp_training_changes_every_trainable_tensor_and_nothing_frozen(cfg, trainable):
    view, before, after, frozen_before, result, n = _train(cfg, trainable)
    assert set(after) == set(view.trainable_names) and after
    unchanged = [k for k in after if np.array_equal(before[k], after[k])]
    # Gaussian noise is added to every trainable coordinate: nothing may stay put
    # (a silent no-op would pass training loss checks; Opacus issue 820 for LoRA).
    assert not unchanged, unchanged
    assert frozen_fingerprint(view.model, view.trainable_names) == frozen_before
    if trainable == "lora":
        assert any("lora_" in k for k in after)
        assert all("lora_" in k or "classifier" in k or "pooler" in k for k in after)
    assert result.steps == batches_per_epoch(n, 16)


def test_last_layers_zero_trains_only_pooler_and_classifier(cfg):
    view, *_ = _train(cfg, "last_layers", last_layers=0)
    assert view.trainable_names and all(k.startswith(("bert.pooler", "classifier")) for k in view.trainable_names)


@pytest.mark.parametrize("trainable", ["all", "last_layers"])
def test_ghost_clipping_mode_trains(cfg, trainable):
    _, before, after, _, result, _ = _train(cfg, trainable, grad_sample_mode="ghost")
    assert result.spends and any(not np.array_equal(before[k], after[k]) for k in after)


def test_reported_spend_matches_plan_and_both_accountants(cfg):
    view, _, _, _, result, n = _train(cfg, "last_layers")
    q, steps = poisson_rate(n, 16), batches_per_epoch(n, 16)
    assert result.spends == [(1.0, q, steps)]
    history = [Spend(*s) for s in result.spends] * 3  # three rounds of the same spend
    eps_opacus = epsilon_opacus(history, 1e-5)
    eps_google = epsilon_dp_accounting_rdp(history, 1e-5)
    assert eps_opacus > 0
    # Same RDP curve and conversion; dp-accounting bounds fractional orders from above, so it
    # may be a hair larger (never smaller). What a site records is the larger of the two.
    assert eps_opacus <= eps_google <= eps_opacus * 1.001
    assert epsilon(history, 1e-5) == max(eps_opacus, eps_google)


def test_non_private_training_records_no_spend(cfg):
    _, before, after, _, result, _ = _train(cfg, "all", dp=False)
    assert result.spends == []
    assert any(not np.array_equal(before[k], after[k]) for k in after)


def test_last_layers_cache_equals_recomputed_prefix(cfg, tmp_path):
    view = build_view(cfg)
    pool, _ = pool_and_test(cfg)
    part = pool.subset(np.arange(20))
    first = encode(cfg, view, part, cache_dir=tmp_path)
    assert list(tmp_path.glob("prefix-*.pt"))
    again = encode(cfg, view, part, cache_dir=tmp_path)
    assert torch.equal(first.tensors[0], again.tensors[0])
    # The suffix on cached states gives the full model's logits (eval mode).
    view.model.eval()
    view.module.eval()
    with torch.no_grad():
        ids = encode(cfg, make_train_view(build_model(cfg), "all", 0, 8, 16), part).tensors
        full = view.model(input_ids=ids[0], attention_mask=ids[1]).logits
        via_cache = view.module(first.tensors[0], first.tensors[1])
    assert torch.allclose(full, via_cache, atol=1e-5)


def test_tensor_dataset_labels_are_the_task_labels(cfg):
    view = build_view(cfg)
    data = _dataset(cfg, view)
    assert isinstance(data, TensorDataset)
    assert set(data.tensors[-1].tolist()) <= {0, 1}


@pytest.mark.parametrize("released", [None, 12])  # q from the data (10 records), or from a released count
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_take_the_noise_only_step_the_accountant_counts(mode, released):
    """n = 10, expected batch 1: about a third of Poisson batches are empty. Each still takes
    a step of pure noise (as the accountant assumes), and the round spends what was planned.
    With a released (noisy) count of 12, q and the steps are the count's: 1/12, 12 a pass."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,)))
    q = None if released is None else 1.0 / released
    plan = LocalPlan(epochs=3, batch_size=1, max_physical_batch_size=1, learning_rate=0.1, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, sample_rate=q,
                     expected_batch_size=None if released is None else 1)
    before = module[0].weight.detach().clone()
    result = train_local(module, data, plan, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    steps = 3 * (released or 10)
    assert result.steps == steps and result.spends == [(1.0, 1.0 / (released or 10), steps)]
    after = next(p for n, p in module.named_parameters() if n.endswith("weight"))
    assert torch.isfinite(after).all() and not torch.equal(after.detach(), before)


@pytest.mark.parametrize("n, batch_size", [(744, 8), (792, 8), (840, 8), (1488, 16), (100, 8)])
def test_a_round_runs_the_steps_and_rate_the_plan_spends_for_every_n(n, batch_size):
    """Opacus' sampler runs int(1/q) draws: for 93, 99, 105 batches an epoch that is one fewer,
    logged at another q, and the site refused every round. The sampler now runs the plan's
    steps (task.trainer.round_steps) at the plan's q."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)))
    q = poisson_rate(n, batch_size)
    plan = LocalPlan(epochs=1, batch_size=batch_size, max_physical_batch_size=batch_size, learning_rate=0.1,
                     optimizer="sgd", dp=True, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q,
                     expected_batch_size=batch_size)
    result = train_local(module, data, plan, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert round_steps(q, 1) == batches_per_epoch(n, batch_size)
    assert result.spends == [(1.0, q, round_steps(q, 1))]


@pytest.mark.parametrize("trainable, last_layers", [("all", 1), ("last_layers", 1), ("last_layers", 2),
                                                    ("last_layers", 0), ("lora", 1)])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_takes_its_noise_step_in_every_trainable_view(cfg, trainable, last_layers, mode):
    """Tiny BERT, 3 records at batch size 2 (q = 1/2): 30 draws, of which about 4 select no
    record. A BERT forward over zero rows crashed (attention reshapes [0, heads, -1, width]);
    each empty draw now takes the noise-only step the accountant counts."""
    cfg = cfg.with_values({"training.trainable": trainable, "training.last_layers": last_layers})
    view = build_view(cfg)
    pool, _ = pool_and_test(cfg)
    data = encode(cfg, view, pool.subset(np.arange(3)))
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    plan = LocalPlan(epochs=15, batch_size=2, max_physical_batch_size=2, learning_rate=0.01, optimizer="sgd",
                     dp=True, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    result = train_local(view.module, data, plan, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    assert result.spends == [(1.0, 0.5, 30)]
    after = view.trainable_state()
    assert all(np.isfinite(v).all() for v in after.values())
    assert not [k for k in after if np.array_equal(before[k], after[k])]

"""Feature centering: the private feature-mean release and the exported model's equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend, calibrate_noise_multiplier, epsilon
from fedshield.task import centering
from fedshield.task.model import default_center_clip_norm, fold_center, supports_centering
from fedshield.task.pipeline import build_view, encode, pool_and_test
from tests.helpers import tiny_overrides


@pytest.fixture()
def cfg(tiny_bert, synthetic_csv, tmp_path):
    return Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path))


def _data(cfg, view, n=48):
    pool, _ = pool_and_test(cfg)
    return encode(cfg, view, pool.subset(np.arange(n)))


@pytest.mark.parametrize("last_layers", [0, 1])
def test_exported_model_computes_the_centred_model_without_a_centring_step(cfg, last_layers):
    cfg = cfg.with_values({"training.last_layers": last_layers})
    view = build_view(cfg)
    data = _data(cfg, view)
    view.module.eval()
    with torch.no_grad():
        uncentred = view.module(*data.tensors[:-1])
    torch.manual_seed(0)
    centering.set_center(view, torch.randn(view.module.center.shape[0]).numpy())
    with torch.no_grad():
        centred = view.module(*data.tensors[:-1])
    assert not torch.allclose(centred, uncentred, atol=1e-3)  # the centre changes the model
    fold_center(view)
    assert not view.module.center.any()
    pool, _ = pool_and_test(cfg)
    whole = cfg.with_values({"training.trainable": "all"})  # no frozen prefix: encode gives the token ids and mask
    ids, mask, _ = encode(whole, build_view(whole), pool.subset(np.arange(48))).tensors
    view.model.eval()
    with torch.no_grad():
        plain = view.model(input_ids=ids, attention_mask=mask).logits  # what save_pretrained holds
    assert torch.allclose(centred, plain, atol=1e-4)


def test_noiseless_sum_is_the_sum_of_clipped_features_and_noise_has_the_calibrated_scale(cfg):
    view = build_view(cfg)
    data = _data(cfg, view)
    with torch.no_grad():
        x = view.module.pooler_input(*data.tensors[:-1])[:, 0].double()
    norms = x.norm(dim=1)
    clip = float(norms.median())  # half the records are clipped
    g = torch.Generator().manual_seed(1)
    exact = centering.noisy_feature_sum(view, data, clip, 0.0, g, torch.device("cpu"))
    want = (x * torch.clamp(clip / norms, max=1.0)[:, None]).sum(0).numpy()
    np.testing.assert_allclose(exact, want, rtol=1e-6)
    assert np.linalg.norm(exact) < norms.sum().item()  # clipping really bounded the records

    draws = np.stack([centering.noisy_feature_sum(view, data, clip, 3.0, torch.Generator().manual_seed(s),
                                                  torch.device("cpu")) for s in range(200)])
    noise = draws - exact
    assert noise.std() == pytest.approx(3.0, rel=0.05)
    assert abs(noise.mean()) < 0.1


def test_release_spend_is_one_full_batch_gaussian_step_only_with_dp(cfg):
    view = build_view(cfg)
    assert supports_centering(view) and centering.applies(cfg, view)
    cfg = cfg.with_values({"privacy.center_noise_multiplier": 5.0})
    assert centering.release_spend(cfg, view) == Spend(5.0, 1.0, 1)
    assert centering.release_spend(cfg.with_values({"privacy.mode": "none"}), view) is None
    assert centering.release_spend(cfg.with_values({"training.center_features": False}), view) is None


def test_no_centering_where_there_is_no_pooler_input(cfg):
    for trainable in ("all", "lora"):
        c = cfg.with_values({"training.trainable": trainable})
        assert not centering.applies(c, build_view(c))


def test_default_clip_norm_comes_from_public_weights_only(cfg):
    view = build_view(cfg)
    ln = view.model.bert.encoder.layer[-1].output.LayerNorm
    with torch.no_grad():
        ln.weight.fill_(0.5)
        ln.bias.zero_()
    assert default_center_clip_norm(view) == pytest.approx(0.5 * np.sqrt(ln.weight.numel()))
    assert centering.clip_norm(cfg.with_values({"privacy.center_clip_norm": 2.5}), view) == 2.5


def test_combine_divides_the_summed_sums_by_all_records():
    mean = centering.combine([np.array([2.0, 4.0]), np.array([6.0, 0.0])], [2, 6])
    np.testing.assert_allclose(mean, [1.0, 0.5])


def test_set_center_refuses_a_wrong_shape_or_non_finite_values(cfg):
    view = build_view(cfg)
    width = view.module.center.shape[0]
    with pytest.raises(ValueError, match="feature centre"):
        centering.set_center(view, np.zeros(width + 1))
    with pytest.raises(ValueError, match="feature centre"):
        centering.set_center(view, np.full(width, np.nan))


def test_calibration_leaves_room_for_the_release():
    release = Spend(4.0, 1.0, 1)
    alone = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80)
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 80, before=[release])
    total = epsilon([release, Spend(sigma, 0.5, 80)], 1e-5)
    assert sigma > alone
    assert 7.9 < total <= 8.0  # the run spends its target, never more
    assert epsilon([release, Spend(alone, 0.5, 80)], 1e-5) > 8.0  # ignoring it would overspend


def test_calibration_refuses_when_the_release_alone_spends_the_target():
    from fedshield.privacy.errors import FedShieldError

    with pytest.raises(FedShieldError, match="nothing is left for training"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.5, 80, before=[Spend(0.5, 1.0, 1)])

"""Feature centering: the federation's mean [CLS] feature, released privately once per run.

Why: the pooler of a sentence-embedding model reads a [CLS] feature whose coordinates
share one large common direction (for all-MiniLM-L6-v2 on BBC News the mean feature has
norm 6.0, the features 6.4 to 8.1). Under DP-SGD every per-sample gradient is clipped to
one norm, and the pooler's gradient is (backprop) x (feature): most of that norm would be
spent on the direction every record shares. Subtracting the mean first is the private
normalisation of Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better
features"), who also estimate the statistics with part of the privacy budget.

The release (per site, per run, before round 1):

    noisy sum = sum_i clip(x_i, C) + N(0, (sigma_c * C)^2 I)

Adding or removing one record moves the clipped sum by at most C, so this is the Gaussian
mechanism with sensitivity C and noise multiplier sigma_c: exactly one step of the
Poisson-subsampled Gaussian mechanism with q = 1 (every record is in). The site records it
in its ledger as the spend (sigma_c, q=1, steps=1) before the sum leaves, so it composes
with the run's DP-SGD steps in the same accountants, and the DP-SGD noise is calibrated so
that both together stay within the site's target ε.

The coordinator's mean is sum(noisy sums) / sum(n), with n the record count every site
already reports (FedAvg's weights). A sum comes from a site, which may send anything finite
in float64 (1e300 is; it is inf in the float32 centre): before it is added, its norm must be
one an honest site can send (`sum_bound`: at most n clipped features plus the noise's
norm, which exceeds sqrt(d) + 10 standard deviations with probability below e^-50). The
centre travels in the plan; the exported model folds it into the pooler's bias
(task.model.fold_center).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend
from fedshield.privacy.progress import progress
from fedshield.task.model import TrainView, centered_module, default_center_clip_norm, supports_centering


def applies(cfg: Config, view: TrainView) -> bool:
    return cfg.training.center_features and supports_centering(view)


def clip_norm(cfg: Config, view: TrainView) -> float:
    c = cfg.privacy.center_clip_norm
    return float(c) if c is not None else default_center_clip_norm(view)


def release_spend(cfg: Config, view: TrainView) -> Spend | None:
    """What the release costs this site (None: no DP, or no centering in this run)."""
    if cfg.privacy.mode != "dp-sgd" or not applies(cfg, view):
        return None
    return Spend(cfg.privacy.center_noise_multiplier, 1.0, 1)


@torch.no_grad()
def noisy_feature_sum(
    view: TrainView, dataset: TensorDataset, clip: float, noise_std: float,
    generator: torch.Generator, device: torch.device, batch_size: int = 256,
) -> np.ndarray:
    """sum_i clip(x_i, clip) + N(0, noise_std^2 I) over the site's records (float64)."""
    module = centered_module(view).to(device)
    total = torch.zeros(module.center.shape[0], dtype=torch.float64)
    batches = DataLoader(dataset, batch_size=batch_size)
    for batch in progress(batches, "centering: clipped feature sum", total=len(batches), unit="batch"):
        *inputs, _ = (t.to(device) for t in batch)
        x = module.pooler_input(*inputs)[:, 0].double().cpu()
        scale = torch.clamp(clip / x.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        total += (x * scale).sum(0)
    if noise_std > 0:
        total += torch.normal(0.0, noise_std, size=total.shape, generator=generator, dtype=torch.float64)
    return total.numpy()


def sum_bound(records: float, clip: float, noise_std: float, width: int) -> float:
    """The largest L2 norm an honest site's noisy sum can have: `records` features clipped to
    `clip`, plus Gaussian noise of std `noise_std` in `width` coordinates (its norm passes
    noise_std * (sqrt(width) + 10) with probability below e^-50: the norm is 1-Lipschitz, E|z| <=
    sqrt(width), and Gaussian concentration gives P(|z| > sqrt(width) + t) <= e^(-t^2/2)). The
    clipped sum gets 1e-6 relative room for rounding (n aligned features clipped to `clip`)."""
    return records * clip * (1 + 1e-6) + noise_std * (math.sqrt(width) + 10.0)


def sum_problem(feature_sum: np.ndarray, bound: float) -> str | None:
    """Why a site's feature sum cannot be used (not finite, or larger than `bound`), or None."""
    values = np.asarray(feature_sum, dtype=np.float64)
    if not np.isfinite(values).all():
        return "its feature sum is not finite"
    norm = float(np.linalg.norm(values))
    if not norm <= bound:  # inf from an overflowing norm is refused too
        return f"its feature sum has norm {norm:.4g}, more than the {bound:.4g} its records and noise allow"
    return None


def combine(sums: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """The federation's mean feature from the sites' (noisy) sums and record counts."""
    mean: np.ndarray = (np.sum(sums, axis=0) / max(1, int(sum(counts)))).astype(np.float32)
    return mean


def set_center(view: TrainView, values: npt.ArrayLike) -> None:
    module = centered_module(view)
    center = check_center(view, values)
    module.center.copy_(center.to(module.center.device))


def check_center(view: TrainView, values: npt.ArrayLike) -> torch.Tensor:
    """What `set_center` refuses (ValueError), without setting anything: the centre as it
    would set it."""
    module = centered_module(view)
    center = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if center.shape != module.center.shape or not torch.isfinite(center).all():
        raise ValueError(f"feature centre: expected {tuple(module.center.shape)} finite values, "
                         f"got shape {tuple(center.shape)}")
    return center

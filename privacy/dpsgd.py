"""DP-SGD at a site: a thin wrapper over Opacus' PrivacyEngine.

Poisson sampling (each record joins each step independently with rate q), per-sample
clipping to `max_grad_norm`, Gaussian noise of std `noise_multiplier * max_grad_norm`.
Opacus' own accountant counts the steps that really ran; `spends()` reads them back so
the site records what happened, not what was planned.

Per-sample gradients of two layer kinds that transformers models use and Opacus 1.6 gets
wrong or leaves to its (slower) functorch fallback are registered here:
- `nn.LayerNorm` without a bias (ModernBERT, `bias=False`): Opacus' sampler reads
  `layer.bias.requires_grad` and fails on None; ours skips the missing bias.
- RMSNorm classes written as `weight * x / sqrt(mean(x^2) + variance_epsilon)` (Llama,
  Qwen2, Mistral): `register_rms_norm` (the task layer names the classes; privacy imports
  no model code). Opacus registers only torch's own `nn.RMSNorm`.
tests/test_families.py checks both against gradients of microbatches of one record.

Noise comes from torch's generator. Opacus' secure_mode needs torchcsprng, which does not
install here; the site seeds torch from os.urandom in deployment (see client/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from fedshield.privacy.accountant import OPACUS_ACCOUNTANTS


def _layer_norm_grad_sample(layer: nn.LayerNorm, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' LayerNorm sampler, with an optional weight and bias (elementwise_affine, bias)."""
    x = activations[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = torch.nn.functional.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        ret[layer.weight] = sum_over_all_but_batch_and_last_n(normed * backprops, layer.weight.dim())
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, layer.bias.dim())
    return ret


register_grad_sampler(nn.LayerNorm)(_layer_norm_grad_sample)


def _rms_norm_grad_sample(layer: nn.Module, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    weight = layer.weight
    assert isinstance(weight, nn.Parameter)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if weight.requires_grad:
        x = activations[0].float()
        eps = float(getattr(layer, "variance_epsilon"))  # noqa: B009 - set by the registered classes
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(activations[0].dtype)
        ret[weight] = sum_over_all_but_batch_and_last_n(normed * backprops, weight.dim())
    return ret


def register_rms_norm(*classes: type[nn.Module]) -> None:
    """Per-sample gradients for RMSNorm classes of the form weight * x / rms(x) (Llama's:
    a `weight` and a `variance_epsilon`), instead of Opacus' functorch fallback."""
    for cls in classes:
        if cls not in GradSampleModule.GRAD_SAMPLERS:
            register_grad_sampler(cls)(_rms_norm_grad_sample)


@dataclass
class PrivateTraining:
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, ...]]
    criterion: nn.Module
    engine: PrivacyEngine


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
    accountant: str = "rdp",
    sample_rate: float | None = None,
    expected_batch_size: int | None = None,
    steps: int | None = None,
    criterion: nn.Module | None = None,
) -> PrivateTraining:
    """Wrap module/optimizer/loader for DP-SGD. `module` must be in train mode.

    `sample_rate`: the Poisson rate q (default: Opacus' 1 / len(loader), which is a function
    of the exact record count). Given, the loader is Opacus' own `DPDataLoader` at that rate
    (1 / q steps per epoch), and `expected_batch_size` replaces Opacus' int(n q) as the
    divisor of each step's noisy sum: with q and the divisor computed from a released
    (noisy) count, nothing in the update is a function of the exact count.

    `steps` (with `sample_rate`): the Poisson draws of one pass. Opacus' sampler runs
    int(1 / q) of them, and 1 / (1 / 93) is 92.99999999999999: for q = 1/93 it runs 92, and
    its accountant then logs q as 1 / len(loader) = 1/92, neither what the site planned.
    Given, the sampler runs exactly `steps` draws at rate q (its `steps` argument), and
    len(loader) = steps, so Opacus' log holds q itself when q = 1 / steps.

    `criterion` (default CrossEntropyLoss): a loss whose value is the mean over the batch
    of per-record losses (Opacus' loss_reduction="mean" undoes exactly that mean)."""
    module.train()
    # Opacus' accountant only logs the steps that ran (`spends`); fedshield's own accountant
    # (privacy.accountant) computes ε. "pld" is not an Opacus accountant: its log is the same.
    engine = PrivacyEngine(accountant=accountant if accountant in OPACUS_ACCOUNTANTS else "rdp")
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    poisson = True
    if sample_rate is not None:
        loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, generator=loader.generator)
        if steps is not None:  # the same loader (its collate builds empty batches), `steps` draws long
            sampler = UniformWithReplacementSampler(num_samples=len(loader.dataset),  # type: ignore[arg-type]
                                                    sample_rate=sample_rate, generator=loader.generator,
                                                    steps=int(steps))
            loader = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn,
                                generator=loader.generator)
        poisson = False  # the loader samples already; Opacus keeps it as it is
    common = dict(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=poisson, grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":  # ghost clipping wraps the loss too (two backward passes)
        m, opt, crit, dl = engine.make_private(criterion=criterion, **common)
    else:
        m, opt, dl = engine.make_private(**common)
        crit = criterion
    if expected_batch_size is not None:
        opt.expected_batch_size = int(expected_batch_size)
    return PrivateTraining(m, opt, dl, crit, engine)


def spends(engine: PrivacyEngine) -> list[tuple[float, float, int]]:
    """(noise_multiplier, sample_rate, steps) segments Opacus' accountant recorded."""
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]

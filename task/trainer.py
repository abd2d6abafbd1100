"""The local training loop of a site: DP-SGD through Opacus, or plain SGD without DP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dpsgd import make_private, spends
from privacy.errors import FedShieldError


class TrainingError(FedShieldError):
    """Local training produced something that must not leave the site."""


@dataclass
class LocalPlan:
    """What one round of local training does; agreed before any record is touched."""

    epochs: int
    batch_size: int
    max_physical_batch_size: int
    learning_rate: float
    optimizer: str
    dp: bool
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"
    accountant: str = "rdp"
    proximal_mu: float = 0.0
    # DP: the Poisson rate, from the count the site released (None: from the data, 1 /
    # batches_per_epoch(len(dataset))). Steps per epoch are 1 / q and every step's noisy sum
    # is divided by round(q * count): no figure of the update depends on the exact count.
    sample_rate: float | None = None
    expected_batch_size: int | None = None


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def poisson_rate(n: int, batch_size: int) -> float:
    """Opacus' DPDataLoader samples each record with q = 1 / len(loader)."""
    return 1.0 / batches_per_epoch(n, batch_size)


@dataclass
class LocalResult:
    mean_loss: float
    steps: int
    spends: list[tuple[float, float, int]]  # what Opacus' accountant recorded (DP only)


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_local(
    module: nn.Module,
    dataset: TensorDataset,
    plan: LocalPlan,
    *,
    device: torch.device,
    generator: torch.Generator,
) -> LocalResult:
    """Train `module` in place on `dataset` (inputs..., labels) for `plan.epochs` epochs.

    Without DP the batch gradient is clipped to the same max_grad_norm, so that a
    `privacy=none` baseline differs from the private run only by what DP adds (per-sample
    clipping, noise, Poisson sampling), not by an optimizer tuned for clipped steps.

    FedProx's proximal term is applied as a separate step w -= lr*mu*(w - w_global) after
    each optimizer step: it does not depend on the data, so it is post-processing of the
    private gradient (adding it to the loss would bypass Opacus' per-sample hooks).
    """
    module.to(device)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else []
    optimizer = _optimizer(plan.optimizer, params, plan.learning_rate)
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=True, generator=generator)
    criterion: nn.Module = nn.CrossEntropyLoss()
    engine = None
    if plan.dp:
        private = make_private(
            module,
            optimizer,
            loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            grad_sample_mode=plan.grad_sample_mode,
            accountant=plan.accountant,
            sample_rate=plan.sample_rate,
            expected_batch_size=plan.expected_batch_size,
        )
        module, optimizer, loader = private.module, private.optimizer, private.loader
        criterion, engine = private.criterion, private.engine

    losses: list[float] = []
    steps = 0
    for _ in range(plan.epochs):
        if plan.dp:
            with BatchMemoryManager(
                data_loader=loader,
                max_physical_batch_size=plan.max_physical_batch_size,
                optimizer=optimizer,
            ) as memory_safe_loader:
                steps += _epoch(module, optimizer, memory_safe_loader, criterion, device, losses, plan, params, anchors)
        else:
            steps += _epoch(module, optimizer, loader, criterion, device, losses, plan, params, anchors)
    for p in params:
        if not torch.isfinite(p).all():
            raise TrainingError(
                "local training diverged (non-finite weights); lower training.learning_rate"
            )
    return LocalResult(
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        spends=spends(engine) if engine is not None else [],
    )


def _epoch(module, optimizer, loader, criterion, device, losses, plan, params, anchors) -> int:
    steps = 0
    for batch in loader:
        *inputs, labels = (t.to(device) for t in batch)
        optimizer.zero_grad(set_to_none=True)
        if len(labels):
            loss = criterion(module(*inputs), labels)
            loss.backward()
            losses.append(float(loss.detach()))
            if not plan.dp:
                torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        elif plan.dp:
            # An empty Poisson batch takes the pure-noise step the accountant counts: the
            # forward and backward pass over zero records give Opacus empty per-sample
            # gradients (a summed loss: the mean of nothing would be NaN), which it clips to
            # a zero sum before adding its noise.
            empty = criterion(module(*inputs), labels)
            (empty.backward() if plan.grad_sample_mode == "ghost" else empty.sum().mul(0.0).backward())
        optimizer.step()
        if not getattr(optimizer, "_is_last_step_skipped", False):
            steps += 1
        if anchors:
            with torch.no_grad():
                for p, a in zip(params, anchors, strict=True):
                    p.sub_(plan.learning_rate * plan.proximal_mu * (p - a))
    return steps

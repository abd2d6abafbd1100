"""The local training loop of a site: DP-SGD through Opacus, or plain SGD without DP.

Steps. One pass of Poisson sampling at rate q = 1 / b (b = batches_per_epoch) is b draws:
`steps_per_epoch(q)` is THE number, and the site's plan (client/app.py, what it spends and
checks its budget with), the sampler (`train_local` hands it to Opacus' sampler) and the
coordinator's expectation (the same b) all take it from here. Opacus' own sampler would
run int(1 / q) draws, one fewer whenever 1 / (1 / b) rounds below b (b = 93, 99, 105, ...),
and log that run at q' = 1 / (b - 1): a site then refused every round for a spend that
differs from its plan.

Empty Poisson batches. A draw may select no record; the accountant counts that step all the
same (the noise alone is released). The step is taken without a forward pass (a transformer
cannot reshape zero rows: BERT's attention views a [0, heads, -1, width] tensor): the
per-sample gradients of zero records are set as an empty batch, which Opacus' optimizer
clips to a zero sum and noises, for every trainable view and both clipping modes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedshield.privacy.errors import FedShieldError


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


def steps_per_epoch(sample_rate: float) -> int:
    """The Poisson draws of one epoch at rate q: 1 / q, rounded (q = 1 / b gives b exactly;
    Opacus' int(1 / q) truncates 92.99999999999999 to 92). The one definition of a round's
    steps: the plan and the sampler both use it (module docstring)."""
    if not 0 < sample_rate <= 1:
        raise TrainingError(f"Poisson sample rate {sample_rate!r}: must be in (0, 1]")
    return max(1, round(1.0 / sample_rate))


def round_steps(sample_rate: float, epochs: int) -> int:
    """The DP-SGD steps of one round of `epochs` epochs at rate q: what the site spends."""
    return int(epochs) * steps_per_epoch(sample_rate)


@dataclass
class LocalResult:
    mean_loss: float
    steps: int
    spends: list[tuple[float, float, int]]  # what Opacus' accountant recorded (DP only)
    # Memory of the first physical batch's forward + backward (bytes, how it was measured):
    # the site's log only (a physical batch's size is a Poisson draw: it never leaves).
    batch_memory: tuple[int, str] | None = None


class _BatchMemory:
    """Memory one physical batch takes, measured at the first local step.

    CUDA: `torch.cuda.max_memory_allocated` over forward + backward (the allocator's own
    peak). CPU has no allocator statistics (tracemalloc does not see torch's allocations,
    and the process' maxrss is a high-water mark of everything before): an estimate is
    reported instead, the bytes of the trainable parameters and their gradients, of every
    leaf module's output in the forward pass (each storage once: what autograd and Opacus
    keep for the backward pass, roughly), and of Opacus' per-sample gradients: what a batch
    holds at its peak, minus transient workspace. (autograd's saved-tensor hooks would be
    exact, but Opacus' functorch fallback for layers it has no sampler for refuses them.)"""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: tuple[int, str] | None = None
        self._saved: dict[int, int] = {}  # storage address -> bytes (each storage once)

    def _record(self, _module: nn.Module, _args: object, output: object) -> None:
        for t in output if isinstance(output, (tuple, list)) else [getattr(output, "logits", output)]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self._saved[storage.data_ptr()] = storage.nbytes()

    @contextmanager
    def measure(self, module: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
        """Around the first forward + backward (later ones run as they are)."""
        if self.result is not None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.result = (int(torch.cuda.max_memory_allocated(self.device)), "cuda max_memory_allocated")
            return
        hooks = [m.register_forward_hook(self._record) for m in module.modules() if not any(m.children())]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        held = sum(2 * p.numel() * p.element_size() for p in params)  # weights + gradients
        per_sample = sum(int(g.numel() * g.element_size()) for p in params
                         if isinstance(g := getattr(p, "grad_sample", None), torch.Tensor))
        self.result = (held + sum(self._saved.values()) + per_sample,
                       "estimate: trainable weights + grads + layer outputs + per-sample grads")


def _optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
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
    # A module may name its own per-record-mean loss (task.causal_lm: per-document token mean).
    own_loss = getattr(module, "criterion", None)
    criterion: nn.Module = own_loss if isinstance(own_loss, nn.Module) else nn.CrossEntropyLoss()
    engine = None
    if plan.dp:
        # Opacus is imported when a site trains with DP, not with this module: a deployed
        # site's process per message (Flower's flwr-clientapp) that only says hello, sums
        # features or unmasks saves its 1.3 s import.
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        from fedshield.privacy.dpsgd import make_private, spends

        rate = plan.sample_rate if plan.sample_rate is not None else poisson_rate(len(dataset), plan.batch_size)
        private = make_private(
            module,
            optimizer,
            loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            grad_sample_mode=plan.grad_sample_mode,
            accountant=plan.accountant,
            sample_rate=rate,
            expected_batch_size=plan.expected_batch_size,
            steps=steps_per_epoch(rate),
            criterion=criterion,
        )
        module, optimizer, loader = private.module, private.optimizer, private.loader
        criterion, engine = private.criterion, private.engine

    losses: list[float] = []
    steps = 0
    memory = _BatchMemory(device)
    for _ in range(plan.epochs):
        if plan.dp:
            with BatchMemoryManager(
                data_loader=loader,
                max_physical_batch_size=plan.max_physical_batch_size,
                optimizer=optimizer,
            ) as memory_safe_loader:
                steps += _epoch(module, optimizer, memory_safe_loader, criterion, device, losses, plan, params, anchors,
                                memory)
        else:
            steps += _epoch(module, optimizer, loader, criterion, device, losses, plan, params, anchors, memory)
    for p in params:
        if not torch.isfinite(p).all():
            raise TrainingError(
                "local training diverged (non-finite weights); lower training.learning_rate"
            )
    return LocalResult(
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        spends=spends(engine) if engine is not None else [],
        batch_memory=memory.result,
    )


def _epoch(module: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[tuple[torch.Tensor, ...]],
           criterion: nn.Module, device: torch.device, losses: list[float], plan: LocalPlan,
           params: list[nn.Parameter], anchors: list[torch.Tensor], memory: _BatchMemory) -> int:
    steps = 0
    for batch in loader:
        *inputs, labels = (t.to(device) for t in batch)
        optimizer.zero_grad(set_to_none=True)
        if len(labels):
            with memory.measure(module, params):
                loss = criterion(module(*inputs), labels)
                loss.backward()
            losses.append(float(loss.detach()))
            if not plan.dp:
                torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        elif plan.dp:
            # An empty Poisson batch takes the pure-noise step the accountant counts, with
            # no forward pass (module docstring): zero records' per-sample gradients.
            _empty_batch(optimizer, plan.grad_sample_mode)
        optimizer.step()
        if not getattr(optimizer, "_is_last_step_skipped", False):
            steps += 1
        if anchors:
            with torch.no_grad():
                for p, a in zip(params, anchors, strict=True):
                    p.sub_(plan.learning_rate * plan.proximal_mu * (p - a))
    return steps


def _empty_batch(optimizer: torch.optim.Optimizer, grad_sample_mode: str) -> None:
    """What a backward pass over zero records leaves for Opacus' optimizer: per-sample
    gradients with a batch dimension of 0 (hooks: clipped to a zero sum), or a zero
    gradient (ghost clipping, which sums before its step). The optimizer adds the noise."""
    for p in _trainable(optimizer):
        if grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            # Opacus' per-sample gradients: an attribute its hooks set on parameters at run time
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters Opacus' optimizer steps (its `params`: those that require grad)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

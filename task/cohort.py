"""Local training of a whole cohort of sites at once: `train_local`, vectorised across sites.

The batched simulation engine (issue 18) runs many virtual sites in one process. Each site's
round is what `task.trainer.train_local` does; here the sites' trainable weights are stacked
along a leading site axis and one `torch.func.vmap` over sites (of a vmap over records, for
DP's per-sample gradients) computes every site's step in one call. At 1,000 sites a round the
per-site loop spends most of its time outside the arithmetic (DESIGN.md: vmap 937 updates/s
with DP against 13 through the per-message runtime).

What each site computes is `train_local`'s, up to float rounding (tests/test_cohort.py
compares weights, steps and spends for every supported module):
- The same records in the same order: each site's index batches come from the samplers
  `train_local` uses (Opacus' `UniformWithReplacementSampler` for DP, a shuffling
  `DataLoader` without), with the site's generator consumed exactly as there (a base seed
  per epoch, then the masks or the permutations): without DP through that `DataLoader`,
  with DP by the same draws made directly (`_schedule`).
- DP: per-sample gradients of the cross-entropy, Opacus' clipping factor
  (C / (norm + 1e-6)).clamp(max=1) over the flat norm of all trainable weights, the sum,
  Gaussian noise of std sigma * C drawn per weight in parameter order from a generator seeded
  as `torch.manual_seed(seed)` seeds the global one (the same stream), divided by the
  expected batch size. Physical batches (max_physical_batch_size) are processed as Opacus'
  BatchMemoryManager splits them (np.array_split), and FedProx' proximal step follows every
  physical batch, as in `train_local` (where it follows every `optimizer.step()` call,
  including the ones Opacus skips inside a logical batch). An empty Poisson batch takes the
  noise-only step.
- Without DP: the batch-mean gradient, clipped as `clip_grad_norm_` clips it.
- SGD with momentum 0.9 and AdamW (weight decay 0) are elementwise, so they are written here
  on the stacked tensors with a per-site learning rate (torch.optim's single-tensor
  formulas), and a site that has finished its steps stays where it is.

Speed. The default view (pooler + classifier on one [CLS] vector per record) is clipped
without per-sample gradients: a linear layer's per-sample gradient is an outer product,
so its norm and the clipped sum are matmuls (`_Chunk._pooler_head_sums`); the per-sample
path would write sites x batch x 150k floats per step. BERT layers (last_layers >= 1) and
the tabular MLP, whose trained weights are all linear layers' and layer norms', are clipped
the same way in general form (`_Chunk._ghost_sums`: ghost norms, Li et al. 2022, as Opacus'
fast gradient clipping computes them): one forward pass with each site's weights applied to
its own records, one backward pass to the layers' outputs, the norms from those, the sums by
one bmm per layer; at 128 sites of one 32-wide BERT layer, 1.5x the per-sample path
(bench/ghost_clipping.py).
Anything else takes the generic per-sample vmap; so does a chunk whose forward reads a trained
weight otherwise than once through F.linear / F.layer_norm (found as it runs). Chunks are
sized for the per-sample path either way: sites x physical batch x trainable weights x 4
bytes stay under `max_chunk_bytes`. The exact-noise rule costs one generator call per site, step and
weight (as train_local pays). bench/cohort.py measures both against a loop of train_local.
On a GPU the noise comes from a CUDA generator seeded alike (torch.manual_seed seeds it
too); equality with train_local there has not been checked on a GPU yet.

Dropout: the default view's one dropout (between pooler and classifier) takes each site's
masks from the site's own stream, one bernoulli_ per physical batch before that step's noise,
as nn.Dropout draws them in `train_local` (`draws_dropout_alike`; tested equal). Any other
module with active dropout is refused by `can_vectorise` (its masks would come from the
shared generator under vmap, so a site's result would depend on its worker's other sites):
the engine trains those one site at a time with `train_local` (simulations/batched.py).

Which modules: the default view (trainable=last_layers: BERT-style top layers + head on
the cached prefix), a BERT whose head alone trains (trainable=head), the tabular MLP.
`can_vectorise` names why anything else is refused; the engine trains those sites one by
one with `train_local`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedshield.task.model import TabularMLP, _BertSuffix, _FullBert, is_bert_like
from fedshield.task.trainer import LocalPlan, LocalResult, TrainingError, poisson_rate, steps_per_epoch

# Opacus' clipping and clip_grad_norm_ both add this to the norm before dividing.
_NORM_EPS = 1e-6
_SGD_MOMENTUM = 0.9
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
DEFAULT_MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class CohortJob:
    """One site's round: its starting weights, its records, its plan and its seed."""

    start: dict[str, torch.Tensor]  # trainable parameters by module.named_parameters() name
    dataset: TensorDataset  # (inputs..., labels), as train_local gets it
    plan: LocalPlan
    seed: int  # the site runs torch.manual_seed(seed); its generator is seeded seed + 1


@dataclass(frozen=True)
class CohortResult:
    params: dict[str, torch.Tensor]  # trained trainable weights (CPU), {} on error
    result: LocalResult | None
    error: Exception | None  # what train_local would have raised


def can_vectorise(module: nn.Module, plan: LocalPlan) -> str | None:
    """None if `train_cohort` trains `module` under `plan` as train_local would; else why not
    (one line)."""
    return module_refusal(module) or plan_refusal(plan)


def plan_refusal(plan: LocalPlan) -> str | None:
    """Why `train_cohort` cannot train under `plan` (one line); None if it can."""
    if plan.optimizer not in ("sgd", "adamw"):
        return f"optimizer {plan.optimizer!r}: the cohort trainer writes sgd and adamw"
    return None


def module_refusal(module: nn.Module) -> str | None:
    """Why `train_cohort` cannot train `module` as train_local would (one line); None if it
    can. A walk of the module: the batched engine asks once per view and round, not per site."""
    if isinstance(getattr(module, "criterion", None), nn.Module):
        return "the module brings its own loss (module.criterion); the cohort trainer uses cross-entropy"
    if getattr(module, "autograd_grad_sample_hooks", None):
        return "the module carries Opacus' per-sample hooks from an earlier train_local; build a fresh view"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return "the module has BatchNorm layers (running statistics are per-batch state)"
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        return "the module has no trainable weights"
    if isinstance(module, _FullBert) and _bert_head(module) is None:
        return "a whole BERT trains only with its head alone (training.trainable=head) in the cohort trainer"
    if not isinstance(module, (_BertSuffix, TabularMLP, _FullBert)):
        return f"{type(module).__name__}: only the last_layers and head views of BERT-style models and the tabular MLP"
    if has_dropout(module) and not draws_dropout_alike(module):
        # Masks drawn under vmap come from the shared generator: a site's result would depend
        # on which sites share its worker (so on the core count). train_local draws them
        # from the site's own stream, interleaved with its noise.
        return ("its dropout masks would be drawn from the shared generator under vmap, not from each site's "
                "own stream as train_local draws them")
    return None


def has_dropout(module: nn.Module) -> bool:
    """Whether training `module` draws dropout masks (nn.Dropout, or attention that calls the
    functional dropout with a rate it keeps as a number)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        for name in ("dropout_prob", "attention_dropout"):
            rate = getattr(m, name, 0.0)
            if isinstance(rate, float) and rate > 0:
                return True
    return False


def _bert_head(module: nn.Module) -> nn.Module | None:
    """The BERT classifier of a `_FullBert` whose classifier alone trains (trainable=head),
    else None. Its encoder is then a frozen trunk run outside vmap (transformers' mask
    builder branches on the data, which vmap cannot trace), once per physical batch."""
    if not isinstance(module, _FullBert) or not is_bert_like(module.model):
        return None
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if not trainable or not all(n.startswith("model.classifier.") for n in trainable):
        return None
    return module.model


_HEAD_PREFIX = "model.classifier."
_POOLER_HEAD = ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias")


def _is_pooler_head(module: nn.Module, names: list[str]) -> bool:
    """The default view (last_layers=0 on BERT): tanh(dense(x - center)), dropout, a linear
    classifier, on one [CLS] vector per record, and exactly those four weights trainable."""
    if not isinstance(module, _BertSuffix) or len(module.layers) or module.sequence_head:
        return False
    pooler = module.pooler
    return (pooler is not None and isinstance(pooler.get_submodule("dense"), nn.Linear)
            and isinstance(pooler.get_submodule("activation"), nn.Tanh)
            and isinstance(module.classifier, nn.Linear) and sorted(names) == sorted(_POOLER_HEAD))


def _ghost_clippable(module: nn.Module, names: list[str]) -> bool:
    """Whether DP's per-sample clipping of `module` can go without per-sample gradients
    (`_Chunk._ghost_sums`): a last_layers view or the tabular MLP (modules whose records
    never meet in the forward pass), every trainable weight the weight or bias of an
    nn.Linear or nn.LayerNorm. That each is then read once, through F.linear or F.layer_norm
    and nothing else, is checked as the forward runs (`_SiteWeights`)."""
    if not isinstance(module, (_BertSuffix, TabularMLP)):
        return False
    owners = {name: type(m) for name, m in module.named_modules()}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        if owners.get(owner) not in (nn.Linear, nn.LayerNorm) or leaf not in ("weight", "bias"):
            return False
    return True


class _NotGhostable(Exception):
    """A trained weight is read otherwise than once by F.linear or F.layer_norm."""


@dataclass
class _Use:
    """One F.linear / F.layer_norm call on sites' weights: their names (None: frozen), its
    input (F.layer_norm's: normalised, before the affine map) and its output."""

    kind: str  # "linear" | "norm"
    weight: str | None
    bias: str | None
    inputs: torch.Tensor
    output: torch.Tensor


class _SiteWeights(TorchFunctionMode):
    """The forward pass of `_Chunk._ghost_sums`: activations [sites x records, ...]
    (site-major), each trained weight stacked [sites, ...]. F.linear and F.layer_norm apply
    each site's weights to its own records (one bmm, one broadcast) and keep their inputs and
    outputs; anything else that reads a trained weight, or a second read, raises _NotGhostable."""

    def __init__(self, weights: dict[str, torch.Tensor], sites: int, records: int) -> None:
        super().__init__()
        self.names = {id(t): n for n, t in weights.items()}
        self.sites, self.records = sites, records
        self.uses: list[_Use] = []
        self.read: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return self._linear(*_arguments(args, kwargs, ("input", "weight", "bias"), (None,)))
        if func is F.layer_norm:
            return self._layer_norm(*_arguments(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                                (None, None, 1e-5)))
        if self._trained(*args, *kwargs.values()):
            raise _NotGhostable(f"{getattr(func, '__name__', func)} reads a trained weight")
        return func(*args, **kwargs)

    def _trained(self, *values: Any) -> bool:
        for v in values:
            if id(v) in self.names:
                return True
            if isinstance(v, (list, tuple)) and any(id(x) in self.names for x in v):
                return True
        return False

    def _take(self, t: torch.Tensor | None) -> str | None:
        name = None if t is None else self.names.get(id(t))
        if name is not None:
            if name in self.read:
                raise _NotGhostable(f"{name} is read twice")
            self.read.add(name)
        return name

    def _site_major(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != self.records:
            raise _NotGhostable("an activation is not one row per record")
        return x.reshape(self.sites, -1, x.shape[-1])

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self._take(weight), self._take(bias)
        if w is None and b is None:
            return F.linear(x, weight, bias)
        if w is None:
            raise _NotGhostable("a frozen weight with a trained bias")
        xs = self._site_major(x)
        if bias is None:
            z = torch.bmm(xs, weight.transpose(1, 2))
        else:
            z = torch.baddbmm(bias.unsqueeze(1) if b is not None else bias, xs, weight.transpose(1, 2))
        out = z.reshape(*x.shape[:-1], weight.shape[1])
        self.uses.append(_Use("linear", w, b, x.detach(), out))
        return out

    def _layer_norm(self, x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
        w, b = self._take(weight), self._take(bias)
        if w is None and b is None:
            return F.layer_norm(x, normalized_shape, weight, bias, eps)
        if len(normalized_shape) != 1:
            raise _NotGhostable("a layer norm over more than the last dimension")
        normed = F.layer_norm(x, normalized_shape, None, None, eps)
        z = self._site_major(normed)
        scale = None if weight is None else weight.unsqueeze(1) if w is not None else weight
        shift = None if bias is None else bias.unsqueeze(1) if b is not None else bias
        if scale is not None and shift is not None:
            z = torch.addcmul(shift, z, scale)
        elif scale is not None:
            z = z * scale
        elif shift is not None:
            z = z + shift
        out = z.reshape(normed.shape)
        self.uses.append(_Use("norm", w, b, normed.detach(), out))
        return out


def _arguments(args: Sequence[Any], kwargs: dict[str, Any], names: tuple[str, ...],
               defaults: tuple[Any, ...]) -> list[Any]:
    """A call's arguments in the order of `names` (positional or by keyword), the last
    `len(defaults)` of them optional."""
    given = dict(zip(names, args, strict=False))
    given.update(kwargs)
    optional = dict(zip(names[len(names) - len(defaults):], defaults, strict=True))
    return [given[n] if n in given else optional[n] for n in names]


def _live(inputs: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`inputs` and `grads` [records, positions, ...], only at the first position when the
    gradient is zero at every other (the top BERT layer's parts after its attention: only
    [CLS] is read), exactly: a zero row adds nothing to a norm or a sum."""
    if grads.shape[1] > 1 and not bool(grads[:, 1:].any()):
        return inputs[:, :1], grads[:, :1]
    return inputs, grads


def draws_dropout_alike(module: nn.Module) -> bool:
    """Whether `train_cohort` draws `module`'s dropout masks as train_local does: the default
    view, whose one dropout (between the pooler and the classifier) takes each site's masks
    from its own stream, physical batch by physical batch, before that step's noise. Other
    modules with active dropout get fresh masks under vmap (the same distribution, other draws)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return _is_pooler_head(module, names)


def _bert_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What BertForSequenceClassification's classifier reads, before its dropout: the pooled
    output, with the position and token-type ids `_FullBert` passes."""
    b, n = input_ids.shape
    position_ids = torch.arange(n, device=input_ids.device).repeat(b, 1)
    with torch.no_grad():
        out = model.get_submodule("bert")(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids))
    pooled: torch.Tensor = out[1]
    return pooled


class _Indices(Dataset[int]):
    """Record positions 0..n-1: the samplers' batches, without fetching the records."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _as_list(batch: list[int]) -> list[int]:
    return batch


Schedule = list[list[list[int]]]  # logical steps -> physical batches -> record positions


def _schedule(n: int, plan: LocalPlan, generator: torch.Generator) -> tuple[Schedule, float | None]:
    """The record positions of every step of `train_local`, drawn from `generator` exactly as
    its loaders draw them (each epoch's iterator takes a base seed from the loader's generator
    first, then the sampler draws); with the Poisson rate for DP."""
    steps: Schedule = []
    if not plan.dp:
        loader = DataLoader(_Indices(n), batch_size=plan.batch_size, shuffle=True, generator=generator,
                            collate_fn=_as_list)
        for _ in range(plan.epochs):
            steps.extend([batch] for batch in loader)
        return steps, None
    rate = plan.sample_rate if plan.sample_rate is not None else poisson_rate(n, plan.batch_size)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=generator,
                                            steps=steps_per_epoch(rate))
    for _ in range(plan.epochs):
        # What `DataLoader(batch_sampler=sampler, generator=generator)` draws, without
        # building that loader for every site (a tenth of a virtual site's round): each
        # epoch's iterator first takes its base seed from the generator
        # (torch/utils/data/dataloader.py), then the sampler draws its Poisson masks.
        # tests/test_cohort.py checks the positions and the generator's state against the loader.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        for batch in sampler:
            steps.append(_split(batch, plan.max_physical_batch_size) if batch else [[]])
    return steps, rate


def _split(batch: list[int], max_physical: int) -> list[list[int]]:
    """Opacus' BatchSplittingSampler: `np.array_split(batch, ceil(len / max_physical))`, the
    first pieces one longer where the length does not divide."""
    pieces = math.ceil(len(batch) / max_physical)
    size, longer = divmod(len(batch), pieces)
    out, start = [], 0
    for k in range(pieces):
        end = start + size + (1 if k < longer else 0)
        out.append(batch[start:end])
        start = end
    return out


@dataclass
class _Site:
    index: int  # position in the jobs
    job: CohortJob
    schedule: Schedule
    rate: float | None
    expected_batch: float
    noise: torch.Generator | None


def _prepare(index: int, job: CohortJob, names: list[str], device: torch.device) -> _Site:
    plan = job.plan
    if set(job.start) != set(names):
        odd = sorted(set(job.start) ^ set(names))
        raise TrainingError(f"the start weights do not match the module's trainable weights: {', '.join(odd[:3])}")
    n = len(job.dataset)
    torch_generator = torch.Generator().manual_seed(job.seed + 1)
    schedule, rate = _schedule(n, plan, torch_generator)
    expected = 1.0
    if plan.dp and rate is not None:
        # Opacus' default divisor: int(n * (1 / len(loader))), len(loader) = steps per epoch.
        expected = float(plan.expected_batch_size if plan.expected_batch_size is not None
                         else int(n * (1 / steps_per_epoch(rate))))
    # torch.manual_seed(seed) seeds the default generator of every device with `seed`: a
    # generator seeded alike gives the stream train_local's dropout masks and Opacus' noise
    # (generator=None) come from, in the order they are drawn there.
    noise = torch.Generator(device=device).manual_seed(job.seed)
    return _Site(index, job, schedule, rate, expected, noise)


def _group_key(site: _Site) -> tuple[object, ...]:
    shapes = tuple((tuple(t.shape[1:]), t.dtype) for t in site.job.dataset.tensors)
    return (site.job.plan.dp, site.job.plan.optimizer, shapes)


def train_cohort(module: nn.Module, jobs: Sequence[CohortJob], device: torch.device,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> list[CohortResult]:
    """Train every job as `train_local(module <- job.start, job.dataset, job.plan,
    generator=Generator().manual_seed(job.seed + 1))` after `torch.manual_seed(job.seed)`
    would; one result per job, in order. `module` (its frozen weights and buffers, shared by
    all jobs) is left as it was; `can_vectorise(module, job.plan)` must hold for every job.

    Sites are grouped by (DP, optimizer, record shapes), sorted by step count and cut into
    chunks whose stacked per-sample gradients take about `max_chunk_bytes` at most
    (sites x physical batch x trainable weights x 4 bytes, plus the weights' own state)."""
    refused = module_refusal(module)
    for job in jobs:
        reason = refused or plan_refusal(job.plan)
        if reason is not None:
            raise TrainingError(f"the cohort trainer cannot train this module: {reason}")
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    results: list[CohortResult | None] = [None] * len(jobs)
    sites: list[_Site] = []
    for i, job in enumerate(jobs):
        try:
            sites.append(_prepare(i, job, names, device))
        except Exception as exc:  # noqa: BLE001 - what train_local raises for this site, reported per site
            results[i] = CohortResult({}, None, exc)
    frozen = {n: p.detach().to(device) for n, p in module.named_parameters() if not p.requires_grad}
    frozen.update({n: b.to(device) for n, b in module.named_buffers()})
    numel = sum(p.numel() for _, p in trainable)
    modes = {m: m.training for m in module.modules()}
    module.train()  # train_local trains in train mode (dropout active)
    attention = _eager_attention(module)
    try:
        groups: dict[tuple[object, ...], list[_Site]] = {}
        for site in sites:
            groups.setdefault(_group_key(site), []).append(site)
        for members in groups.values():
            members.sort(key=lambda s: (len(s.schedule), len(s.job.dataset)))  # alike steps and widths
            for chunk in _chunks(members, numel, max_chunk_bytes, _is_pooler_head(module, names)):
                for site, result in zip(chunk, _Chunk(module, names, frozen, chunk, device).run(), strict=True):
                    results[site.index] = result
    finally:
        for m, training in modes.items():
            m.training = training
        for config, implementation in reversed(attention):
            config._attn_implementation = implementation
    return [r if r is not None else CohortResult({}, None, TrainingError("not trained")) for r in results]


def _eager_attention(module: nn.Module) -> list[tuple[Any, Any]]:
    """Switch transformers' attention to its eager form (put back by the caller): torch has
    no vmap batching rule for the CPU flash kernel behind SDPA (a slow per-sample fallback);
    the eager form is the same softmax(QK^T / sqrt(d) + mask) V in plain ops."""
    saved: list[tuple[Any, Any]] = []  # (config, its implementation); configs are unhashable
    for m in module.modules():
        config = getattr(m, "config", None)
        if (config is not None and hasattr(config, "_attn_implementation")
                and all(c is not config for c, _ in saved)):
            saved.append((config, config._attn_implementation))
            config._attn_implementation = "eager"
    return saved


def _chunks(sites: list[_Site], numel: int, max_bytes: int, matmul_clipping: bool) -> list[list[_Site]]:
    out: list[list[_Site]] = []
    current: list[_Site] = []
    used = 0
    for site in sites:
        plan = site.job.plan
        per_record = sum(t[0].numel() * t.element_size() for t in site.job.dataset.tensors) if len(
            site.job.dataset) else 0
        width = plan.max_physical_batch_size if plan.dp else plan.batch_size
        # per-sample gradients (DP, unless clipped by matmuls) or one batch gradient, + weights,
        # grads and optimizer state, + the batch's activations (roughly)
        per_sample = plan.dp and not matmul_clipping
        cost = 4 * numel * ((width if per_sample else 1) + 5) + 16 * width * per_record
        if current and used + cost > max_bytes:
            out.append(current)
            current, used = [], 0
        current.append(site)
        used += cost
    if current:
        out.append(current)
    return out


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-site scalars shaped to broadcast against a [sites, ...] tensor."""
    t = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))


class _Chunk:
    """A group of sites trained in lockstep: logical step t of every site, physical batch j of
    each logical step; a site steps its optimizer after its last physical batch."""

    def __init__(self, module: nn.Module, names: list[str], frozen: dict[str, torch.Tensor],
                 sites: list[_Site], device: torch.device) -> None:
        self.module, self.names, self.frozen, self.sites, self.device = module, names, frozen, sites, device
        self.plans = [s.job.plan for s in sites]
        self.dp = self.plans[0].dp
        self.sgd = self.plans[0].optimizer == "sgd"
        dtypes = {n: p.dtype for n, p in module.named_parameters()}
        self.params = {n: self._stacked([s.job.start[n] for s in sites], dtypes[n]) for n in names}
        fedprox = any(p.proximal_mu > 0 for p in self.plans)
        self.anchors = {n: t.clone() for n, t in self.params.items()} if fedprox else {}
        self.state_a = {n: torch.zeros_like(t) for n, t in self.params.items()}  # momentum / exp_avg
        self.state_b = {n: torch.zeros_like(t) for n, t in self.params.items()} if not self.sgd else {}
        self.summed = {n: torch.zeros_like(t) for n, t in self.params.items()} if self.dp else {}
        tensors = [s.job.dataset.tensors for s in sites]
        self.data = [torch.cat([ts[k] for ts in tensors]).to(device) for k in range(len(tensors[0]))]
        sizes = [len(s.job.dataset) for s in sites]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.bert = _bert_head(module)  # trainable=head: the encoder runs once, outside vmap
        self.pooler_head = _is_pooler_head(module, names)
        self.ghost = self.dp and not self.pooler_head and self.bert is None and _ghost_clippable(module, names)
        dropout = getattr(module, "dropout", None) if self.pooler_head else None
        self.keep = 1.0 - float(dropout.p) if isinstance(dropout, nn.Dropout) else 1.0  # the head's dropout
        self.inputs = 1 if self.bert is not None else len(self.data) - 1
        self.loss_sum = np.zeros(len(sites))
        self.loss_count = np.zeros(len(sites), dtype=np.int64)
        self.steps = np.zeros(len(sites), dtype=np.int64)
        self._per_site = self._dp_gradients() if self.dp else self._batch_gradients()

    def _stacked(self, starts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """[sites, ...] start weights; one broadcast copy when every site starts from the same
        tensor (the round's global weights, as the engine passes them)."""
        first = starts[0].detach().to(device=self.device, dtype=dtype)
        if all(t is starts[0] for t in starts):
            return first.unsqueeze(0).expand(len(starts), *first.shape).clone()
        return torch.stack([t.detach().to(device=self.device, dtype=dtype) for t in starts])

    # --- gradients -------------------------------------------------------------------------
    def _logits(self, params: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.bert is not None:  # inputs: the pooled features; BERT's head: dropout + classifier
            head = {n.removeprefix(_HEAD_PREFIX): p for n, p in params.items()}
            features = self.bert.get_submodule("dropout")(inputs[0])
            logits = functional_call(self.bert.get_submodule("classifier"), head, (features,))
            assert isinstance(logits, torch.Tensor)
            return logits
        out = functional_call(self.module, (params, self.frozen), tuple(inputs))
        assert isinstance(out, torch.Tensor)
        return out

    def _dp_gradients(self) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """(site weights [S, ...], inputs [S, B, ...]..., labels [S, B]) -> per-sample
        gradients [S, B, ...] and losses [S, B]: vmap over sites of a vmap over records."""

        def record_loss(params: dict[str, torch.Tensor], *record: torch.Tensor) -> torch.Tensor:
            *inputs, label = record
            logits = self._logits(params, [x.unsqueeze(0) for x in inputs])
            return F.cross_entropy(logits, label.unsqueeze(0))

        k = self.inputs + 1
        per_record = vmap(grad_and_value(record_loss), in_dims=(None, *([0] * k)), randomness="different")
        return vmap(per_record, in_dims=(0, *([0] * k)), randomness="different")

    def _batch_gradients(self) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """(site weights, mask [S, B], inputs..., labels) -> the batch-mean gradient and loss
        per site (padded rows masked out of the mean)."""

        def batch_loss(params: dict[str, torch.Tensor], mask: torch.Tensor, *batch: torch.Tensor) -> torch.Tensor:
            *inputs, labels = batch
            losses = F.cross_entropy(self._logits(params, inputs), labels, reduction="none")
            return torch.where(mask, losses, torch.zeros_like(losses)).sum() / mask.sum()

        k = self.inputs + 1
        return vmap(grad_and_value(batch_loss), in_dims=(0, 0, *([0] * k)), randomness="different")

    def _gather(self, rows: list[int], batches: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The records of `batches` (one per site in `rows`), padded to the widest with the
        site's own first record of the batch (masked out; never another site's record)."""
        width = max(len(b) for b in batches)
        idx = np.empty((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for r, (i, b) in enumerate(zip(rows, batches, strict=True)):
            idx[r, :] = self.offsets[i] + b[0]
            idx[r, : len(b)] = self.offsets[i] + np.asarray(b, dtype=np.int64)
            mask[r, : len(b)] = True
        at = torch.from_numpy(idx).to(self.device)
        gathered = [t[at] for t in self.data]
        if self.bert is not None:
            ids, attention, labels = gathered
            features = _bert_features(self.bert, ids.flatten(0, 1), attention.flatten(0, 1))
            gathered = [features.view(*ids.shape[:2], -1), labels]
        return gathered, torch.from_numpy(mask).to(self.device)

    def _rows(self, rows: list[int]) -> slice | torch.Tensor:
        """A slice where the rows are contiguous (sites sorted by steps: the active ones are
        the last ones; views, no copies), else an index tensor."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        return torch.tensor(rows, device=self.device)

    def _select(self, tensors: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        at = self._rows(rows)
        if isinstance(at, slice):
            return {n: t[at] for n, t in tensors.items()}
        return {n: t.index_select(0, at) for n, t in tensors.items()}

    def _blocks(self, rows: list[int], *tensors: dict[str, torch.Tensor]
                ) -> Iterator[tuple[slice, list[dict[str, torch.Tensor]]]]:
        """The contiguous runs of `rows` (sorted): their positions in `rows`, and views of
        `tensors` at them to update in place (no copies: sites sorted by steps and size make
        the runs long)."""
        k = 0
        while k < len(rows):
            end = k + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            at = slice(rows[k], rows[end - 1] + 1)
            yield slice(k, end), [{n: t[at] for n, t in group.items()} for group in tensors]
            k = end

    def _physical_batch(self, rows: list[int], batches: list[list[int]]) -> dict[str, torch.Tensor]:
        """DP: clip and add this physical batch's per-sample gradients into the sites' sums.
        Without DP: the sites' clipped batch gradients (returned)."""
        data, mask = self._gather(rows, batches)
        *inputs, labels = data
        params = self._select(self.params, rows)
        clip = [self.plans[i].max_grad_norm for i in rows]
        drop = self._dropout_masks(rows, batches, inputs[0].shape[1], inputs[0].shape[-1]) if self.pooler_head \
            else None
        if self.dp:
            # The clipped per-sample gradient sums, by the cheapest exact path the module allows.
            ghost = self._ghost_sums(params, inputs, labels, mask, clip) if self.ghost else None
            if self.pooler_head:
                sums, losses = self._pooler_head_sums(params, inputs[0], labels, mask, clip, drop)
            elif ghost is not None:
                sums, losses = ghost
            else:
                sums, losses = self._per_sample_sums(params, inputs, labels, mask, clip)
            for part, (summed,) in self._blocks(rows, self.summed):
                for n in self.names:
                    summed[n].add_(sums[n][part])
            batch_loss = torch.where(mask, losses, torch.zeros_like(losses)).sum(1) / mask.sum(1)
        else:
            grads, batch_loss = (self._pooler_head_batch(params, inputs[0], labels, mask, drop) if self.pooler_head
                                 else self._per_site(params, mask, *inputs, labels))
            # torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms
            total = torch.stack([grads[n].reshape(len(rows), -1).norm(2, dim=-1) for n in self.names],
                                dim=-1).norm(2, dim=-1)
            coef = (_column(clip, total) / (total + _NORM_EPS)).clamp(max=1.0)
            grads = {n: g * coef.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}
        for r, value in zip(rows, batch_loss.detach().cpu().tolist(), strict=True):
            self.loss_sum[r] += float(np.float32(value))
            self.loss_count[r] += 1
        return grads if not self.dp else {}

    def _per_sample_sums(self, params: dict[str, torch.Tensor], inputs: list[torch.Tensor], labels: torch.Tensor,
                         mask: torch.Tensor, clip: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """DP's clipped sums from per-sample gradients (`_dp_gradients`: any module the
        cohort trains): Opacus' factor over each record's flat norm, then the weighted sum."""
        grads, losses = self._per_site(params, *inputs, labels)
        sites, width = mask.shape
        norms = torch.stack([grads[n].reshape(sites, width, -1).norm(2, dim=-1) for n in self.names],
                            dim=-1).norm(2, dim=-1)
        factor = (_column(clip, norms) / (norms + _NORM_EPS)).clamp(max=1.0)
        factor = torch.where(mask, factor, torch.zeros_like(factor))
        return {n: torch.einsum("sb,sb...->s...", factor, grads[n]) for n in self.names}, losses

    def _dropout_masks(self, rows: list[int], batches: list[list[int]], width: int,
                       hidden: int) -> torch.Tensor | None:
        """The default view's dropout masks for this physical batch, [sites, width, hidden]:
        each site's drawn from its own stream as nn.Dropout draws them in train_local (one
        bernoulli_ over the physical batch, divided by the keep rate); None without dropout."""
        if self.keep == 1.0:
            return None
        masks = torch.ones(len(rows), width, hidden, device=self.device)
        for r, (i, batch) in enumerate(zip(rows, batches, strict=True)):
            drawn = torch.empty(len(batch), hidden, device=self.device)
            masks[r, : len(batch)] = drawn.bernoulli_(self.keep, generator=self.sites[i].noise).div_(self.keep)
        return masks

    def _pooler_head_batch(self, params: dict[str, torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                           mask: torch.Tensor, drop: torch.Tensor | None
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Without DP, the default view: each site's gradient of its batch-mean loss (one
        backward pass over all sites: a site's loss reaches only its own weights)."""
        own = {n: params[n].detach().requires_grad_(True) for n in self.names}
        x = hidden[:, :, 0, :] - self.frozen["center"]
        with torch.enable_grad():
            z1 = torch.baddbmm(own["pooler.dense.bias"].unsqueeze(1), x, own["pooler.dense.weight"].transpose(1, 2))
            a = torch.tanh(z1) if drop is None else torch.tanh(z1) * drop
            z2 = torch.baddbmm(own["classifier.bias"].unsqueeze(1), a, own["classifier.weight"].transpose(1, 2))
            losses = F.cross_entropy(z2.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
            per_site = torch.where(mask, losses, torch.zeros_like(losses)).sum(1) / mask.sum(1)
            grads = torch.autograd.grad(per_site.sum(), [own[n] for n in self.names])
        return dict(zip(self.names, grads, strict=True)), per_site.detach()

    def _ghost_sums(self, params: dict[str, torch.Tensor], inputs: list[torch.Tensor], labels: torch.Tensor,
                    mask: torch.Tensor, clip: list[float]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """DP's clipped per-sample gradient sums and the losses [sites, batch] without
        per-sample gradients (`_ghost_clippable` modules; None, and the per-sample path from
        then on, if the forward reads a trained weight otherwise: `_SiteWeights`).

        One forward pass over every site's records (each site's weights applied to its own
        rows), one backward pass to each linear layer's and layer norm's output, then per
        record, from its input x and output gradient g (positions t): a linear layer's weight
        gradient is sum_t g_t x_t^T, whose squared norm is sum_{t,t'} (g_t.g_t')(x_t.x_t')
        (the "ghost norm", Li et al. 2022, Opacus' fast gradient clipping) or, where that is
        the larger product, the norm of the gradient formed per record; a bias's is sum_t g_t;
        a layer norm's weight's sum_t g_t * x_t. Clipped by Opacus' factor over the norm of all
        of them, each site's sum is one bmm of its records' (factor x g) and x. The same
        factors and sums as `_dp_gradients`' up to float rounding (tests/test_cohort.py)."""
        sites, width = mask.shape
        records = sites * width
        weights = {n: params[n].detach().requires_grad_(True) for n in self.names}
        mode = _SiteWeights(weights, sites, records)
        try:
            with torch.enable_grad():
                with mode:
                    logits = self._logits(weights, [x.flatten(0, 1) for x in inputs])
                losses = F.cross_entropy(logits, labels.flatten(), reduction="none")
                grads = torch.autograd.grad(losses.sum(), [u.output for u in mode.uses]) if mode.uses else ()
        except Exception:  # noqa: BLE001  _NotGhostable, or anything else: the per-sample path says what
            self.ghost = False
            return None
        pairs = [_live(u.inputs.reshape(records, -1, u.inputs.shape[-1]), g.reshape(records, -1, g.shape[-1]))
                 for u, g in zip(mode.uses, grads, strict=True)]
        squared = torch.zeros(records, dtype=logits.dtype, device=self.device)
        for use, (x, g) in zip(mode.uses, pairs, strict=True):
            if use.weight is not None and use.kind == "linear":
                positions, fan = x.shape[1], x.shape[2] * g.shape[2]
                if positions == 1:
                    squared += g[:, 0].square().sum(-1) * x[:, 0].square().sum(-1)
                elif positions * (x.shape[2] + g.shape[2]) <= fan:
                    squared += (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
                else:
                    squared += torch.bmm(g.transpose(1, 2), x).square().sum((1, 2))
            elif use.weight is not None:
                squared += (g * x).sum(1).square().sum(-1)
            if use.bias is not None:
                squared += g.sum(1).square().sum(-1)
        norms = squared.sqrt().view(sites, width)
        factor = (_column(clip, norms) / (norms + _NORM_EPS)).clamp(max=1.0)
        factor = torch.where(mask, factor, torch.zeros_like(factor)).view(records, 1, 1)
        sums = {n: torch.zeros_like(params[n]) for n in self.names}  # a weight the forward never read: 0
        for use, (x, g) in zip(mode.uses, pairs, strict=True):
            scaled = (g * factor).reshape(sites, -1, g.shape[-1])
            if use.weight is not None:
                by_site = x.reshape(sites, -1, x.shape[-1])
                sums[use.weight] = (torch.bmm(scaled.transpose(1, 2), by_site) if use.kind == "linear"
                                    else (scaled * by_site).sum(1))
            if use.bias is not None:
                sums[use.bias] = scaled.sum(1)
        return sums, losses.detach().view(sites, width)

    def _pooler_head_sums(self, params: dict[str, torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                          mask: torch.Tensor, clip: list[float], drop: torch.Tensor | None
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The default view's clipped per-sample gradient sums without materialising them.

        A linear layer's per-sample weight gradient on one input vector x_i is the outer
        product g_i x_i^T (g_i: the gradient at its output), so its norm is |g_i| |x_i| and
        the clipped sum over the batch is (c * G)^T X, one matmul (Opacus' ghost clipping
        identities, Li et al. 2022). g_i of both layers come from one backward pass over
        the batch (a record's loss reaches only its own row). The same clipping factors
        and sums as the per-sample path, in a fraction of the memory traffic."""
        assert isinstance(self.module, _BertSuffix) and self.module.pooler is not None
        w1, b1 = params["pooler.dense.weight"], params["pooler.dense.bias"]
        w2, b2 = params["classifier.weight"], params["classifier.bias"]
        x = hidden[:, :, 0, :] - self.frozen["center"]  # [sites, batch, hidden]: the [CLS] feature
        with torch.enable_grad():
            z1 = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)).requires_grad_(True)
            a = self.module.pooler.get_submodule("activation")(z1)
            if drop is not None:  # nn.Dropout's arithmetic with the site's own masks
                a = a * drop
            z2 = torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2))
            losses = F.cross_entropy(z2.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
            g1, g2 = torch.autograd.grad(losses.sum(), [z1, z2])
        a = a.detach()
        squared = (g2.square().sum(-1) * (a.square().sum(-1) + 1)  # classifier weight + bias
                   + g1.square().sum(-1) * (x.square().sum(-1) + 1))  # pooler weight + bias
        norms = squared.sqrt()
        factor = (_column(clip, norms) / (norms + _NORM_EPS)).clamp(max=1.0)
        factor = torch.where(mask, factor, torch.zeros_like(factor)).unsqueeze(-1)
        c1, c2 = factor * g1, factor * g2
        sums = {"pooler.dense.weight": torch.bmm(c1.transpose(1, 2), x), "pooler.dense.bias": c1.sum(1),
                "classifier.weight": torch.bmm(c2.transpose(1, 2), a), "classifier.bias": c2.sum(1)}
        return sums, losses.detach()

    # --- steps -----------------------------------------------------------------------------
    def _noisy_mean(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Opacus' add_noise + scale_grad for the sites in `rows`: noise per weight in
        parameter order from each site's own stream (drawn in place: the same numbers as
        Opacus' torch.normal), added to the clipped sum, / expected batch size."""
        summed = self._select(self.summed, rows)
        noisy = {n: torch.empty_like(t) for n, t in summed.items()}
        by_site = list(zip(*(noisy[n].unbind(0) for n in self.names), strict=True))  # [site][weight]: row views
        for k, i in enumerate(rows):
            std = self.plans[i].noise_multiplier * self.plans[i].max_grad_norm
            generator = self.sites[i].noise
            for row in by_site[k]:
                if std == 0:  # Opacus draws nothing for a zero std
                    row.zero_()
                else:
                    row.normal_(0.0, std, generator=generator)
        divisor = [self.sites[i].expected_batch for i in rows]
        return {n: noisy[n].add_(summed[n]).div_(_column(divisor, summed[n])) for n in self.names}

    def _optimizer_step(self, rows: list[int], grads: dict[str, torch.Tensor], step: int) -> None:
        """torch.optim's single-tensor SGD (momentum 0.9) or AdamW (weight decay 0), per site
        (its formulas, in place; a per-site learning rate where torch has a scalar)."""
        lr = [self.plans[i].learning_rate for i in rows]
        state = (self.params, self.state_a) if self.sgd else (self.params, self.state_a, self.state_b)
        beta1, beta2 = _ADAM_BETAS
        # every site of a chunk takes its (step + 1)-th step together
        correction1 = 1 - beta1 ** (step + 1)
        correction2_sqrt = math.sqrt(1 - beta2 ** (step + 1))
        for part, groups in self._blocks(rows, *state):
            params, a = groups[0], groups[1]
            for n in self.names:
                g = grads[n][part]
                if self.sgd:
                    a[n].mul_(_SGD_MOMENTUM).add_(g)  # zeros at first: buf = grad, as torch's
                    params[n].addcmul_(_column([-x for x in lr[part]], params[n]), a[n])
                    continue
                b = groups[2]
                a[n].lerp_(g, 1 - beta1)
                b[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (b[n].sqrt() / correction2_sqrt).add_(_ADAM_EPS)
                params[n].addcmul_(_column([-x / correction1 for x in lr[part]], params[n]), a[n] / denom)

    def _proximal_step(self, rows: list[int]) -> None:
        """FedProx: w -= lr * mu * (w - w_start), after every optimizer.step() call."""
        rows = [i for i in rows if self.plans[i].proximal_mu > 0]
        if not rows:
            return
        coef = [-self.plans[i].learning_rate * self.plans[i].proximal_mu for i in rows]
        for part, (params, anchors) in self._blocks(rows, self.params, self.anchors):
            for n in self.names:
                params[n].addcmul_(_column(coef[part], params[n]), params[n] - anchors[n])

    def run(self) -> list[CohortResult]:
        horizon = max((len(s.schedule) for s in self.sites), default=0)
        for t in range(horizon):
            active = [i for i, s in enumerate(self.sites) if t < len(s.schedule)]
            pieces = max(len(self.sites[i].schedule[t]) for i in active)
            for j in range(pieces):
                here = [i for i in active if j < len(self.sites[i].schedule[t])]
                with_records = [i for i in here if self.sites[i].schedule[t][j]]
                grads: dict[str, torch.Tensor] = {}
                if with_records:
                    grads = self._physical_batch(with_records, [self.sites[i].schedule[t][j] for i in with_records])
                last = [i for i in here if j == len(self.sites[i].schedule[t]) - 1]
                if self.dp and last:
                    for part, (summed,) in self._blocks(last, self.summed):
                        block = last[part]
                        self._optimizer_step(block, self._noisy_mean(block), t)
                        for v in summed.values():
                            v.zero_()
                elif not self.dp and with_records:
                    self._optimizer_step(with_records, grads, t)
                for i in last:
                    self.steps[i] += 1
                self._proximal_step(here)
        weights = {n: t.detach().cpu() for n, t in self.params.items()}
        finite = torch.stack([torch.isfinite(w).flatten(1).all(1) for w in weights.values()]).all(0).tolist()
        rows = {n: w.unbind(0) for n, w in weights.items()}  # the sites' rows, split once (not indexed one by one)
        return [self._result(r, finite[r], rows) for r in range(len(self.sites))]

    def _result(self, r: int, finite: bool, rows: dict[str, tuple[torch.Tensor, ...]]) -> CohortResult:
        site, plan = self.sites[r], self.plans[r]
        if not finite:
            return CohortResult({}, None, TrainingError(
                "local training diverged (non-finite weights); lower training.learning_rate"))
        steps = int(self.steps[r])
        # Opacus' accountant logs q as 1 / len(loader) = 1 / steps per epoch, one segment.
        spends = ([(float(plan.noise_multiplier), 1.0 / steps_per_epoch(site.rate), steps)]
                  if plan.dp and site.rate is not None and steps else [])
        mean_loss = float(self.loss_sum[r] / self.loss_count[r]) if self.loss_count[r] else float("nan")
        return CohortResult({n: w[r] for n, w in rows.items()},  # rows of one chunk-wide tensor
                            LocalResult(mean_loss=mean_loss, steps=steps, spends=spends), None)

"""The cohort trainer (task/cohort.py) trains every site as train_local would: the same
weights (up to float rounding), steps and spends, site by site, for the modules it
vectorises; it refuses the others with a reason and reports a diverging site alone."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedshield.task.cohort import CohortJob, _ghost_clippable, _schedule, can_vectorise, train_cohort
from fedshield.task.model import ModelError, TabularMLP, make_train_view
from fedshield.task.trainer import LocalPlan, TrainingError, train_local

CPU = torch.device("cpu")
HIDDEN = 32


def _bert(num_labels: int = 3, dropout: float = 0.0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        classifier_dropout=dropout)
    return BertForSequenceClassification(config)


def _view(trainable: str = "last_layers", last_layers: int = 0, dropout: float = 0.0) -> nn.Module:
    return make_train_view(_bert(dropout=dropout), trainable, last_layers, 4, 8).module


def _features(n: int, length: int, seed: int) -> TensorDataset:
    """Cached prefix states (the last_layers view's inputs): [n, length, hidden], a mask, labels."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(n, length, dtype=torch.long)
    if length > 1:
        attention[:, length // 2:] = (torch.rand(n, length - length // 2, generator=g) < 0.5).long()
    return TensorDataset(torch.randn(n, length, HIDDEN, generator=g), attention,
                         torch.randint(0, 3, (n,), generator=g))


def _start(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Trainable weights a little away from the module's own (sites start where the server says)."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g)
            for n, p in module.named_parameters() if p.requires_grad}


def _plan(**kw: object) -> LocalPlan:
    base: dict[str, object] = dict(epochs=2, batch_size=8, max_physical_batch_size=4, learning_rate=0.5,
                                   optimizer="sgd", dp=True, noise_multiplier=0.8, max_grad_norm=1.0)
    base.update(kw)
    return LocalPlan(**base)  # type: ignore[arg-type]


def _reference(module: nn.Module, job: CohortJob):
    """train_local on a copy of the module, seeded as the site seeds it."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in job.start:
                p.copy_(job.start[n])
    torch.manual_seed(job.seed)
    try:
        generator = torch.Generator().manual_seed(job.seed + 1)
        result = train_local(m, job.dataset, job.plan, device=CPU, generator=generator)
    except Exception as exc:  # noqa: BLE001 - compared with the cohort's error
        return None, exc
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}, result


def _assert_like_train_local(module: nn.Module, jobs: list[CohortJob], atol: float = 1e-5, **kw: object) -> list:
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    out = train_cohort(module, jobs, CPU, **kw)  # type: ignore[arg-type]
    assert len(out) == len(jobs)
    # the shared module is left as it was
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    for job, got in zip(jobs, out, strict=True):
        params, expected = _reference(module, job)
        if params is None:
            assert got.error is not None and type(got.error) is type(expected) and str(got.error) == str(expected)
            assert got.params == {} and got.result is None
            continue
        assert got.error is None, got.error
        assert set(got.params) == set(params)
        for n in params:
            gap = (got.params[n] - params[n]).abs().max()
            assert torch.allclose(got.params[n], params[n], atol=atol, rtol=1e-5), (n, job.plan, gap)
        assert got.result.steps == expected.steps
        assert got.result.spends == expected.spends
        assert got.result.batch_memory is None
        assert got.result.mean_loss == pytest.approx(expected.mean_loss, rel=1e-4)
    return out


def test_dp_sites_of_different_sizes_rates_and_optimizers_match_train_local():
    """Different n, q, expected batch and steps; a site whose Poisson batches are often empty
    (q = 1/12 of 5 records: noise-only steps) and sites whose batches exceed the physical
    batch (split as Opacus' BatchMemoryManager splits them, with FedProx after each piece)."""
    module = _view()
    start = _start(module)
    sites = [  # (records, plan)
        (5, _plan(sample_rate=1 / 12, expected_batch_size=1)),
        (13, _plan(proximal_mu=0.3)),
        (48, _plan(optimizer="adamw", learning_rate=0.01)),
        (71, _plan(optimizer="adamw", learning_rate=0.02, proximal_mu=0.5, batch_size=16,
                   max_physical_batch_size=5, noise_multiplier=1.3)),
        (90, _plan(sample_rate=0.2, expected_batch_size=17, epochs=1, max_grad_norm=0.5)),
    ]
    jobs = [CohortJob(start, _features(n, 1, seed=i), plan, seed=100 + i) for i, (n, plan) in enumerate(sites)]
    # the cases named above really occur in these draws
    schedules = [_schedule(len(j.dataset), j.plan, torch.Generator().manual_seed(j.seed + 1))[0] for j in jobs]
    assert any(step == [[]] for step in schedules[0])
    assert any(len(step) > 1 for step in schedules[1]) and any(len(step) > 1 for step in schedules[3])
    assert len({len(s) for s in schedules}) == len(jobs)  # every site its own step count
    _assert_like_train_local(module, jobs)


def _loader_schedule(n: int, plan: LocalPlan, generator: torch.Generator) -> list[list[list[int]]]:
    """The DP positions as train_local's loader draws them: Opacus' Poisson sampler in a
    DataLoader on the site's generator, each batch split as np.array_split splits it."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import DataLoader

    from fedshield.task.trainer import steps_per_epoch

    rate = float(plan.sample_rate)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=generator,
                                            steps=steps_per_epoch(rate))
    loader = DataLoader(list(range(n)), batch_sampler=sampler, collate_fn=list, generator=generator)
    steps: list[list[list[int]]] = []
    for _ in range(plan.epochs):
        for batch in loader:
            pieces = np.array_split(batch, math.ceil(len(batch) / plan.max_physical_batch_size)) if batch else [[]]
            steps.append([[int(i) for i in piece] for piece in pieces])
    return steps


@pytest.mark.parametrize("n, rate, epochs, physical", [
    (1, 1.0, 1, 1), (5, 1 / 12, 3, 4), (13, 0.25, 2, 3), (64, 0.125, 1, 8), (100, 0.3, 2, 7), (257, 0.05, 1, 2),
])
def test_dp_schedule_draws_what_opacus_sampler_in_a_dataloader_draws(n, rate, epochs, physical):
    """`_schedule` makes the loader's draws without the loader: the same positions, the same
    pieces (empty batches, uneven splits), and the generator left in the same state."""
    plan = _plan(sample_rate=rate, epochs=epochs, max_physical_batch_size=physical)
    for seed in range(5):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got, got_rate = _schedule(n, plan, ours)
        assert got == _loader_schedule(n, plan, theirs)
        assert got_rate == rate
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_non_private_sgd_and_adamw_with_proximal_term_match_train_local():
    module = _view()
    plans = [_plan(dp=False, proximal_mu=mu, optimizer=opt, learning_rate=lr, batch_size=bs, epochs=3)
             for mu in (0.0, 0.4) for opt, lr in (("sgd", 1.0), ("adamw", 0.01)) for bs in (4, 16)]
    # each site from its own start weights (the other tests: one start shared by all)
    jobs = [CohortJob(_start(module, seed=i), _features(9 + 6 * i, 1, seed=i), plan, seed=7 * i)
            for i, plan in enumerate(plans)]
    _assert_like_train_local(module, jobs)


@pytest.mark.parametrize("mode", ["ghost", "functorch"])
def test_other_grad_sample_modes_are_the_same_math(mode):
    """Opacus' ghost clipping and functorch per-sample gradients clip and noise alike."""
    module = _view()
    start = _start(module)
    jobs = [CohortJob(start, _features(n, 1, seed=n), _plan(grad_sample_mode=mode, proximal_mu=0.2 * (n > 20)), seed=n)
            for n in (7, 33)]
    _assert_like_train_local(module, jobs)


def test_a_trained_bert_layer_matches_train_local():
    """last_layers=1: a BERT layer (attention over a padded mask) under vmap, DP and not."""
    module = _view(last_layers=1)
    start = _start(module)
    jobs = [CohortJob(start, _features(n, 6, seed=n), _plan(dp=dp, epochs=1, learning_rate=0.3), seed=n)
            for n, dp in ((11, True), (19, True), (14, False))]
    _assert_like_train_local(module, jobs)
    assert module.config._attn_implementation != "eager"  # put back


def test_bert_head_and_tabular_mlp_match_train_local():
    module = _view(trainable="head")
    start = _start(module)

    def ids(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        attention = torch.ones(n, 6, dtype=torch.long)
        attention[: n // 2, 4:] = 0
        return TensorDataset(torch.randint(1, 100, (n, 6), generator=g), attention,
                             torch.randint(0, 3, (n,), generator=g))

    jobs = [CohortJob(start, ids(n, n), _plan(dp=dp, epochs=1, batch_size=4, max_physical_batch_size=3), seed=n)
            for n, dp in ((9, True), (15, True), (10, False))]
    _assert_like_train_local(module, jobs)

    torch.manual_seed(0)
    mlp = TabularMLP(5, 3, 8)
    start = _start(mlp)

    def rows(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))

    jobs = [CohortJob(start, rows(n, n), _plan(dp=dp, epochs=3, batch_size=4, max_physical_batch_size=2), seed=n)
            for n, dp in ((6, True), (23, True), (17, False), (30, False))]
    _assert_like_train_local(mlp, jobs)


def test_a_diverging_site_fails_alone_and_a_site_without_records_as_train_local_does():
    module = _view()
    start = _start(module)
    jobs = [CohortJob(start, _features(20, 1, seed=1), _plan(), seed=1),
            CohortJob(start, _features(20, 1, seed=2), _plan(learning_rate=1e38, noise_multiplier=50.0), seed=2),
            CohortJob(start, _features(20, 1, seed=3), _plan(dp=False, learning_rate=1e38), seed=3),
            CohortJob(start, _features(0, 1, seed=4), _plan(), seed=4),
            CohortJob(start, _features(25, 1, seed=5), _plan(dp=False), seed=5)]
    out = _assert_like_train_local(module, jobs)
    assert [type(r.error).__name__ if r.error else None for r in out] == [
        None, "TrainingError", "TrainingError", "ValueError", None]
    assert "diverged" in str(out[1].error)
    partial = {n: t for n, t in start.items() if n != "classifier.bias"}
    out = train_cohort(module, [CohortJob(partial, _features(20, 1, seed=1), _plan(), seed=1), jobs[0]], CPU)
    assert isinstance(out[0].error, TrainingError) and "classifier.bias" in str(out[0].error)
    assert out[1].error is None


def test_the_default_views_matmul_clipping_equals_per_sample_gradients(monkeypatch):
    """The default view (pooler + classifier) clips by the outer-product identities, without
    per-sample gradients; the generic vmap path gives the same weights."""
    from fedshield.task import cohort

    module = _view()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert cohort._is_pooler_head(module, names)
    start = _start(module)
    jobs = [CohortJob(start, _features(n, 1, seed=n), _plan(max_physical_batch_size=3), seed=n) for n in (6, 25)]
    fast = train_cohort(module, jobs, CPU)
    monkeypatch.setattr(cohort, "_is_pooler_head", lambda *_: False)
    generic = train_cohort(module, jobs, CPU)
    for a, b in zip(fast, generic, strict=True):
        assert a.result is not None and b.result is not None
        assert a.result.mean_loss == pytest.approx(b.result.mean_loss, rel=1e-5)
        for n in names:
            assert torch.allclose(a.params[n], b.params[n], atol=1e-6)


_GHOST_CLIPPABLE = _ghost_clippable


def _ghost_and_per_sample(module: nn.Module, jobs: list[CohortJob], monkeypatch) -> tuple[list, list, dict]:
    """train_cohort twice: as it runs (counting which DP path each physical batch took), and
    with the ghost clipping turned off (the per-sample vmap path)."""
    from fedshield.task import cohort

    taken = {"ghost": 0, "per-sample": 0}
    real = cohort._Chunk._ghost_sums

    def counted(self, *args):
        out = real(self, *args)
        taken["ghost" if out is not None else "per-sample"] += 1
        return out

    monkeypatch.setattr(cohort._Chunk, "_ghost_sums", counted)
    monkeypatch.setattr(cohort, "_ghost_clippable", _GHOST_CLIPPABLE)  # as it is (a caller may have turned it off)
    fast = train_cohort(module, jobs, CPU)
    monkeypatch.setattr(cohort, "_ghost_clippable", lambda *_: False)
    generic = train_cohort(module, jobs, CPU)
    return fast, generic, taken


@pytest.mark.parametrize("last_layers", [1, 2])
def test_ghost_clipping_equals_per_sample_gradients(last_layers, monkeypatch):
    """BERT layers and the tabular MLP are clipped from each linear layer's and layer norm's
    inputs and output gradients (ghost norms), never forming per-sample gradients: the same
    weights, losses and steps as the per-sample path. Two layers: the lower one's gradient
    lives at every position (the Gram form of the norm); the top one's after its attention
    only at [CLS] (the rest skipped, exactly)."""
    module = _view(last_layers=last_layers)
    start = _start(module)
    jobs = [CohortJob(start, _features(n, 9, seed=n), _plan(max_physical_batch_size=3), seed=n) for n in (6, 17)]
    fast, generic, taken = _ghost_and_per_sample(module, jobs, monkeypatch)
    assert taken["ghost"] > 0 and taken["per-sample"] == 0
    for a, b in zip(fast, generic, strict=True):
        assert a.result is not None and b.result is not None and a.result.steps == b.result.steps
        assert a.result.mean_loss == pytest.approx(b.result.mean_loss, rel=1e-5)
        for n in b.params:
            assert torch.allclose(a.params[n], b.params[n], atol=1e-6), n

    for kind in (TabularMLP, _LinearByKeyword):  # F.linear called as nn.Linear calls it, and by keyword
        torch.manual_seed(0)
        mlp = kind(5, 3, 8)
        rows = [TensorDataset(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (9, 14)]
        jobs = [CohortJob(_start(mlp), ds, _plan(max_physical_batch_size=4), seed=i) for i, ds in enumerate(rows)]
        fast, generic, taken = _ghost_and_per_sample(mlp, jobs, monkeypatch)
        assert taken["ghost"] > 0 and taken["per-sample"] == 0, kind
        for a, b in zip(fast, generic, strict=True):
            for n in b.params:
                assert torch.allclose(a.params[n], b.params[n], atol=1e-6), n


class _LinearByKeyword(TabularMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.net[0]
        hidden = torch.nn.functional.linear(input=x, weight=first.weight, bias=first.bias)
        return self.net[2](self.net[1](hidden))


class _ReadsAWeightTwice(TabularMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out + 0.5 * self.net[2](self.net[1](self.net[0](x)))  # net[2]'s weight a second time


class _ReadsAWeightOtherwise(TabularMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.net[0].weight.sum() * 1e-3  # a trained weight outside F.linear


@pytest.mark.parametrize("kind", [_ReadsAWeightTwice, _ReadsAWeightOtherwise])
def test_a_module_that_reads_a_trained_weight_otherwise_takes_the_per_sample_path(kind, monkeypatch):
    """A ghost norm holds for one F.linear / F.layer_norm read of each weight: a second read,
    or any other, is seen as the forward runs and the chunk goes on per sample (the same
    weights as the per-sample path throughout)."""
    torch.manual_seed(0)
    mlp = kind(5, 3, 8)
    rows = [TensorDataset(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (9, 14)]
    jobs = [CohortJob(_start(mlp), ds, _plan(max_physical_batch_size=4), seed=i) for i, ds in enumerate(rows)]
    fast, generic, taken = _ghost_and_per_sample(mlp, jobs, monkeypatch)
    assert taken == {"ghost": 0, "per-sample": 1}  # tried once; the chunk's later batches go per sample
    for a, b in zip(fast, generic, strict=True):
        for n in b.params:
            assert torch.equal(a.params[n], b.params[n]), n


def test_chunking_changes_nothing():
    """One site per chunk (a budget below one site) or all together: the same sites' results."""
    module = _view()
    start = _start(module)
    jobs = [CohortJob(start, _features(7 + 5 * i, 1, seed=i), _plan(dp=i % 2 == 0), seed=i) for i in range(4)]
    alone = train_cohort(module, jobs, CPU, max_chunk_bytes=1)
    together = train_cohort(module, jobs, CPU)
    for a, b in zip(alone, together, strict=True):
        assert a.result is not None and b.result is not None and a.result.steps == b.result.steps
        for n in a.params:
            assert torch.allclose(a.params[n], b.params[n], atol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_the_default_views_dropout_draws_the_masks_train_local_draws(rate):
    """The default view keeps BERT's dropout between pooler and classifier: each site's masks
    come from its own stream, physical batch by physical batch, before that step's noise,
    as nn.Dropout draws them in train_local: the same weights, with DP (split and empty
    batches included) and without. The module's train/eval modes are put back."""
    from fedshield.task.cohort import draws_dropout_alike

    module = _view(dropout=rate)
    assert draws_dropout_alike(module) and not draws_dropout_alike(_view("last_layers", 1, dropout=rate))
    module.eval()
    start = _start(module)
    plans = [_plan(sample_rate=1 / 12, expected_batch_size=1), _plan(proximal_mu=0.3), _plan(batch_size=16),
             _plan(dp=False, batch_size=4, epochs=3), _plan(dp=False, optimizer="adamw", learning_rate=0.01)]
    jobs = [CohortJob(start, _features(5 + 11 * i, 1, seed=i), plan, seed=40 + i) for i, plan in enumerate(plans)]
    _assert_like_train_local(module, jobs)
    assert not module.training and not any(m.training for m in module.modules())


def test_a_module_whose_dropout_the_cohort_cannot_draw_as_train_local_does_is_refused():
    """The engine trains such a module one site at a time: under vmap its masks would come from
    the shared generator, so a site's result would depend on which sites share its worker."""
    plan = _plan()
    assert "dropout" in str(can_vectorise(_view("last_layers", 1, dropout=0.1), plan))
    assert can_vectorise(_view("last_layers", 1, dropout=0.0), plan) is None
    assert can_vectorise(_view(dropout=0.1), plan) is None  # the default view: each site's own stream


def test_can_vectorise_names_what_it_refuses():
    plan = _plan()
    assert can_vectorise(_view(), plan) is None
    assert can_vectorise(TabularMLP(4, 2, 0), plan) is None
    assert "optimizer" in str(can_vectorise(_view(), _plan(optimizer="rmsprop")))
    assert "head" in str(can_vectorise(_view(trainable="all"), plan))
    assert "Sequential" in str(can_vectorise(nn.Sequential(nn.Linear(3, 2)), plan))
    with_loss = TabularMLP(4, 2, 0)
    with_loss.criterion = nn.CrossEntropyLoss()
    assert "own loss" in str(can_vectorise(with_loss, plan))
    batch_norm = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert "BatchNorm" in str(can_vectorise(batch_norm, plan))
    # a module Opacus wrapped in an earlier train_local keeps its hooks
    used = TabularMLP(4, 2, 0)
    train_local(used, TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), plan, device=CPU,
                generator=torch.Generator().manual_seed(0))
    assert "hooks" in str(can_vectorise(used, plan))
    with pytest.raises(TrainingError, match="cannot train this module"):
        train_cohort(nn.Sequential(nn.Linear(3, 2)), [CohortJob({}, TensorDataset(torch.randn(2, 3), torch.zeros(2)),
                                                                plan, 0)], CPU)


def test_steps_and_rate_follow_the_plan_for_awkward_counts():
    """n = 744, batch 8: 93 draws a pass at q = 1/93 (task.trainer's rule, not Opacus' int(1/q))."""
    module = TabularMLP(3, 2, 0)
    n = 744
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))
    out = train_cohort(module, [CohortJob(_start(module), data, _plan(epochs=1, max_physical_batch_size=8), 3)], CPU)
    assert out[0].result is not None
    assert out[0].result.steps == 93 and out[0].result.spends == [(0.8, 1 / 93, 93)]
    assert math.isfinite(out[0].result.mean_loss) and np.isfinite(out[0].result.mean_loss)


def test_a_views_trainable_weights_load_and_read_back_as_load_state_dict_would():
    """TrainView.load_trainable keeps the tensors it copies into (looked up once), refuses a
    missing name or another shape before it changes any weight, and trainable_state reads
    what was loaded."""
    view = make_train_view(_bert(), "last_layers", 1, 4, 8)
    state = view.trainable_state()
    loaded = {k: np.full_like(v, 0.25) for k, v in state.items()}
    view.load_trainable(loaded)
    reference = view.model.state_dict()
    for k in view.trainable_names:
        assert np.array_equal(view.trainable_state()[k], loaded[k])
        assert torch.equal(reference[k], torch.as_tensor(loaded[k]))
    name = view.trainable_names[0]
    with pytest.raises(ModelError, match="update lacks trainable weights"):
        view.load_trainable({k: v for k, v in loaded.items() if k != name})
    wrong = {**{k: np.zeros_like(v) for k, v in loaded.items()}, name: np.zeros((3, 3), dtype=np.float32)}
    with pytest.raises(ModelError, match=f"weight {name}: shape"):
        view.load_trainable(wrong)
    assert all(np.array_equal(view.trainable_state()[k], loaded[k]) for k in view.trainable_names)  # none changed


@pytest.mark.parametrize("trainable, last_layers", [("last_layers", 0), ("last_layers", 1), ("lora", 0),
                                                    ("head", 0), ("all", 0)])
def test_trained_state_is_what_copying_the_weights_in_and_reading_them_out_gives(trainable, last_layers):
    """A batched worker's site reads its trained weights (by the module's parameter names)
    straight into its reply's arrays: the same names, dtypes and values as copying them into
    the view and taking `trainable_state()`, and the view is left as it was."""
    view = make_train_view(_bert(), trainable, last_layers, 4, 8)
    generator = torch.Generator().manual_seed(3)
    params = {n: torch.randn(p.shape, generator=generator).to(p.dtype)
              for n, p in view.module.named_parameters() if p.requires_grad}
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    got = view.trained_state(params)
    assert {k: v.tobytes() for k, v in view.trainable_state().items()} == {k: v.tobytes() for k, v in before.items()}
    reference = copy.deepcopy(view)
    with torch.no_grad():
        own = dict(reference.module.named_parameters())
        for name, value in params.items():
            own[name].copy_(value)
    expected = reference.trainable_state()
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        assert np.array_equal(got[name], value)
    # weights that do not pair up with the view's (here another dtype) are copied in and read out
    halves = {n: v.to(torch.float64) for n, v in params.items()}
    assert all(np.array_equal(view.trained_state(halves)[k], v) for k, v in expected.items())
    assert all(np.array_equal(a, b) for a, b in zip(view.trainable_state().values(), expected.values(), strict=True))


def test_a_shared_view_checks_a_sites_start_as_loading_it_would_without_loading_it():
    """A batched worker's site checks the round's weights (and centre) against the shared view
    before it spends, as loading them would, and leaves loading to its job."""
    from fedshield.task import centering

    view = make_train_view(_bert(), "last_layers", 1, 4, 8)
    before = {k: v.copy() for k, v in view.trainable_state().items()}
    other = {k: np.zeros_like(v) for k, v in before.items()}
    assert list(view.check_trainable(other)) == list(before)
    assert all(np.array_equal(view.trainable_state()[k], v) for k, v in before.items())  # nothing loaded
    first = next(iter(other))
    with pytest.raises(ModelError, match="lacks trainable weights"):
        view.check_trainable({k: v for k, v in other.items() if k != first})
    with pytest.raises(ModelError, match=f"weight {first}: shape"):
        view.check_trainable({**other, first: np.zeros((3, 1), dtype=np.float32)})
    center = centering.centered_module(view).center
    kept = center.clone()
    assert torch.equal(centering.check_center(view, [0.5] * HIDDEN), torch.full((HIDDEN,), 0.5))
    assert torch.equal(center, kept)
    for bad in ([0.5] * (HIDDEN - 1), [float("nan")] * HIDDEN):
        with pytest.raises(ValueError, match="feature centre"):
            centering.check_center(view, bad)

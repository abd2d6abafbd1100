"""Plug-in tasks: a researcher's own model and data, without editing fedshield.

A plug-in is a factory (a callable taking no argument) that returns an object with the
`TaskPlugin` interface below. A run names it in one of two ways:

- `task.name=<name>`: an entry point `<name>` in the group `fedshield.tasks` of an installed
  distribution (`[project.entry-points."fedshield.tasks"] my-task = "my_pkg.task:make"`);
- `task.name=plugin task.plugin=module:factory`: a module importable where the run runs.

What a site imports is decided by the site alone (docs/site-operator.md, "Plug-in tasks").
The coordinator names a task, never ships code, and a deployed site never imports a module
because a plan named it: an entry point is importable only when the site's operator installed
its distribution in the site's environment (installing a package is the act that trusts its
code), and a `module:factory` only when the site set the very same `task.plugin` in its own
settings. Anything else is declined with kind `policy` before any import (`site_allows`).

The plug-in's model is built under `torch.manual_seed(federation.seed)`, so that the
coordinator and every site hold the same frozen weights (the plan carries their
fingerprint, and a site whose copy differs does not train). Its datasets are
(inputs..., label) tensors; only the weights `trainable(model)` names train and travel.
Opacus trains it as it is: the model must be what Opacus accepts (no BatchNorm, GroupNorm
instead), checked here before anything starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedshield.conf import ConfigError
from fedshield.conf.schema import PLUGIN_FACTORY_RE, PLUGIN_TASK, TASKS
from fedshield.task.data import LabeledData
from fedshield.task.model import TrainView

ENTRY_POINT_GROUP = "fedshield.tasks"


class PluginError(ConfigError):
    """A plug-in task cannot be found, imported, built or used (the task the config names)."""


@runtime_checkable
class TaskPlugin(Protocol):
    """What a plug-in task provides (docs/api.md, "Plug-in tasks").

    class_names: the classes, in label order (label k is class_names[k]).
    build_model(seed): a fresh model, inputs... -> logits (batch, len(class_names)); called
        under torch.manual_seed(seed): every copy must have the same weights.
    datasets(): (train, test); each a TensorDataset or a tuple of tensors (inputs..., label),
        or a LabeledData (text or feature rows). At a deployed site, `train` is the site's
        own records (the plug-in reads them where the site keeps them); `test` serves the
        coordinator's central evaluation.
    trainable(model): the names (model.named_parameters()) of the weights that train and
        travel; every other weight is frozen.
    Optional: site_split() -> one site name per training row (federation.partition=natural).
    """

    class_names: Sequence[str]

    def build_model(self, seed: int) -> nn.Module: ...

    def datasets(self) -> tuple[Any, Any]: ...

    def trainable(self, model: nn.Module) -> Iterable[str]: ...


@dataclass
class PluginData(LabeledData):
    """Rows of a plug-in's dataset: its input tensors, row-aligned with `labels`."""

    inputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def subset(self, idx: np.ndarray) -> PluginData:
        rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        base = super().subset(idx)  # a PluginData (dataclasses.replace keeps the class)
        assert isinstance(base, PluginData)
        base.inputs = tuple(t[rows] for t in self.inputs)
        return base


def is_plugin(name: str) -> bool:
    """Whether task.name names a plug-in (anything but a built-in task)."""
    return name not in TASKS


def installed_plugins() -> dict[str, metadata.EntryPoint]:
    """The `fedshield.tasks` entry points of this environment, by name (nothing imported)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def check_factory_string(value: str) -> str | None:
    """Why `value` cannot be task.plugin, or None."""
    if value == "" or PLUGIN_FACTORY_RE.fullmatch(value):
        return None
    return f"task.plugin={value!r}: must be module:factory (dotted Python names, e.g. my_pkg.tasks:make_task)"


def site_allows(name: str, plugin: str, own_plugin: str) -> str | None:
    """Why a deployed site must not run the plan's plug-in task (kind policy), or None.

    `name`/`plugin` are the plan's task.name/task.plugin, `own_plugin` the site's own
    task.plugin setting. Decided from names and this environment's metadata only: nothing
    is imported here, and nothing ever is because the coordinator asked for it."""
    if name == PLUGIN_TASK:
        if not own_plugin:
            return (f"task.plugin={plugin!r}: this site runs no module:factory plug-in (a site allows one by "
                    "setting the same task.plugin in its own settings)")
        if plugin != own_plugin:
            return f"task.plugin={plugin!r}: this site allows only its own task.plugin={own_plugin!r}"
        return None
    if name not in installed_plugins():
        return (f"task.name={name!r}: no such task is installed at this site (built-in tasks and the "
                f"{ENTRY_POINT_GROUP} entry points of its environment)")
    return None


def _factory(name: str, plugin: str) -> tuple[Callable[[], object], str]:
    """The plug-in's factory and how it is named in messages."""
    if name == PLUGIN_TASK:
        where = f"task.plugin={plugin!r}"
        problem = check_factory_string(plugin) if plugin else \
            f"{where}: task.name=plugin needs task.plugin=module:factory"
        if problem:
            raise PluginError(problem)
        module_name, attr = plugin.split(":", 1)
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"{where}: cannot import module {module_name!r} ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - a module that fails while importing: one line
            raise PluginError(f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise PluginError(f"{where}: module {module_name!r} has no {attr!r}")
            obj = getattr(obj, part)
    else:
        where = f"task.name={name!r}"
        eps = installed_plugins()
        if name not in eps:
            shown = ", ".join(sorted(eps)) or "none"
            raise PluginError(f"{where}: must be one of {', '.join(TASKS)}, {PLUGIN_TASK} (with "
                              f"task.plugin=module:factory) or an installed plug-in (entry points "
                              f"{ENTRY_POINT_GROUP}: {shown})")
        try:
            obj = eps[name].load()
        except Exception as exc:  # noqa: BLE001 - a broken installed plug-in: one line
            raise PluginError(f"{where}: loading entry point {eps[name].value!r} failed: "
                              f"{type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise PluginError(f"{where}: {type(obj).__name__} object is not callable (a factory returning a TaskPlugin)")
    return obj, where


@dataclass(frozen=True)
class LoadedPlugin:
    """A plug-in, checked: its interface, its datasets as PluginData/LabeledData."""

    plugin: TaskPlugin
    where: str
    class_names: tuple[str, ...]
    train: LabeledData
    test: LabeledData

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        try:
            model = self.plugin.build_model(seed)
        except Exception as exc:  # noqa: BLE001 - the plug-in's own failure: one line
            raise PluginError(f"{self.where}: build_model raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise PluginError(f"{self.where}: build_model returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def trainable_names(self, model: nn.Module) -> list[str]:
        try:
            names = list(self.plugin.trainable(model))
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"{self.where}: trainable raised {type(exc).__name__}: {exc}") from None
        params = dict(model.named_parameters())
        unknown = [n for n in names if not isinstance(n, str) or n not in params]
        if unknown:
            raise PluginError(f"{self.where}: trainable names {unknown[0]!r}, not a parameter of the model "
                              f"(model.named_parameters(): {', '.join(list(params)[:5])}...)")
        if not names:
            raise PluginError(f"{self.where}: trainable returned no weight; at least one must train")
        return list(dict.fromkeys(names))


def _rows(value: object, what: str, where: str, classes: tuple[str, ...]) -> LabeledData:
    """A dataset the plug-in returned, as rows: (inputs..., label) tensors or LabeledData."""
    if isinstance(value, LabeledData):
        if list(value.class_names) != list(classes):
            raise PluginError(f"{where}: datasets() {what} has classes {value.class_names}, "
                              f"class_names says {list(classes)}")
        return value
    tensors = value.tensors if isinstance(value, TensorDataset) else value
    if not isinstance(tensors, (tuple, list)) or len(tensors) < 2 \
            or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise PluginError(f"{where}: datasets() {what} is {type(value).__name__}; expected a TensorDataset or a "
                          "tuple of tensors (inputs..., label), or a LabeledData")
    *inputs, labels = tensors
    n = len(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise PluginError(f"{where}: datasets() {what}: the label tensor (the last) must be 1-d integer class "
                          f"indices, got dtype {labels.dtype} and shape {tuple(labels.shape)}")
    if any(t.dim() == 0 or len(t) != n for t in inputs):
        raise PluginError(f"{where}: datasets() {what}: every input tensor needs one row per label ({n})")
    if n == 0:
        raise PluginError(f"{where}: datasets() {what} has no rows")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise PluginError(f"{where}: datasets() {what}: labels must be in 0..{len(classes) - 1} (class_names has "
                          f"{len(classes)}), found {int(labels.min())}..{int(labels.max())}")
    return PluginData(labels=labels.detach().cpu().numpy().astype(np.int64), class_names=list(classes),
                      inputs=tuple(t.detach().cpu().contiguous() for t in inputs), source=where)


def _check_interface(obj: object, where: str) -> TaskPlugin:
    missing = [a for a in ("class_names", "build_model", "datasets", "trainable") if not hasattr(obj, a)]
    if missing:
        raise PluginError(f"{where}: the factory returned {type(obj).__name__}, which lacks {', '.join(missing)} "
                          "(a TaskPlugin: class_names, build_model(seed), datasets(), trainable(model))")
    not_callable = [a for a in ("build_model", "datasets", "trainable") if not callable(getattr(obj, a))]
    if not_callable:
        raise PluginError(f"{where}: {type(obj).__name__}.{not_callable[0]} is not callable")
    assert isinstance(obj, TaskPlugin)  # every member present (runtime_checkable checks names only)
    return obj


@lru_cache(maxsize=4)
def load_plugin(name: str, plugin: str) -> LoadedPlugin:
    """The plug-in task `name` (an entry point, or PLUGIN_TASK with `plugin`=module:factory),
    built and checked once per process; PluginError (one line) for anything wrong."""
    factory, where = _factory(name, plugin)
    try:
        obj = factory()
    except Exception as exc:  # noqa: BLE001 - the plug-in's own failure: one line
        raise PluginError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from None
    task = _check_interface(obj, where)
    classes = task.class_names
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2 \
            or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise PluginError(f"{where}: class_names must be a list of at least 2 distinct non-empty names, "
                          f"got {classes!r}")
    names = tuple(classes)
    try:
        got = task.datasets()
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"{where}: datasets() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(got, tuple) or len(got) != 2:
        raise PluginError(f"{where}: datasets() must return (train, test), got {type(got).__name__}")
    train, test = _rows(got[0], "train", where, names), _rows(got[1], "test", where, names)
    if isinstance(train, PluginData) and isinstance(test, PluginData):
        shapes = [(tuple(t.shape[1:]), t.dtype) for t in train.inputs]
        if shapes != [(tuple(t.shape[1:]), t.dtype) for t in test.inputs]:
            raise PluginError(f"{where}: datasets(): train and test inputs differ in shape or dtype")
    split = getattr(task, "site_split", None)
    if callable(split):
        try:
            groups = np.asarray([str(g) for g in split()])
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"{where}: site_split raised {type(exc).__name__}: {exc}") from None
        if len(groups) != len(train):
            raise PluginError(f"{where}: site_split() names {len(groups)} sites for {len(train)} training rows")
        train = replace(train, groups=groups)
    return LoadedPlugin(task, where, names, train, test)


def plugin_view(model: nn.Module, names: Sequence[str]) -> TrainView:
    """The plug-in's model as a TrainView: `names` train (and travel), every other weight
    is frozen; the model itself is the inputs -> logits module Opacus wraps."""
    train = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    return TrainView(model, model, [n for n, _ in model.named_parameters() if n in train], None)


def check_opacus(model: nn.Module, where: str) -> None:
    """A model Opacus cannot train with per-sample gradients (BatchNorm, ...): one line now."""
    from opacus.validators import ModuleValidator

    # BatchNorm mixes the records of a batch even when it is frozen (train mode normalises by
    # the batch's statistics): one record's gradient then depends on the others, and
    # per-sample clipping no longer bounds its influence. Opacus checks only trained modules.
    mixing = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixing:
        raise PluginError(f"{where}: the model is not trainable with DP-SGD: {mixing[0]} is a BatchNorm, which "
                          "mixes the records of a batch (use GroupNorm or LayerNorm)")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PluginError(f"{where}: the model is not trainable with DP-SGD: {' '.join(str(errors[0]).split())}")


def plugin_inputs(data: LabeledData) -> tuple[torch.Tensor, ...]:
    """The input tensors of a plug-in's rows (() for other data)."""
    return data.inputs if isinstance(data, PluginData) else ()

"""A task: its data, its model, and how records become tensors.

Shared by the site (training) and the server (initial model, central evaluation). The
held-out test split is fixed by task.split_seed and never reaches a site in simulation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedshield.conf.columns import TabularSchema, parse_schema
from fedshield.conf.config import Config
from fedshield.conf.schema import TaskConfig
from fedshield.task import causal_lm, image, tabular
from fedshield.task.data import (
    LabeledData,
    load_heart_disease,
    load_news_topics,
    load_text_file,
    train_test_split,
)
from fedshield.task.deid import DeidSpec, deidentified
from fedshield.task.model import (
    ModelError,
    TrainView,
    build_tabular_model,
    build_text_model,
    check_model_head,
    check_trainable,
    frozen_fingerprint,
    load_tokenizer,
    make_train_view,
    prefix_hidden_states,
    text_model_path,
)
from fedshield.task.model_digest import folder_digest
from fedshield.task.plugin import PluginData, check_opacus, is_plugin, load_plugin, plugin_view

if TYPE_CHECKING:  # transformers is imported when a text model is loaded (task.model._quiet_transformers first)
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The `task` section, typed and hashable: what the data and the initial model depend
    on, and so the key of the per-process caches below (a value, not the config's text)."""

    name: str
    model: str
    test_fraction: float
    split_seed: int
    data_path: str
    test_path: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]
    site_column: str
    hidden_units: int
    # task.deidentify: the scrubber's settings (task/deid.py), None when off. Part of the key
    # so that scrubbed and raw records, or two sites' patterns, never share a cache entry.
    deidentify: DeidSpec | None = None
    # tabular only (task/tabular.py): the parsed column schema and where the rows come from
    columns: TabularSchema | None = None
    package_data: str = ""
    site_files: tuple[str, ...] = ()
    path_column: str = "path"  # image task: the CSV's image path column
    image_size: int = 32  # image task: the input side when the model folder does not say
    plugin: str = ""

    @classmethod
    def of(cls, task: TaskConfig, *, text_column: str | None = None, label_column: str | None = None,
           site_column: str | None = None) -> TaskSpec:
        """The spec of a validated config's `task` section; the columns given (a site's
        own) replace the config's."""
        label_column = task.label_column if label_column is None else label_column
        site_column = task.site_column if site_column is None else site_column
        columns = None
        if task.name == "tabular":  # the schema was checked with the config (conf/columns.py)
            columns = parse_schema(task, label_column=label_column, site_column=site_column)
        return cls(
            name=task.name, model=task.model, test_fraction=task.test_fraction,
            split_seed=task.split_seed, data_path=task.data_path, test_path=task.test_path,
            text_column=task.text_column if text_column is None else text_column,
            label_column=label_column,
            labels=tuple(task.labels),
            site_column=site_column,
            hidden_units=task.hidden_units, deidentify=DeidSpec.of(task), plugin=task.plugin,
            columns=columns, package_data=task.package_data, site_files=tuple(task.site_files),
            path_column=task.path_column, image_size=task.image_size,
        )


TABULAR_TASKS = ("heart-disease", "tabular")  # a TabularMLP built in code, no model folder


@lru_cache(maxsize=4)
def _pool_and_test(t: TaskSpec) -> tuple[LabeledData, LabeledData]:
    if is_plugin(t.name):  # task/plugin.py: the plug-in's own (train, test)
        loaded = load_plugin(t.name, t.plugin)
        return loaded.train, loaded.test
    if t.name == causal_lm.TASK:
        return _documents(t)
    if t.name == "news-topics":
        data = load_news_topics()
    elif t.name == "heart-disease":  # the name alone: the preset's hospitals, read as always (task.data)
        data = load_heart_disease()
    elif t.columns is not None:
        return tabular.pool_and_test(t.columns, data_path=t.data_path, package_data=t.package_data,
                                     site_files=list(t.site_files), test_path=t.test_path,
                                     test_fraction=t.test_fraction, split_seed=t.split_seed)
    elif t.name == "image":
        data = read_images(t, t.data_path)
        if t.test_path:
            return data, read_images(t, t.test_path, labels=data.class_names)
    else:
        data = read_text_file(t, t.data_path)
        if t.test_path:
            return data, read_text_file(t, t.test_path, labels=data.class_names)
    return train_test_split(data, t.test_fraction, t.split_seed)


def _documents(t: TaskSpec) -> tuple[LabeledData, LabeledData]:
    """text-generation: the bundled BBC News texts (topics unused), or task.data_path."""
    if not t.data_path:
        data = causal_lm.as_documents(load_news_topics())
    else:
        data = causal_lm.load_documents(t.data_path, t.text_column)
        if t.test_path:
            return data, causal_lm.load_documents(t.test_path, t.text_column)
    return train_test_split(data, t.test_fraction, t.split_seed)


def read_text_file(task: TaskSpec, path: str, labels: list[str] | None = None) -> LabeledData:
    """A site's own data file (a deployed site's, or text-file's): text records, or for a
    tabular task the file read by the task's column schema."""
    if task.columns is not None:
        return tabular.load_tabular_file(path, task.columns, labels)
    return load_text_file(
        path,
        text_column=task.text_column,
        label_column=task.label_column,
        labels=labels if labels is not None else (list(task.labels) or None),
        site_column=task.site_column,
    )


def read_site_file(task: TaskSpec, path: str, labels: list[str] | None = None) -> LabeledData:
    """A deployed site's own data file read as the plan's task reads records: images (a
    folder per class or a CSV of paths), documents (text-generation), a table or texts."""
    if task.name == "image":
        return read_images(task, path, labels)
    if task.name == causal_lm.TASK:
        return causal_lm.load_documents(path, task.text_column)
    return read_text_file(task, path, labels)


def scrubbed(task: TaskSpec, data: LabeledData) -> tuple[LabeledData, dict[str, int] | None]:
    """The records as a site encodes them: scrubbed (task.deidentify, task/deid.py; cached per
    data object) with the counts by type, or `data` itself and None when it is off."""
    if task.deidentify is None:
        return data, None
    scrubbed, counts = deidentified(data, task.deidentify)
    return scrubbed, dict(counts)


def read_images(task: TaskSpec, path: str, labels: list[str] | None = None) -> LabeledData:
    """A site's images (a folder per class or a CSV of paths; "" = the bundled digits),
    at the model's input size."""
    spec = image.input_spec(task.model, task.image_size)
    if not path:
        return image.load_digits_images(spec)
    fixed = labels if labels is not None else (list(task.labels) or None)
    return image.load_images(path, spec, task.path_column, task.label_column, fixed)


def pool_and_test(cfg: Config) -> tuple[LabeledData, LabeledData]:
    """The training pool (split across virtual sites) and the held-out test split."""
    return _pool_and_test(TaskSpec.of(cfg.task))


def check_task(cfg: Config) -> tuple[LabeledData, LabeledData, Path | None]:
    """The run's data and (text tasks) model folder, read as the coordinator and the sites
    will load them, without loading the weights (a wrong folder, a head of another size, a
    missing file is one line before anything starts): (pool, test, the model folder or None)."""
    folder = model_folder(cfg)
    pool, test = pool_and_test(cfg)
    name, where = cfg.task.name, f"task.model={cfg.task.model!r}"
    if name == "image":  # loaded and validated for Opacus (then cached): a model it cannot train fails here
        build_model(cfg)
    elif is_plugin(name):
        view = build_view(cfg)  # the plug-in's model and trainable names, checked now, not in round 1
        if cfg.privacy.mode == "dp-sgd":
            check_opacus(view.model, load_plugin(name, cfg.task.plugin).where)
    elif folder is not None and name != causal_lm.TASK:  # a decoder for text-generation has no head to check
        check_model_head(folder, list(test.class_names), where)
        tr = cfg.training  # the family supports the mode, and Opacus the modules that train
        check_trainable(folder, tr.trainable, tr.last_layers, tr.lora_r, tr.lora_alpha, where)
    return pool, test, folder


def model_folder(cfg: Config, check_type: bool = True) -> Path | None:
    """The model folder a task loads (checked), or None for models built in code
    (the tabular MLP, plug-ins). `check_type`: see task.model.check_model_folder."""
    name = cfg.task.name
    if name in TABULAR_TASKS or is_plugin(name):
        return None
    if name == causal_lm.TASK:
        return causal_lm.decoder_path(cfg.task.model)
    if name == "image":  # "" = a small ResNet built in code (task/image.py)
        return image.image_model_folder(cfg.task.model) if cfg.task.model else None
    return text_model_path(cfg.task.model, check_type)


def model_digest(cfg: Config, check_type: bool = True) -> str:
    """The digest of the task's model folder (task/model_digest.py; "" without a folder):
    what the coordinator's plan names and a deployed site checks its own copy against."""
    folder = model_folder(cfg, check_type)
    return "" if folder is None else folder_digest(folder)


def check_model_copy(cfg: Config, where: str) -> None:
    """A deployed site's copy of the model is the one the plan names (task.model_digest).
    On every message, so without the model_type check (a second of import, in each of a
    deployed site's ClientApp processes): a copy with the plan's digest is the folder the
    site checked whole before it joined (`fedshield client`), and loading it checks again."""
    digest = model_digest(cfg, check_type=False)
    if digest != cfg.task.model_digest:
        shown = f"{cfg.task.model!r}" if cfg.task.model else "'' (the bundled all-MiniLM-L6-v2)"
        raise ModelCopyError(f"{where}: its model (task.model={shown}) has digest {digest[:16] or 'none'}..., the "
                             f"coordinator's plan names {cfg.task.model_digest[:16] or 'none'}...: copy the "
                             "coordinator's model folder (docs/site-operator.md)")


class ModelCopyError(ModelError):
    """A site's copy of the model is not the coordinator's (decline kind `model`)."""


def class_names(cfg: Config) -> list[str]:
    return pool_and_test(cfg)[1].class_names


@lru_cache(maxsize=2)
def _base_model(t: TaskSpec, seed: int, num_features: int, classes: tuple[str, ...]) -> nn.Module:
    if is_plugin(t.name):
        return load_plugin(t.name, t.plugin).build_model(seed)
    if t.name in TABULAR_TASKS:
        return build_tabular_model(num_features, len(classes), t.hidden_units, seed)
    if t.name == causal_lm.TASK:
        return causal_lm.build_causal_lm(t.model, seed)
    if t.name == "image":
        return image.build_image_model(t.model, classes, seed)
    return build_text_model(t.model, list(classes), seed)


def build_model(cfg: Config) -> nn.Module:
    """A fresh copy of the task's initial model (pretrained body, seeded head)."""
    test = pool_and_test(cfg)[1]
    num_features = 0 if test.features is None else int(test.features.shape[1])
    base = _base_model(TaskSpec.of(cfg.task), cfg.federation.seed, num_features, tuple(test.class_names))
    return copy.deepcopy(base)


def build_view(cfg: Config, device: torch.device | None = None) -> TrainView:
    model = build_model(cfg)
    if device is not None:
        model.to(device)  # before LoRA wrapping: see task.model.add_lora
    tr = cfg.training
    if is_plugin(cfg.task.name):  # the plug-in names what trains (training.trainable is for BERT models)
        view = plugin_view(model, load_plugin(cfg.task.name, cfg.task.plugin).trainable_names(model))
    elif cfg.task.name == causal_lm.TASK:
        view = causal_lm.make_causal_view(model, tr.lora_r, tr.lora_alpha)
    elif cfg.task.name == "image":
        view = _image_view(cfg, model)
    else:
        view = make_train_view(model, tr.trainable, tr.last_layers, tr.lora_r, tr.lora_alpha)
    # The frozen weights are fixed by the config (checkpoint, seed, what trains), so their
    # hash is computed once per process: hashing 22M weights per message would dominate.
    key = (TaskSpec.of(cfg.task), cfg.federation.seed, tr.trainable, tr.last_layers,
           tr.lora_r, tr.lora_alpha)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = frozen_fingerprint(view.model, view.trainable_names)
    view.fingerprint = _FINGERPRINTS[key]
    return view


def _image_view(cfg: Config, model: nn.Module) -> TrainView:
    """All the image model's weights train, or (trainable=head, or last_layers with
    last_layers=0) its head only; the module Opacus wraps reads 8-bit pixels (task.image.ImageClassifier)."""
    names = [n for n, _ in model.named_parameters()] if cfg.training.trainable == "all" \
        else image.head_names(model)
    chosen = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    spec = image.input_spec(cfg.task.model, cfg.task.image_size)
    return TrainView(model, image.ImageClassifier(model, spec, cfg.task.augment), names, None)


@lru_cache(maxsize=2)
def tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The task's tokenizer, loaded once per process."""
    return load_tokenizer(model)


def _tokenize(cfg: Config, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(cfg.task.model)(
        texts,
        truncation=True,
        max_length=cfg.task.max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def encode(
    cfg: Config,
    view: TrainView,
    data: LabeledData,
    cache_dir: Path | None = None,
    device: torch.device = torch.device("cpu"),
) -> TensorDataset:
    """Records -> (inputs..., labels). In last_layers mode the inputs are the frozen
    prefix's hidden states, computed once and kept in `cache_dir` (keyed by the frozen
    weights and the token ids, so a different model or data never reuses a stale cache).
    """
    if cfg.task.name == causal_lm.TASK:  # (input_ids, attention_mask, next-token labels)
        return causal_lm.encode_documents(cfg.task.model, cfg.task.max_length, list(data.texts or []))
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    if isinstance(data, PluginData):  # a plug-in's tensors go to its model as they are
        return TensorDataset(*data.inputs, labels)
    if data.features is not None:
        return TensorDataset(torch.as_tensor(data.features, dtype=torch.float32), labels)
    if data.images is not None:  # 8-bit: the module scales and normalises (task.image.ImageClassifier)
        return TensorDataset(torch.from_numpy(data.images), labels)
    ids, mask = _tokenize(cfg, list(data.texts or []))
    if view.prefix_layers is None:
        return TensorDataset(ids, mask, labels)
    key = _prefix_key(view, ids)
    path = cache_dir / f"prefix-{key}.pt" if cache_dir is not None else None
    hidden = None
    if path is not None and path.is_file():
        try:
            hidden = torch.load(path, weights_only=True)
        except Exception:  # a torn cache file is rebuilt, never trusted
            hidden = None
    if hidden is None or len(hidden) != len(ids):
        hidden = prefix_hidden_states(view.model, ids, mask, view.prefix_layers, device=str(device))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(hidden, tmp)
            os.replace(tmp, path)
    return TensorDataset(hidden, mask[:, : hidden.shape[1]], labels)


def _prefix_key(view: TrainView, ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(view.prefix_layers).encode())
    h.update(view_fingerprint(view).encode())  # every frozen weight, the prefix's included
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:24]


# (task, seed, trainable, last_layers, lora_r, lora_alpha) -> fingerprint (build_view)
_FINGERPRINTS: dict[tuple[TaskSpec, int, str, int, int, int], str] = {}


def view_fingerprint(view: TrainView) -> str:
    return view.fingerprint or frozen_fingerprint(view.model, view.trainable_names)

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

from fedshield.conf.config import Config
from fedshield.conf.schema import TaskConfig
from fedshield.task import causal_lm
from fedshield.task.data import (
    LabeledData,
    load_heart_disease,
    load_news_topics,
    load_text_file,
    train_test_split,
)
from fedshield.task.model import (
    TrainView,
    build_tabular_model,
    build_text_model,
    check_model_head,
    frozen_fingerprint,
    load_tokenizer,
    make_train_view,
    prefix_hidden_states,
    text_model_path,
)

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

    @classmethod
    def of(cls, task: TaskConfig, *, text_column: str | None = None, label_column: str | None = None,
           site_column: str | None = None) -> TaskSpec:
        """The spec of a validated config's `task` section; the columns given (a site's
        own) replace the config's."""
        return cls(
            name=task.name, model=task.model, test_fraction=task.test_fraction,
            split_seed=task.split_seed, data_path=task.data_path, test_path=task.test_path,
            text_column=task.text_column if text_column is None else text_column,
            label_column=task.label_column if label_column is None else label_column,
            labels=tuple(task.labels),
            site_column=task.site_column if site_column is None else site_column,
            hidden_units=task.hidden_units,
        )


@lru_cache(maxsize=4)
def _pool_and_test(t: TaskSpec) -> tuple[LabeledData, LabeledData]:
    if t.name == causal_lm.TASK:
        return _documents(t)
    if t.name == "news-topics":
        data = load_news_topics()
    elif t.name == "heart-disease":
        data = load_heart_disease()
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
    if task.name == causal_lm.TASK:  # documents: the text column only (a deployed site's file too)
        return causal_lm.load_documents(path, task.text_column)
    return load_text_file(
        path,
        text_column=task.text_column,
        label_column=task.label_column,
        labels=labels if labels is not None else (list(task.labels) or None),
        site_column=task.site_column,
    )


def pool_and_test(cfg: Config) -> tuple[LabeledData, LabeledData]:
    """The training pool (split across virtual sites) and the held-out test split."""
    return _pool_and_test(TaskSpec.of(cfg.task))


def check_task(cfg: Config) -> tuple[LabeledData, LabeledData, Path | None]:
    """The run's data and (text tasks) model folder, read as the coordinator and the sites
    will load them, without loading the weights (a wrong folder, a head of another size, a
    missing file is one line before anything starts): (pool, test, the model folder or None)."""
    if cfg.task.name == causal_lm.TASK:  # a decoder, no head to check
        decoder = causal_lm.decoder_path(cfg.task.model)
        pool, test = pool_and_test(cfg)
        return pool, test, decoder
    folder = None if cfg.task.name == "heart-disease" else text_model_path(cfg.task.model)  # tabular: built in code
    pool, test = pool_and_test(cfg)
    if folder is not None:
        check_model_head(folder, list(test.class_names), f"task.model={cfg.task.model!r}")
    return pool, test, folder


def class_names(cfg: Config) -> list[str]:
    return pool_and_test(cfg)[1].class_names


@lru_cache(maxsize=2)
def _base_model(t: TaskSpec, seed: int, num_features: int, classes: tuple[str, ...]) -> nn.Module:
    if t.name == "heart-disease":
        return build_tabular_model(num_features, len(classes), t.hidden_units, seed)
    if t.name == causal_lm.TASK:
        return causal_lm.build_causal_lm(t.model, seed)
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
    if cfg.task.name == causal_lm.TASK:
        view = causal_lm.make_causal_view(model, tr.lora_r, tr.lora_alpha)
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
    if data.features is not None:
        return TensorDataset(torch.as_tensor(data.features, dtype=torch.float32), labels)
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

"""Shared fixtures: a tiny random-weight BERT built in code, and an easy synthetic task."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv
import random
from pathlib import Path

import pytest

# Two topics that share no words: a tiny model separates them in a few steps.
WEATHER = "sunny rain cloud storm wind snow warm cold forecast breeze thunder humid".split()
MARKETS = "stock shares bank profit market trade price bond investor revenue dollar loss".split()


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "weather" if i % 2 == 0 else "markets"
        words = WEATHER if label == "weather" else MARKETS
        rows.append((" ".join(rng.choice(words) for _ in range(8)), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from task.model import bundled_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "topics.csv", synthetic_rows(600, seed=1))


def tiny_overrides(tiny_bert: Path, data: Path, tmp_path: Path, **extra: object) -> list[str]:
    """A config for the tiny model on the synthetic task; extra keys override."""
    base = {
        "task": "text-file",
        "task.data_path": str(data),
        "task.model": str(tiny_bert),
        "task.max_length": 16,
        "task.test_fraction": 0.25,
        "federation.num_sites": 3,
        "federation.rounds": 2,
        # DP-SGD clips every per-sample gradient of a random tiny model: plain SGD with a
        # large step learns the synthetic task reliably (Adam turns the noise into steps).
        "training.trainable": "last_layers",
        "training.last_layers": 1,
        "training.optimizer": "sgd",
        "training.batch_size": 32,
        "training.local_epochs": 3,
        "training.learning_rate": 1.0,
        "privacy.delta": 1e-3,
        "privacy.max_grad_norm": 1.0,
        "output.dir": str(tmp_path / "runs"),
        "simulation.client_cpus": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]

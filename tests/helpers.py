"""Helpers the tests share: an easy synthetic text task and the tiny-model config.

Imported as `from tests.helpers import ...`; conftest.py holds only fixtures.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

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


def train_message(cfg, run_id: str, server_round: int = 1):
    """The coordinator's TRAIN message for `cfg` (its plan, round `server_round`, the initial
    trainable weights), as the ServerApp sends it to a site's ClientApp."""
    from flwr.app import Message, RecordDict

    from fedshield import protocol
    from fedshield.task.pipeline import build_view, pool_and_test, view_fingerprint

    view = build_view(cfg)
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id=run_id, run_dir="",
                                frozen_fingerprint=view_fingerprint(view),
                                class_names=pool_and_test(cfg)[1].class_names)
    plan[protocol.SERVER_ROUND] = server_round
    return Message(content=RecordDict({protocol.PLAN: plan,
                                       protocol.ARRAYS: protocol.to_array_record(view.trainable_state())}),
                   message_type=protocol.TRAIN, dst_node_id=1)

"""Central evaluation of the global model on the held-out test split (never seen by a site)."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, classification_report, f1_score

from task.model import TrainView
from task.pipeline import encode, pool_and_test
from task.trainer import predict


def classification_metrics(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict:
    report = classification_report(
        labels, preds, labels=list(range(len(class_names))), target_names=class_names,
        output_dict=True, zero_division=0,
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(len(class_names))), zero_division=0)),
        "per_class": {
            c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score", "support")}
            for c in class_names
        },
    }


class CentralEvaluator:
    """Holds the encoded test split (the frozen prefix is computed once, in memory)."""

    def __init__(self, cfg: DictConfig, view: TrainView, device: torch.device) -> None:
        self.view = view
        self.device = device
        test = pool_and_test(cfg)[1]
        self.class_names = test.class_names
        self.labels = test.labels
        self.dataset = encode(cfg, view, test, cache_dir=None, device=device)

    def __call__(self, trainable: dict[str, np.ndarray]) -> dict:
        self.view.load_trainable(trainable)
        preds = predict(self.view.module, self.dataset, self.device)
        return classification_metrics(self.labels, preds, self.class_names)

"""Evaluation maths shared by the coordinator's central evaluation and the benchmarks:
predictions of a model on encoded records, and the metrics every run reports."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@torch.no_grad()
def predict(module: nn.Module, dataset: TensorDataset, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Argmax predictions and labels of `module` on `dataset` (inputs..., labels)."""
    module.to(device)
    module.eval()
    preds = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        *inputs, _ = (t.to(device) for t in batch)
        preds.append(module(*inputs).argmax(-1).cpu())
    module.train()
    return torch.cat(preds).numpy() if preds else np.empty(0, dtype=np.int64)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1 (floats) and per_class (class name -> precision, recall, f1-score,
    support): a JSON object, as the run's metrics rows carry it."""
    report = classification_report(
        labels, preds, labels=list(range(len(class_names))), target_names=class_names,
        output_dict=True, zero_division=0,
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(
            f1_score(labels, preds, average="macro", labels=list(range(len(class_names))), zero_division=0)
        ),
        "per_class": {
            c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score", "support")}
            for c in class_names
        },
    }

"""Central evaluation of the global model on the held-out test split (never seen by a site):
accuracy, macro-F1 and per-class scores for classification; loss and perplexity on the
held-out documents' tokens for text-generation (task.causal_lm).

When the test split knows each record's site (heart-disease's hospitals, a tabular task's
site files or site column), the metrics also carry each site's held-out accuracy and
their unweighted mean: a model that serves the large sites well and a small one badly shows
it there, not in the pooled figure. Computed by the coordinator on its own test data: no
site releases anything for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedshield.conf.config import Config
from fedshield.task import causal_lm
from fedshield.task.evaluation import classification_metrics, predict
from fedshield.task.model import TrainView
from fedshield.task.pipeline import TaskSpec, encode, pool_and_test, scrubbed


class CentralEvaluator:
    """Holds the encoded test split (the frozen prefix is computed once, in memory)."""

    def __init__(self, cfg: Config, view: TrainView, device: torch.device) -> None:
        self.view = view
        self.generation = cfg.task.name == causal_lm.TASK
        self.device = device
        # task.deidentify: the model trains on scrubbed texts, so it is evaluated on them too.
        test = scrubbed(TaskSpec.of(cfg.task), pool_and_test(cfg)[1])[0]
        self.class_names = test.class_names
        self.labels = test.labels
        self.groups = test.groups
        self.dataset = encode(cfg, view, test, cache_dir=None, device=device)

    def __call__(self, trainable: dict[str, np.ndarray]) -> dict[str, Any]:
        self.view.load_trainable(trainable)
        if self.generation:
            return causal_lm.perplexity_metrics(*causal_lm.token_nll(self.view.module, self.dataset, self.device))
        preds = predict(self.view.module, self.dataset, self.device)
        metrics = classification_metrics(self.labels, preds, self.class_names)
        if self.groups is not None:
            metrics.update(site_accuracies(self.labels, preds, self.groups))
        return metrics


def site_accuracies(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """per_site_accuracy (site -> accuracy on its held-out rows) and mean_site_accuracy."""
    per_site = {str(g): float(np.mean(preds[groups == g] == labels[groups == g])) for g in np.unique(groups)}
    return {"per_site_accuracy": per_site, "mean_site_accuracy": float(np.mean(list(per_site.values())))}

"""Central evaluation of the global model on the held-out test split (never seen by a site):
accuracy, macro-F1 and per-class scores for classification; loss and perplexity on the
held-out documents' tokens for text-generation (task.causal_lm)."""

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
        self.dataset = encode(cfg, view, test, cache_dir=None, device=device)

    def __call__(self, trainable: dict[str, np.ndarray]) -> dict[str, Any]:
        self.view.load_trainable(trainable)
        if self.generation:
            return causal_lm.perplexity_metrics(*causal_lm.token_nll(self.view.module, self.dataset, self.device))
        preds = predict(self.view.module, self.dataset, self.device)
        return classification_metrics(self.labels, preds, self.class_names)

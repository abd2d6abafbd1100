"""The pfl-research (Apple, PyPI `pfl`) side of bench/sim_scale.py: the same local work in pfl.

Runs ONLY in the benchmark's own venv (bench/.venv-pfl, made by `bench/sim_scale.py
--setup-pfl` from bench/pfl-requirements.txt: pfl 0.6.0 next to the same CPU torch 2.13.0
and transformers as fedshield); nothing here imports fedshield, and fedshield never imports
pfl. sim_scale.py's `--one pfl N` child prepares the work with fedshield's own task code (the
sites' shares of the same pool, tokenised, the frozen prefix run once: what a fedshield site
keeps in its prefix cache) and saves it as tensors; this script trains it with pfl:

- model: the same tiny BERT folder, and the same trainable part as fedshield's
  `training.trainable=last_layers k=1` (task.model._BertSuffix: the last encoder layer +
  pooler + dropout + classifier on the cached hidden states), wrapped in pfl's
  `PyTorchModel` (local SGD with momentum 0.9, central SGD lr 1 = FedAvg);
- data: one pfl `Dataset` of tensors per user (8 records), a `FederatedDataset` with pfl's
  `minimize_reuse` user sampler and a cohort of all N users per central iteration;
- algorithm: pfl's `FederatedAveraging` on its `SimulatedBackend` (users trained one after
  another in this process, one model reused: pfl's design), local batch 8, 1 epoch, the
  batch gradient clipped to max_grad_norm (as fedshield's non-DP baseline does);
- DP: pfl has no record-level DP-SGD; its closest per-user mechanism is used, the local
  `GaussianMechanism` (each user's model update clipped to the same max_grad_norm and
  Gaussian noise of noise_multiplier x clip added before it leaves the user). That is
  user-level local DP on the update, one clip and one noise draw per user per round, where
  fedshield clips every record's gradient at every step (Opacus per-sample gradients) and
  noises every step: less work than fedshield's DP, stated in bench/RESULTS.md.

One torch intra-op thread (SIM_SCALE_PFL_THREADS, sim_scale.py's --threads; 0 = torch's
default): see main(). Updates/s = users trained per second in the last central iteration
(warm; pfl evaluates each user before and after training only in the first), as for the
other variants. Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import GaussianMechanism
from torch import nn
from transformers import BertForSequenceClassification


class BertSuffix(nn.Module):
    """fedshield's task.model._BertSuffix for BERT (last layers + pooler + dropout +
    classifier on cached prefix hidden states), with the `loss`/`metrics` pfl asks for."""

    def __init__(self, model: BertForSequenceClassification, first_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.bert.encoder.layer[first_layer:])
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        logits: torch.Tensor = self.classifier(self.dropout(self.pooler(hidden[:, :1])))
        return logits

    def loss(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.train()
        loss: torch.Tensor = self.criterion(self(hidden, attention_mask), labels)
        return loss

    @torch.no_grad()
    def metrics(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Weighted]:
        self.eval()
        logits = self(hidden, attention_mask)
        n = len(labels)
        return {"loss": Weighted(float(self.criterion(logits, labels)) * n, n),
                "accuracy": Weighted(float((logits.argmax(-1) == labels).sum()), n)}


class RoundClock(TrainingProcessCallback):
    """The wall-clock time at the start and after every central iteration."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_begin(self, *, model: PyTorchModel) -> Metrics:
        self.stamps.append(time.time())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics: Metrics, model: PyTorchModel, *,
                                central_iteration: int) -> tuple[bool, Metrics]:
        self.stamps.append(time.time())
        return False, Metrics()


def main(work_file: str) -> None:
    t0 = time.time()
    work = torch.load(work_file, weights_only=False)
    # One intra-op thread: pfl trains users one after another in this process, and on a model
    # this small torch's second thread only spins (measured under load: 82 vs 18 updates/s at
    # 100 users); Ray gives each Flower worker one thread too (OMP_NUM_THREADS=1).
    threads = int(os.environ.get("SIM_SCALE_PFL_THREADS", "1"))
    if threads > 0:  # 0: torch's default
        torch.set_num_threads(threads)
    torch.manual_seed(work["seed"])
    base = BertForSequenceClassification.from_pretrained(work["model"])
    for p in base.parameters():
        p.requires_grad_(False)
    module = BertSuffix(base, work["first_layer"])
    for p in module.parameters():
        p.requires_grad_(True)
    users = {i: list(site) for i, site in enumerate(work["sites"])}  # from_slices makes the Datasets
    n = len(users)
    federated = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    params = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(model=module,
                         local_optimizer_create=functools.partial(torch.optim.SGD, momentum=0.9),
                         central_optimizer=torch.optim.SGD(params, lr=1.0))
    postprocessors = []
    if work["dp"]:
        postprocessors.append(GaussianMechanism(clipping_bound=work["max_grad_norm"],
                                                relative_noise_stddev=work["noise_multiplier"]))
    backend = SimulatedBackend(training_data=federated, val_data=None, postprocessors=postprocessors)
    clock = RoundClock()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=work["rounds"],
                                           evaluation_frequency=work["rounds"] + 1,
                                           train_cohort_size=n, val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=work["epochs"],
                                              local_learning_rate=work["learning_rate"],
                                              local_batch_size=work["batch_size"],
                                              local_max_grad_norm=work["max_grad_norm"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[clock])
    stamps = clock.stamps
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    print("RESULT " + json.dumps({"rounds_s": stamps[-1] - stamps[0], "last_round_s": stamps[-1] - stamps[-2],
                                  "rounds_seen": len(stamps) - 1, "pfl_wall_s": time.time() - t0,
                                  "finite": finite}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

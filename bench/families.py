"""Architecture x trainable mode: works or refused (why), step time and memory with DP vs without.

    .venv/bin/python bench/families.py                 # every family, tiny configs + the bundled MiniLM
    .venv/bin/python bench/families.py --steps 5 --families gpt2,llama --threads 2

Each family is the tiny random config of tests/test_families.py (2 layers, hidden 32, the
bundled MiniLM tokenizer's 30,522-word vocabulary), built in this process; "minilm" is the
bundled all-MiniLM-L6-v2 itself (6 layers, hidden 384). For every (family, mode) the view is
what a site trains (task.model.make_train_view; last_layers k=1 on cached prefix states),
and one optimizer step runs on the same fixed batch of 16 records x 32 tokens, without DP
and with Opacus (hooks), the two variants interleaved step by step so that the load of this
shared machine hits both alike; the median step time and the DP/non-DP ratio are reported.

Memory: the trainer's own figure for one physical batch (task.trainer._BatchMemory, what a
site logs). On CPU it is an estimate (trainable weights + gradients + layer outputs +
per-sample gradients), not a measurement: torch's CPU allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

BATCH, TOKENS = 16, 32


def build(family: str, mode: str):  # noqa: ANN201 - (view, inputs) or the refusal text
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedshield.task.model import ModelError, make_train_view, prefix_hidden_states

    torch.manual_seed(0)
    if family == "minilm":
        from fedshield.task.model import build_text_model

        model = build_text_model("", ["a", "b", "c"], 0)
    else:
        from tests.test_families import _tiny_config

        config = _tiny_config(family)
        config.num_labels = 3
        if config.pad_token_id is None:
            config.pad_token_id = 0
        model = AutoModelForSequenceClassification.from_config(config)
    try:
        view = make_train_view(model, mode, 1, 8, 16)
    except ModelError as exc:
        return None, str(exc).split(": ", 1)[-1]
    ids = torch.randint(1000, 2000, (BATCH, TOKENS))
    mask = torch.ones_like(ids)
    mask[: BATCH // 2, TOKENS // 2 :] = 0
    inputs = (ids, mask)
    if view.prefix_layers is not None:
        hidden = prefix_hidden_states(view.model, ids, mask, view.prefix_layers)
        inputs = (hidden, mask[:, : hidden.shape[1]])
    return view, inputs


def variant(view, inputs, dp: bool):  # noqa: ANN001, ANN201 - a step function and its memory meter
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedshield.privacy.dpsgd import make_private
    from fedshield.task.trainer import _BatchMemory

    labels = torch.arange(BATCH) % 3
    module = view.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if dp:
        loader = DataLoader(TensorDataset(*inputs, labels), batch_size=BATCH)
        private = make_private(module, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
        module, optimizer, criterion = private.module, private.optimizer, private.criterion
    memory = _BatchMemory(torch.device("cpu"))

    def step() -> float:
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with memory.measure(module, params):
            loss = criterion(module(*inputs), labels)
            loss.backward()
        optimizer.step()
        return time.perf_counter() - t

    return step, memory


def main() -> None:
    import torch

    from fedshield.task.families import FAMILIES, MODES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(["minilm", *FAMILIES]))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {BATCH} x {TOKENS} tokens, median of {args.steps} steps after 1 warm-up, "
          f"torch threads {torch.get_num_threads()}")
    print("| model | mode | result | trainable | step no-DP s | step DP s | DP/no-DP "
          "| mem no-DP MiB | mem DP MiB | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in args.families.split(","):
        for mode in args.modes.split(","):
            view, inputs = build(family, mode)
            if view is None:
                why = inputs.replace("|", "\\|")  # the modes that work, as a Markdown table cell
                print(f"| {family} | {mode} | refused: {why} | | | | | | | |", flush=True)
                continue
            n = sum(p.numel() for p in view.module.parameters() if p.requires_grad)
            plain_view, _ = build(family, mode)
            runs = {"plain": variant(plain_view, inputs, False), "dp": variant(view, inputs, True)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for i in range(args.steps + 1):
                for k, (step, _) in runs.items():
                    t = step()
                    if i:
                        times[k].append(t)
            plain, dp = (statistics.median(times[k]) for k in ("plain", "dp"))
            mem = {k: (m.result[0] if m.result else 0) / 2**20 for k, (_, m) in runs.items()}
            print(f"| {family} | {mode} | works | {n:,} | {plain:.3f} | {dp:.3f} | {dp / plain:.1f} | "
                  f"{mem['plain']:.1f} | {mem['dp']:.1f} | {mem['dp'] / max(mem['plain'], 1e-9):.1f} |", flush=True)


if __name__ == "__main__":
    main()

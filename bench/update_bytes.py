"""Bytes a site sends per round, by trainable mode, on the default model.

Only trainable weights travel. This measures the size of the reply's ArrayRecord as
Flower serializes it for the wire (`deflate` of every object in its tree: the record
and its array chunks), next to the raw float32 size, for all / last_layers (k=1, k=0) /
LoRA. The coordinator sends the same arrays to each site, so down = up.

    .venv/bin/python bench/update_bytes.py
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import copy

from fedshield import conf
from fedshield.protocol import to_array_record as to_arrays
from fedshield.task.pipeline import build_view


def wire_bytes(record) -> int:
    """Bytes of every object Flower pushes for this record (record + array chunks)."""
    total = len(record.deflate())
    for array in record.values():
        total += len(array.deflate())
        for child in array.children.values() if array.children else []:
            total += len(child.deflate())
    return total


def main() -> None:
    base = conf.load_config([])
    modes = [("all", 0), ("last_layers", 1), ("last_layers", 0), ("lora", 0)]
    rows = []
    for trainable, k in modes:
        cfg = copy.deepcopy(base)
        cfg.training.trainable, cfg.training.last_layers = trainable, k
        view = build_view(cfg)
        state = view.trainable_state()
        params = sum(v.size for v in state.values())
        raw = sum(v.nbytes for v in state.values())
        rows.append((f"{trainable}" + (f" k={k}" if trainable == "last_layers" else ""), len(state), params, raw,
                     wire_bytes(to_arrays(state))))
    full = rows[0][4]
    print(f"{'mode':<16} {'tensors':>7} {'parameters':>12} {'float32 MB':>11} {'wire MB':>9} {'vs all':>8}")
    for name, n, params, raw, wire in rows:
        print(f"{name:<16} {n:>7} {params:>12,} {raw / 1e6:>11.3f} {wire / 1e6:>9.3f} {wire / full:>8.4f}")


if __name__ == "__main__":
    main()

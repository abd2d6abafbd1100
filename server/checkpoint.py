"""A run's checkpoint: everything the coordinator needs to continue after a crash.

    <run>/checkpoint.npz   written after every round's central evaluation (and after round 0:
                           discovery and the feature-mean release), replaced atomically

It holds the global trainable weights, the wrapped Flower strategy's state (FedAdam's
moments), the sites no longer asked (budget, books that failed), each site's last ε and
declines, and the feature centre, together with the run id and a hash of the resolved
config, so that `--resume` continues exactly where the last completed round left off and
refuses a checkpoint of another run or config.

Written to a temporary file, fsynced, renamed over the old one, directory fsynced: a
crash leaves the previous checkpoint or the new one, never a torn one. A damaged file
(bad zip, CRC, missing field) is one clear error, not a guess.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedshield.privacy.errors import FedShieldError

CHECKPOINT = "checkpoint.npz"
VERSION = 1
_STATE = "__state__"
_WEIGHTS, _STRATEGY = "weights/", "strategy/"


class CheckpointError(FedShieldError):
    """No usable checkpoint to resume from."""


@dataclass
class Checkpoint:
    run_id: str
    config_sha256: str
    server_round: int  # the last completed round (0: discovery and centering done)
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    declines: dict[str, list[str]] = field(default_factory=dict)
    center: list[float] | None = None


def config_digest(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    state = {
        "version": VERSION, "run_id": ckpt.run_id, "config_sha256": ckpt.config_sha256,
        "round": ckpt.server_round, "excluded": ckpt.excluded, "epsilon": ckpt.epsilon,
        "declines": ckpt.declines, "center": ckpt.center,
    }
    arrays: dict[str, np.ndarray] = {_STATE: np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)}
    arrays.update({_WEIGHTS + k: v for k, v in ckpt.weights.items()})
    for attr, values in ckpt.strategy_state.items():
        arrays.update({f"{_STRATEGY}{attr}/{k}": v for k, v in values.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle
    path = run_dir / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(run_dir: Path, run_id: str, config_sha256: str) -> Checkpoint:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint; the run stopped before discovery finished, so there is "
                              "nothing to resume: start it again under a new output.run_name")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        state = json.loads(bytes(arrays.pop(_STATE)).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(exc).__name__}: {exc}); "
                              "restore it from a backup or start the run again") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a fedshield checkpoint of version {VERSION}")
    if state.get("run_id") != run_id:
        raise CheckpointError(f"{path}: a checkpoint of run {state.get('run_id')!r}, not {run_id!r}")
    if state.get("config_sha256") != config_sha256:
        raise CheckpointError(f"{path}: the run was started with another config; resume it with the config "
                              f"in {run_dir / 'config.yaml'} (only output.* may differ)")
    strategy: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith(_STRATEGY):
            attr, name = key[len(_STRATEGY):].split("/", 1)
            strategy.setdefault(attr, {})[name] = value
    try:
        return Checkpoint(
            run_id=run_id, config_sha256=config_sha256, server_round=int(state["round"]),
            weights={k[len(_WEIGHTS):]: v for k, v in arrays.items() if k.startswith(_WEIGHTS)},
            strategy_state=strategy, excluded={str(k): str(v) for k, v in state["excluded"].items()},
            epsilon={str(k): float(v) for k, v in state["epsilon"].items()},
            declines={str(k): [str(x) for x in v] for k, v in state["declines"].items()},
            center=None if state["center"] is None else [float(x) for x in state["center"]],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint (field {exc})") from None


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    """The state a Flower strategy carries from round to round (FedOpt's m_t and v_t)."""
    out = {}
    for attr in ("m_t", "v_t"):
        value = getattr(strategy, attr, None)
        if value:
            out[attr] = {k: np.asarray(v) for k, v in value.items()}
    return out


def restore_strategy_state(strategy: Any, state: dict[str, dict[str, np.ndarray]]) -> None:
    for attr, values in state.items():
        if not hasattr(strategy, attr):
            raise CheckpointError(f"checkpoint: strategy state {attr!r} does not belong to {type(strategy).__name__}")
        setattr(strategy, attr, {k: np.array(v) for k, v in values.items()})

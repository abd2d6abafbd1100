"""Checks on a site's update before it may join the aggregate.

A malformed or non-finite update (NaN, Inf, a wrong key or shape) is dropped from the
round with one line that names the site and the tensor; the round goes on without it.
"""

from __future__ import annotations

import json

import numpy as np


def update_problem(
    update: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> str | None:
    """None if `update` has exactly the expected tensors, shapes and finite values."""
    missing = sorted(set(expected) - set(update))
    if missing:
        return f"missing tensor {missing[0]!r} ({len(missing)} missing)"
    extra = sorted(set(update) - set(expected))
    if extra:
        return f"unexpected tensor {extra[0]!r}"
    for name, (shape, dtype) in expected.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(shape):
            return f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
        if arr.dtype != dtype:
            return f"tensor {name!r} has dtype {arr.dtype}, expected {dtype}"
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            return f"tensor {name!r} has {bad} non-finite values (NaN/Inf)"
    return None


def ledger_entries(site_record: dict) -> list[dict]:
    """The signed ledger entries a site sent with its reply (a JSON list); ValueError if unreadable."""
    raw = str(site_record.get("ledger-entries", "") or "[]")
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("unreadable ledger entries") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("unreadable ledger entries")
    return entries

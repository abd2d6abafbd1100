"""The run directory: everything a run leaves behind.

    <run>/config.yaml            the resolved config
    <run>/metrics.jsonl          one line per round (central metrics, ε per site, sites)
    <run>/privacy/ledger.jsonl   the sites' signed ledger entries, as received
    <run>/privacy/ledger-keys/   the sites' ledger signing public keys (<site>.pub)
    <run>/privacy/sites.json     per-site summary: final ε, budget, δ, accountant, declines
    <run>/plots/*.png            accuracy and ε per site over rounds
    <run>/model/                 the final model (save_pretrained + tokenizer)
    <run>/report.md              what ran and what it cost, in words
    <run>/checkpoint.npz         after every round: what --resume continues from (server/checkpoint.py)
    <run>/privacy/rejected-entries.jsonl   ledger entries that did not verify on arrival, kept apart
    <run>/sites/<site>/          simulation only: each virtual site's own state folder
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedshield import conf
from fedshield.conf.config import Config

LEDGER_KEYS = "ledger-keys"  # <run>/privacy/<this>/<site>.pub: what signed each site's entries
# The ServerApp's last line when a run stops with an error (server/app.py says it, server/cli.py quotes it).
RUN_STOPPED = "fedshield: the run stopped: "


def new_run_dir(cfg: Config) -> Path:
    name = cfg.output.run_name or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    path = Path(cfg.output.dir).expanduser().resolve() / name
    if path.exists() and any(path.iterdir()):
        raise conf.ConfigError(
            f"output.run_name={name!r}: {path} already holds a run; choose another name"
        )
    (path / "privacy" / LEDGER_KEYS).mkdir(parents=True, exist_ok=True)
    (path / "plots").mkdir(exist_ok=True)
    (path / "config.yaml").write_text(cfg.to_yaml())
    return path


def existing_run_dir(cfg: Config) -> Path:
    """The folder of the run `output.run_name` to resume; its config must be the one given
    (server/checkpoint.py checks everything but `output.*`)."""
    if not cfg.output.run_name:
        raise conf.ConfigError("--resume: say which run with output.run_name=NAME (its folder under output.dir)")
    path = Path(cfg.output.dir).expanduser().resolve() / cfg.output.run_name
    if not (path / "config.yaml").is_file():
        raise conf.ConfigError(f"output.run_name={cfg.output.run_name!r}: {path} holds no run to resume")
    return path


def run_to_resume(run: str | bool, output_dir: str, run_name: str = "") -> Path:
    """The run folder that `--resume [RUN]` names (`fedshield simulate` and `server` alike).

    RUN is a run folder's path or a run's name under `output_dir`; a bare `--resume` means
    `output.run_name` when it is set, else the newest run under `output_dir` (the one whose
    metrics.jsonl, or config.yaml, changed last): the run that was just interrupted.
    """
    base = Path(output_dir).expanduser().resolve()
    if isinstance(run, str):
        given = Path(run).expanduser()
        if (given / "config.yaml").is_file():
            return given.resolve()
        if (base / run / "config.yaml").is_file():
            return base / run
        raise conf.ConfigError(f"--resume {run}: holds no run to resume (neither a run folder nor a run "
                               f"under output.dir={str(base)!r})")
    if run_name:
        return existing_run_dir_named(base, run_name)
    runs = [p for p in base.iterdir() if not p.name.startswith(".") and (p / "config.yaml").is_file()] \
        if base.is_dir() else []
    if not runs:
        raise conf.ConfigError(f"--resume: output.dir={str(base)!r} holds no run; name one with --resume RUN")

    def changed(p: Path) -> float:
        metrics = p / "metrics.jsonl"
        return (metrics if metrics.is_file() else p / "config.yaml").stat().st_mtime

    return max(runs, key=changed)


def existing_run_dir_named(base: Path, run_name: str) -> Path:
    path = base / run_name
    if not (path / "config.yaml").is_file():
        raise conf.ConfigError(f"output.run_name={run_name!r}: {path} holds no run to resume")
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line, flushed and fsynced: a crash loses at most the line being written."""
    append_jsonl_all(path, [record])


def append_jsonl_all(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Lines in one write and one fsync (a round's records: one fsync, not one per site); a
    crash loses at most the lines of this call, the last of them possibly torn."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

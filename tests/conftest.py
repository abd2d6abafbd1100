"""Shared fixtures: a tiny random-weight BERT built in code, an easy synthetic task, and one
run of the default config shared by the e2e tests that need a real default run. Helpers
that are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from tests.helpers import synthetic_rows, write_csv


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedshield.task.model import bundled_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "topics.csv", synthetic_rows(600, seed=1))


@pytest.fixture
def flower_task_identity():
    """Flower stamps every message it builds with the run and task of the process (set by
    its runtimes); a test that builds messages outside them sets one and puts it back."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fedshield simulate` on the default config (8 sites of the bundled MiniLM on BBC News,
    PLD, target ε 8 at δ 1e-5) with `federation.rounds=2`, to fit the suite, and
    `output.tracking=mlflow` (output.* says where and how a run is recorded, never what it
    computes). Shared by the README's audit examples (tests/test_audit_readme.py),
    the tracking store's e2e check (tests/test_tracking.py) and the dashboard in a browser
    (tests/test_dashboard_browser.py, on a copy): one default run instead of three. None
    changes what the run wrote (the audit adds its report under audit/)."""
    out = tmp_path_factory.mktemp("default-run")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "fedshield", "simulate", "federation.rounds=2",
                           "output.tracking=mlflow", f"output.dir={out}", "output.run_name=default"],
                          cwd=root, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "default"

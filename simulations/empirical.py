"""`fedshield audit --empirical`: a one-run canary audit of a simulated federation.

Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run": m canary
records, each a unique string of random words with a random label, are planted at ONE
site, each included independently with probability 1/2. The federation trains once (the
ordinary simulation: the same ClientApp, DP-SGD, accountant and δ < 1/n check as any run).
The final model's loss on every canary (included or not) scores it; the bound of
privacy.canary turns the correct "in"/"out" guesses on the most confident canaries into a
lower bound on ε at 95% confidence, reported next to the site's accounted ε.

A lower bound below the accounted ε is expected (the audit sees only the final model, so it
is weaker than the worst case the accountant covers); one above it means the implementation
leaks more than it claims: that is flagged and the command exits with 1.

The canaries are only in the training file: the held-out test set is a separate file
(task.test_path), so no split can move a canary out of training or into evaluation.
"""

from __future__ import annotations

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import argparse
import csv
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.deploy.processes import add_deprecated_alias

if TYPE_CHECKING:  # privacy.canary brings scipy: imported when the audit runs, after its config is checked
    from fedshield.privacy.canary import CanaryResult

SITE_COLUMN = "site"
EXPECTED = ("a lower bound below the accounted ε is expected; "
            "one above it means the implementation leaks more than it claims")

# The synthetic base task: two topics that share no words (easy for any model).
WEATHER = "sunny rain cloud storm wind snow warm cold forecast breeze thunder humid".split()
MARKETS = "stock shares bank profit market trade price bond investor revenue dollar loss".split()
BASES = ("synthetic", "news-topics")


@dataclass
class Canaries:
    texts: list[str]
    labels: list[str]
    included: np.ndarray  # bool (m,)


def synthetic_base(n: int, rng: random.Random) -> tuple[list[tuple[str, str]], list[str]]:
    rows = []
    for i in range(n):
        label = "weather" if i % 2 == 0 else "markets"
        words = WEATHER if label == "weather" else MARKETS
        rows.append((" ".join(rng.choice(words) for _ in range(8)), label))
    return rows, ["markets", "weather"]


def news_base(n: int, rng: random.Random) -> tuple[list[tuple[str, str]], list[str]]:
    from fedshield.task.data import DataError, load_news_topics

    data = load_news_topics()
    if n > len(data):
        raise DataError(f"news-topics has {len(data)} articles; {n} base rows were asked for")
    idx = rng.sample(range(len(data)), n)
    texts, names = data.texts, data.class_names
    assert texts is not None and names is not None  # news-topics: texts, and names for its classes
    return [(texts[i], names[data.labels[i]]) for i in idx], list(names)


def canary_vocabulary(model: str, exclude: set[str]) -> list[str]:
    """Whole-word, alphabetic tokens of the model's tokenizer: one token per canary word."""
    from fedshield.task.model import load_tokenizer

    vocab = load_tokenizer(model).get_vocab()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) >= 4 and w not in exclude)


def make_canaries(m: int, classes: list[str], vocab: list[str], words: int, seed: int) -> Canaries:
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < m:
        text = " ".join(rng.choice(vocab, size=words, replace=False))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    labels = [classes[int(k)] for k in rng.integers(len(classes), size=m)]
    included = rng.random(m) < 0.5  # the auditor's secret coin flips
    return Canaries(texts, labels, included)


def _write(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def build_dataset(out: Path, sites: list[str], canary_site: str, base: str, base_rows: int,
                  test_rows: int, m: int, words: int, model: str, seed: int) -> tuple[Path, Path, list[str], Canaries]:
    """train.csv (base rows at every site + the included canaries at canary_site), test.csv
    (base rows only) and canaries.csv (every canary with its coin flip: the auditor's file)."""
    rng = random.Random(seed)
    make = synthetic_base if base == "synthetic" else news_base
    rows, classes = make(base_rows * len(sites) + test_rows, rng)
    train = [(t, lab, sites[i // base_rows]) for i, (t, lab) in enumerate(rows[: base_rows * len(sites)])]
    test = [(t, lab, sites[0]) for t, lab in rows[base_rows * len(sites):]]
    base_words = {w.lower() for t, _ in rows for w in t.split()}
    can = make_canaries(m, classes, canary_vocabulary(model, base_words), words, seed + 1)
    train += [(t, lab, canary_site) for t, lab, inc in zip(can.texts, can.labels, can.included, strict=False) if inc]
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    header = ["text", "label", SITE_COLUMN]
    train_path = _write(out / "train.csv", header, train)
    test_path = _write(out / "test.csv", header, test)
    _write(out / "canaries.csv", ["text", "label", "included"],
           [(t, lab, int(inc)) for t, lab, inc in zip(can.texts, can.labels, can.included, strict=False)])
    return train_path, test_path, classes, can


def canary_losses(model_dir: Path, texts: list[str], labels: list[str], max_length: int) -> np.ndarray:
    """Per-example cross-entropy of the final model under each canary's planted label."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    y = torch.tensor([label2id[lab] for lab in labels], dtype=torch.long)
    losses = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            enc = tok(texts[start:start + 64], truncation=True, max_length=max_length,
                      padding="max_length", return_tensors="pt")
            logits = model(**enc).logits
            losses.append(torch.nn.functional.cross_entropy(logits, y[start:start + 64], reduction="none"))
    return torch.cat(losses).numpy().astype(np.float64)


ACCOUNTANT_NAMES = {"pld": "PLD", "rdp": "RDP", "prv": "PRV"}  # privacy.accountant, as a report says it


def report(result: CanaryResult, site: str, accounted: float | None, dp_on: bool,
           run_dir: Path, *, accountant: str, neighbouring: str) -> tuple[dict[str, Any], str, bool]:
    """The audit's record and report; `accountant` and `neighbouring` are the run's
    (privacy.accountant, privacy.neighbouring): the accounted ε is stated under them."""
    leak = dp_on and accounted is not None and result.epsilon_lb > accounted
    record = {
        "canary_site": site,
        "m": result.m,
        "guesses": result.guesses,
        "correct": result.correct,
        "k_plus": result.k_plus,
        "k_minus": result.k_minus,
        "epsilon_lower_bound": result.epsilon_lb,
        "confidence": 1 - result.beta,
        "guess_grid_size": result.grid_size,
        "accounted_epsilon": accounted if dp_on else None,
        "accountant": accountant if dp_on else None,
        "neighbouring": neighbouring if dp_on else None,
        "delta": result.delta,
        "privacy": "dp-sgd" if dp_on else "none",
        "leaks_more_than_claimed": leak,
        "statement": EXPECTED,
        "method": "Steinke, Nasr, Jagielski (2023), one-run audit, Theorem 5.2 with the δ term; "
                  "score = minus the final model's loss on the canary",
        "run_dir": str(run_dir),
    }
    acc = f"{accounted:.4g}" if dp_on and accounted is not None else "none (privacy=none: no DP claim)"
    lines = [
        "# Empirical privacy audit (one training run, canaries)",
        "",
        f"- canary site: {site}; canaries m = {result.m}, each included with probability 1/2",
        f"- guesses r = {result.guesses} (k+ = {result.k_plus} \"in\", k- = {result.k_minus} \"out\"), "
        f"correct = {result.correct}",
        f"- **ε lower bound at {100 * (1 - result.beta):.0f}% confidence: {result.epsilon_lb:.4f}** "
        f"(best of {result.grid_size} guess counts, each tested at β/{result.grid_size})",
        f"- accounted ε of {site}: {acc}" + (f" ({ACCOUNTANT_NAMES.get(accountant, accountant)} accountant, "
                                             f"{neighbouring})" if dp_on else ""),
        f"- δ = {result.delta:g}",
        "",
        f"Note: {EXPECTED}.",
        "",
    ]
    if leak:
        lines += [f"**WARNING: THE LOWER BOUND ({result.epsilon_lb:.4f}) IS ABOVE THE ACCOUNTED ε "
                  f"({accounted:.4g}): the implementation leaks more than it claims.**", ""]
    lines += [f"Method: {record['method']}.", f"Run directory: {run_dir}", ""]
    return record, "\n".join(lines), leak


def empirical_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedshield audit --empirical",
        description="Plant canaries at one site, simulate once, and lower-bound ε empirically.",
        epilog="""examples:
  fedshield audit --empirical
  fedshield audit --empirical --canaries 400 --virtual-site site-2 federation.rounds=5 privacy.target_epsilon=4
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canaries", type=int, default=200, help="number of canaries m (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the canaries and their coin flips")
    parser.add_argument("--out", default="", help="output folder (default runs/empirical-<time>)")
    site_flag = parser.add_mutually_exclusive_group()
    # --virtual-site, not --site: in `fedshield audit`, --site names a real site's state folder.
    site_flag.add_argument("--virtual-site", default="site-0", metavar="SITE",
                           help="the virtual site that holds the canaries (default site-0)")
    add_deprecated_alias(site_flag, "--site", "--virtual-site")
    parser.add_argument("--base", choices=BASES, default="synthetic", help="the base task's rows")
    parser.add_argument("--base-rows", type=int, default=100, help="base rows per site (default 100)")
    parser.add_argument("--test-rows", type=int, default=100, help="held-out base rows (default 100)")
    parser.add_argument("--canary-words", type=int, default=8, help="random words per canary")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides and presets")
    args = parser.parse_args(argv)
    for name in ("canaries", "base_rows", "test_rows", "canary_words"):
        if getattr(args, name) < 1:
            raise conf.ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")

    # The task is built here (a text-file task on the canary data): a task preset only says
    # which one the user had in mind; heart-disease and image have no texts to plant canaries in.
    presets = [a.split("=", 1)[1].strip() for a in args.overrides if a.startswith("task=")]
    for preset in presets:
        if preset in ("heart-disease", "image"):  # no texts to plant canaries in
            raise conf.ConfigError(f"task={preset!r}: the canary audit needs a text task (canaries are texts)")
    overrides = [a for a in args.overrides if not a.startswith("task=")
                 and not a.startswith(("task.name=", "task.data_path=", "task.test_path="))]
    user = Config.load(overrides)
    sites = [f"site-{i}" for i in range(user.federation.num_sites)]
    if args.virtual_site not in sites:
        raise conf.ConfigError(f"--virtual-site={args.virtual_site!r}: must be one of {', '.join(sites)} "
                               "(federation.num_sites)")
    out = Path(args.out or Path(user.output.dir) / time.strftime("empirical-%Y%m%d-%H%M%S")).expanduser().resolve()
    if (out / "empirical_audit.json").exists():
        raise conf.ConfigError(f"--out={str(out)!r}: already holds an empirical audit; choose another folder")

    train, test, classes, can = build_dataset(
        out / "data", sites, args.virtual_site, args.base, args.base_rows, args.test_rows,
        args.canaries, args.canary_words, user.task.model, args.seed,
    )
    forced = {
        "task.name": "text-file", "task.data_path": str(train), "task.test_path": str(test),
        "task.text_column": "text", "task.label_column": "label", "task.site_column": SITE_COLUMN,
        "task.labels": "[" + ",".join(classes) + "]", "federation.partition": "natural",
        "output.dir": str(out / "runs"), "output.save_model": True,
    }
    cfg = Config.load(overrides + [f"{k}={v}" for k, v in forced.items()])
    print(f"empirical audit: {args.canaries} canaries at {args.virtual_site}, "
          f"{int(can.included.sum())} included (coin flips, seed {args.seed})")

    from fedshield.privacy.canary import BETA, audit_scores
    from fedshield.simulations.simulate import run_simulation

    run_dir = run_simulation(cfg, verbose=args.verbose)
    losses = canary_losses(run_dir / "model", can.texts, can.labels, cfg.task.max_length)
    dp_on = cfg.privacy.mode != "none"
    delta = cfg.privacy.delta
    result = audit_scores(-losses, can.included, delta=delta, beta=BETA)
    sites_json = json.loads((run_dir / "privacy" / "sites.json").read_text())
    accounted = float(sites_json[args.virtual_site]["epsilon"]) if dp_on and args.virtual_site in sites_json else None
    if dp_on and accounted is None:
        accounted = math.inf  # the site never reported: nothing to compare against

    record, text, leak = report(result, args.virtual_site, accounted, dp_on, run_dir,
                                accountant=cfg.privacy.accountant, neighbouring=cfg.privacy.neighbouring)
    record["canary_losses"] = {"included_mean": float(losses[can.included].mean()) if can.included.any() else None,
                               "excluded_mean": float(losses[~can.included].mean()) if (~can.included).any() else None}
    (out / "empirical_audit.json").write_text(json.dumps(record, indent=2))
    (out / "empirical_audit.md").write_text(text)
    acc = f"{accounted:.4g}" if dp_on else "none (privacy=none)"
    print(f"ε lower bound (95%): {result.epsilon_lb:.4f} from {result.correct}/{result.guesses} correct guesses "
          f"(m={result.m}); accounted ε of {args.virtual_site}: {acc}; δ={delta:g}")
    print(f"note: {EXPECTED}")
    if leak:
        print(f"LEAK: the lower bound {result.epsilon_lb:.4f} is ABOVE the accounted ε {accounted:.4g}: "
              "the implementation leaks more than it claims")
    print(f"report: {out / 'empirical_audit.md'}")
    return 1 if leak else 0

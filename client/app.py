"""The fedshield ClientApp: what runs at a site, in simulation and in deployment alike.

Messages from the coordinator carry the run's plan (the resolved config) and the current
trainable weights. What the site decides for itself never comes from the coordinator:
in deployment its data file, state folder, key and privacy settings (budget, δ, target ε)
come from the SuperNode's node config, which `fedshield client` fills from the site's own
command line. In simulation a virtual site takes its share of the bundled data (its
partition id) and keeps its state in the run directory.

Messages: `query` (who is this site), `query.feature_mean` (once per run, before round 1:
the site's noisy feature sum for feature centering, client/centering.py) and `train`.

Train replies: `arrays` (trained trainable weights only), `metrics` (num-examples, loss, ε),
and `site` (site name, and the signed ledger entry of the spend, written before the reply
leaves). A site that declines (budget, bad data, bad plan) replies with `declined=1` and
a one-line reason instead of weights; the coordinator carries on without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported

import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

import conf
from task import centering
from task.model import ModelError, TrainView
from task.partition import partition, site_names
from client.site import SiteState
from task.pipeline import build_view, encode, from_arrays, pool_and_test, read_text_file, to_arrays, view_fingerprint
from task.data import LabeledData
from task.trainer import LocalPlan, TrainingError, batches_per_epoch, poisson_rate, train_local
from privacy.accountant import Spend, epsilon
from privacy.errors import FedShieldError

log = logging.getLogger("fedshield.site")

# Node-config keys a deployed site sets for itself (see client/cli.py).
NODE_SITE_NAME, NODE_DATA, NODE_STATE, NODE_KEY = "site-name", "data-path", "state-dir", "site-key"
SITE_OVERRIDABLE = ("privacy.budget_epsilon", "privacy.target_epsilon", "privacy.delta",
                    "privacy.max_grad_norm", "privacy.mode", "privacy.center_noise_multiplier",
                    "privacy.center_clip_norm", "training.device",
                    "training.max_physical_batch_size")

app = ClientApp()


@dataclass
class Site:
    name: str
    cfg: DictConfig  # the coordinator's plan with the site's own settings on top
    data: LabeledData
    state: SiteState
    simulated: bool


def site_config(plan: DictConfig, node_config: dict) -> DictConfig:
    """The coordinator's plan, overridden by what the site set for itself."""
    own = {k: v for k, v in node_config.items() if k in SITE_OVERRIDABLE}
    unknown = [k for k in node_config if "." in k and k not in SITE_OVERRIDABLE]
    if unknown:
        raise conf.ConfigError(
            f"site config: {unknown[0]!r} cannot be set by a site; allowed: {', '.join(SITE_OVERRIDABLE)}"
        )
    if not own:
        return plan
    flat = conf.to_flat(plan)
    flat.update(own)
    return conf.load_config(base=flat)


def resolve_site(msg: Message, context: Context) -> Site:
    plan = conf.from_yaml(str(msg.content["config"]["fedshield-config"]))
    node = dict(context.node_config)
    cfg = site_config(plan, node)
    if NODE_SITE_NAME in node:  # deployment: everything local comes from the site itself
        name = str(node[NODE_SITE_NAME])
        # The coordinator's classes: a site row with any other label is refused (file, line).
        classes = tuple(str(c) for c in msg.content["config"]["class-names"])
        data = _site_file(conf.to_yaml(cfg.task), str(node[NODE_DATA]), classes)
        key = Path(str(node[NODE_KEY])) if node.get(NODE_KEY) else None
        state = _state(Path(str(node[NODE_STATE])), name, key)
        return Site(name, cfg, data, state, simulated=False)
    pid = int(node["partition-id"])
    names, data = _virtual_site_data(conf.to_yaml(cfg), pid)
    run_dir = Path(str(msg.content["config"]["run-dir"]))
    return Site(names[pid], cfg, data, _state(run_dir / "sites" / names[pid], names[pid], None), True)


def _state(state_dir: Path, name: str, key: Path | None) -> SiteState:
    # Read from disk on every message: in simulation another worker process may have
    # served this site in an earlier round, so no in-memory copy can be trusted.
    return SiteState(state_dir, name, key)


@lru_cache(maxsize=8)
def _site_file(task_yaml: str, path: str, classes: tuple[str, ...]) -> LabeledData:
    from omegaconf import OmegaConf

    return read_text_file(OmegaConf.create(task_yaml), path, labels=list(classes))


@lru_cache(maxsize=64)
def _virtual_site_data(cfg_yaml: str, pid: int) -> tuple[list[str], LabeledData]:
    cfg = conf.from_yaml(cfg_yaml)
    pool, _ = pool_and_test(cfg)
    fed = cfg.federation
    parts = partition(pool.labels, fed.num_sites, fed.partition, seed=fed.seed,
                      alpha=fed.dirichlet_alpha, groups=pool.groups)
    return site_names(fed.partition, fed.num_sites, pool.groups), pool.subset(parts[pid])


def _device(cfg: DictConfig) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise FedShieldError("training.device=cuda: no CUDA device is available at this site")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def check_delta(site: Site) -> None:
    n = len(site.data)
    if site.cfg.privacy.mode != "none" and site.cfg.privacy.delta >= 1.0 / max(n, 1):
        raise conf.ConfigError(
            f"privacy.delta={site.cfg.privacy.delta:g}: must be below 1/n = {1.0 / max(n, 1):.3g} "
            f"for site {site.name} with n={n} records"
        )


def _decline(msg: Message, site_name: str, reason: str, kind: str, epsilon: float = 0.0) -> Message:
    log.warning("%s: declines: %s", site_name, reason)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "declined": 1, "epsilon": float(epsilon)}),
        "site": ConfigRecord({"site": site_name, "reason": reason, "kind": kind}),
    })
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this site: its name, record count and public key (for sampling and audit)."""
    try:
        site = resolve_site(msg, context)
        check_delta(site)
    except FedShieldError as exc:
        return _decline(msg, str(context.node_config.get(NODE_SITE_NAME, "?")), str(exc), "error")
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": len(site.data), "declined": 0}),
        "site": ConfigRecord({"site": site.name, "public-key": site.state.public_key_pem()}),
    })
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _guarded(msg, context, _train)


def _guarded(msg: Message, context: Context, handler) -> Message:
    """Run `handler(msg, site)`; a fedshield error becomes a one-line decline, not a crash."""
    name = str(context.node_config.get(NODE_SITE_NAME, context.node_config.get("partition-id", "?")))
    try:
        site = resolve_site(msg, context)
        name = site.name
        return handler(msg, site)
    except FedShieldError as exc:
        kind = "budget" if exc.__class__.__name__ == "BudgetExceeded" else "error"
        return _decline(msg, name, str(exc), kind)


def _train(msg: Message, site: Site) -> Message:
    cfg, priv, tr = site.cfg, site.cfg.privacy, site.cfg.training
    config = msg.content["config"]
    run_id, server_round = str(config["run-id"]), int(config["server-round"])
    check_delta(site)
    device = _device(cfg)
    view, dataset = _prepare(site, config, device)
    view.load_trainable(from_arrays(msg.content["arrays"]))
    if centering.PLAN_KEY in config and centering.applies(cfg, view):
        centering.set_center(view, list(config[centering.PLAN_KEY]))
    n = len(dataset)
    dp = priv.mode == "dp-sgd"
    q = poisson_rate(n, tr.batch_size)
    steps = tr.local_epochs * batches_per_epoch(n, tr.batch_size)
    sigma = 0.0
    if dp:
        # The run's feature-mean release counts against the same target, whether or not
        # this site made it (over-count, never under-count).
        release = centering.release_spend(cfg, view)
        sigma = float(priv.noise_multiplier) if priv.noise_multiplier else site.state.noise_multiplier(
            run_id, float(priv.target_epsilon), float(priv.delta), q, steps,
            int(cfg.federation.rounds), priv.accountant, before=[release] if release else [],
        )
        decision = site.state.check_budget(Spend(sigma, q, steps), _budget(site), priv.delta, priv.accountant)
        if not decision.ok:
            return _decline(msg, site.name, decision.reason, "budget", decision.epsilon_now)
    plan = LocalPlan(
        epochs=tr.local_epochs, batch_size=tr.batch_size,
        max_physical_batch_size=tr.max_physical_batch_size, learning_rate=tr.learning_rate,
        optimizer=tr.optimizer, dp=dp, noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm,
        grad_sample_mode=tr.grad_sample_mode, accountant=priv.accountant,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    torch.manual_seed(_seed(cfg, site, server_round))
    generator = torch.Generator().manual_seed(_seed(cfg, site, server_round) + 1)
    t0 = time.time()
    result = train_local(view.module, dataset, plan, device=device, generator=generator)
    state = view.trainable_state()

    entries: list[dict] = []
    if dp:
        # Spend before release: the entry is on disk (fsync) before the weights leave.
        ran = [Spend(*s) for s in result.spends]
        if sum(s.steps for s in ran) != steps or any(s.sample_rate != q for s in ran):
            raise TrainingError(f"site {site.name}: ran {ran}, planned {steps} steps at q={q}")
        entries = _record(site, run_id, server_round, ran, float(priv.max_grad_norm), {"release": "dp-sgd"})
    entry_json, eps = json.dumps(entries), float(entries[-1]["epsilon"]) if entries else 0.0
    metrics = MetricRecord({
        "num-examples": n, "declined": 0, "train-loss": float(result.mean_loss),
        "epsilon": eps, "noise-multiplier": sigma, "seconds": time.time() - t0,
    })
    site_record = ConfigRecord({"site": site.name, "ledger-entries": entry_json})
    content = RecordDict({"arrays": to_arrays(state), "metrics": metrics, "site": site_record})
    return Message(content=content, reply_to=msg)


@app.query("feature_mean")
def feature_mean(msg: Message, context: Context) -> Message:
    """The site's noisy sum of [CLS] features (task.centering), spent before it leaves."""
    return _guarded(msg, context, _feature_mean)


def _feature_mean(msg: Message, site: Site) -> Message:
    cfg, priv = site.cfg, site.cfg.privacy
    config = msg.content["config"]
    check_delta(site)
    device = _device(cfg)
    view, dataset = _prepare(site, config, device)
    if not centering.applies(cfg, view):
        raise conf.ConfigError("training.center_features: this model and training.trainable have no pooler input to centre")
    spend = centering.release_spend(cfg, view)
    clip = centering.clip_norm(cfg, view)
    if spend is not None:
        decision = site.state.check_budget(spend, _budget(site), priv.delta, priv.accountant)
        if not decision.ok:
            return _decline(msg, site.name, decision.reason, "budget", decision.epsilon_now)
    generator = torch.Generator().manual_seed(_seed(cfg, site, 0) + 7)
    noise_std = spend.noise_multiplier * clip if spend is not None else 0.0
    total = centering.noisy_feature_sum(view, dataset, clip, noise_std, generator, device)
    entries = []
    if spend is not None:
        entries = _record(site, str(config["run-id"]), 0, [spend], clip, {"release": "feature-mean"})
    content = RecordDict({
        "arrays": to_arrays({"feature-sum": total}),
        "metrics": MetricRecord({"num-examples": len(dataset), "declined": 0,
                                 "epsilon": float(entries[-1]["epsilon"]) if entries else 0.0}),
        "site": ConfigRecord({"site": site.name, "ledger-entries": json.dumps(entries)}),
    })
    return Message(content=content, reply_to=msg)


def _prepare(site: Site, config, device: torch.device) -> tuple[TrainView, "torch.utils.data.TensorDataset"]:
    """The model view (its frozen weights checked against the coordinator's) and the
    site's encoded records."""
    view = build_view(site.cfg, device)
    expected = str(config.get("frozen-fingerprint", ""))
    if expected and view_fingerprint(view) != expected:
        raise ModelError(
            f"site {site.name}: its copy of the model's frozen weights differs from the "
            "coordinator's (another model version?); not training"
        )
    return view, encode(site.cfg, view, site.data, cache_dir=site.state.dir / "cache", device=device)


def _budget(site: Site) -> float:
    priv = site.cfg.privacy
    return float(priv.budget_epsilon if priv.budget_epsilon is not None else priv.target_epsilon)


def _record(site: Site, run_id: str, server_round: int, spends: list[Spend], clip: float, extra: dict) -> list[dict]:
    """Append (signed, fsynced) one ledger entry per spend; ε is over the whole history."""
    priv = site.cfg.privacy
    history = site.state.history()
    entries = []
    for spend in spends:
        history.append(spend)
        entries.append(site.state.record_spend({
            "run_id": run_id, "round": server_round, "site": site.name,
            "mechanism": "dp-sgd-poisson-gaussian", "privacy_unit": "record",
            "noise_multiplier": spend.noise_multiplier, "sample_rate": spend.sample_rate,
            "steps": spend.steps, "max_grad_norm": float(clip),
            "delta": float(priv.delta), "accountant": priv.accountant,
            "epsilon": epsilon(history, priv.delta, priv.accountant), **extra,
        }))
    return entries


def _seed(cfg: DictConfig, site: Site, server_round: int) -> int:
    """Reproducible in simulation; unpredictable in deployment (the noise must be secret)."""
    if site.simulated:
        return (int(cfg.federation.seed) * 1_000_003 + hash_name(site.name) * 101 + server_round) % 2**62
    return int.from_bytes(os.urandom(8), "big") % 2**62


def hash_name(name: str) -> int:
    import hashlib

    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)

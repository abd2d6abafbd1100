"""The fedshield ClientApp: what runs at a site, in simulation and in deployment alike.

Messages (protocol.py has every field): HELLO (who is this site), FEATURE_SUM (once per
run, before round 1: the site's noisy feature sum for feature centering, task/centering.py)
and TRAIN. Every instruction's plan is parsed by `protocol.read_plan`; anything that is not
exactly the protocol is declined with kind `protocol`, never trained on.

What the site decides for itself never comes from the coordinator: in deployment its data
file, state folder, ledger signing key and privacy settings (budget, δ, target ε) come
from the SuperNode's node config, which `fedshield client` fills from the site's own
command line. In simulation a virtual site takes its share of the bundled data (its
partition id, task.sites.virtual_sites) and keeps its state in the run directory.

A site that declines (budget, bad data, bad plan) replies with a `Decline` (a kind and a
one-line reason) instead of weights; the coordinator carries on without it.

Per-message cost. A simulation worker serves many virtual sites, each message a fresh
call; what depends only on the plan and the node is computed once per worker process and
kept: the parsed config, the site's share of the data, its open state (signing key,
folder). What can change between messages — the site's ledger, which another worker may
have appended to in an earlier round — is read once per message (`SiteState.refresh`),
and every privacy decision of that message uses that one reading.
"""

from __future__ import annotations

import os

import deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

import conf
import protocol
from client import secagg
from client.site import COUNT_RELEASE, SiteState
from privacy.accountant import Spend, epsilon
from privacy.errors import FedShieldError
from task import centering
from task.data import LabeledData
from task.model import ModelError, TrainView
from task.pipeline import build_view, encode, read_text_file, view_fingerprint
from task.sites import check_delta, virtual_sites
from task.trainer import LocalPlan, TrainingError, batches_per_epoch, poisson_rate, train_local

log = logging.getLogger("fedshield.site")

# Node-config keys a deployed site sets for itself (see client/cli.py).
NODE_SITE_NAME, NODE_DATA, NODE_STATE, NODE_KEY = "site-name", "data-path", "state-dir", "site-key"
# The site's privacy policy: what it decides for its own data. A coordinator's plan may be
# stricter (then the plan's value is used) but never looser: a looser one is declined, kind
# `policy`, naming the key. Keys the site did not set take the schema's defaults (DP on,
# δ = 1e-5, ε = 8 per run, budget = ε, center noise 4), so a site started with no setting at
# all still refuses a plan without DP. `budget_epsilon` null means the site's target ε.
POLICY = ("privacy.mode", "privacy.target_epsilon", "privacy.budget_epsilon", "privacy.delta",
          "privacy.min_noise_multiplier", "privacy.center_noise_multiplier", "privacy.neighbouring",
          "privacy.count_noise_multiplier", "federation.secure_aggregation")
# Operational settings a site may set for itself; they apply over the plan as they are.
OPERATIONAL = ("privacy.max_grad_norm", "privacy.center_clip_norm", "training.device",
               "training.max_physical_batch_size")
SITE_OVERRIDABLE = POLICY + OPERATIONAL



@dataclass
class Site:
    name: str
    cfg: DictConfig  # the coordinator's plan, checked against the site's policy (site_config)
    data: LabeledData
    state: SiteState
    simulated: bool


class PolicyError(FedShieldError):
    """The coordinator's plan asks for less privacy than the site's policy allows."""


def site_config(plan: DictConfig, node_config: Mapping[str, Any], deployed: bool = True) -> DictConfig:
    """The config a site works with: the coordinator's plan, checked against the site's
    privacy policy (deployed sites; PolicyError if the plan is looser) and with the site's
    operational settings on top. A simulation's virtual sites take the plan as it is."""
    own = {k: v for k, v in node_config.items() if "." in k}
    unknown = [k for k in own if k not in SITE_OVERRIDABLE]
    if unknown:
        raise conf.ConfigError(
            f"site config: {unknown[0]!r} cannot be set by a site; allowed: {', '.join(SITE_OVERRIDABLE)}"
        )
    operational = {k: v for k, v in own.items() if k in OPERATIONAL}
    if deployed:
        policy = conf.load_config([f"{k}={v}" for k, v in own.items() if k in POLICY])
        check_policy(plan, policy)
        floor = policy.privacy.min_noise_multiplier
        if floor is not None and (plan.privacy.min_noise_multiplier or 0.0) < floor:
            operational["privacy.min_noise_multiplier"] = floor  # a plan silent on it gets the site's floor
    if not operational:
        return plan
    flat = conf.to_flat(plan)
    flat.update(operational)
    return conf.load_config(base=flat)


def check_policy(plan: DictConfig, policy: DictConfig) -> None:
    """Refuse, naming the key, a plan that is looser than the site's policy on any field."""
    p, mine = plan.privacy, policy.privacy
    if mine.mode == "dp-sgd" and p.mode != "dp-sgd":
        raise PolicyError(f"privacy.mode={p.mode!r}: this site trains only with DP (dp-sgd)")
    if p.mode != "dp-sgd":
        _check_secure(plan, policy)
        return  # the site's own policy is no DP, and so is the plan
    if p.target_epsilon > mine.target_epsilon:
        raise PolicyError(f"privacy.target_epsilon={p.target_epsilon:g}: above this site's {mine.target_epsilon:g}")
    budget = p.budget_epsilon if p.budget_epsilon is not None else p.target_epsilon
    own_budget = mine.budget_epsilon if mine.budget_epsilon is not None else mine.target_epsilon
    if budget > own_budget:
        raise PolicyError(f"privacy.budget_epsilon={budget:g}: above this site's {own_budget:g}")
    if p.delta > mine.delta:
        raise PolicyError(f"privacy.delta={p.delta:g}: above this site's {mine.delta:g}")
    floor = mine.min_noise_multiplier
    if floor is not None and p.noise_multiplier is not None and p.noise_multiplier < floor:
        raise PolicyError(f"privacy.noise_multiplier={p.noise_multiplier:g}: below this site's minimum {floor:g}")
    if floor is not None and p.min_noise_multiplier is not None and p.min_noise_multiplier < floor:
        raise PolicyError(f"privacy.min_noise_multiplier={p.min_noise_multiplier:g}: below this site's {floor:g}")
    if p.center_noise_multiplier < mine.center_noise_multiplier:
        raise PolicyError(f"privacy.center_noise_multiplier={p.center_noise_multiplier:g}: below this site's "
                          f"{mine.center_noise_multiplier:g}")
    # The two relations' ε do not compare: the site's is the only one it accounts under.
    if p.neighbouring != mine.neighbouring:
        raise PolicyError(f"privacy.neighbouring={p.neighbouring!r}: this site accounts under {mine.neighbouring!r}")
    if p.count_noise_multiplier < mine.count_noise_multiplier:
        raise PolicyError(f"privacy.count_noise_multiplier={p.count_noise_multiplier:g}: below this site's "
                          f"{mine.count_noise_multiplier:g}")
    _check_secure(plan, policy)


def _check_secure(plan: DictConfig, policy: DictConfig) -> None:
    """A site that requires secure aggregation sends no update in the clear (whatever its DP mode)."""
    if policy.federation.secure_aggregation != "off" and plan.federation.secure_aggregation == "off":
        raise PolicyError("federation.secure_aggregation='off': this site sends its update only masked "
                          f"({policy.federation.secure_aggregation})")


# ------------------------------------------------------------ per-worker caches


@lru_cache(maxsize=16)
def _config(config_yaml: str, node_items: tuple[tuple[str, Any], ...], deployed: bool) -> DictConfig:
    """The plan's config for this site (site_config), parsed once per (plan, node)."""
    cfg = site_config(conf.from_yaml(config_yaml), dict(node_items), deployed)
    OmegaConf.set_readonly(cfg, True)  # shared by every message of this worker
    return cfg


@lru_cache(maxsize=8)
def _site_file(task_yaml: str, path: str, classes: tuple[str, ...]) -> LabeledData:
    return read_text_file(OmegaConf.create(task_yaml), path, labels=list(classes))


_STATES: dict[tuple[str, str, str], SiteState] = {}


def _state(state_dir: Path, name: str, key: Path | None) -> SiteState:
    """The site's state folder, opened (key loaded or made) once per worker process; its
    ledger is re-read by `refresh()` on every message."""
    cache_key = (str(state_dir), name, str(key or ""))
    state = _STATES.get(cache_key)
    if state is None:
        if len(_STATES) >= 4096:
            _STATES.clear()
        state = _STATES[cache_key] = SiteState(state_dir, name, key)  # reads the ledger
    else:
        state.refresh()
    if state.recovery_message:  # a torn last line from a crash was set aside: the operator must know
        log.warning("%s: %s", name, state.recovery_message)
    return state


def resolve_site(plan: protocol.Plan, context: Context) -> Site:
    node = dict(context.node_config)
    # Only dotted keys are config (the site's own settings); the rest (partition-id, paths)
    # must not split the cache: a worker serves many virtual sites with one plan.
    cfg = _config(plan.config_yaml, tuple(sorted((k, v) for k, v in node.items() if "." in k)),
                  NODE_SITE_NAME in node)
    if NODE_SITE_NAME in node:  # deployment: everything local comes from the site itself
        name = str(node[NODE_SITE_NAME])
        # The coordinator's classes: a site row with any other label is refused (file, line).
        data = _site_file(OmegaConf.to_yaml(cfg.task), str(node[NODE_DATA]), plan.class_names)
        key = Path(str(node[NODE_KEY])) if node.get(NODE_KEY) else None
        return Site(name, cfg, data, _state(Path(str(node[NODE_STATE])), name, key), simulated=False)
    pid = int(node["partition-id"])
    name, data = virtual_sites(cfg)[pid]
    state = _state(Path(plan.run_dir) / "sites" / name, name, None)
    return Site(name, cfg, data, state, simulated=True)


def _node_name(context: Context) -> str:
    node = context.node_config
    return str(node.get(NODE_SITE_NAME, f"site-{node.get('partition-id', '?')}"))


def handle(msg: Message, context: Context, handler: Callable[[Message, protocol.Plan, Site], Message]) -> Message:
    """Parse the plan, resolve the site, run `handler`; a fedshield error becomes a
    one-line decline, not a crash. Public with `train_round`: a ClientApp built around
    the site's own pipeline (tests and bench/poisoning.py build hostile sites so) uses them."""
    name = _node_name(context)
    try:
        plan = protocol.read_plan(msg)
        site = resolve_site(plan, context)
        name = site.name
        check_delta(site.cfg, site.name, len(site.data))
        booked = site.state.neighbouring()
        if site.cfg.privacy.mode == "dp-sgd" and booked not in (None, site.cfg.privacy.neighbouring):
            raise PolicyError(f"privacy.neighbouring={site.cfg.privacy.neighbouring!r}: this site's ledger is "
                              f"accounted under {booked!r}, and one site's ε is composed under one relation")
        return handler(msg, plan, site)
    except protocol.ProtocolError as exc:
        return _decline(msg, name, f"the coordinator's message broke the protocol: {exc}", "protocol")
    except PolicyError as exc:
        return _decline(msg, name, f"the plan asks for less privacy than this site allows: {exc}", "policy")
    except FedShieldError as exc:
        # The details (a data file's path, a row, a label) stay in the site's log: the
        # coordinator learns that the site could not take part, and the kind of error.
        log.warning("%s: declines: %s", name, exc)
        return protocol.decline_reply(msg, site=name, kind="error", reason=(
            f"the site could not process this message ({type(exc).__name__}); the details are in its log"))


def _decline(msg: Message, site: str, reason: str, kind: str) -> Message:
    log.warning("%s: declines: %s", site, reason)
    return protocol.decline_reply(msg, site=site, kind=kind, reason=reason)


# ------------------------------------------------------------ handlers


def hello(msg: Message, context: Context) -> Message:
    """Who is this site: its name, record count and ledger public key (for sampling and audit)."""
    return handle(msg, context, _hello)


def _hello(msg: Message, plan: protocol.Plan, site: Site) -> Message:
    count = public_count(site, plan.run_id)
    if isinstance(count, str):
        return _decline(msg, site.name, count, "budget")
    # The count's entry goes with the hello of the run that spent it (again after a
    # coordinator restart: the coordinator's books recognise an entry they hold already).
    entries = [count.entry] if count.spent_in(plan.run_id) else []
    return protocol.hello_reply(msg, site=site.name, num_examples=count.n,
                                ledger_public_key=site.state.public_key_pem(), ledger_entries=entries)


@dataclass(frozen=True)
class PublicCount:
    """The record count a site releases: `n`, the ledger entry that released it (None: the
    count is public), and whether this very call spent it (`fresh`)."""

    n: int
    entry: dict[str, Any] | None = None
    fresh: bool = False

    def spent_in(self, run_id: str) -> bool:
        return self.entry is not None and self.entry.get("run_id") == run_id

    def spend(self) -> Spend:
        assert self.entry is not None
        return Spend(self.entry["noise_multiplier"], self.entry["sample_rate"], self.entry["steps"])


def public_count(site: Site, run_id: str) -> PublicCount | str:
    """The record count this site releases, or why it cannot (a budget reason).

    replace-one, or no DP: the exact count (public under that relation). add-remove: the
    count is protected (privacy.neighbouring): released once per dataset as
    max(1, round(n + N(0, s^2))) with s = privacy.count_noise_multiplier, a Gaussian mechanism
    of sensitivity 1 (one step at q = 1, composed in the same accountant), spent before it
    leaves; later runs on the same data reuse it (post-processing, no spend)."""
    priv = site.cfg.privacy
    n = len(site.data)
    if priv.mode != "dp-sgd" or priv.neighbouring != "add-remove":
        return PublicCount(n)
    digest = site.state.data_digest(_data_bytes(site.data))
    found = site.state.released_count(digest)
    if found is not None:
        return PublicCount(*found)
    spend = Spend(float(priv.count_noise_multiplier), 1.0, 1)
    decision = site.state.check_budget(spend, _budget(site), priv.delta, priv.accountant, priv.neighbouring)
    if not decision.ok:
        return f"releasing its record count: {decision.reason}"
    generator = torch.Generator().manual_seed(_seed(site.cfg, site, 0) + 11)
    noisy = n + float(priv.count_noise_multiplier) * float(torch.randn((), generator=generator, dtype=torch.float64))
    released = max(1, round(noisy))  # post-processing of the Gaussian count
    entry = _record(site, run_id, 0, [spend], 1.0, {  # clip 1.0: the count's sensitivity
        "release": COUNT_RELEASE, "released_count": released, "data_digest": digest})[0]
    return PublicCount(released, entry, fresh=True)


# id(data) -> (data, digest): a worker's site data objects are cached (_site_file, virtual_sites),
# so each is hashed once, not on every message; the object is kept so that its id is not reused.
_DIGESTS: dict[int, tuple[LabeledData, bytes]] = {}


def _data_bytes(data: LabeledData) -> bytes:
    """A digest of the site's records, canonically (what its count counts)."""
    kept = _DIGESTS.get(id(data))
    if kept is not None and kept[0] is data:
        return kept[1]
    h = hashlib.sha256()
    h.update(json.dumps(data.class_names).encode())
    h.update(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes())
    if data.texts is not None:
        for t in data.texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    if data.features is not None:
        h.update(np.ascontiguousarray(data.features, dtype=np.float32).tobytes())
    if len(_DIGESTS) >= 64:
        _DIGESTS.clear()
    _DIGESTS[id(data)] = (data, h.digest())
    return h.digest()


def _counted(msg: Message, plan: protocol.Plan, site: Site) -> PublicCount | Message:
    """The released count for a FEATURE_SUM or TRAIN reply (its entry goes with the reply
    if this very message released it: a coordinator that skipped HELLO); a decline if the
    count cannot be released."""
    count = public_count(site, plan.run_id)
    if isinstance(count, str):
        return _decline(msg, site.name, count, "budget")
    return count


def feature_sum(msg: Message, context: Context) -> Message:
    """The site's noisy sum of [CLS] features (task.centering), spent before it leaves."""
    return handle(msg, context, _feature_sum)


def _feature_sum(msg: Message, plan: protocol.Plan, site: Site) -> Message:
    cfg, priv = site.cfg, site.cfg.privacy
    device = _device(cfg)
    view, dataset = _prepare(site, plan, device)
    if not centering.applies(cfg, view):
        raise conf.ConfigError(
            "training.center_features: this model and training.trainable have no pooler input to centre")
    count = _counted(msg, plan, site)
    if isinstance(count, Message):
        return count
    spend = centering.release_spend(cfg, view)
    clip = centering.clip_norm(cfg, view)
    if spend is not None:
        decision = site.state.check_budget(spend, _budget(site), priv.delta, priv.accountant, priv.neighbouring)
        if not decision.ok:
            return _decline(msg, site.name, decision.reason, "budget")
    generator = torch.Generator().manual_seed(_seed(cfg, site, 0) + 7)
    noise_std = spend.noise_multiplier * clip if spend is not None else 0.0
    total = centering.noisy_feature_sum(view, dataset, clip, noise_std, generator, device)
    entries = _record(site, plan.run_id, 0, [spend], clip, {"release": "feature-mean"}) if spend else []
    count_entries = [count.entry] if count.fresh and count.entry is not None else []
    return protocol.feature_sum_reply(msg, site=site.name, num_examples=count.n, feature_sum=total,
                                      ledger_entries=_with_unreported(site, plan.run_id, count_entries + entries))


def done(msg: Message, context: Context) -> Message:
    """The run is over: noted in the site's state (for its agent's exit code); nothing is released."""
    return handle(msg, context, _done)


def _done(msg: Message, plan: protocol.Plan, site: Site) -> Message:
    site.state.mark_done(plan.run_id)
    return protocol.done_reply(msg, site=site.name)


def train(msg: Message, context: Context) -> Message:
    return handle(msg, context, lambda m, plan, site: _train(m, plan, site, context))


def _train(msg: Message, plan: protocol.Plan, site: Site, context: Context) -> Message:
    step = protocol.read_secagg(msg)
    secure = site.cfg.federation.secure_aggregation != "off"
    if step is None and secure:
        return _decline(msg, site.name, "this run aggregates securely (federation.secure_aggregation="
                        f"{site.cfg.federation.secure_aggregation}): an update in the clear is refused", "protocol")
    if step is None:
        return train_round(msg, plan, site)
    if not secure:
        return _decline(msg, site.name, "a secure-aggregation stage in a run whose plan has "
                        "federation.secure_aggregation=off", "protocol")
    try:
        if step.server_round != plan.server_round:
            raise secagg.SecAggError(f"secure aggregation: the stage is for round {step.server_round}, the "
                                     f"training instruction for round {plan.server_round}")
        state = secagg.begin_collect(context, step, plan.run_id)  # before any training: refuse early
        update = local_update(msg, plan, site)
        if isinstance(update, Message):
            return update
        secagg.claim_round(site.state.dir, plan.run_id, step.server_round)
        weight = 1 if site.cfg.privacy.unit == "site" else update.num_examples
        vector = secagg.masked(context, state, update.arrays, update.weights, weight, site.cfg)
    except secagg.SecAggError as exc:
        return _decline(msg, site.name, str(exc), "protocol")
    return protocol.train_reply(msg, site=site.name, arrays=vector, num_examples=update.num_examples,
                                ledger_entries=update.ledger_entries)


def _secagg_handler(stage: str) -> Callable[[Message, Context], Message]:
    """The ClientApp handler of a SecAgg+ key stage (setup, share, unmask)."""

    def run(msg: Message, plan: protocol.Plan, site: Site, context: Context) -> Message:
        step = protocol.read_secagg(msg)
        if step is None or step.stage != stage:
            raise protocol.ProtocolError(f"expected a secure-aggregation {stage} stage")
        if site.cfg.federation.secure_aggregation == "off":
            return _decline(msg, site.name, f"a secure-aggregation {stage} stage in a run whose plan has "
                            "federation.secure_aggregation=off", "protocol")
        try:
            if stage == "setup":
                fields = secagg.setup(context, step, plan.run_id, site.state.key, site.name)
            elif stage == "share":
                fields = secagg.share(context, step, plan.run_id, site.cfg, site.state.key, site.state.dir)
            elif stage == "check":
                fields = secagg.check(context, step, plan.run_id)
            else:
                fields = secagg.unmask(context, step, plan.run_id)
        except secagg.SecAggError as exc:
            return _decline(msg, site.name, str(exc), "protocol")
        return protocol.secagg_reply(msg, site=site.name, stage=stage, fields=fields)

    def handler(msg: Message, context: Context) -> Message:
        return handle(msg, context, lambda m, plan, site: run(m, plan, site, context))

    return handler


secagg_setup = _secagg_handler("setup")
secagg_share = _secagg_handler("share")
secagg_check = _secagg_handler("check")
secagg_unmask = _secagg_handler("unmask")

Handler = Callable[[Message, Context], Message]


def site_app(**replaced: Handler) -> ClientApp:
    """The site's ClientApp: every handler, under the message kind protocol.py gives it.
    Any may be `replaced` by name (tests and bench/poisoning.py build hostile or vanishing
    sites around the real handlers so); an unknown name is a ValueError."""
    handlers: dict[str, Handler] = {"hello": hello, "feature_sum": feature_sum, "done": done, "train": train,
                                    "secagg_setup": secagg_setup, "secagg_share": secagg_share,
                                    "secagg_check": secagg_check, "secagg_unmask": secagg_unmask}
    unknown = sorted(set(replaced) - set(handlers))
    if unknown:
        raise ValueError(f"site_app: no handler {unknown[0]!r}; handlers: {', '.join(handlers)}")
    handlers.update(replaced)
    out = ClientApp()
    out.query()(handlers["hello"])
    out.query(protocol.FEATURE_SUM_HANDLER)(handlers["feature_sum"])
    out.query(protocol.DONE_HANDLER)(handlers["done"])
    out.train()(handlers["train"])
    out.query(protocol.SECAGG_SETUP_HANDLER)(handlers["secagg_setup"])
    out.query(protocol.SECAGG_SHARE_HANDLER)(handlers["secagg_share"])
    out.query(protocol.SECAGG_CHECK_HANDLER)(handlers["secagg_check"])
    out.query(protocol.SECAGG_UNMASK_HANDLER)(handlers["secagg_unmask"])
    return out


app = site_app()


@dataclass(frozen=True)
class LocalUpdate:
    """What a round of local training produced, before it leaves (in the clear or masked)."""

    weights: dict[str, np.ndarray]  # the global trainable weights the round started from
    arrays: dict[str, np.ndarray]  # the trained ones
    num_examples: int  # the released count (the FedAvg weight)
    ledger_entries: list[dict[str, Any]]


def train_round(msg: Message, plan: protocol.Plan, site: Site) -> Message:
    """One round of local training at `site` for `plan`: budget, DP-SGD, spend, reply."""
    update = local_update(msg, plan, site)
    if isinstance(update, Message):
        return update
    return protocol.train_reply(msg, site=site.name, arrays=update.arrays, num_examples=update.num_examples,
                                ledger_entries=update.ledger_entries)


def local_update(msg: Message, plan: protocol.Plan, site: Site) -> LocalUpdate | Message:
    """Train (or, for a round released already, take the kept result); a decline instead
    if the budget, the policy or the data says no. The spend is on disk before this returns."""
    cfg, priv, tr = site.cfg, site.cfg.privacy, site.cfg.training
    assert plan.server_round is not None  # read_plan requires it for TRAIN
    weights = protocol.train_weights(msg)
    digest = _request_digest(plan, weights)
    kept = site.state.stored_release(plan.run_id, plan.server_round, digest, cfg.privacy.mode == "dp-sgd")
    if kept is not None:  # this very round was released already (the coordinator restarted)
        arrays, meta, entries = kept
        log.warning("%s: round %s of run %s was released already; sending the same reply again (no new spend)",
                    site.name, plan.server_round, plan.run_id)
        return LocalUpdate(weights, arrays, int(meta["num_examples"]), _with_unreported(site, plan.run_id, entries))
    device = _device(cfg)
    view, dataset = _prepare(site, plan, device)
    view.load_trainable(weights)
    if plan.feature_center is not None and centering.applies(cfg, view):
        centering.set_center(view, list(plan.feature_center))
    count = _counted(msg, plan, site)
    if isinstance(count, Message):
        return count
    # n: the count this site released (add-remove: the noisy one). Everything that leaves
    # and depends on the number of records (q, steps, σ, the FedAvg weight, the update's
    # scale) is computed from it, never from the exact count.
    n = count.n
    count_entries = [count.entry] if count.fresh and count.entry is not None else []
    dp = priv.mode == "dp-sgd"
    q = poisson_rate(n, tr.batch_size)
    steps = tr.local_epochs * batches_per_epoch(n, tr.batch_size)
    sigma = 0.0
    if dp:
        # The run's other releases count against the same target: the feature mean whether
        # or not this site made it (over-count, never under-count), the count if this run
        # released it.
        before = [s for s in (centering.release_spend(cfg, view),
                              count.spend() if count.spent_in(plan.run_id) else None) if s]
        sigma = float(priv.noise_multiplier) if priv.noise_multiplier else site.state.noise_multiplier(
            plan.run_id, float(priv.target_epsilon), float(priv.delta), q, steps,
            int(cfg.federation.rounds), priv.accountant, before=before, neighbouring=priv.neighbouring,
        )
        sigma = max(sigma, float(priv.min_noise_multiplier or 0.0))  # more noise than asked: stricter
        decision = site.state.check_budget(Spend(sigma, q, steps), _budget(site), priv.delta, priv.accountant,
                                           priv.neighbouring)
        if not decision.ok:
            return _decline(msg, site.name, decision.reason, "budget")
    local = LocalPlan(
        epochs=tr.local_epochs, batch_size=tr.batch_size,
        max_physical_batch_size=tr.max_physical_batch_size, learning_rate=tr.learning_rate,
        optimizer=tr.optimizer, dp=dp, noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm,
        grad_sample_mode=tr.grad_sample_mode, accountant=priv.accountant,
        proximal_mu=float(plan.proximal_mu or 0.0), sample_rate=q, expected_batch_size=max(1, round(q * n)),
    )
    seed = _seed(cfg, site, plan.server_round)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    result = train_local(view.module, dataset, local, device=device, generator=generator)

    arrays = view.trainable_state()
    # Kept first (for a coordinator that restarts: SiteState.save_release), then spent.
    site.state.save_release(plan.run_id, plan.server_round, digest, arrays, {"num_examples": n})
    entries: list[dict[str, Any]] = []
    if dp:
        # Spend before release: the entry is on disk (fsync) before the weights leave.
        ran = [Spend(*s) for s in result.spends]
        if sum(s.steps for s in ran) != steps or any(s.sample_rate != q for s in ran):
            raise TrainingError(f"site {site.name}: ran {ran}, planned {steps} steps at q={q}")
        entries = count_entries + _record(site, plan.run_id, plan.server_round, ran, float(priv.max_grad_norm),
                                          {"release": "dp-sgd"})
    # The loss and the time are noiseless functions of the private data: they stay here.
    log.info("%s: round %s trained: mean loss %.4f, %.1fs", site.name, plan.server_round, result.mean_loss,
             time.time() - t0)
    return LocalUpdate(weights, arrays, n, _with_unreported(site, plan.run_id, entries))


def _with_unreported(site: Site, run_id: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's entries, after any of this run's spends that a crash interrupted and the
    site has since counted (client/site.py), in ledger order, each once."""
    late = site.state.take_unreported(run_id)
    if late:
        log.warning("%s: reporting %d interrupted spend(s) counted after a crash (seq %s)", site.name, len(late),
                    ", ".join(str(e.get("seq")) for e in late))
    merged = {e["hash"]: e for e in [*late, *entries]}
    return sorted(merged.values(), key=lambda e: int(e["seq"]))


def _request_digest(plan: protocol.Plan, weights: Mapping[str, Any]) -> str:
    """What identifies a training request: run, round, centre and the global weights."""
    h = hashlib.sha256(f"{plan.run_id}\0{plan.server_round}\0{plan.feature_center}\0".encode())
    for name in sorted(weights):
        arr = weights[name]
        h.update(f"{name}:{arr.dtype}:{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------ helpers


def _device(cfg: DictConfig) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise FedShieldError("training.device=cuda: no CUDA device is available at this site")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def _prepare(site: Site, plan: protocol.Plan, device: torch.device) -> tuple[TrainView, torch.utils.data.TensorDataset]:
    """The model view (its frozen weights checked against the coordinator's) and the
    site's encoded records."""
    view = build_view(site.cfg, device)
    if plan.frozen_fingerprint and view_fingerprint(view) != plan.frozen_fingerprint:
        raise ModelError(
            f"site {site.name}: its copy of the model's frozen weights differs from the "
            "coordinator's (another model version?); not training"
        )
    return view, encode(site.cfg, view, site.data, cache_dir=site.state.dir / "cache", device=device)


def _budget(site: Site) -> float:
    priv = site.cfg.privacy
    return float(priv.budget_epsilon if priv.budget_epsilon is not None else priv.target_epsilon)


def _record(site: Site, run_id: str, server_round: int, spends: list[Spend], clip: float,
            extra: dict[str, Any]) -> list[dict[str, Any]]:
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
            "delta": float(priv.delta), "accountant": priv.accountant, "neighbouring": priv.neighbouring,
            "epsilon": epsilon(history, priv.delta, priv.accountant, priv.neighbouring),
            "budget_epsilon": _budget(site),  # signed: an audit takes the site's budget from here
            **extra,
        }))
    return entries


def _seed(cfg: DictConfig, site: Site, server_round: int) -> int:
    """Reproducible in simulation; unpredictable in deployment (the noise must be secret)."""
    if site.simulated:
        return (int(cfg.federation.seed) * 1_000_003 + hash_name(site.name) * 101 + server_round) % 2**62
    return int.from_bytes(os.urandom(8), "big") % 2**62


def hash_name(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)

"""The fedshield ClientApp: what runs at a site, in simulation and in deployment alike.

Messages (protocol.py has every field): HELLO (who is this site), FEATURE_SUM (once per
run, before round 1: the site's noisy feature sum for feature centering, task/centering.py)
and TRAIN. Every instruction's plan is parsed by `protocol.read_plan`; anything that is not
exactly the protocol is declined with kind `protocol`, never trained on.

What the site decides for itself never comes from the coordinator: in deployment its data
file (and its columns and classes), state folder, ledger signing key, ledger witness and
privacy settings (budget, δ, target ε) come from the SuperNode's node config, which
`fedshield client` fills from the site's own command line. No decline may depend on the
site's records except through what it already released (docs/auditor.md, "every decline
kind"): its file is read with its own columns and classes, whatever the plan says. In
simulation a virtual site takes its share of the bundled data (its partition id,
task.sites.virtual_sites) and keeps its state in the run directory.

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

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import copy
import hashlib
import json
import logging
import struct
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedshield import conf, protocol, rules
from fedshield.client import secagg
from fedshield.client.site import BooksBehind, SiteState
from fedshield.conf.config import Config
from fedshield.conf.schema import TaskConfig, split_deidentify_pattern
from fedshield.privacy.accountant import Spend
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.events import (
    COUNT_RELEASE,
    FEATURE_RELEASE,
    TRAIN_RELEASE,
    Mechanism,
    Neighbouring,
    PrivacyEvent,
    entry_fields,
    event_of,
    release_event,
)
from fedshield.task import centering
from fedshield.task.data import LabeledData
from fedshield.task.deid import counts_record, write_counts
from fedshield.task.model import ModelError, TrainView
from fedshield.task.pipeline import (
    ModelCopyError,
    TaskSpec,
    build_view,
    check_model_copy,
    encode,
    pool_and_test,
    read_site_file,
    scrubbed,
    view_fingerprint,
)
from fedshield.task.plugin import is_plugin, plugin_inputs, site_allows
from fedshield.task.sites import check_delta, virtual_sites
from fedshield.task.trainer import LocalPlan, LocalResult, TrainingError, poisson_rate, round_steps, train_local

log = logging.getLogger("fedshield.site")

# Node-config keys a deployed site sets for itself (see client/cli.py).
NODE_SITE_NAME, NODE_DATA, NODE_STATE, NODE_KEY = "site-name", "data-path", "state-dir", "site-key"
# The site's own classes (`fedshield client --labels a,b,c`, comma-separated) and the file
# where it witnesses the head of its ledger (`--ledger-witness`; client/site.py). Neither
# comes from, nor goes to, the coordinator.
NODE_LABELS, NODE_WITNESS = "labels", "ledger-witness"
# The columns of the site's file (`--text-column`, `--label-column`): the site's, never the
# plan's, or a plan could point the label column at any column and learn from a failed read.
NODE_TEXT_COLUMN, NODE_LABEL_COLUMN = "text-column", "label-column"
NODE_CONNECTION_KEY = "connection-key"  # the SuperNode's key file (`fedshield client`): signs the HELLO
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
# De-identification of the site's texts before tokenisation (task/deid.py): a site may turn
# it on and add regions, never turn off what the plan asks for; a deployed site runs only
# its own patterns (_own_scrubbing says why).
DEIDENTIFY = ("task.deidentify", "task.deidentify_patterns", "task.deidentify_regions")
# What the site's own task is made of (docs/site-operator.md): `task.model`, its own copy of
# the model folder (the plan names the model by its digest, task.model_digest, and the site
# declines kind `model` when its copy's differs); `task.plugin`, the one module:factory
# plug-in it allows (a plan naming another, or a plug-in not installed here, is declined kind
# `policy` before anything is imported: task/plugin.py `site_allows`).
# `task.name`, the kind of records its data file holds (text by default; tabular, image,
# text-generation): `fedshield client` reads the file as that task's records before it
# connects, and a plan for another task is declined kind `policy` (_own_task).
SITE_TASK = ("task.name", "task.model", "task.plugin")
SITE_OVERRIDABLE = POLICY + OPERATIONAL + DEIDENTIFY + SITE_TASK



@dataclass
class Site:
    name: str
    cfg: Config  # the coordinator's plan, checked against the site's policy (site_config)
    data: LabeledData  # the records this plan trains on, labelled by the plan's classes
    state: SiteState
    simulated: bool
    counted: LabeledData | None = None  # the records its count counts (the whole file); None: `data`
    keep: np.ndarray | None = None  # the rows of `data` this plan trains on (_plan_rows); None: all

    @property
    def records(self) -> LabeledData:
        """The site's records as its released count counts them: its whole data file."""
        return self.counted if self.counted is not None else self.data


class PolicyError(FedShieldError):
    """The coordinator's plan asks for less privacy than the site's policy allows."""


class TaskNotAllowed(PolicyError):
    """The plan names a task this site did not allow: a plug-in it did not install or name
    (task/plugin.py `site_allows`), or not the task its own task.name says its data is for."""


def site_config(plan: Config, node_config: Mapping[str, Any], deployed: bool = True) -> Config:
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
    operational.update(_own_scrubbing(plan, {k: v for k, v in own.items() if k in DEIDENTIFY}, deployed))
    if deployed and is_plugin(plan.task.name):  # before anything could import the plug-in
        problem = site_allows(plan.task.name, plan.task.plugin, str(own.get("task.plugin", "")))
        if problem:
            raise TaskNotAllowed(problem)
    if deployed and (problem := _own_task(plan.task.name, str(own.get("task.name", "")))):
        raise TaskNotAllowed(problem)
    if deployed and own.get("task.model"):  # the site's own copy; the plan's digest says if it is the same
        operational["task.model"] = str(own["task.model"])
    if deployed:
        policy = Config.load([f"{k}={v}" for k, v in own.items() if k in POLICY])
        check_policy(plan, policy)
        floor = policy.privacy.min_noise_multiplier
        if floor is not None and (plan.privacy.min_noise_multiplier or 0.0) < floor:
            operational["privacy.min_noise_multiplier"] = floor  # a plan silent on it gets the site's floor
    return plan.with_values(operational) if operational else plan


# A site's file of texts and labels serves either text-classification task.
_TEXT_RECORDS = ("news-topics", "text-file")


def _own_task(planned: str, own: str) -> str | None:
    """Why a deployed site that said what its data is for (its own task.name) declines the
    plan's task, or None: its file was read as that task's records, not the plan's."""
    if not own or own == planned or (own in _TEXT_RECORDS and planned in _TEXT_RECORDS):
        return None
    return (f"task.name: this site's data is for task {own!r} (its own task.name); the plan asks for "
            f"{planned!r}")


def _own_scrubbing(plan: Config, own: Mapping[str, Any], deployed: bool) -> dict[str, Any]:
    """The site's de-identification settings over the plan's, only ever adding: on if either
    says so, the site's regions then the plan's. Patterns: a deployed site runs only its own
    (a coordinator's regex run on the site's records could probe them through how long it
    takes: catastrophic backtracking on a record that holds X); a simulation's virtual sites
    take the plan's too (one NAME in both: either regex matches). {} when nothing changes."""
    task = plan.task
    if not own and not (deployed and task.deidentify_patterns):
        return {}
    # Node config values are TOML scalars: a list arrives as its text (client/cli.py node_config).
    mine = {k: conf.parse_override(f"{k}={v}")[1] if isinstance(v, str) else v for k, v in own.items()}
    patterns = {name: regex for name, regex, _ in (split_deidentify_pattern(str(p))
                                                   for p in mine.get("task.deidentify_patterns") or [])}
    if deployed and task.deidentify_patterns:
        log.warning("the plan's task.deidentify_patterns are not run on this site's records (a site runs only its "
                    "own patterns: task.deidentify_patterns on its command line)")
    for name, regex, _ in (() if deployed else (split_deidentify_pattern(p) for p in task.deidentify_patterns)):
        patterns[name] = f"(?:{patterns[name]})|(?:{regex})" if name in patterns and patterns[name] != regex else regex
    regions = [str(r).upper() for r in mine.get("task.deidentify_regions") or []]
    regions += [r.upper() for r in task.deidentify_regions if r.upper() not in regions]
    return {"task.deidentify": bool(task.deidentify or mine.get("task.deidentify", False)),
            "task.deidentify_patterns": [f"{n}={r}" for n, r in patterns.items()],
            "task.deidentify_regions": list(dict.fromkeys(regions))}


def check_policy(plan: Config, policy: Config) -> None:
    """Refuse, naming the key, a plan that is looser than the site's policy on any field."""
    p, mine = plan.privacy, policy.privacy
    if mine.mode == "dp-sgd" and p.mode != "dp-sgd":
        raise PolicyError(f"privacy.mode={p.mode!r}: this site trains only with DP (dp-sgd)")
    if p.mode != "dp-sgd":
        _check_secure(plan, policy)
        return  # the site's own policy is no DP, and so is the plan
    if p.target_epsilon > mine.target_epsilon:
        raise PolicyError(f"privacy.target_epsilon={p.target_epsilon:g}: above this site's {mine.target_epsilon:g}")
    budget = rules.lifetime_budget(p.budget_epsilon, p.target_epsilon)
    own_budget = rules.lifetime_budget(mine.budget_epsilon, mine.target_epsilon)
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


def _check_secure(plan: Config, policy: Config) -> None:
    """A site that requires secure aggregation sends no update in the clear (whatever its DP mode)."""
    if policy.federation.secure_aggregation != "off" and plan.federation.secure_aggregation == "off":
        raise PolicyError("federation.secure_aggregation='off': this site sends its update only masked "
                          f"({policy.federation.secure_aggregation})")


# ------------------------------------------------------------ per-worker caches


def _config(config_yaml: str, node_items: tuple[tuple[str, Any], ...], deployed: bool) -> Config:
    """The plan's config for this site (site_config): a typed, immutable Config. Parsing and
    validating the plan costs milliseconds and every message of a run carries the same one,
    so the parse is kept per (plan digest, node settings): the key is the message's identity,
    never its text, and no model or data cache is keyed by it (those take TaskSpec)."""
    key = (hashlib.sha256(config_yaml.encode()).hexdigest(), node_items, deployed)
    if key not in _PLANS:
        if len(_PLANS) >= 16:  # a worker serves a few runs at most: start over rather than grow
            _PLANS.clear()
        _PLANS[key] = site_config(Config.from_text(config_yaml), dict(node_items), deployed)
    return _PLANS[key]


_PLANS: dict[tuple[str, tuple[tuple[str, Any], ...], bool], Config] = {}


@lru_cache(maxsize=8)
def _site_file(task: TaskSpec, path: str, classes: tuple[str, ...]) -> LabeledData:
    """The site's data file, read with the site's own classes (`classes`; () : the file's
    distinct labels), never with the plan's: what the read finds (a row with another label)
    must not depend on what the coordinator asks."""
    return read_site_file(task, path, labels=list(classes))


# (id(file data), plan classes) -> (file data, relabelled, kept rows): computed once per
# worker and plan; the file's object is kept so that its id is not reused.
_ROWS: dict[tuple[int, tuple[str, ...]], tuple[LabeledData, LabeledData, np.ndarray]] = {}


# The public row a site that did not declare its classes always trains with (label: the
# plan's first class): data-independent, so it costs nothing, and it keeps the training set
# from ever being empty, which would fail where a plan whose classes the site holds would not.
PUBLIC_ROW = ""


def _plan_rows(data: LabeledData, classes: tuple[str, ...]) -> tuple[LabeledData, np.ndarray]:
    """`data` labelled by the plan's `classes` (plus PUBLIC_ROW), and the rows to train on:
    those whose label is one of the plan's, and PUBLIC_ROW. A site that did not declare its
    classes trains on those: rows of other labels are left out, whether or not there are
    any, so that no reply tells which labels the site holds (its count still counts every
    row of the file). Adding or removing one record changes this set by at most that record:
    the DP-SGD spend is the same. Every row is kept in the data (labelled 0 if left out) so
    that it is encoded as it always is; the rows are taken after encoding (`_prepare`)."""
    kept = _ROWS.get((id(data), classes))
    if kept is not None and kept[0] is data:
        return kept[1], kept[2]
    if data.texts is None:
        raise conf.ConfigError("a site's own data file is text: its classes are declared with --labels")
    index = {c: k for k, c in enumerate(classes)}
    names = [data.class_names[k] for k in data.labels]
    keep = np.asarray([i for i, c in enumerate(names) if c in index] + [len(data)], dtype=np.int64)
    if len(keep) - 1 < len(data):
        log.warning("%s: %d of %d rows have labels outside the plan's classes; they are left out of this run",
                    data.source, len(data) - len(keep) + 1, len(data))
    rows = replace(data, class_names=list(classes), texts=[*data.texts, PUBLIC_ROW],
                   labels=np.asarray([index.get(c, 0) for c in names] + [0], dtype=np.int64),
                   groups=None if data.groups is None else np.append(data.groups, ""))
    if len(_ROWS) >= 16:
        _ROWS.clear()
    _ROWS[(id(data), classes)] = (data, rows, keep)
    return rows, keep


def _own_columns(task: TaskConfig, node: Mapping[str, Any]) -> TaskSpec:
    """The task a deployed site reads its file with: its own text and label columns
    (default `text`, `label`, as `fedshield client`'s) and no site column, whatever the plan
    says: which column a read takes, and so whether it fails, is the site's choice."""
    return TaskSpec.of(task, text_column=str(node.get(NODE_TEXT_COLUMN, "text")),
                       label_column=str(node.get(NODE_LABEL_COLUMN, "label")), site_column="")


def _declared_labels(node: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The classes the site declared for itself (node config `labels`), or None."""
    text = node.get(NODE_LABELS)
    if text is None:
        return None
    labels = tuple(x.strip() for x in str(text).split(",") if x.strip())
    if not labels:
        raise conf.ConfigError(f"node config {NODE_LABELS!r}: no class named (expected a,b,c)")
    return labels


_STATES: dict[tuple[str, str, str, str], SiteState] = {}


def _state(state_dir: Path, name: str, key: Path | None, witness: Path | None = None) -> SiteState:
    """The site's state folder, opened (key loaded or made) once per worker process; its
    ledger is re-read by `refresh()` on every message."""
    cache_key = (str(state_dir), name, str(key or ""), str(witness or ""))
    state = _STATES.get(cache_key)
    if state is None:
        if len(_STATES) >= 4096:
            _STATES.clear()
        state = _STATES[cache_key] = SiteState(state_dir, name, key, witness)  # reads the ledger
    else:
        state.refresh()
    if state.recovery_message:  # a torn last line from a crash was set aside: the operator must know
        log.warning("%s: %s", name, state.recovery_message)
    return state


def prepare_budget_checks(interrupted: Callable[[], bool]) -> None:
    """`SiteState.prepare_next_check` and `prepare_next_read` for every site state this
    process holds, until `interrupted()` says that work has come (a batched worker's wait
    between rounds)."""
    for state in list(_STATES.values()):
        if interrupted():
            return
        state.prepare_next_check()
        state.prepare_next_read()


def resolve_site(plan: protocol.Plan, context: Context) -> Site:
    node = dict(context.node_config)
    # Only dotted keys are config (the site's own settings); the rest (partition-id, paths)
    # must not split the cache: a worker serves many virtual sites with one plan.
    cfg = _config(plan.config_yaml, tuple(sorted((k, v) for k, v in node.items() if "." in k)),
                  NODE_SITE_NAME in node)
    if NODE_SITE_NAME in node:  # deployment: everything local comes from the site itself
        name = str(node[NODE_SITE_NAME])
        # No free bits (docs/auditor.md): whether the plan's classes are taken never depends
        # on the site's records. A site that declared its classes takes exactly those, else
        # declines (kind `policy`) whatever it holds; one that did not trains on its rows of
        # the plan's classes (_plan_rows). Its file is read with its own classes either way.
        if cfg.task.model_digest:  # the plan names the coordinator's model: is this site's copy the same?
            check_model_copy(cfg, f"site {name}")
        if is_plugin(cfg.task.name):
            return _plugin_site(name, plan, cfg, node)
        declared = _declared_labels(node)
        if declared is not None and tuple(plan.class_names) != declared:
            raise PolicyError(f"{protocol.CLASS_NAMES}: the plan's classes are not the ones this site declared "
                              "(its --labels, same names in the same order)")
        spec = _own_columns(cfg.task, node)
        whole = _site_file(spec, str(node[NODE_DATA]), declared or ())
        seen, counts = scrubbed(spec, whole)  # task.deidentify: what the tokenizer sees; the count counts `whole`
        data, keep = (seen, None) if declared is not None else _plan_rows(seen, plan.class_names)
        key = Path(str(node[NODE_KEY])) if node.get(NODE_KEY) else None
        witness = Path(str(node[NODE_WITNESS])) if node.get(NODE_WITNESS) else None
        state = _state(Path(str(node[NODE_STATE])), name, key, witness)
        _note_scrubbed(state, name, spec, len(whole), counts)
        return Site(name, cfg, data, state, simulated=False, counted=whole, keep=keep)
    pid = int(node["partition-id"])
    name, share = virtual_sites(cfg)[pid]
    spec = TaskSpec.of(cfg.task)
    data, counts = scrubbed(spec, share)
    state = _state(Path(plan.run_dir) / "sites" / name, name, None)
    _note_scrubbed(state, name, spec, len(share), counts)
    return Site(name, cfg, data, state, simulated=True, counted=None if counts is None else share)


def _note_scrubbed(state: SiteState, name: str, task: TaskSpec, records: int, counts: Mapping[str, int] | None) -> None:
    """What de-identification replaced, by type (never a value), into the site's log and
    `<state dir>/deidentified.json`, when it changes; nothing of it is sent."""
    if counts is None or task.deidentify is None:
        return
    record = counts_record(counts, records, task.deidentify)
    if _NOTED.get(str(state.dir)) == record:
        return
    if write_counts(state.dir, record):
        found = ", ".join(f"{k} {v}" for k, v in record["replaced"].items()) or "nothing"
        log.info("%s: de-identified %d records before tokenisation; replaced: %s", name, records, found)
    _NOTED[str(state.dir)] = record


_NOTED: dict[str, dict[str, Any]] = {}  # state dir -> the counts written there by this worker


def _plugin_site(name: str, plan: protocol.Plan, cfg: Config, node: Mapping[str, Any]) -> Site:
    """A deployed site of a plug-in task (allowed: site_config): its records are the
    plug-in's training set, read by the site's own code; the plug-in's classes are the
    site's declared ones, so a plan with others is declined (policy), whatever the rows."""
    data = pool_and_test(cfg)[0]
    if tuple(plan.class_names) != tuple(data.class_names):
        raise PolicyError(f"{protocol.CLASS_NAMES}: the plan's classes are not this site's plug-in's "
                          "(its class_names, same names in the same order)")
    key = Path(str(node[NODE_KEY])) if node.get(NODE_KEY) else None
    witness = Path(str(node[NODE_WITNESS])) if node.get(NODE_WITNESS) else None
    state = _state(Path(str(node[NODE_STATE])), name, key, witness)
    return Site(name, cfg, data, state, simulated=False)


def _node_name(context: Context) -> str:
    node = context.node_config
    return str(node.get(NODE_SITE_NAME, f"site-{node.get('partition-id', '?')}"))


def handle(msg: Message, context: Context, handler: Callable[[Message, protocol.Plan, Site], Message]) -> Message:
    """Parse the plan, resolve the site, run `handler`; a fedshield error becomes a
    one-line decline, not a crash. Public with `train_round`: a ClientApp built around
    the site's own pipeline (tests and bench/poisoning.py build hostile sites so) uses them."""

    def steps(m: Message, plan: protocol.Plan, site: Site) -> Steps:
        return handler(m, plan, site)
        yield  # a generator that trains nothing: handle_steps takes generators  # pragma: no cover

    return run_steps(handle_steps(msg, context, steps))


# A handler as steps: it yields the one local training it needs (a TrainJob) and gets its
# outcome back, then returns the reply. Run in line (`run_steps`) on Flower's runtime; the
# batched engine (simulations/batched.py) runs many sites' steps and trains their jobs together.
Steps = Generator["TrainJob", "TrainOutcome", Message]


def run_steps(steps: Steps) -> Message:
    """Drive a handler's steps to its reply, training each job in line."""
    try:
        job = next(steps)
        while True:
            job = steps.send(job.run())
    except StopIteration as stop:
        reply: Message = stop.value
        return reply


def handle_steps(msg: Message, context: Context,
                 handler: Callable[[Message, protocol.Plan, Site], Steps]) -> Steps:
    """`handle` as steps: the same checks and the same declines around a handler's steps."""
    name = _node_name(context)
    try:
        plan = protocol.read_plan(msg)
        site = resolve_site(plan, context)  # a witness ahead of the books: BooksBehind
        name = site.name
        if plan.books_head is not None:  # the coordinator's record of this site's books
            site.state.check_head(plan.books_head.seq, plan.books_head.hash, "the coordinator")
        booked = site.state.neighbouring()
        if site.cfg.privacy.mode == "dp-sgd" and booked not in (None, site.cfg.privacy.neighbouring):
            raise PolicyError(f"privacy.neighbouring={site.cfg.privacy.neighbouring!r}: this site's ledger is "
                              f"accounted under {booked!r}, and one site's ε is composed under one relation")
        return (yield from handler(msg, plan, site))
    except protocol.ProtocolError as exc:
        return _decline(msg, name, f"the coordinator's message broke the protocol: {exc}", "protocol")
    except TaskNotAllowed as exc:  # nothing was imported: the site's own installs and settings say no
        return _decline(msg, name, f"the plan names a task this site does not run: {exc}", "policy")
    except PolicyError as exc:
        return _decline(msg, name, f"the plan asks for less privacy than this site allows: {exc}", "policy")
    except ModelCopyError as exc:  # from the digests (public: the plan's and the site's software)
        return _decline(msg, name, str(exc), "model")
    except BooksBehind as exc:  # the site's own books against a head kept elsewhere: no data in it
        return _decline(msg, name, str(exc), "books")
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
    """Who is this site: its name, record count and ledger public key (for sampling and audit);
    deployed, signed with its connection key (`prove_connection`)."""
    return prove_connection(handle(msg, context, _hello), msg, context)


def prove_connection(reply: Message, msg: Message, context: Context) -> Message:
    """A deployed site's HELLO carries `protocol.connection_statement` (this run, this node,
    this name) signed with its connection key, the key its SuperNode authenticates with: the
    coordinator checks it against the key enrolled for the name (server/app.py). A key that
    cannot be read leaves the HELLO unsigned (the coordinator then refuses it, and says why)."""
    path = context.node_config.get(NODE_CONNECTION_KEY)
    if not path or protocol.SITE not in reply.content or protocol.DECLINE in reply.content:
        return reply
    from fedshield.deploy.pki import load_connection_private_key
    from fedshield.privacy import signing

    try:
        key = load_connection_private_key(str(path))
        statement = protocol.connection_statement(protocol.read_plan(msg).run_id, msg.metadata.dst_node_id,
                                                  str(reply.content[protocol.SITE][protocol.NAME]))
    except FedShieldError as exc:  # a ProtocolError too
        log.warning("HELLO not signed with the connection key: %s", exc)
        return reply
    return protocol.with_connection_proof(reply, signing.sign(key, statement))


def _hello(msg: Message, plan: protocol.Plan, site: Site) -> Message:
    count = public_count(site, plan.run_id)
    if isinstance(count, str):
        return _decline(msg, site.name, count, "budget")
    check_delta(site.cfg, site.name, count.n)  # from the released count: no bit about the exact one
    # The count's entry goes with every hello: in the run that spent it as a spend (again
    # after a coordinator restart: the books recognise an entry they hold already), in a later
    # run as the signed proof that the count is a release (the coordinator refuses a bare count).
    entries = [count.entry] if count.entry is not None else []
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
        return event_of(self.entry).spend()


def public_count(site: Site, run_id: str) -> PublicCount | str:
    """The record count this site releases, or why it cannot (a budget reason).

    replace-one, or no DP: the exact count (public under that relation). add-remove: the
    count is protected (privacy.neighbouring): released once per dataset as
    max(1, round(n + N(0, s^2))) with s = privacy.count_noise_multiplier, a Gaussian mechanism
    of sensitivity 1 (one step at q = 1, composed in the same accountant), spent before it
    leaves; later runs on the same data reuse it (post-processing, no spend)."""
    priv = site.cfg.privacy
    n = len(site.records)
    if priv.mode != "dp-sgd" or priv.neighbouring != "add-remove":
        return PublicCount(n)
    digest = site.state.data_digest(_data_bytes(site.records))
    found = site.state.released_count(digest)
    if found is not None:
        return PublicCount(*found)
    spend = Spend(priv.count_noise_multiplier, 1.0, 1)
    decision = site.state.check_budget(spend, _budget(site), priv.delta, priv.accountant, priv.neighbouring)
    if not decision.ok:
        return f"releasing its record count: {decision.reason}"
    generator = torch.Generator().manual_seed(_seed(site.cfg, site, 0) + 11)
    noisy = n + priv.count_noise_multiplier * float(torch.randn((), generator=generator, dtype=torch.float64))
    released = max(1, round(noisy))  # post-processing of the Gaussian count
    count = release_event(Mechanism.GAUSSIAN_COUNT, spend.noise_multiplier, 1.0, priv.neighbouring)  # sensitivity 1
    entry = _record(site, run_id, 0, count, COUNT_RELEASE, {"released_count": released, "data_digest": digest})
    return PublicCount(released, entry, fresh=True)


# id(data) -> (data, digest): a worker's site data objects are cached (_site_file, virtual_sites),
# so each is hashed once, not on every message; the object is kept so that its id is not reused.
_DIGESTS: dict[int, tuple[LabeledData, bytes]] = {}
# A batched worker serves up to 5,000 sites (10,000 registered, 2 workers): each site's own
# data object, kept by the worker anyway. At 64 the cache was emptied every 64 sites, and
# every site's records were hashed again on every message.
_DIGESTS_KEPT = 1 << 14


def _data_bytes(data: LabeledData) -> bytes:
    """A digest of the site's records, canonically (what its count counts): each record's
    text (or features) and label NAME, in file order. Not the class list, nor the order of
    the classes: those are the plan's, and a plan that lists other classes (a dummy one
    added) must not make the site release its count again."""
    kept = _DIGESTS.get(id(data))
    if kept is not None and kept[0] is data:
        return kept[1]
    h = hashlib.sha256()
    h.update(json.dumps([data.class_names[k] for k in data.labels]).encode("utf-8", "surrogatepass"))
    if data.texts is not None:
        for t in data.texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    if data.features is not None:
        h.update(np.ascontiguousarray(data.features, dtype=np.float32).tobytes())
    if data.images is not None:  # task=image: the pixels the site trains on
        h.update(np.ascontiguousarray(data.images, dtype=np.uint8).tobytes())
    for tensor in plugin_inputs(data):  # a plug-in's rows: its input tensors
        h.update(f"{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    if len(_DIGESTS) >= _DIGESTS_KEPT:
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
    check_delta(site.cfg, site.name, count.n)  # from the released count: no bit about the exact one
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
    if spend is not None:  # within the run's target too (the training rounds were calibrated around it)
        decision = site.state.check_budget(spend, _budget(site), priv.delta, priv.accountant, priv.neighbouring,
                                           run_id=plan.run_id, run_target=priv.target_epsilon)
        if not decision.ok:
            return _decline(msg, site.name, decision.reason, "budget")
    generator = torch.Generator().manual_seed(_seed(cfg, site, 0) + 7)
    noise_std = spend.noise_multiplier * clip if spend is not None else 0.0
    total = centering.noisy_feature_sum(view, dataset, clip, noise_std, generator, device)
    entries = [_record(site, plan.run_id, 0, release_event(Mechanism.GAUSSIAN_FEATURE_SUM, spend.noise_multiplier,
                                                           clip, priv.neighbouring), FEATURE_RELEASE)] if spend else []
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
    return run_steps(train_steps(msg, context))


def train_steps(msg: Message, context: Context) -> Steps:
    """`train` as steps: the batched engine (simulations/batched.py) runs many sites' steps
    and trains their jobs together; everything else is the same code."""
    return handle_steps(msg, context, lambda m, plan, site: _train(m, plan, site, context))


def _train(msg: Message, plan: protocol.Plan, site: Site, context: Context) -> Steps:
    step = protocol.read_secagg(msg)
    secure = site.cfg.federation.secure_aggregation != "off"
    if step is None and secure:
        return _decline(msg, site.name, "this run aggregates securely (federation.secure_aggregation="
                        f"{site.cfg.federation.secure_aggregation}): an update in the clear is refused", "protocol")
    if step is None:
        return (yield from train_round_steps(msg, plan, site))
    if not secure:
        return _decline(msg, site.name, "a secure-aggregation stage in a run whose plan has "
                        "federation.secure_aggregation=off", "protocol")
    try:
        if step.server_round != plan.server_round:
            raise secagg.SecAggError(f"secure aggregation: the stage is for round {step.server_round}, the "
                                     f"training instruction for round {plan.server_round}")
        state = secagg.begin_collect(context, step, plan.run_id)  # before any training: refuse early
        update = yield from local_update_steps(msg, plan, site)
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
    if "train" not in replaced:
        _TRAINS_AS_STEPS.add(out)
    return out


# ClientApps whose TRAIN handler is this module's own `train`: the batched engine may run
# their TRAIN messages as `train_steps`. An app with another train handler (a test's or a
# benchmark's hostile site) is always called as it is.
_TRAINS_AS_STEPS: weakref.WeakSet[ClientApp] = weakref.WeakSet()


def train_steps_of(client_app: ClientApp) -> Callable[[Message, Context], Steps] | None:
    """`train_steps` if `client_app` trains with it (site_app with its own train handler)."""
    return train_steps if client_app in _TRAINS_AS_STEPS else None


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
    return run_steps(train_round_steps(msg, plan, site))


def train_round_steps(msg: Message, plan: protocol.Plan, site: Site) -> Steps:
    update = yield from local_update_steps(msg, plan, site)
    if isinstance(update, Message):
        return update
    return protocol.train_reply(msg, site=site.name, arrays=update.arrays, num_examples=update.num_examples,
                                ledger_entries=update.ledger_entries)


@dataclass(frozen=True)
class TrainJob:
    """One site's local training as `local_update_steps` planned it: run in line (`run`), or
    by the batched engine together with other sites' jobs (task/cohort.py: the same steps,
    the same random draws). The view may be shared by many sites' jobs (`shared_views`):
    `load` puts this job's starting point (the round's weights, the plan's centre) in it."""

    view: TrainView
    dataset: torch.utils.data.TensorDataset
    plan: LocalPlan
    seed: int  # torch.manual_seed(seed); the sampler's generator: seed + 1 (as train_local takes it)
    device: torch.device
    weights: dict[str, np.ndarray]
    center: tuple[float, ...] | None
    shared: bool = False  # the view serves other sites' jobs too: load this one's start before training

    def load(self) -> None:
        self.view.load_trainable(self.weights)
        if self.center is not None:
            centering.set_center(self.view, list(self.center))

    def run(self) -> TrainOutcome:
        module = self.view.module
        if self.shared:  # a copy of its own: Opacus' hooks stay on what it trains
            self.load()
            module = copy.deepcopy(module)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed + 1)
        try:
            result = train_local(module, self.dataset, self.plan, device=self.device, generator=generator)
        except (FedShieldError, RuntimeError, ValueError) as exc:
            return TrainOutcome(None, exc)
        if not self.shared:
            return TrainOutcome(result)
        return TrainOutcome(result, params={n: p.detach() for n, p in module.named_parameters() if p.requires_grad})


@dataclass(frozen=True)
class TrainOutcome:
    """What a TrainJob gave: its result or its error; `params`, the trained weights of the
    view's module by parameter name when it was trained elsewhere (None: they are in it)."""

    result: LocalResult | None
    error: Exception | None = None
    params: Mapping[str, torch.Tensor] | None = None


def local_update_steps(msg: Message, plan: protocol.Plan,
                       site: Site) -> Generator[TrainJob, TrainOutcome, LocalUpdate | Message]:
    """Train (or, for this very request released already, take the kept result); a decline
    instead if the budget, the policy or the data says no, or if the round was spent for
    another request.

    Spend before compute (DP): the round's ledger entry, keyed by the request's digest
    (`plan_digest`: run, round, plan, centre and global weights; `_request_digest`), is
    written and fsynced before the first DP step, so a training that fails, or a process
    that dies, after steps ran is still a spend. One release per (run, round): the same
    request again gets the kept release (post-processing, no spend) or, if its training
    never completed, a decline (never a second training for free); other weights or another
    plan for a round spent already are declined, never answered under the old entry. A
    decline, not a new spend: a coordinator that follows the protocol asks each round once
    (a restart re-sends the same request), the ledger keeps each run's rounds moving
    forward (privacy/ledger.py), and the run's target was calibrated for one release a round.
    """
    cfg, priv, tr = site.cfg, site.cfg.privacy, site.cfg.training
    assert plan.server_round is not None  # read_plan requires it for TRAIN
    weights = protocol.train_weights(msg)
    # Within a simulation's worker a push's sites share one ArrayRecord; a deployed site keeps none.
    digest = _request_digest(plan, weights, msg.content[protocol.ARRAYS] if _SHARED_VIEWS is not None else None)
    dp = priv.mode == "dp-sgd"
    kept = site.state.stored_release(plan.run_id, plan.server_round, digest, dp)
    if kept is not None:  # this very request was released already (the coordinator restarted)
        arrays, meta, released = kept
        log.warning("%s: round %s of run %s was released already; sending the same reply again (no new spend)",
                    site.name, plan.server_round, plan.run_id)
        return LocalUpdate(weights, arrays, int(meta["num_examples"]), _with_unreported(site, plan.run_id, released))
    if dp:
        refused = _round_spent(site, plan, digest)
        if refused is not None:
            kind, why = refused
            return _decline(msg, site.name, f"round {plan.server_round} of run {plan.run_id}: {why}", kind)
    device = _device(cfg)
    view, dataset = _prepare(site, plan, device)
    center = tuple(plan.feature_center) if plan.feature_center is not None and centering.applies(cfg, view) else None
    # Refused here, before any spend, if they are not the model's. A view shared by a batched
    # worker's sites (TrainJob.shared) is loaded by the job when it trains (TrainJob.load):
    # nothing reads its weights before, and a push's sites all start from the same ones.
    if _SHARED_VIEWS is None:
        view.load_trainable(weights)
        if center is not None:
            centering.set_center(view, list(center))
    else:
        view.check_trainable(weights)
        if center is not None and _CHECKED_CENTERS.get(id(view)) != (view, center):  # a push's sites share one
            centering.check_center(view, list(center))
            _CHECKED_CENTERS[id(view)] = (view, center)
    count = _counted(msg, plan, site)
    if isinstance(count, Message):
        return count
    # n: the count this site released (add-remove: the noisy one). Everything that leaves
    # and depends on the number of records (q, steps, σ, the FedAvg weight, the update's
    # scale) is computed from it, never from the exact count.
    n = count.n
    entries: list[dict[str, Any]] = [count.entry] if count.fresh and count.entry is not None else []
    q = poisson_rate(n, tr.batch_size)
    steps = round_steps(q, tr.local_epochs)  # what the sampler runs (task/trainer.py)
    sigma = 0.0
    if dp:
        # The run's other releases count against the same target: the feature mean whether
        # or not this site made it (over-count, never under-count), the count if this run
        # released it. σ is calibrated for the plan's rounds at the run's target (the site's,
        # or the plan's if stricter); whatever σ or rounds the plan states, check_budget
        # bounds the run's releases by that target and the whole history by the budget.
        mean = centering.release_spend(cfg, view)
        before = [s for s in (mean, count.spend() if count.spent_in(plan.run_id) else None) if s]
        sigma = float(priv.noise_multiplier) if priv.noise_multiplier else site.state.noise_multiplier(
            plan.run_id, priv.target_epsilon, priv.delta, q, steps,
            cfg.federation.rounds, priv.accountant, before=before, neighbouring=priv.neighbouring,
        )
        sigma = max(sigma, float(priv.min_noise_multiplier or 0.0))  # more noise than asked: stricter
        made = any(e.get("release") == FEATURE_RELEASE and e.get("run_id") == plan.run_id
                   for e in site.state.entries())
        decision = site.state.check_budget(
            Spend(sigma, q, steps), _budget(site), priv.delta, priv.accountant, priv.neighbouring,
            run_id=plan.run_id, run_target=priv.target_epsilon,
            run_assumed=[mean] if mean is not None and not made else [])
        if not decision.ok:
            if entries:  # the count this message released: the coordinator hears of it with a later reply
                site.state.mark_unreported(entries)
            return _decline(msg, site.name, decision.reason, "budget")
        # Spend before compute: on disk (fsync) before the first step that could be released,
        # and marked for the next reply of this run until a reply carries it.
        training = PrivacyEvent(Mechanism.DP_SGD, sigma, q, steps, Neighbouring(priv.neighbouring),
                                priv.max_grad_norm)
        entries.append(_record(site, plan.run_id, plan.server_round, training, TRAIN_RELEASE, {"plan_digest": digest}))
        site.state.mark_unreported(entries)
    local = LocalPlan(
        epochs=tr.local_epochs, batch_size=tr.batch_size,
        max_physical_batch_size=tr.max_physical_batch_size, learning_rate=tr.learning_rate,
        optimizer=tr.optimizer, dp=dp, noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm,
        grad_sample_mode=tr.grad_sample_mode, accountant=priv.accountant,
        proximal_mu=float(plan.proximal_mu or 0.0), sample_rate=q, expected_batch_size=max(1, round(q * n)),
    )
    t0 = time.time()
    outcome = yield TrainJob(view, dataset, local, _seed(cfg, site, plan.server_round), device,
                             weights, center, shared=_SHARED_VIEWS is not None)
    try:
        if outcome.error is not None:
            raise outcome.error
        result = outcome.result
        assert result is not None
        ran = [Spend(*s) for s in result.spends]
        if dp and (sum(s.steps for s in ran) != steps or any(s.sample_rate != q or s.noise_multiplier != sigma
                                                             for s in ran)):
            raise TrainingError(f"site {site.name}: ran {ran}, planned {steps} steps at q={q}, σ={sigma}")
    except (FedShieldError, RuntimeError, ValueError) as exc:
        if not dp:
            raise
        # Spent, not released: the entry stays (the steps that ran were a mechanism's run,
        # and what the coordinator sees of them, this decline, is post-processing of it).
        log.error("%s: round %s of run %s: training failed after its spend (seq %s)", site.name,
                  plan.server_round, plan.run_id, entries[-1]["seq"], exc_info=exc)
        return _decline(msg, site.name, (
            f"round {plan.server_round} of run {plan.run_id}: training failed after its spend was recorded "
            f"(seq {entries[-1]['seq']}, ε={entries[-1]['epsilon']:.3f}; {type(exc).__name__}): the spend stands, "
            "nothing was released, and the details are in the site's log"), "error")
    # Trained with other sites' jobs (outcome.params): the view holds another's weights.
    arrays = view.trainable_state() if outcome.params is None else view.trained_state(outcome.params)
    site.state.save_release(plan.run_id, plan.server_round, digest, arrays, {"num_examples": n})
    # The loss and the time are noiseless functions of the private data: they stay here.
    memory = (f", {result.batch_memory[0] / 2**20:.1f} MiB a physical batch ({result.batch_memory[1]})"
              if result.batch_memory else "")
    log.info("%s: round %s trained: mean loss %.4f, %.1fs%s", site.name, plan.server_round, result.mean_loss,
             time.time() - t0, memory)
    return LocalUpdate(weights, arrays, n, _with_unreported(site, plan.run_id, entries))


def _round_spent(site: Site, plan: protocol.Plan, digest: str) -> tuple[str, str] | None:
    """(decline kind, why) this request must not train (DP), given this site's books; None if
    it may. Called when no kept release answers the request (`SiteState.stored_release`)."""
    assert plan.server_round is not None
    later = [int(e["round"]) for e in site.state.entries() if e.get("run_id") == plan.run_id
             and isinstance(e.get("round"), int) and e["round"] > plan.server_round]
    if later:  # whatever was asked for this round before: the run has moved on (privacy/ledger.py)
        return "protocol", f"this site has spent round {max(later)} of that run already: rounds move forward"
    done = site.state.train_entries(plan.run_id, plan.server_round)
    same = [e for e in done if e.get("plan_digest") == digest]
    if same:  # spent, and not kept: a failure or a crash came between the spend and the reply
        site.state.mark_unreported(same)  # in case the crash came before its mark: the next reply carries it
        return "error", (f"its training was spent for this very request (seq {same[-1].get('seq')}) and did not "
                         "complete (a failure or a crash): nothing was released, and it is not trained again")
    if done:
        return "protocol", (f"spent already (seq {done[-1].get('seq')}) for other global weights or another plan: "
                            "one release per round, never a second training nor the old one's weights")
    return None


def _with_unreported(site: Site, run_id: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's entries, after any of this run's spends that a crash interrupted and the
    site has since counted (client/site.py), in ledger order, each once."""
    late = site.state.take_unreported(run_id)
    # This reply's own entries are marked too (spend before compute): only the others are news.
    ours = {e["hash"] for e in entries}
    interrupted = [e for e in late if e.get("hash") not in ours]
    if interrupted:
        log.warning("%s: reporting %d earlier spend(s) that no reply carried (a decline, a failure or a crash "
                    "came after them; seq %s)", site.name, len(interrupted),
                    ", ".join(str(e.get("seq")) for e in interrupted))
    merged = {e["hash"]: e for e in [*late, *entries]}
    return sorted(merged.values(), key=lambda e: int(e["seq"]))


# The TRAIN messages of one push share one ArrayRecord (a batched worker receives it once,
# simulations/batched.py): the digest of the last (record, head) is kept, with the record
# itself, so that the object compared is the one hashed (never a new one at a reused id).
_LAST_DIGEST: tuple[object, tuple[Any, ...], str] | None = None


def _request_digest(plan: protocol.Plan, weights: Mapping[str, Any], record: object = None) -> str:
    """What identifies a training request (its entry's `plan_digest`): run, round, the
    plan's config, model fingerprint, classes, centre and proximal term, and the global
    weights. A function of the coordinator's own message only: public. `record`: the
    ArrayRecord `weights` were read from; the same record with the same head has the same
    digest (nothing changes a message's content once received)."""
    global _LAST_DIGEST
    # What the head below is made of, compared exactly (floats by their bits: -0.0 and NaN
    # are written so, and are not == to what they were written as): its JSON, a long string
    # escaped again for each of a push's sites, is made only when the digest is.
    center = None if plan.feature_center is None else struct.pack(f"<{len(plan.feature_center)}d",
                                                                   *plan.feature_center)
    parts = (plan.run_id, plan.server_round, plan.config_yaml, plan.frozen_fingerprint, plan.class_names, center,
             None if plan.proximal_mu is None else struct.pack("<d", plan.proximal_mu))
    last = _LAST_DIGEST
    if record is not None and last is not None and last[0] is record and last[1] == parts:
        return last[2]
    head = json.dumps([plan.run_id, plan.server_round, plan.config_yaml, plan.frozen_fingerprint,
                       list(plan.class_names), None if plan.feature_center is None else list(plan.feature_center),
                       plan.proximal_mu])
    h = hashlib.sha256(head.encode() + b"\0")
    for name in sorted(weights):
        arr = weights[name]
        h.update(f"{name}:{arr.dtype}:{arr.shape}\0".encode())
        h.update(arr.tobytes())
    digest = h.hexdigest()
    if record is not None:
        _LAST_DIGEST = (record, parts, digest)
    return digest


# ------------------------------------------------------------ helpers


def _device(cfg: Config) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise FedShieldError("training.device=cuda: no CUDA device is available at this site")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


# The batched engine's per-process memo (`shared_views`): one view per (plan, device) for all
# the virtual sites of a worker, and each site's encoded records. None: every message builds
# its own (Flower's runtime, deployment: a view is never shared between messages).
_SHARED_VIEWS: dict[tuple[int, str], tuple[Config, TrainView]] | None = None
_ENCODED: dict[tuple[str, int, int, str], tuple[LabeledData, Config, torch.utils.data.TensorDataset]] = {}
_ENCODED_LIMIT = 20_000  # sites a worker keeps encoded (a few MB each at most); past it, start over
_CHECKED_CENTERS: dict[int, tuple[TrainView, tuple[float, ...]]] = {}  # a shared view's last centre found fine


@contextmanager
def shared_views() -> Iterator[None]:
    """Within it, the virtual sites of this process share one model view per plan and keep
    their encoded records (simulations/batched.py): what a site trains with is unchanged,
    as every TrainJob loads its own start (`TrainJob.load`) and the frozen part is the same."""
    global _SHARED_VIEWS
    _SHARED_VIEWS = {}
    # A run's virtual sites open their state folders afresh: a process that ran another
    # simulation before (the Python API, a test) must not answer with a site it had opened
    # then, whose folder may have been removed or replaced since.
    _STATES.clear()
    try:
        yield
    finally:
        _SHARED_VIEWS = None
        _ENCODED.clear()
        _CHECKED_CENTERS.clear()
        _STATES.clear()


def _view(cfg: Config, device: torch.device) -> TrainView:
    if _SHARED_VIEWS is None:
        return build_view(cfg, device)
    key = (id(cfg), str(device))
    kept = _SHARED_VIEWS.get(key)
    if kept is None or kept[0] is not cfg:
        if len(_SHARED_VIEWS) >= 4:  # a few plans at most in one run
            _SHARED_VIEWS.clear()
        kept = _SHARED_VIEWS[key] = (cfg, build_view(cfg, device))
    return kept[1]


def _prepare(site: Site, plan: protocol.Plan, device: torch.device) -> tuple[TrainView, torch.utils.data.TensorDataset]:
    """The model view (its frozen weights checked against the coordinator's) and the
    site's encoded records."""
    view = _view(site.cfg, device)
    if plan.frozen_fingerprint and view_fingerprint(view) != plan.frozen_fingerprint:
        raise ModelError(
            f"site {site.name}: its copy of the model's frozen weights differs from the "
            "coordinator's (another model version?); not training"
        )
    key = (str(site.state.dir), id(site.data), id(site.cfg), view.fingerprint)
    if _SHARED_VIEWS is not None:
        encoded = _ENCODED.get(key)
        if encoded is not None and encoded[0] is site.data and encoded[1] is site.cfg:
            return view, encoded[2]
    dataset = encode(site.cfg, view, site.data, cache_dir=site.state.dir / "cache", device=device)
    if site.keep is not None:  # the rows of the plan's classes (_plan_rows), taken after encoding
        dataset = torch.utils.data.TensorDataset(*(t[torch.as_tensor(site.keep)] for t in dataset.tensors))
    if _SHARED_VIEWS is not None:
        if len(_ENCODED) >= _ENCODED_LIMIT:
            _ENCODED.clear()
        _ENCODED[key] = (site.data, site.cfg, dataset)
    return view, dataset


def _budget(site: Site) -> float:
    priv = site.cfg.privacy
    return float(rules.lifetime_budget(priv.budget_epsilon, priv.target_epsilon))


def _record(site: Site, run_id: str, server_round: int, event: PrivacyEvent, release: str,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Append (signed, fsynced) the ledger entry of one spend (privacy.events.entry_fields,
    version 2); ε is over the whole history."""
    priv = site.cfg.privacy
    return site.state.record_spend(entry_fields(
        event, site=site.name, run_id=run_id, round=server_round, delta=priv.delta,
        accountant=priv.accountant, release=release,
        epsilon=site.state.epsilon_after(event.spend(), priv.delta, priv.accountant, priv.neighbouring),
        extra={"budget_epsilon": _budget(site), **(extra or {})},  # signed: an audit takes the site's budget from it
    ))


def _seed(cfg: Config, site: Site, server_round: int) -> int:
    """Reproducible in simulation; unpredictable in deployment (the noise must be secret)."""
    if site.simulated:
        return (cfg.federation.seed * 1_000_003 + hash_name(site.name) * 101 + server_round) % 2**62
    return int.from_bytes(os.urandom(8), "big") % 2**62


def hash_name(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)

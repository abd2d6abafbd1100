"""The fedshield ServerApp: one federated run, on Flower's round loop.

`run_federation` is the whole coordinator: it is what `flwr run .` executes (through
`app`, config from Flower's run config), what `fedshield simulate` executes (through
`build_server_app(cfg)`), and what `fedshield server` executes on a SuperLink.
"""

from __future__ import annotations

import fedshield.deploy.offline  # noqa: F401  (first: nothing phones home; deploy/offline.py)

# isort: split

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedshield import conf, protocol
from fedshield.conf.config import Config
from fedshield.deploy.enrolment import LiveEnrolment, flower_key_fingerprint, load_enrolment, proves
from fedshield.privacy import signing
from fedshield.privacy.accountant import ADD_REMOVE
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.ledger_check import Expected, LedgerCheck, Verdict, plan_problem
from fedshield.privacy.secure_sum import AUTO_RING_ABOVE, DistributedNoise
from fedshield.server import checkpoint
from fedshield.server.evaluate import CentralEvaluator
from fedshield.server.export import export_model
from fedshield.server.federation_books import open_books
from fedshield.server.plots import plot_run
from fedshield.server.prompt_grid import prompt
from fedshield.server.report import summarize, write_report
from fedshield.server.run_dir import (
    LEDGER_KEYS,
    RUN_STOPPED,
    append_jsonl,
    append_jsonl_all,
    existing_run_dir,
    new_run_dir,
    read_jsonl,
)
from fedshield.server.settings import CoordinatorSettings, SecAggPolicy
from fedshield.server.site_heads import FILE as SITE_HEADS
from fedshield.server.site_heads import SiteHeads
from fedshield.server.tracking import NoTracker, Tracker, open_tracker
from fedshield.strategies.flower import flower_strategy, shortfall
from fedshield.strategies.report import PlannedCheck, RoundReport
from fedshield.strategies.secagg import SecAggPlus
from fedshield.strategies.stack import SiteLevel, build_stack
from fedshield.task import centering
from fedshield.task.model import TrainView
from fedshield.task.pipeline import build_view, model_digest, pool_and_test, view_fingerprint
from fedshield.task.trainer import batches_per_epoch, poisson_rate

log = logging.getLogger("fedshield.server")

REJECTED_ENTRIES = "rejected-entries.jsonl"  # <run>/privacy/: entries that did not verify, kept apart
RELEASE_SPEND = Expected(sample_rate=1.0, steps=1)  # the feature-mean release (task.centering)
COUNT_SPEND = Expected(sample_rate=1.0, steps=1)  # the record count's release (add-remove; client/app.py)


class EmptyRoundsError(FedShieldError):
    """federation.max_empty_rounds rounds in a row trained nothing: the run stops."""


def say(text: str) -> None:
    """Progress for the person running the job (stdout, unbuffered). Each line is printable-
    escaped (protocol.printable): a site's words in it cannot drive the terminal."""
    print("\n".join(protocol.printable(line) for line in text.split("\n")), flush=True)


def simulated(grid: Grid) -> bool:
    """A simulation's grid: Flower's runtime (InMemoryGrid) or the batched engine's, whose
    virtual sites are fixed at start and keep their books in the run folder."""
    return isinstance(grid, InMemoryGrid) or getattr(grid, "simulated", False) is True


def connection_keys(grid: Grid) -> dict[int, bytes]:
    """Node id -> the public key its SuperNode registered and authenticates every request
    with (Flower's `NodeInfo.public_key`, PEM; deploy/enrolment.py says why it can be trusted)."""
    try:
        return {int(n.node_id): bytes(n.public_key) for n in grid.get_nodes()}
    except Exception as exc:  # noqa: BLE001 - Flower's error: no key is known, so no name is bound
        say(f"cannot read the sites' connection keys from the SuperLink ({type(exc).__name__}: {exc})")
        return {}


def check_identity(identity: LiveEnrolment | None, hello: protocol.SiteHello, node: int, run_id: str,
                   key: bytes | None) -> str | None:
    """Why the HELLO `hello` of node `node`, which authenticated with `key`, may not be site
    `hello.site` (None: it may; no `identity`: names are not bound, as in a simulation): the
    key must be the one enrolled for the name, and the HELLO signed with it for this run and
    this node (`protocol.connection_statement`; Flower does not check who pushed a reply)."""
    if identity is None:
        return None
    problem = identity.check(hello.site, key)
    if problem is None and not proves(key, hello.connection_proof,
                                      protocol.connection_statement(run_id, node, hello.site)):
        problem = ("its HELLO is not signed with its connection key for this run and node (a reply in another "
                   "site's place, or a site whose fedshield predates enrolment)")
    return problem


def exclude_revoked(identity: LiveEnrolment | None, sites: dict[int, dict[str, Any]],
                    excluded: MutableMapping[str, str]) -> None:
    """Before each round: a site whose connection key was revoked since it joined is not asked
    again (`excluded`: the strategy's site -> why); said once."""
    if identity is None:
        return
    identity.current()
    if problem := identity.take_problem():
        say(f"enrolment registry: {problem}")
    for s in sites.values():
        if s["site"] not in excluded and identity.revoked(s.get("connection_key")):
            excluded[s["site"]] = f"its connection key {s['connection_key']} was revoked"
            say(f"  {s['site']}: not asked any more: its connection key was revoked")


def announce_connected(grid: Grid, nodes: list[int], announced: set[int], expected: int,
                       identity: LiveEnrolment | None) -> None:
    """Say each node the first time it is seen: "site <name> connected (n of N)", its name the
    one enrolled for its connection key (deployment), its node id otherwise; `announced` the
    nodes already said. Before its HELLO: the name is what its key proves, not what it claims."""
    new = [n for n in nodes if n not in announced]
    if not new:
        return
    keys = connection_keys(grid) if identity is not None else {}
    for node in new:
        announced.add(node)
        name = identity.name_of(keys.get(node)) if identity is not None else None
        who = f"site {protocol.printable(name)}" if name else f"site on node {node}"
        say(f"{who} connected ({len(announced)} of {expected})")


def discover_sites(grid: Grid, plan: ConfigRecord, expected: int, timeout: float,
                   refused: list[str] | None = None, identity: LiveEnrolment | None = None,
                   heads: SiteHeads | None = None) -> dict[int, dict[str, Any]]:
    """Wait for `expected` sites, then ask each who it is (name, records, ledger public key).

    A site that cannot join is refused alone, never the run; why is said and appended to
    `refused` (for the report). With `identity` (deployment: the enrolment registry), a site
    is admitted under a name only if its node authenticated with the key enrolled for that
    name, whatever its node id (`check_identity`), and each node's HELLO carries `heads`'
    record of the books of the site its key is enrolled as (server/site_heads.py), so that a
    site whose books were put back declines before it releases anything."""
    refused = refused if refused is not None else []

    def refuse(why: str) -> None:
        why = protocol.printable(why)
        say(why)
        refused.append(why)

    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    if simulated(grid):  # Flower's simulation runtime: its SuperNodes never change
        nodes = _simulated_nodes(grid, expected, min(timeout, 30.0))
    announced: set[int] = set()
    if not simulated(grid):  # a simulation's virtual sites all come at once: not said
        announce_connected(grid, nodes, announced, expected, identity)
    if len(nodes) < expected:
        say(f"waiting for {expected} sites to connect ({len(nodes)} so far)")
    while len(nodes) < expected and time.time() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
        announce_connected(grid, nodes, announced, expected, identity)
    if len(nodes) < expected:
        say(f"waited {timeout:.0f}s: {len(nodes)} of {expected} sites connected; going on with them")
    say(f"asking {len(nodes)} sites who they are")
    keys = connection_keys(grid) if identity is not None else {}

    def hello_plan(node: int) -> ConfigRecord:
        name = identity.name_of(keys.get(node)) if identity is not None and heads is not None else None
        return protocol.with_books_head(plan, heads.latest(name)) if heads is not None and name else plan

    messages = [protocol.instruction(protocol.HELLO, hello_plan(n), n) for n in nodes]
    sites: dict[int, dict[str, Any]] = {}
    taken: dict[str, int] = {}  # site name -> node id
    for reply in sorted(grid.send_and_receive(messages, timeout=timeout), key=lambda m: m.metadata.src_node_id):
        node = reply.metadata.src_node_id
        hello = protocol.read_hello(reply)
        if isinstance(hello, protocol.Failed):
            refuse(f"site on node {node}: failed to start: {hello.reason}")
        elif isinstance(hello, protocol.Rejected):
            refuse(f"site on node {node}: not joining: its reply broke the protocol: {hello.reason}")
        elif isinstance(hello, protocol.Decline):
            refuse(f"site {hello.site}: not joining: {hello.reason}")
        elif problem := check_identity(identity, hello, node, str(plan[protocol.RUN_ID]), keys.get(node)):
            refuse(f"site on node {node}: not joining as {hello.site!r}: {problem}")
        elif hello.site in taken:
            # The first to claim a name keeps it; a second site of that name (a misconfigured
            # or hostile client) is refused, never the run.
            refuse(f"site on node {node}: not joining: the name {hello.site!r} is taken by node {taken[hello.site]}")
        else:
            try:
                key = signing.load_public_key(hello.ledger_public_key)
            except (FedShieldError, ValueError) as exc:  # ValueError: text that does not encode
                refuse(f"site {hello.site}: not joining: its ledger public key is not usable ({exc})")
                continue
            taken[hello.site] = node
            sites[node] = {"site": hello.site, "n": hello.num_examples, "public_key": hello.ledger_public_key,
                           "key": key, "entries": hello.ledger_entries}
            if identity is not None:  # for exclude_revoked
                sites[node]["connection_key"] = flower_key_fingerprint(keys.get(node))
    return sites


def check_released_counts(sites: dict[int, dict[str, Any]], books: LedgerCheck, refused: list[str]
                          ) -> tuple[list[tuple[str, tuple[Any, ...]]], list[tuple[str, tuple[Any, ...]]]]:
    """Each site's record-count release (add-remove: sent with every HELLO) checked like any
    spend when this run spent it, checked as signed when an earlier run did (the count is
    released once per dataset; that entry is not a spend of this run and is not recorded), and
    its released count equal to the count it declared. Under add-remove a DP site whose hello
    carries no release is refused: its count would be unprotected, or made up. A site whose
    entries fail is refused (removed from `sites`); returns the entries to record and those
    to keep apart, by site."""
    counted, apart = [], []
    required = books.dp and books.neighbouring == ADD_REMOVE
    for node, s in sorted(sites.items()):
        entries = tuple(s.pop("entries", ()))
        if not entries and not required:
            continue  # no DP, or replace-one: the count is public
        ours = tuple(e for e in entries if e.get("run_id") == books.run_id)
        earlier = tuple(e for e in entries if e.get("run_id") != books.run_id)
        fresh = tuple(e for e in ours if not books.holds(s["site"], e))  # a resumed run holds it already
        verdict = books.check(s["site"], 0, fresh, COUNT_SPEND) if fresh else Verdict(None)
        problem = verdict.problem
        if not entries:
            problem = ("its hello carries no record-count release: under add-remove a count is usable only with "
                       "the signed release that spent it")
        elif len(entries) != 1:
            problem = f"its hello carries {len(entries)} ledger entries; a count has one release"
        if problem is None and earlier:
            problem = books.earlier_release_problem(s["site"], earlier)
        if problem is None and any(e.get("release") != "record-count" or e.get("released_count") != s["n"]
                                   for e in entries):
            problem = f"its count release does not say the {s['n']} records it declared"
        if problem:
            why = f"site {s['site']}: not joining: its record-count release was refused: {problem}"
            say(why)
            refused.append(why)
            apart.append((s["site"], entries))
            del sites[node]
        else:
            counted.append((s["site"], verdict.new_entries))
    return counted, apart


def _simulated_nodes(grid: Grid, expected: int, settle_s: float) -> list[int]:
    """The simulation runtime registers all its SuperNodes at once and none can join later:
    a count other than `expected` is a config mismatch, said at once instead of waiting
    round_timeout_s for sites that cannot come."""
    deadline, last, stable_since = time.time() + settle_s, -1, time.time()
    nodes = list(grid.get_node_ids())
    while len(nodes) != expected and time.time() < deadline:
        if len(nodes) != last:
            last, stable_since = len(nodes), time.time()
        elif nodes and time.time() - stable_since > 2.0:
            break
        time.sleep(0.25)
        nodes = list(grid.get_node_ids())
    if len(nodes) != expected:
        raise FedShieldError(
            f"Flower's simulation runtime started {len(nodes)} SuperNode(s) but federation.num_sites={expected}; "
            f'with `flwr run` pass --federation-config "num-supernodes={expected}"')
    return nodes


def collect_feature_mean(grid: Grid, plan: ConfigRecord, sites: dict[int, dict[str, Any]], rounds: RoundLog,
                         books: LedgerCheck, width: int, timeout: float, bound: Callable[[int], float] | None = None
                         ) -> np.ndarray | None:
    """Ask every site for its noisy feature sum (task.centering); their mean, or None.

    `bound(n)`: the largest norm an honest sum of a site that declared n records can have
    (centering.sum_bound); a larger or non-finite sum is not used (that site alone)."""
    say(f"feature centering: asking {len(sites)} sites for their noisy feature sums (each site first "
        "encodes its records with the frozen model, once per run: this is the slow step on a CPU)")
    messages = [protocol.instruction(protocol.FEATURE_SUM, protocol.with_books_head(plan, rounds.head_of(s["site"])), n)
                for n, s in sites.items()]
    sums, counts = [], []
    spent: list[tuple[str, Sequence[dict[str, Any]]]] = []  # recorded together before any sum is used
    try:
        for reply in grid.send_and_receive(messages, timeout=timeout):
            name = sites.get(reply.metadata.src_node_id, {}).get("site", str(reply.metadata.src_node_id))
            got = protocol.read_feature_sum(reply, width)
            if isinstance(got, protocol.Failed):
                say(f"  {name}: feature mean failed: {got.reason}")
            elif got.site not in (None, name):
                say(f"  {name}: feature-mean reply names site {got.site!r}; not used")
            elif isinstance(got, protocol.Decline):
                say(f"  {name}: no feature mean: {got.reason}")
            else:
                verdict = books.check(name, 0, got.ledger_entries, RELEASE_SPEND)
                if verdict.problem:
                    rounds.keep_apart(name, got.ledger_entries)
                    say(f"  {name}: feature-mean reply rejected: {verdict.problem}; not used")
                    continue
                spent.append((name, verdict.new_entries))  # spent, whether or not the sum is usable
                declared = sites[reply.metadata.src_node_id]["n"]
                if isinstance(got, protocol.Rejected):
                    say(f"  {name}: feature-mean reply broke the protocol ({got.reason}); not used")
                elif got.num_examples != declared:
                    say(f"  {name}: feature-mean reply claims {got.num_examples} records, not the {declared} "
                        "it declared; not used")
                elif bound is not None and (problem := centering.sum_problem(got.feature_sum, bound(declared))):
                    say(f"  {name}: feature-mean reply not used: {problem}")
                else:
                    sums.append(got.feature_sum)
                    counts.append(got.num_examples)
    finally:  # what was spent is recorded, whatever happens to the rest
        rounds.record_all(spent)
    if not sums:
        say("feature centering: no site released a feature mean; training without centering")
        return None
    center = centering.combine(sums, counts)
    if not np.isfinite(center).all():  # cannot happen with bounded sums; never the run if it does
        say("feature centering: the combined feature mean is not finite; training without centering")
        return None
    eps = rounds.epsilon_max()
    say(f"feature centering: mean [CLS] feature from {len(sums)} sites ({sum(counts)} records, "
        f"|mean| {np.linalg.norm(center):.2f}; ε max after it {eps:.3f})")
    return center


class RoundLog:
    """Collects each round's site replies and ledger entries, writes metrics, shows progress."""

    def __init__(self, run_dir: Path, settings: CoordinatorSettings, sites: dict[int, dict[str, Any]],
                 verified: Callable[[str], float] | None = None) -> None:
        self.run_dir, self.settings = run_dir, settings
        # Per site: the cumulative ε its own entries state (earlier runs included; a site may
        # over-state its own), and `verified`: what this run's verified entries cost it, as the
        # coordinator recomputes it (LedgerCheck.run_epsilon) -- the run's "ε max" and "ε mean".
        self.epsilon = {s["site"]: 0.0 for s in sites.values()}
        self.verified = verified
        self.declines: dict[str, list[str]] = {}
        self.reports: dict[int, RoundReport] = {}  # server round -> its sites' outcomes
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.site_level_epsilon: float | None = None  # privacy.unit=site: the federation's ε so far
        self.tracker: Tracker = NoTracker()  # output.tracking: each row also goes there
        # The head of each site's books this coordinator holds, across runs (server/site_heads.py).
        self.heads: SiteHeads | None = None
        self.fingerprints = {s["site"]: signing.fingerprint(s["key"]) for s in sites.values() if "key" in s}

    def head_of(self, site: str) -> protocol.BooksHead | None:
        """The head of `site`'s books to send it (None: none held for its current key)."""
        fp = self.fingerprints.get(site)
        return self.heads.get(site, fp) if self.heads is not None and fp is not None else None

    def record(self, site: str, entries: Iterable[dict[str, Any]]) -> None:
        """A site's verified spends into the run's ledger; its ε is the last entry's."""
        self.record_all([(site, entries)])

    def record_all(self, spent: Iterable[tuple[str, Iterable[dict[str, Any]]]]) -> None:
        """Sites' verified spends into the run's ledger, in their order, with one fsync for
        all of them (and one write of the heads): durable before this returns, as before."""
        spent = [(site, list(entries)) for site, entries in spent]
        append_jsonl_all(self.run_dir / "privacy" / "ledger.jsonl", [e for _, entries in spent for e in entries])
        for site, entries in spent:
            for entry in entries:
                self.epsilon[site] = float(entry["epsilon"])
        if self.heads is not None:
            self.heads.advance_all(spent)

    def restore(self, ckpt: checkpoint.Checkpoint,
                accepted: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
        """The round log as it was after the checkpoint's round: ε, declines and metrics
        rows (rows of a round after it, written before the crash, are dropped).

        `accepted`: each site's entries in the run's ledger. It may hold spends past the
        checkpoint (recorded, then the coordinator died before its checkpoint): a site's ε
        is then that of its newest entry there, or a round replayed after the resume (its
        entries known, none new) would leave it one round behind."""
        self.epsilon.update({k: v for k, v in ckpt.epsilon.items() if k in self.epsilon})
        for site, own in (accepted or {}).items():
            if own:
                self.epsilon[site] = max(self.epsilon.get(site, 0.0), float(own[-1].get("epsilon", 0.0)))
        self.declines = {k: list(v) for k, v in ckpt.declines.items()}
        path = self.run_dir / "metrics.jsonl"
        rows = read_jsonl(path)
        self.rows = [r for r in rows if r["round"] <= ckpt.server_round]
        if len(self.rows) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
            os.replace(tmp, path)
        if self.rows:
            self.t0 = time.time() - float(self.rows[-1].get("elapsed_s", 0.0))

    def run_epsilons(self) -> list[float]:
        """Per site, the ε of this run's spends from verified entries (recorded ε without books)."""
        if self.verified is None:
            return list(self.epsilon.values())
        return [self.verified(site) for site in self.epsilon]

    def epsilon_max(self) -> float:
        return max(self.run_epsilons(), default=0.0)

    def keep_apart(self, site: str, entries: Iterable[dict[str, Any]]) -> None:
        """Entries that did not verify: kept for the record, never in the run's ledger."""
        append_jsonl_all(self.run_dir / "privacy" / REJECTED_ENTRIES,
                         [{"from_site": site, "entry": entry} for entry in entries])

    def on_round(self, report: RoundReport) -> None:
        # The late replies' spends first (a site's chain in the run's ledger continues from
        # them), then this round's, spent whether or not the update is used: one write for all.
        self.record_all([(r.site, r.ledger_entries) for r in [*report.late, *report.replies]])
        for r in report.late:
            self.keep_apart(r.site, r.rejected_entries)
            if r.status == "trained":
                say(f"  {r.site}: its round-{r.late_round} reply came after that round's timeout: its spend is "
                    "recorded, its update not used")
            else:
                self.declines.setdefault(r.site, []).append(
                    f"round {report.server_round}: its late round-{r.late_round} reply: rejected: {r.reason}")
                say(f"  {r.site}: its late round-{r.late_round} reply was rejected: {r.reason}")
        for r in report.replies:
            self.keep_apart(r.site, r.rejected_entries)
            if r.status != "trained":
                self.declines.setdefault(r.site, []).append(f"round {report.server_round}: {r.status}: {r.reason}")
                say(f"  {r.site}: {r.status}: {r.reason}")
            elif r.clipped and len(report.clipped()) <= 10:
                say(f"  {r.site}: update clipped: norm {r.update_norm:.4g} scaled down to {self._bound()}")
        if len(report.clipped()) > 10:  # many small sites: one line, the norms are in metrics.jsonl
            say(f"  {len(report.clipped())} of {report.count('trained')} updates clipped to {self._bound()}")
        if report.breaches() and report.withstood is not None:
            say(f"  {report.rule}: {len(report.breaches())} attacker(s) unmasked by a breach "
                f"({', '.join(report.breaches())}); it withstands {report.withstood} more of "
                f"federation.num_malicious={self.settings.rule.num_malicious} among the rest")
        if report.left_out():
            say(f"  {report.rule} left out {len(report.left_out())} update(s): {', '.join(report.left_out())}")
        for site, stage in sorted((report.dropped or {}).items()):
            say(f"  {site}: dropped out of secure aggregation at {stage}")
        if report.skipped:
            say(f"  round {report.server_round}: nothing aggregated, the global model is kept: {report.skipped}")
        elif report.empty():
            say(f"  round {report.server_round}: trained nothing: no sampled site's update was usable")
        self.reports[report.server_round] = report

    def on_withheld(self, server_round: int) -> None:
        say(f"  round {server_round}: not released: it would take site-level ε past "
            f"privacy.site_target_epsilon={self._site_target():g}")

    def _site_target(self) -> float:
        assert self.settings.site_level is not None  # rounds are withheld only under site-level DP
        return self.settings.site_level.target_epsilon

    def empty_streak(self) -> int:
        """How many rounds in a row, up to the last one logged, trained nothing."""
        streak = 0
        for row in reversed(self.rows):
            if row["round"] == 0 or not row.get("empty"):
                break
            streak += 1
        return streak

    def _bound(self) -> str:
        site, bound = self.settings.site_level, self.settings.rule.update_norm_bound
        return (f"privacy.site_clip_norm={site.clip_norm:g}" if site is not None
                else f"federation.update_norm_bound={bound:g}")

    def on_evaluated(self, server_round: int, metrics: dict[str, Any]) -> dict[str, Any]:
        report = self.reports.pop(server_round, None)  # none for round 0, or a round nobody was asked
        eps = self.run_epsilons() or [0.0]
        row = {
            "round": server_round,
            # classification: accuracy, macro_f1, per_class (and per_site_accuracy,
            # mean_site_accuracy where the test split knows each row's site, server/evaluate.py);
            # text-generation: loss, perplexity
            **metrics,
            "epsilon": dict(self.epsilon),
            "epsilon_max": max(eps),
            "epsilon_mean": float(np.mean(eps)),
            "site_level_epsilon": self.site_level_epsilon,  # privacy.unit=site (server/federation_books.py)
            "sampled": report.sampled if report else [],
            "trained": report.count("trained") if report else 0,
            "declined": report.count("declined") if report else 0,
            "declined_sites": report.sites("declined") if report else [],
            # why each declined, as the site's kind (budget, books, ...): the live view shows it
            "decline_kinds": {r.site: r.decline_kind for r in report.replies if r.status == "declined"}
            if report else {},
            "rejected": report.count("rejected") if report else 0,
            "failed": report.count("failed") if report else 0,
            # Poisoning defences: why each refused reply was refused, each usable update's norm
            # (from the round's global weights), which were clipped to the bound or left out by
            # the rule's selection (krum, multikrum, bulyan), and why nothing was aggregated.
            "rejected_reasons": {r.site: r.reason for r in report.replies if r.status == "rejected"} if report else {},
            "update_norms": {r.site: r.update_norm for r in report.replies if r.update_norm is not None}
            if report else {},
            "clipped": len(report.clipped()) if report else 0,
            "clipped_sites": report.clipped() if report else [],
            "failed_sites": report.sites("failed") if report else [],
            "left_out_sites": report.left_out() if report else [],
            "breach_sites": report.breaches() if report else [],  # refused for proof of an attack
            "withstood": report.withstood if report else None,  # the f the robust rule withstood
            "skipped": report.skipped if report else "",
            # No sampled site's update was aggregated (RoundReport.empty): a round that did not
            # happen; federation.max_empty_rounds of them in a row stop the run.
            "empty": report.empty() if report else False,
            "late_sites": {r.site: r.late_round for r in report.late} if report else {},
            # Secure aggregation: who dropped out of the round, at which stage (None: SecAgg+ off)
            "secagg_dropped": report.dropped if report else None,
            "elapsed_s": round(time.time() - self.t0, 1),
        }
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        self.tracker.log_round(row)
        self.rows.append(row)
        total = self.settings.rounds
        sites = (f" | sites {row['trained']} trained, {row['declined']} declined, "
                 f"{row['rejected'] + row['failed']} dropped") if server_round else ""
        sites += " | TRAINED NOTHING" if row["empty"] else ""
        quality = (f"perplexity {row['perplexity']:.2f} | loss {row['loss']:.3f}" if "perplexity" in row
                   else f"acc {row['accuracy']:.3f} | macro-F1 {row['macro_f1']:.3f}")
        say(f"round {server_round:>3}/{total} | {quality}"
            f" | ε max {row['epsilon_max']:.2f} mean {row['epsilon_mean']:.2f}{sites} | {row['elapsed_s']:.0f}s")
        return row


def run_federation(grid: Grid, cfg: Config, run_dir: Path | None = None, resume: bool = False,
                   identity: LiveEnrolment | None = None) -> Path:
    """One whole run; returns the run directory. With `resume`, the run continues from its
    checkpoint (server/checkpoint.py) at the round after the last completed one. With
    `identity` (`fedshield server`), site names are bound to enrolled connection keys and
    revocations apply at once (deploy/enrolment.py)."""
    # The edge: the coordinator's own code reads these typed settings; the task code takes
    # the typed, immutable Config (the model, the data, the plan the sites receive).
    settings = CoordinatorSettings.from_config(cfg)
    run_dir = run_dir or (existing_run_dir(cfg) if resume else new_run_dir(cfg))
    say(f"run directory: {run_dir}" + (" (resuming)" if resume else ""))
    digest = checkpoint.config_digest(run_config_yaml(cfg))
    ckpt = checkpoint.load(run_dir, run_dir.name, digest) if resume else None
    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu")
    view = build_view(cfg, device)
    initial = view.trainable_state()
    # What every update must be, from the model itself (a checkpoint's weights may have been
    # widened by the strategy's arithmetic, e.g. FedAdam's float64).
    spec = {k: (tuple(v.shape), v.dtype) for k, v in initial.items()}
    # The plan names the model by its digest, not by where the coordinator keeps it: a deployed
    # site loads its own copy and declines (kind `model`) if it is another (task/model_digest.py).
    digest_of_model = model_digest(cfg)
    plan_cfg = cfg.with_values({"task.model_digest": digest_of_model}) if digest_of_model else cfg
    plan = protocol.plan_record(
        config_yaml=plan_cfg.to_yaml(), run_id=run_dir.name, run_dir=str(run_dir),
        frozen_fingerprint=view_fingerprint(view), class_names=pool_and_test(cfg)[1].class_names,
    )
    refused: list[str] = []
    # Deployed sites keep their books across runs: so does the coordinator's record of their
    # heads. Virtual sites keep theirs in the run directory: so does it.
    heads = SiteHeads(run_dir / "privacy" / SITE_HEADS if simulated(grid)
                      else run_dir.parent / SITE_HEADS)
    sites = discover_sites(grid, plan, settings.sites.expected, settings.sites.round_timeout_s, refused, identity,
                           heads)
    if ckpt is not None:
        sites = rejoined_sites(run_dir, sites)
    if len(sites) < settings.sites.min_sites:
        raise FedShieldError(
            f"only {len(sites)} site(s) can join, fewer than federation.min_sites={settings.sites.min_sites}"
        )
    books = LedgerCheck(run_dir.name, {s["site"]: s["key"] for s in sites.values()},
                        dp=settings.accounting.dp, delta=settings.accounting.delta,
                        accountant=settings.accounting.accountant, neighbouring=settings.accounting.neighbouring)
    if ckpt is not None:
        problem = books.restore(read_jsonl(run_dir / "privacy" / "ledger.jsonl"), recorded_ledger_keys(run_dir))
        if problem:
            raise checkpoint.CheckpointError(f"cannot resume {run_dir.name}: {problem}")
        for site, own in sorted(books.absent.items()):  # the run goes on with the sites that came back
            why = (f"site {site}: did not rejoin the resumed run; not asked again (its {len(own)} spend(s) of this "
                   f"run stay in the run's ledger, ε {float(own[-1].get('epsilon', 0.0)):.4g})")
            say(why)
            refused.append(why)
    counted, apart = check_released_counts(sites, books, refused)
    batch, epochs = settings.batch_size, settings.local_epochs
    books.plans = {s["site"]: Expected(poisson_rate(s["n"], batch), epochs * batches_per_epoch(s["n"], batch))
                   for s in sites.values()}  # what each site's round must spend, from its declared n
    for node, s in sorted(sites.items()):
        problem = plan_problem(books.plans[s["site"]])
        if problem:  # its checks would cost more than the coordinator spends on one site
            # Its count release of this run is recorded (a spend is a spend): its key goes with it.
            (run_dir / "privacy" / LEDGER_KEYS / f"{s['site']}.pub").write_text(s["public_key"])
            why = f"site {s['site']}: not joining: {problem}"
            say(why)
            refused.append(why)
            del sites[node]
    if len(sites) < settings.sites.min_sites:
        raise FedShieldError(
            f"only {len(sites)} site(s) can join, fewer than federation.min_sites={settings.sites.min_sites}"
        )
    for s in sites.values():
        (run_dir / "privacy" / LEDGER_KEYS / f"{s['site']}.pub").write_text(s["public_key"])
    listed = sorted(sites.values(), key=lambda s: s["site"])
    shown = listed if len(listed) <= 20 else listed[:10]  # a cross-device run has a thousand
    say(f"{len(sites)} sites: " + ", ".join(f"{s['site']} (n={s['n']})" for s in shown)
        + (f", ... and {len(listed) - len(shown)} more (privacy/sites.json)" if len(shown) < len(listed) else ""))

    rounds = RoundLog(run_dir, settings, sites, verified=books.run_epsilon)
    rounds.heads = heads
    for site, entries in apart:
        rounds.keep_apart(site, entries)
    rounds.record_all(counted)
    center: list[float] | np.ndarray[Any, Any] | None = None  # the checkpoint's, or the feature mean collected
    if ckpt is not None:
        rounds.restore(ckpt, books.accepted)
        for site, own in books.absent.items():  # still in the run's books: its ε, and why it trains no more
            rounds.epsilon[site] = float(own[-1].get("epsilon", 0.0))
            rounds.declines.setdefault(site, []).append(
                f"after round {ckpt.server_round}: did not rejoin the resumed run")
        initial, center = ckpt.weights, ckpt.center
        say(f"resuming after round {ckpt.server_round} of {settings.rounds}")
    elif centering.applies(cfg, view):
        center_buffer = view.module.center
        assert isinstance(center_buffer, torch.Tensor)  # centering.applies: the view has one
        width = int(center_buffer.shape[0])
        p = settings.accounting
        noise_std = p.center_noise_multiplier * centering.clip_norm(cfg, view) if p.dp else 0.0
        # Under add-remove the sum counts the true n, the declared n is its noisy release.
        slack = 20.0 * p.count_noise_multiplier + 1.0 if p.dp and p.neighbouring == ADD_REMOVE else 0.0
        clip = centering.clip_norm(cfg, view)
        center = collect_feature_mean(grid, plan, sites, rounds, books, width, settings.sites.round_timeout_s,
                                      bound=lambda n: centering.sum_bound(n + slack, clip, noise_std, width))
    elif cfg.training.center_features and cfg.task.name in ("news-topics", "text-file"):
        # Only a BERT view in last_layers mode has the pooler that centering acts on
        # (task.model.supports_centering): say so, rather than skip it in silence.
        say("training.center_features: not applied with this model and training.trainable (it needs a BERT "
            "pooler in last_layers mode); nothing is released for it")
    if center is not None:
        centering.set_center(view, center)
        plan = protocol.with_feature_center(plan, [float(v) for v in center])
    evaluator = CentralEvaluator(cfg, view, device)
    fed = cfg.federation
    inner = flower_strategy(
        fed.strategy, proximal_mu=fed.proximal_mu, server_learning_rate=fed.server_learning_rate,
        num_malicious=fed.num_malicious, trim_fraction=fed.trim_fraction, krum_select=fed.krum_select,
    )
    if ckpt is not None:
        checkpoint.restore_strategy_state(inner, ckpt.strategy_state)
    planned = books.plans
    done = ckpt.server_round if ckpt is not None else 0
    dim = sum(int(np.prod(shape)) for shape, _ in spec.values())
    books_fed = (open_books(settings, run_dir, simulated(grid), dim)
                 if settings.site_level is not None else None)
    if books_fed is not None and books_fed.noise is not None:
        rounds.site_level_epsilon = books_fed.epsilon
        m, noise = books_fed.mechanism, books_fed.noise
        say(f"site-level DP under secure aggregation: each site sampled with q={m.sample_rate:g} per round, clips "
            f"its update to S={m.clip_norm:g} and adds its share of Skellam noise (variance {noise.total_variance:.4g} "
            f"levels² in the sum, z≈{noise.noise_multiplier:.3g}); ε≤{books_fed.budget:g} "
            f"at δ={books_fed.delta:g} after {settings.rounds} rounds (replace one site, "
            "no amplification)")
    elif books_fed is not None:
        rounds.site_level_epsilon = books_fed.epsilon
        m = books_fed.mechanism
        say(f"site-level DP: each site sampled with q={m.sample_rate:g} per round, updates clipped to "
            f"S={m.clip_norm:g}, noise z={m.noise_multiplier:.4g} on the sum over {m.denominator:g}; "
            f"ε={books_fed.budget:g} at δ={books_fed.delta:g} after "
            f"{settings.rounds} rounds (per site, add/remove one site)")
    names = {nid: s["site"] for nid, s in sites.items()}
    strategy = build_stack(
        inner, names,
        fraction_train=settings.sites.fraction_train,
        seed=settings.seed,
        expected_arrays=spec,
        sink=rounds,  # each round's report (RoundLog.on_round), the books heads sent (RoundLog.head_of)
        records={nid: s["n"] for nid, s in sites.items()},
        ledger=PlannedCheck(books, planned),
        heads=rounds,
        first_round=done + 1,
        excluded=dict(ckpt.excluded) if ckpt is not None else None,
        update_norm_bound=None if fed.update_norm_bound is None else float(fed.update_norm_bound),
        update_norm_action=fed.update_norm_action,
        site_level=SiteLevel(books_fed.mechanism, books_fed) if books_fed is not None else None,
        secagg=secure_aggregation(settings.secagg, settings.seed, names, simulated(grid),
                                  books_fed.noise if books_fed is not None else None,
                                  {nid: s["public_key"] for nid, s in sites.items()}),
    )
    short = shortfall(inner, strategy.per_round())  # fewer sites joined than the config's check assumed
    if short:
        raise FedShieldError(f"{len(sites)} site(s) joined, {strategy.per_round()} asked per round: {short}; "
                             "lower federation.num_malicious or add sites")

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        exclude_revoked(identity, sites, strategy.excluded)  # before every round (this runs ahead of each)
        server_round = strategy.run_round(flower_round) if flower_round else done
        weights = protocol.from_array_record(arrays)
        if flower_round == 0 and ckpt is not None:  # the checkpoint's model: evaluated and logged already
            row = rounds.rows[-1]
        else:
            if books_fed is not None:  # the federation's ε after the last round its books released
                rounds.site_level_epsilon = books_fed.epsilon
            row = rounds.on_evaluated(server_round, evaluator(weights))
            checkpoint.save(run_dir, checkpoint.Checkpoint(
                run_id=run_dir.name, config_sha256=digest, server_round=server_round, weights=weights,
                strategy_state=checkpoint.strategy_state(inner), excluded=dict(strategy.excluded),
                epsilon=dict(rounds.epsilon), declines=dict(rounds.declines),
                center=None if center is None else [float(v) for v in center]))
            streak = rounds.empty_streak()
            if server_round and streak >= fed.max_empty_rounds:  # after its checkpoint: resumable
                raise EmptyRoundsError(empty_rounds_line(rounds, server_round, streak, fed.max_empty_rounds))
        quality = ({"perplexity": row["perplexity"], "loss": row["loss"]} if "perplexity" in row
                   else {"accuracy": row["accuracy"], "macro-f1": row["macro_f1"]})
        return MetricRecord({**quality, "epsilon-max": row["epsilon_max"]})

    # The tracked run opens once nothing but the rounds can refuse the run; from here on every
    # way out closes it (a failure says FAILED, and a resume continues the same run).
    rounds.tracker = open_tracker(settings.tracking, run_dir, ckpt.server_round if ckpt is not None else None)
    rounds.tracker.log_config(cfg.to_flat(), cfg.to_yaml())
    if settings.tracking != "none":
        say(f"tracking: {settings.tracking} in {run_dir / 'tracking' / settings.tracking}")
    remaining = settings.rounds - done
    if remaining > 0:
        calibrates = " (in its first round each site calibrates its noise for the whole run)" \
            if settings.accounting.dp and not done else ""
        asked = (f"each site with probability {settings.sites.fraction_train:g}" if books_fed is not None
                 else f"{len(strategy.sample(done + 1))} sites")
        say(f"round {done + 1} of {settings.rounds}: {asked} train{calibrates}")
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=protocol.to_array_record(initial),
            num_rounds=remaining,
            timeout=settings.sites.round_timeout_s,
            train_config=plan,
            evaluate_fn=evaluate,
        )
    except EmptyRoundsError:
        summarize(run_dir, settings.accounting, sites, rounds.epsilon, rounds.declines)  # every spend so far
        rounds.tracker.close(failed=True)
        raise
    except BaseException:  # the tracked run says it failed (a resume continues it)
        rounds.tracker.close(failed=True)
        raise
    try:
        finish_run(run_dir, settings, view, rounds, sites, result.arrays, initial, cfg,
                   centered=center is not None, refused=refused)
    except BaseException:
        rounds.tracker.close(failed=True)
        raise
    rounds.tracker.close()
    # Tell every site the run is over (a site not picked for the last round cannot tell that
    # from a lost coordinator); a site that does not answer in time changes nothing.
    grid.send_and_receive([protocol.instruction(protocol.DONE, plan, n) for n in sites], timeout=10.0)
    return run_dir


def finish_run(run_dir: Path, settings: CoordinatorSettings, view: TrainView, rounds: RoundLog,
               sites: dict[int, dict[str, Any]], arrays: ArrayRecord | None, initial: dict[str, np.ndarray[Any, Any]],
               cfg: Config, *, centered: bool, refused: list[str]) -> None:
    """After the last round: the final weights, the privacy summary, plots, model and report."""
    final = protocol.from_array_record(arrays) if arrays else initial  # no round trained: initial
    view.load_trainable(final)
    # What follows takes a while on a big run (the model export alone, tens of seconds): say so.
    say("the rounds are done: writing the privacy summary, plots" + (", the final model" if settings.save_model
                                                                     else "") + " and report.md")
    summary = summarize(run_dir, settings.accounting, sites, rounds.epsilon, rounds.declines)
    plot_run(run_dir, rounds.rows, summary)
    if settings.save_model:
        export_model(cfg, view, run_dir / "model")
        rounds.tracker.log_final_model(run_dir / "model")
    # task=image: BatchNorms made GroupNorms for Opacus (task.image.build_image_model records how many)
    batch_norms = int(getattr(getattr(view.model, "config", None), "fedshield_batchnorm_to_groupnorm", 0) or 0)
    write_report(run_dir, settings, rounds.rows, summary, centered=centered, refused=refused, batch_norms=batch_norms)


def empty_rounds_line(rounds: RoundLog, server_round: int, streak: int, limit: int) -> str:
    """One line: which rounds trained nothing, and what each site said in the last one."""
    said = [f"{site}: {why.split(': ', 1)[1]}" for site, whys in sorted(rounds.declines.items())
            for why in whys if why.startswith(f"round {server_round}: ")]
    row = rounds.rows[-1]
    if not said:
        said = [row.get("skipped") or "no site was asked"]
    shown = "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")
    first = server_round - streak + 1
    span = f"round {server_round}" if streak == 1 else f"rounds {first}-{server_round}"
    return (f"{span} trained nothing ({streak} in a row; federation.max_empty_rounds={limit}); in round "
            f"{server_round}: {shown}. The checkpoint after round {server_round} is kept: resume once the sites "
            "can train")


def secure_aggregation(policy: SecAggPolicy | None, seed: int, names: dict[int, str], simulated: bool,
                       noise: DistributedNoise | None = None,
                       ledger_keys: dict[int, str] | None = None) -> SecAggPlus | None:
    """The run's SecAgg+ stages (None: federation.secure_aggregation=off). `seed`:
    federation.seed, which fixes the neighbourhoods in a simulation."""
    if policy is None:
        return None
    settings = policy.settings
    # The ring of neighbourhoods is public; seeded in simulation so that a seed fixes a run.
    rng = random.Random(seed * 31 + 7) if simulated else None
    if settings.neighbours:
        masks = f"{settings.neighbours} neighbours each"
    elif settings.neighbours == 0:
        masks = "every sampled site masks with every other"
    else:
        masks = (f"every sampled site masks with every other up to {AUTO_RING_ABOVE} sites a round, with a ring of "
                 "2·ceil(log2 n) above")
    say(f"secure aggregation: SecAgg+, updates quantized to {settings.bits} bits in ±{settings.clip_range:g}, "
        f"{masks}, up to {settings.max_dropout_fraction:.0%} of a neighbourhood may drop")
    # Each site's round keys are checked against the ledger key of its hello (Bell et al.'s
    # malicious variant: strategies/secagg.py).
    return SecAggPlus(settings, names, ledger_keys or {}, timeout=policy.timeout_s, rng=rng, noise=noise)


def run_config_yaml(cfg: Config) -> str:
    """The config that fixes what a run computes: everything but `output.*` (where it is
    written), so that a resumed run may be pointed at its folder differently."""
    data = cfg.to_dict()
    data.pop("output", None)
    return json.dumps(data, sort_keys=True)


def rejoined_sites(run_dir: Path, sites: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """On resume, a site must present the ledger signing key it had before the restart."""
    kept = {}
    for node, s in sites.items():
        before = run_dir / "privacy" / LEDGER_KEYS / f"{s['site']}.pub"
        if before.is_file() and signing.fingerprint(signing.load_public_key(before.read_bytes())) != \
                signing.fingerprint(s["key"]):
            say(f"site {s['site']}: not rejoining: its ledger signing key is not the one it had in this run")
            continue
        kept[node] = s
    return kept


def recorded_ledger_keys(run_dir: Path) -> dict[str, signing.PublicKey]:
    """Site -> the ledger signing key the run recorded for it (privacy/ledger-keys/)."""
    return {p.stem: signing.load_public_key(p.read_bytes())
            for p in sorted((run_dir / "privacy" / LEDGER_KEYS).glob("*.pub"))}


RUN_CONFIG_YAML_KEY = "fedshield-config-yaml"
RESUME_KEY = "fedshield-resume"  # run config: continue the run output.run_name from its checkpoint
# run config (`fedshield server`): the registry that binds names to connection keys, and the one
# whose deny-list applies (the same file when sites enrolled with `fedshield certs sign`)
ENROLMENT_KEY = "fedshield-enrolment"
REVOKED_KEY = "fedshield-revoked"


def identity_from_run_config(run_config: dict[str, Any]) -> LiveEnrolment | None:
    """The name binding `fedshield server` asked for (its run config keys, popped), or None."""
    bindings = str(run_config.pop(ENROLMENT_KEY, "") or "")
    revoked = str(run_config.pop(REVOKED_KEY, "") or "") or bindings
    if not bindings:
        return None
    if Path(bindings) == Path(revoked):
        identity = LiveEnrolment(revoked)
    else:
        identity = LiveEnrolment(revoked, load_enrolment(bindings))
    if not identity.current().sites:
        raise FedShieldError(f"enrolment registry {bindings}: no site is enrolled")
    return identity


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """Flower's run config: dotted keys (`flwr run . --run-config "privacy.target_epsilon=4"`,
    encoded as conf/flower.py says), or the whole config as one YAML string (the older form,
    and `fedshield server`'s app)."""
    from fedshield.conf.flower import from_run_config

    run_config = dict(run_config)
    text = str(run_config.pop(RUN_CONFIG_YAML_KEY, "") or "")
    written = conf.flat_from_yaml(text, RUN_CONFIG_YAML_KEY)
    # Flower passes every declared key (pyproject's [tool.flwr.app.config]) on every run:
    # only those that differ from their declared default override the YAML.
    return Config.from_dict({**written, **from_run_config(run_config)})


def build_server_app(cfg: Config | None = None, run_dir: Path | None = None, resume: bool = False) -> ServerApp:
    """The ServerApp; with no `cfg` it reads Flower's run config (`flwr run .`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        again = resume or bool(run_config.pop(RESUME_KEY, False))
        try:
            identity = identity_from_run_config(run_config)
            run_cfg = cfg if cfg is not None else config_from_run_config(run_config)
            # Flower's deployment grid pulls replies every 3 s: polled promptly (server/prompt_grid.py)
            run_federation(prompt(grid), run_cfg, run_dir, resume=again, identity=identity)
        except FedShieldError as exc:  # the cause, in one line the operator sees (server/cli.py quotes it)
            say(f"{RUN_STOPPED}{exc}")
            raise

    return server_app


app = build_server_app()

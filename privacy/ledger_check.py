"""The coordinator's check of every ledger entry a site sends, on arrival.

A reply's entries are the site's signed account of what its release cost. The coordinator
keeps a copy per run (`<run>/privacy/ledger.jsonl`) for the auditor, so before an entry is
copied there it must be what the site really signed, for what the plan asked, and not
under-report:

1. **Chain and signature** (`privacy.ledger.verify_ledger`): the new entries continue the
   site's chain from its last accepted entry of this run (hash links, seq, run_seq, rounds
   forward, ε never down), each signed by the ledger signing key the site presented at
   discovery (its `SiteHello`). Entries that start past the next spend of this run (a reply
   with the spends between is late or lost) cannot be checked across the gap: refused as
   `missing`, not as a breach, and held (`pending`) until the spends between arrive, then
   taken in after them; a second such reply while entries are held is refused for good.
2. **Provenance**: each entry names this site, this run and this round, or an earlier
   round of this run that the coordinator does not hold (a late spend: one that a crash
   interrupted and the site counted since; recorded, not checked against this round's plan).
   Entries are parsed once, on arrival, into typed `privacy.events.LedgerEntry`s (version 1
   or 2: a site's count, released once per dataset, may have been written by an older
   version and is reused in every later run; both versions are accounted identically);
   everything below reads the typed event and provenance.
3. **The mechanism**: a site's releases are record-level Gaussian mechanisms: DP-SGD, the
   record count (gaussian-count), the feature sum (gaussian-feature-sum); the last two are
   one-step releases of round 0.
4. **The plan**: a release's entries spend exactly the planned Poisson rate and steps
   (`Expected`, from the record count the site declared), with σ > 0, the run's accountant
   and the run's δ or a smaller one (a site may be stricter than the plan, never looser).
   No entry in a DP run's release (the site trained without DP, or dropped the account)
   is a rejection.
5. **ε recomputed**: the recorded cumulative ε is at least what the accountant
   (`privacy.accountant.epsilon`, the larger of Opacus and dp-accounting) computes over the
   site's entries of this run alone. Earlier runs only add to the true ε, so this is a
   lower bound the site cannot go under; the site's own ledger is the full account.

6. **Bounded before arithmetic, bounded in cost** (issue 21): every number an entry holds
   is range-checked first (`privacy.ledger`: a 401-digit σ or ε is refused, not an
   OverflowError); a late spend is held to the plan of its own round (`plans`; round 0 is
   the one-step, full-batch releases), never only to "an earlier round"; σ >=
   `MIN_NOISE_MULTIPLIER`; at most `MAX_MECHANISMS` different (σ, q) per site and run. The
   work of recomputing ε grows with ε itself (dp-accounting's PLD spans the privacy-loss
   range at interval 1e-3: σ = 0.01 cost 152 s, 1e9 steps 250 GiB), so a cheap sound
   estimate comes first: Opacus' RDP ε (milliseconds at any σ, q, steps) above
   `MAX_CHECKED_EPSILON` refuses the entries before the PLD is built. It only ever refuses
   (an RDP figure never admits an entry), so the recorded ε stays >= the accountant's.
   A plan of more than `MAX_PLAN_STEPS` steps a round (`plan_problem`, a declared count
   of ~10^8 records) is refused at discovery. Measured on this machine: the worst
   admitted check costs about 2 s (σ = 0.1, q = 1, ε ≈ 1000; 10^6 steps at q = 1e-6).
   Whatever still goes wrong inside a check (MemoryError included) refuses that site's
   entries with one line, never the run.

A reply whose entries fail is rejected and its entries are kept apart (the caller writes
them to `privacy/rejected-entries.jsonl`); the site's chain state does not advance, so a
site whose books failed once cannot be accepted again in this run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedshield.privacy import signing
from fedshield.privacy.accountant import ADD_REMOVE, Grouped, SpendTotals, epsilon, epsilon_opacus
from fedshield.privacy.errors import LedgerError
from fedshield.privacy.events import (
    ONE_SHOT,
    RECORD_GAUSSIANS,
    LedgerEntry,
    Mechanism,
    PrivacyEvent,
    as_float,
    shown,
)
from fedshield.privacy.ledger import ChainState, verify_ledger

TOLERANCE = 1e-6  # relative, as the audit's
# A floor no honest plan goes under: one full-batch step at σ = 0.1 already costs ε ≈ 92
# (PLD, δ = 1e-5); a site calibrated to any target ε a report would print uses σ > 0.5.
MIN_NOISE_MULTIPLIER = 0.1
# The ε past which the coordinator does not build a PLD (its cost grows with ε): an RDP
# estimate above it refuses the entries. ε = 1000 is e^1000: no privacy left to account.
MAX_CHECKED_EPSILON = 1000.0
MAX_MECHANISMS = 16  # different (σ, q) in one site's spends of one run (an honest site uses 3)
PREPARED_HISTORIES = 4  # different histories whose next ε `LedgerCheck.prepare` computes ahead, at most
MAX_PLAN_STEPS = 10**6  # DP-SGD steps a round's plan may ask of one site (n ≈ 1.3e8 at batch 128)
UNVERIFIED = "its ledger entries do not verify"


@dataclass(frozen=True)
class Verdict:
    """`problem` None: the entries may join the run's ledger; `new_entries` are those it lacks.

    `missing`: what fails is that the entries start after spends of this run that the
    coordinator never received (a reply lost or late on the way): refused, but no proof of
    an attack. `held`: the entries are kept until those spends arrive (`LedgerCheck.pending`);
    False: the site had entries held already, its books cannot be completed in this run."""

    problem: str | None
    new_entries: tuple[dict[str, Any], ...] = ()
    missing: bool = False
    held: bool = False


@dataclass(frozen=True)
class Expected:
    """What one release of a site must spend: `steps` steps at Poisson rate `sample_rate`."""

    sample_rate: float
    steps: int


def plan_problem(expected: Expected) -> str | None:
    """Why the coordinator cannot check a site held to `expected` at bounded cost, or None."""
    if expected.steps > MAX_PLAN_STEPS:
        return (f"its declared record count makes a round {expected.steps} DP-SGD steps, more than the "
                f"{MAX_PLAN_STEPS} the coordinator checks per round")
    return None


@dataclass
class _Accepted:
    """A site's accepted entries as the coordinator checked them (`LedgerCheck._accepted`)."""

    last: dict[str, Any] | None  # the last accepted entry (the object), None if none
    count: int
    events: list[PrivacyEvent]  # the entries, parsed
    state: ChainState | None  # the chain state after them (None: they did not verify)
    # What each reply's check reads of them, kept up to date as entries are accepted (a
    # round's check then costs the same in round 300 as in round 3): their spends as the
    # accountants group them, their (σ, q), their hashes.
    totals: SpendTotals = field(default_factory=SpendTotals)
    mechanisms: set[tuple[float, float]] = field(default_factory=set)
    hashes: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, entries: list[dict[str, Any]], events: list[PrivacyEvent], state: ChainState | None) -> _Accepted:
        return cls(entries[-1] if entries else None, len(entries), events, state,
                   SpendTotals(ev.spend() for ev in events), {(ev.noise_multiplier, ev.sample_rate) for ev in events},
                   {h for e in entries if isinstance(h := e.get("hash"), str)})


@dataclass
class _Checked:
    """What one `LedgerCheck._problem` call found besides its verdict: the chain state after
    the entries it verified (None until they verify). One per call: never another check's."""

    state: ChainState | None = None
    events: list[PrivacyEvent] | None = None  # the fresh entries' events, parsed once
    totals: SpendTotals | None = None  # the accepted entries' and the fresh ones' spends, grouped
    mechanisms: set[tuple[float, float]] | None = None  # and their (σ, q)


class LedgerCheck:
    """Per-run, per-site state of the entries accepted so far; `check` each reply's entries.

    Parameters
    ----------
    run_id : str
        The run every entry must name.
    public_keys : Mapping[str, PublicKey]
        Site -> its ledger signing public key, from discovery.
    dp : bool
        Whether the run's plan is record-level DP: then every release needs its entries.
    delta, accountant, neighbouring : float, str, str
        The plan's δ, accountant and neighbouring relation; entries must use them.
    plans : Mapping[str, Expected], optional
        Site -> what each of its training rounds must spend (the same every round: from its
        declared count). A late spend of round r >= 1 is held to it (without it: to the
        `expected` of the check at hand); a round-0 spend is one full-batch step. Settable
        after discovery (`self.plans`).
    """

    def __init__(self, run_id: str, public_keys: Mapping[str, signing.PublicKey], *, dp: bool,
                 delta: float, accountant: str, neighbouring: str = ADD_REMOVE,
                 plans: Mapping[str, Expected] | None = None) -> None:
        self.run_id = run_id
        self.plans: dict[str, Expected] = dict(plans or {})
        self.neighbouring = neighbouring
        self.public_keys = dict(public_keys)
        self.dp = dp
        self.delta = float(delta)
        self.accountant = accountant
        self.accepted: dict[str, list[dict[str, Any]]] = {site: [] for site in self.public_keys}
        self._chains: dict[str, _Accepted] = {}  # site -> its accepted entries as checked (`_accepted`)
        # On resume: site -> its entries in the run's ledger, for the sites that did not rejoin.
        self.absent: dict[str, list[dict[str, Any]]] = {}
        # Site -> (round, entries, plan) of a reply whose entries start after spends not yet
        # received: checked and taken in once those arrive (a late reply), as of their round.
        self.pending: dict[str, tuple[int, list[dict[str, Any]], Expected | None]] = {}

    def restore(self, entries: Sequence[dict[str, Any]],
                recorded_keys: Mapping[str, signing.PublicKey] | None = None) -> str | None:
        """Take in a run's ledger as written before a restart (resume); None, or why it
        cannot be trusted (each site's entries must verify under its key, as on arrival).

        A site that did not rejoin does not stop the resume (docs/coordinator.md §11): its
        entries must verify under the key the run recorded for it (`recorded_keys`: site ->
        the key in `privacy/ledger-keys/`), and they are kept in `absent` (the run's ledger
        keeps them; the site is not asked again)."""
        by_site: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            by_site.setdefault(str(e.get("site")), []).append(e)
        for site, own in by_site.items():
            key = self.public_keys.get(site) or (recorded_keys or {}).get(site)
            if key is None:
                return (f"the run's ledger has entries of site {site!r}, which did not rejoin, and the run recorded "
                        "no ledger key of it to check them")
            verified = verify_ledger(own, {site: key})
            if not verified.ok:
                return f"the run's ledger does not verify: {verified.reason}"
            if site in self.public_keys:
                self.accepted[site] = list(own)
            else:
                self.absent[site] = list(own)
        return None

    def earlier_release_problem(self, site: str, entries: Sequence[dict[str, Any]]) -> str | None:
        """Why `entries`, a site's spends of EARLIER runs (its record count, released once per
        dataset and reused), are not what its key signed, or None. They are not spends of
        this run: checked (fields in bounds, hash, signature under the site's key) and not
        recorded; their chain is in the site's own ledger."""
        if site not in self.public_keys:
            return f"no ledger key for site {site!r} from discovery"
        try:
            for e in entries:
                if e.get("site") != site or e.get("run_id") == self.run_id:
                    return (f"an earlier-run ledger entry names site {shown(e.get('site'))}, "
                            f"run {shown(e.get('run_id'))}")
                verified = verify_ledger([e], {site: self.public_keys[site]})
                problems = [why for _, why in verified.problems if "spend #" not in why]  # one entry, not its run
                if problems:
                    return f"its earlier-run ledger entry does not verify: {problems[0]}"
        except Exception as exc:  # noqa: BLE001  whatever a site signed, the run goes on
            return f"its earlier-run ledger entries could not be checked ({type(exc).__name__})"
        return None

    def holds(self, site: str, entry: Mapping[str, Any]) -> bool:
        """Whether this run's ledger already holds `entry` of `site` (by its hash, among the
        accepted hashes the books keep)."""
        digest = entry.get("hash")
        return isinstance(digest, str) and digest in self._accepted(site).hashes

    def check(self, site: str, server_round: int, entries: Sequence[dict[str, Any]],
              expected: Expected | None) -> Verdict:
        """Whether `entries` may join the run's ledger; accepted ones are taken in.

        `expected` is the spend the plan asked for (None: nothing to check, e.g. a site
        that declined after spending). Entries this run already accepted (a site replaying
        its last release after a coordinator restart) are recognised, not counted twice:
        `Verdict.new_entries` is what the run's ledger still lacks."""
        entries = list(entries)
        accepted = self.accepted.get(site, [])
        known = self._accepted(site).hashes
        replayed = [e for e in entries if isinstance(h := e.get("hash"), str) and h in known]
        if replayed:
            if entries[: len(replayed)] != replayed or accepted[-len(replayed):] != replayed:
                return Verdict("its ledger entries repeat accepted ones out of order or changed")
        fresh = entries[len(replayed):]
        checked = _Checked()
        try:
            problem = self._problem(site, server_round, entries, fresh, expected, checked)
        except Exception as exc:  # noqa: BLE001  whatever a site signed, the run goes on
            problem = f"its ledger entries could not be checked ({type(exc).__name__})"
        if problem is not None:
            gap = self._gap(site, fresh) if problem.startswith(UNVERIFIED) else None
            if gap is not None and site not in self.pending:
                self.pending[site] = (server_round, fresh, expected)
                return Verdict(f"its ledger entries start at spend #{gap[1]} of this run, and this run's ledger "
                               f"holds its spends up to #{gap[0]}: the reply with the spends between has not "
                               "arrived (not a breach); this reply's entries are held until it does, its update "
                               "is not used", missing=True, held=True)
            if gap is not None:
                return Verdict(f"its ledger entries start at spend #{gap[1]} of this run, and this run's ledger "
                               f"holds its spends up to #{gap[0]}: the spends between never arrived (a reply "
                               "lost, not a breach); its chain cannot be checked across them, so it is not asked "
                               "again in this run (its own ledger keeps the full account)", missing=True)
            return Verdict(problem)
        # Nothing new (no entries, or only replayed ones): the chain state stays the site's own.
        chain = self._accepted(site)
        state = checked.state if fresh else chain.state
        accepted.extend(fresh)
        if fresh and checked.events is not None and len(checked.events) == len(fresh) \
                and checked.totals is not None and checked.mechanisms is not None:
            chain.events.extend(checked.events)
            chain.hashes.update(e["hash"] for e in fresh)
            self._chains[site] = _Accepted(accepted[-1], len(accepted), chain.events, state, checked.totals,
                                           checked.mechanisms, chain.hashes)
        elif fresh:  # not as checked (never, past a check that passed): parsed and counted again
            chain.events.extend(LedgerEntry.from_dict(e).event for e in fresh)
            self._chains[site] = _Accepted.of(accepted, chain.events, state)
        return Verdict(None, tuple(fresh) + self._adopt(site))

    def prepare(self, sites: Iterable[str], limit: int = PREPARED_HISTORIES) -> None:
        """Compute, ahead, the ε that checking replies from `sites` will compute if each site
        spends as its last spend of this run did (a DP-SGD round's, again: a calibrated σ
        stays): only the accountants' caches keep them. At most `limit` different histories,
        the most common first (at 1,000 sites a round they are one or a few). The checks run
        in full when the replies come; a site that spends otherwise computes its own. The
        reply gate calls this while the round's sites train (strategies/reply_gate.py)."""
        if not self.dp:
            return
        # Keyed by what the accountants read of a history (its spends grouped), not by the
        # history itself: one step per (σ, q) a site, whatever the round.
        histories: Counter[Grouped | None] = Counter()
        nexts: dict[Grouped | None, SpendTotals] = {}
        for site in sites:
            if site in self.public_keys:
                chain = self._accepted(site)
                if chain.events and chain.events[-1].mechanism is Mechanism.DP_SGD:
                    following = chain.totals.copy()
                    following.add(chain.events[-1].spend())
                    key = following.grouped()
                    histories[key] += 1
                    nexts.setdefault(key, following)
        for key, _ in histories.most_common(limit):
            spends = nexts[key]
            try:  # `_problem`'s two, and its guard: the rough RDP bound, then the run's own accountant
                if epsilon_opacus(spends, self.delta, "rdp") <= MAX_CHECKED_EPSILON:
                    epsilon(spends, self.delta, self.accountant, self.neighbouring)
            except Exception:  # noqa: BLE001  only a cache is at stake: a check raises it in its place
                pass

    def _accepted(self, site: str) -> _Accepted:
        """`site`'s accepted entries as checked: parsed once, with the chain state after them,
        so that a reply's new entries are checked continuing it (every reply used to check the
        run's whole chain again). Built again from `accepted` when that is not the list it was
        made from (its length and its last entry, the very object, tell: `restore`)."""
        own = self.accepted.get(site, [])
        chain = self._chains.get(site)
        if chain is None or chain.count != len(own) or chain.last is not (own[-1] if own else None):
            verified = verify_ledger(own, {site: self.public_keys[site]}) if site in self.public_keys else None
            chain = self._chains[site] = _Accepted.of(own, [LedgerEntry.from_dict(e).event for e in own],
                                                      verified.state if verified is not None and verified.ok else None)
        return chain

    def _adopt(self, site: str) -> tuple[dict[str, Any], ...]:
        """The held entries of `site` that now continue its chain, checked as of their own
        round and taken in (the entries that filled the gap have just been accepted)."""
        if site not in self.pending:
            return ()
        server_round, held, expected = self.pending.pop(site)
        # Still short of spends: held again; failing on their own: refused for good (they
        # were kept apart on arrival).
        return self.check(site, server_round, held, expected).new_entries

    def _gap(self, site: str, fresh: list[dict[str, Any]]) -> tuple[int, int] | None:
        """(last spend number of this run accepted, first in `fresh`) if `fresh` starts past
        the next one: spends of this run were never received (their reply was lost)."""
        first = fresh[0].get("run_seq") if fresh else None
        if not isinstance(first, int) or isinstance(first, bool):
            return None
        held = [e.get("run_seq") for e in self.accepted.get(site, []) if e.get("run_id") == self.run_id]
        last = max((n for n in held if isinstance(n, int) and not isinstance(n, bool)), default=-1)
        return (last, first) if first > last + 1 else None

    def _problem(self, site: str, server_round: int, entries: list[dict[str, Any]], fresh: list[dict[str, Any]],
                 expected: Expected | None, checked: _Checked) -> str | None:
        if site not in self.public_keys:
            return f"no ledger key for site {site!r} from discovery"
        if not entries:
            return "no ledger entry: a DP release must come with its signed spend" if self.dp and expected else None
        try:  # parsed once, here: everything below reads the typed entries
            typed = [LedgerEntry.from_dict(e) for e in entries]
        except LedgerError as exc:
            return f"{UNVERIFIED}: {exc}"
        for t in typed:
            p = t.provenance
            # An earlier round of this run is a late spend (one a crash interrupted, counted
            # by the site since): recorded, and not part of this round's planned spend.
            late = 0 <= p.round < server_round
            if (p.site, p.run_id) != (site, self.run_id) or not (late or p.round == server_round):
                return (f"a ledger entry names site {shown(p.site)}, run {shown(p.run_id)}, round "
                        f"{shown(p.round)}; expected {site!r}, {self.run_id!r}, {server_round}")
            # A site may be stricter than the plan (a smaller δ of its own), never looser.
            if t.accountant != self.accountant or not isinstance(t.fields["delta"], float) \
                    or not 0 < t.delta <= self.delta:
                return (f"a ledger entry is at δ={shown(t.fields['delta'])} with {shown(t.accountant)}; the run "
                        f"allows δ <= {self.delta:g} with {self.accountant!r}")
            if t.mechanism not in RECORD_GAUSSIANS:
                return (f"a ledger entry records {t.mechanism.value} for unit {t.event.privacy_unit}: a site's "
                        "releases are record-level DP-SGD, its count and its feature sum")
            if t.mechanism in ONE_SHOT and p.round != 0:
                return (f"a ledger entry records a {t.mechanism.value} release in round {p.round}: it is a "
                        "round-0 release")
            if t.event.relation.value != self.neighbouring:
                return (f"a ledger entry is accounted under {t.event.relation.value}; the run's relation is "
                        f"{self.neighbouring}")
        chain, keys = self._accepted(site), {site: self.public_keys[site]}
        if chain.state is not None:  # the accepted entries verified: the new ones continue them
            verified = verify_ledger(fresh, keys, chain.state)
        else:
            verified = verify_ledger([*self.accepted[site], *fresh], keys)
        if not verified.ok:
            return f"{UNVERIFIED}: {verified.reason}"
        checked.state = verified.state
        # Past verify_ledger every entry parses, and every number is within privacy.events' bounds.
        fresh_events = checked.events = [t.event for t in typed[len(typed) - len(fresh):]]
        totals = chain.totals.copy()
        for ev in fresh_events:
            totals.add(ev.spend())
        mechanisms = chain.mechanisms | {(ev.noise_multiplier, ev.sample_rate) for ev in fresh_events}
        spends = [t.event.spend() for t in typed if t.provenance.round == server_round]
        if expected is not None:
            if any(s.sample_rate != expected.sample_rate for s in spends) or \
                    sum(s.steps for s in spends) != expected.steps:
                got = ", ".join(f"{s.steps} steps at q={s.sample_rate:g}" for s in spends) or "nothing for this round"
                return (f"its ledger entries spend {got}; the plan asks {expected.steps} steps "
                        f"at q={expected.sample_rate:g}")
            if any(s.noise_multiplier <= 0 for s in spends):
                return "a ledger entry records noise multiplier 0: no DP"
        if any(ev.noise_multiplier < MIN_NOISE_MULTIPLIER for ev in fresh_events):
            return (f"a ledger entry records noise multiplier {min(ev.noise_multiplier for ev in fresh_events):.4g}, "
                    f"below the {MIN_NOISE_MULTIPLIER:g} that any honest plan uses")
        problem = self._late_problem(site, server_round, typed[len(typed) - len(fresh):], expected)
        if problem is not None:
            return problem
        if len(mechanisms) > MAX_MECHANISMS:
            return (f"its ledger entries of this run use more than {MAX_MECHANISMS} different (σ, q): more "
                    "than the coordinator checks")
        last = typed[-1]
        rough = epsilon_opacus(totals, last.delta, "rdp")
        if rough > MAX_CHECKED_EPSILON:
            return (f"its ledger entries of this run cost ε ≈ {rough:.4g} (RDP), above the {MAX_CHECKED_EPSILON:g} "
                    "the coordinator checks: no privacy left to account")
        floor = epsilon(totals, last.delta, self.accountant, self.neighbouring)
        recorded = last.epsilon if last.epsilon is not None else -1.0
        if recorded < floor * (1 - TOLERANCE):
            return f"its ledger records ε={recorded:.6g}, below the {floor:.6g} that this run's entries alone cost"
        checked.totals, checked.mechanisms = totals, mechanisms
        return None

    def _late_problem(self, site: str, server_round: int, fresh: list[LedgerEntry],
                      expected: Expected | None) -> str | None:
        """A late spend (an earlier round's) held to the plan of its own round: round 0 is a
        one-step full-batch release; a training round spends at most its plan's steps at its
        rate. Without this, an entry for 'an earlier round' could say 1e9 steps."""
        late: dict[int, list[LedgerEntry]] = {}
        for t in fresh:
            if t.provenance.round < server_round:
                late.setdefault(t.provenance.round, []).append(t)
        for r, own in sorted(late.items()):
            plan = Expected(1.0, len(own)) if r == 0 else self.plans.get(site, expected)
            if plan is None:
                return f"a ledger entry of round {r} is a late spend, and no plan of round {r} is known for it"
            steps = [t.event.steps for t in own]
            q_ok = all(t.event.sample_rate == plan.sample_rate for t in own)
            if not q_ok or (r == 0 and any(n != 1 for n in steps)) or sum(steps) > plan.steps:
                got = ", ".join(f"{t.event.steps} steps at q={t.event.sample_rate:g}" for t in own)
                return (f"its late ledger entries of round {r} spend {got}; the plan of round {r} asks "
                        f"{plan.steps} steps at q={plan.sample_rate:g}")
        return None

    def run_epsilon(self, site: str) -> float:
        """ε of `site`'s entries accepted in this run, recomputed by the coordinator (at the
        δ of its last entry): what the run's releases cost it, from verified entries only.
        (Its entries' own ε may be larger: earlier runs, or a site that over-states.)"""
        own = self.accepted.get(site, [])
        if not own:
            return 0.0
        try:
            # The entry was parsed and checked when it was accepted (delta in (0, 1)): its
            # delta is read again, not the whole entry (once a site a round, for the metrics).
            delta = as_float(own[-1].get("delta"))
            if delta is None or not 0.0 < delta < 1.0:
                delta = LedgerEntry.from_dict(own[-1]).delta
            return epsilon(self._accepted(site).totals, delta, self.accountant, self.neighbouring)
        except Exception:  # noqa: BLE001  accepted entries were computed once already; never the run
            return float(own[-1]["epsilon"])

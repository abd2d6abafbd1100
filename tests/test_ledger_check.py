"""The coordinator's check of a site's ledger entries on arrival: what a site really signed,
for what the plan asked, never under-reported; everything else is refused."""

from __future__ import annotations

import copy

import pytest

from fedshield.privacy import signing
from fedshield.privacy.accountant import Spend, epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.ledger_check import Expected, LedgerCheck

PLAN = Expected(sample_rate=0.25, steps=4)
DELTA = 1e-5


class Site:
    """A site with its own signed ledger, as client/site.py keeps it."""

    def __init__(self, tmp_path, name="st-marys"):
        self.name = name
        key_path = tmp_path / name / "site.key"
        signing.generate_site_key(key_path)
        self.key = signing.load_private_key(key_path)
        self.ledger = Ledger(tmp_path / name / "ledger.jsonl")

    def spend(self, server_round, sigma=1.1, q=0.25, steps=4, run="run-1", **extra):
        return self.ledger.append({"run_id": run, "round": server_round, "site": self.name,
                                   "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                                   "max_grad_norm": 1.0, "delta": DELTA, "accountant": "rdp", **extra}, self.key)

    @property
    def public(self):
        return self.key.public_key()


def books(*sites, dp=True):
    return LedgerCheck("run-1", {s.name: s.public for s in sites}, dp=dp, delta=DELTA, accountant="rdp")


def test_honest_entries_are_accepted_round_after_round(tmp_path):
    site = Site(tmp_path)
    check = books(site)
    for r in (1, 2, 3):
        assert check.check(site.name, r, [site.spend(r)], PLAN).problem is None
    assert [e["round"] for e in check.accepted[site.name]] == [1, 2, 3]


def test_a_site_with_earlier_runs_starts_mid_chain(tmp_path):
    site = Site(tmp_path)
    site.spend(1, run="run-0")
    site.spend(2, run="run-0")
    assert books(site).check(site.name, 1, [site.spend(1)], PLAN).problem is None  # seq 2, partial history


def test_forged_and_foreign_entries_are_refused(tmp_path):
    site, other = Site(tmp_path), Site(tmp_path, "impostor")
    check = books(site)
    forged = other.spend(1)
    forged["site"] = site.name  # another key's entry, renamed
    assert "do not verify" in check.check(site.name, 1, [forged], PLAN).problem
    entry = site.spend(1)
    edited = copy.deepcopy(entry)
    edited["noise_multiplier"] = 5.0  # looks like more noise than was used
    assert "do not verify" in check.check(site.name, 1, [edited], PLAN).problem
    assert check.check(site.name, 1, [entry], PLAN).problem is None  # the real one still passes
    assert "names site" in check.check(site.name, 2, [other.spend(2)], PLAN).problem
    assert "no ledger key" in check.check("nobody", 1, [entry], PLAN).problem


def test_entries_for_another_run_round_or_delta_are_refused(tmp_path):
    site = Site(tmp_path)
    other_run = site.spend(1, run="run-9")
    assert "expected 'st-marys', 'run-1', 1" in books(site).check(site.name, 1, [other_run], PLAN).problem
    # An earlier round's entry alone is a late spend, not round 2's: the round is short of its plan.
    assert "spend nothing for this round; the plan asks" in books(site).check(site.name, 2, [site.spend(1)],
                                                                             PLAN).problem
    assert "expected 'st-marys', 'run-1', 1" in books(site).check(site.name, 1, [site.spend(2)], PLAN).problem
    loose = site.ledger.append({"run_id": "run-1", "round": 3, "site": site.name, "noise_multiplier": 1.0,
                                "sample_rate": 0.25, "steps": 4, "max_grad_norm": 1.0, "delta": 1e-3,
                                "accountant": "rdp"}, site.key)
    assert "the run allows δ <= 1e-05" in books(site).check(site.name, 3, [loose], PLAN).problem


def test_a_chain_with_a_gap_or_a_replay_is_refused(tmp_path):
    site = Site(tmp_path)
    check = books(site)
    first = site.spend(1)
    assert check.check(site.name, 1, [first], PLAN).problem is None
    second = site.spend(2)  # spent, its reply not (yet) at the coordinator
    third = site.spend(3)
    gap = check.check(site.name, 3, [third], PLAN)  # refused, but a late reply is no proof of an attack
    assert "start at spend #2" in gap.problem and "has not arrived (not a breach)" in gap.problem
    assert gap.missing and gap.held and check.accepted[site.name] == [first]
    late = check.check(site.name, 2, [second], PLAN)  # the late reply comes: both join, in chain order
    assert late.problem is None and late.new_entries == (second, third)
    assert check.accepted[site.name] == [first, second, third]
    site.spend(4)  # lost for good
    check.check(site.name, 5, [site.spend(5)], PLAN)  # held
    never = check.check(site.name, 6, [site.spend(6)], PLAN)  # still missing: the books cannot be completed
    assert "never arrived (a reply lost, not a breach)" in never.problem and never.missing and not never.held
    twice = books(site).check(site.name, 1, [first, first], PLAN)  # the same entry twice
    assert "do not verify" in twice.problem and not twice.missing


@pytest.mark.parametrize("spend, says", [
    (dict(steps=1), "its ledger entries spend 1 steps at q=0.25; the plan asks 4 steps at q=0.25"),
    (dict(q=0.5), "the plan asks 4 steps at q=0.25"),
    (dict(sigma=0.0), "noise multiplier 0"),
])
def test_a_spend_other_than_the_plan_or_without_noise_is_refused(tmp_path, spend, says):
    site = Site(tmp_path)
    assert says in books(site).check(site.name, 1, [site.spend(1, **spend)], PLAN).problem


def test_a_spend_in_segments_that_add_up_to_the_plan_is_accepted(tmp_path):
    site = Site(tmp_path)
    split = [site.spend(1, steps=1), site.spend(1, steps=3)]  # Opacus may record segments
    assert books(site).check(site.name, 1, split, PLAN).problem is None


def test_no_entry_in_a_dp_run_is_refused_and_none_needed_without_dp(tmp_path):
    site = Site(tmp_path)
    assert "must come with its signed spend" in books(site).check(site.name, 1, [], PLAN).problem
    assert books(site, dp=False).check(site.name, 1, [], PLAN).problem is None
    assert books(site).check(site.name, 1, [], None).problem is None  # nothing was asked of it


def _resigned(site, entry, **changes):
    """The site's own key over a changed entry: a valid signature on a lie."""
    import base64

    from fedshield.privacy.ledger import entry_hash

    lie = dict(entry, **changes)
    lie["hash"] = entry_hash(lie)
    lie["signature"] = base64.b64encode(signing.sign(site.key, lie["hash"].encode())).decode()
    return lie


def test_an_under_reported_epsilon_is_refused(tmp_path):
    site = Site(tmp_path)
    honest = site.spend(1)
    assert honest["epsilon"] >= epsilon([Spend(1.1, 0.25, 4)], DELTA, "rdp")
    check = books(site)
    assert "below the" in check.check(site.name, 1, [_resigned(site, honest, epsilon=0.5)], PLAN).problem
    assert check.accepted[site.name] == []  # the refused entry is not taken in
    assert check.check(site.name, 1, [honest], PLAN).problem is None
    later = _resigned(site, site.spend(2), epsilon=honest["epsilon"])  # a round that cost nothing?
    assert "below the" in check.check(site.name, 2, [later], PLAN).problem
    assert check.accepted[site.name] == [honest]


@pytest.mark.parametrize("dp", [True, False])
def test_a_site_stricter_than_the_plan_is_accepted(tmp_path, dp):
    site = Site(tmp_path)
    strict = site.ledger.append({"run_id": "run-1", "round": 1, "site": site.name, "noise_multiplier": 3.0,
                                 "sample_rate": 0.25, "steps": 4, "max_grad_norm": 0.5, "delta": 1e-7,
                                 "accountant": "rdp"}, site.key)
    assert books(site, dp=dp).check(site.name, 1, [strict], PLAN).problem is None


def test_a_release_replayed_after_a_coordinator_restart_is_recognised_not_counted_twice(tmp_path):
    site = Site(tmp_path)
    first, second = site.spend(1), site.spend(2)
    check = books(site)
    assert check.restore([first, second]) is None  # the run's ledger as the crash left it
    verdict = check.check(site.name, 2, [second], PLAN)  # round 2 asked again: the site replays it
    assert verdict.problem is None and verdict.new_entries == ()
    assert check.accepted[site.name] == [first, second]
    again = site.spend(2)  # or it trains round 2 again, and spends again: a continuation
    verdict = check.check(site.name, 2, [again], PLAN)
    assert verdict.problem is None and verdict.new_entries == (again,)
    assert "out of order or changed" in check.check(site.name, 2, [first], PLAN).problem


def test_a_ledger_that_does_not_verify_cannot_be_resumed(tmp_path):
    site = Site(tmp_path)
    first = site.spend(1)
    assert "does not verify" in books(site).restore([dict(first, steps=1)])
    assert "did not rejoin" in books(site).restore([Site(tmp_path, "gone").spend(1)])


def test_a_resume_goes_on_with_the_sites_that_rejoin(tmp_path):
    stays, gone = Site(tmp_path), Site(tmp_path, "gone")
    ledger = [stays.spend(1), gone.spend(1), stays.spend(2), gone.spend(2)]  # the run's ledger before the crash
    check = books(stays)  # only st-marys came back
    assert check.restore(ledger, {"gone": gone.public}) is None  # its entries checked under the run's recorded key
    assert list(check.absent) == ["gone"] and len(check.absent["gone"]) == 2
    assert check.check(stays.name, 3, [stays.spend(3)], PLAN).problem is None  # the run goes on
    edited = [*ledger[:3], dict(ledger[3], steps=1)]  # an absent site's entries still must verify
    assert "does not verify" in books(stays).restore(edited, {"gone": gone.public})
    assert "does not verify" in books(stays).restore(ledger, {"gone": stays.public})  # under its own key


# ------------------------------------------------------------ typed events (privacy/events.py)


def test_the_count_and_feature_sum_come_under_their_own_mechanisms_in_round_0(tmp_path):
    """A round-1 reply that also carries the site's count and feature-sum releases (round 0,
    late): accepted under their own mechanisms, and ε is the same composition as DP-SGD's."""
    site = Site(tmp_path)
    count = site.spend(0, sigma=10.0, q=1.0, steps=1, release="record-count", released_count=150)
    mean = site.spend(0, sigma=20.0, q=1.0, steps=1, release="feature-mean")
    train = site.spend(1, release="dp-sgd")
    assert [e["mechanism"] for e in (count, mean, train)] == [
        "gaussian-count", "gaussian-feature-sum", "dp-sgd-poisson-gaussian"]
    assert all(e["ledger_version"] == 2 for e in (count, mean, train))
    check = books(site)
    assert check.check(site.name, 1, [count, mean, train], PLAN).problem is None
    spends = [Spend(10.0, 1.0, 1), Spend(20.0, 1.0, 1), Spend(1.1, 0.25, 4)]
    assert check.run_epsilon(site.name) == epsilon(spends, DELTA, "rdp")


def test_a_one_shot_release_outside_round_0_or_a_site_level_mechanism_is_refused(tmp_path):
    site = Site(tmp_path)
    count = site.spend(1, sigma=10.0, q=1.0, steps=1, release="record-count", released_count=150)
    problem = books(site).check(site.name, 1, [count], PLAN).problem
    assert problem == "a ledger entry records a gaussian-count release in round 1: it is a round-0 release"
    other = Site(tmp_path, "fed")
    fedavg = other.spend(1, mechanism="dp-fedavg-poisson-gaussian", privacy_unit="site")
    problem = books(other).check(other.name, 1, [fedavg], PLAN).problem
    assert problem.startswith("a ledger entry records dp-fedavg-poisson-gaussian for unit site")


def test_a_forged_v2_entry_is_refused_on_arrival_with_one_line(tmp_path):
    """A site that signs a count release under DP-SGD's name (version 2), or a version the
    coordinator does not know: refused before any accounting, one line."""
    import base64

    from fedshield.privacy.ledger import entry_hash

    site = Site(tmp_path)
    entry = site.spend(1)
    for changes, says in (({"release": "record-count"}, "is not the mechanism of a record-count release"),
                          ({"ledger_version": 9}, "ledger_version 9 is not one this reader knows"),
                          ({"noise_multiplier": 2e6}, "noise_multiplier must be a number in [0, 1e+06]")):
        forged = dict(entry, **changes)
        forged["hash"] = entry_hash(forged)
        forged["signature"] = base64.b64encode(signing.sign(site.key, forged["hash"].encode())).decode()
        problem = books(site).check(site.name, 1, [forged], PLAN).problem
        assert problem.startswith("its ledger entries do not verify: ledger entry of site 'st-marys' round 1: ")
        assert says in problem and "\n" not in problem


def test_a_remembered_signature_never_vouches_for_other_bytes_or_another_key(tmp_path):
    """signing.verify_known remembers successes only, keyed by (key fingerprint, signature,
    bytes): the whole chain checked on every reply costs one verification per new entry,
    and nothing else verifies because something once did."""
    from fedshield.privacy import signing

    signing.generate_site_key(tmp_path / "a.key")
    signing.generate_site_key(tmp_path / "b.key")
    a, b = signing.load_private_key(tmp_path / "a.key"), signing.load_private_key(tmp_path / "b.key")
    pub_a, pub_b = a.public_key(), b.public_key()
    fp_a, fp_b = signing.fingerprint(pub_a), signing.fingerprint(pub_b)
    sig = signing.sign(a, b"entry hash 1")
    assert signing.verify_known(pub_a, fp_a, sig, b"entry hash 1")
    assert signing.verify_known(pub_a, fp_a, sig, b"entry hash 1")  # remembered
    assert not signing.verify_known(pub_a, fp_a, sig, b"entry hash 2")
    assert not signing.verify_known(pub_b, fp_b, sig, b"entry hash 1")
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    assert not signing.verify_known(pub_a, fp_a, forged, b"entry hash 1")
    assert not signing.verify_known(pub_a, fp_a, forged, b"entry hash 1")  # failures are checked again


def test_prepare_computes_the_next_rounds_epsilon_ahead_and_decides_nothing(tmp_path):
    """LedgerCheck.prepare (called by the reply gate while a streamed round trains) leaves the
    ε of each site's history plus its last DP-SGD spend again in the accountants' caches:
    the check of such a reply then computes no new ε. It accepts and refuses nothing (the
    verdicts are those of books that were never prepared), a site whose spend differs
    computes its own, and a site not known, or without a DP-SGD spend yet, is passed over."""
    from fedshield.privacy import accountant

    sites = [Site(tmp_path, f"site-{i}") for i in range(3)]
    prepared, plain = books(*sites), books(*sites)
    for site in sites:
        entry = site.spend(1, sigma=1.37)
        assert prepared.check(site.name, 1, [entry], PLAN).problem is None
        assert plain.check(site.name, 1, [entry], PLAN).problem is None
    nothing_yet = books(Site(tmp_path, "new"))
    nothing_yet.prepare(["new", "nobody"])  # no spend to repeat, no such site: nothing to compute

    round2 = [site.spend(2, sigma=1.37) for site in sites[:2]] + [sites[2].spend(2, sigma=2.9)]
    caches = (accountant._opacus_cached, accountant._rdp_of_step)

    def misses() -> list[int]:
        return [c.cache_info().misses for c in caches]

    for cache in caches:  # the sites' own appends computed them in this process: forgotten
        cache.cache_clear()
    prepared.prepare([s.name for s in sites])
    before = misses()
    verdicts = [prepared.check(s.name, 2, [e], PLAN).problem for s, e in zip(sites[:2], round2[:2], strict=True)]
    assert verdicts == [None, None]
    assert misses() == before  # the two sites' ε were ready
    assert prepared.check(sites[2].name, 2, [round2[2]], PLAN).problem is None  # another σ: its own ε
    assert misses()[0] > before[0]
    for cache in caches:
        cache.cache_clear()
    before = misses()
    assert [plain.check(s.name, 2, [e], PLAN).problem for s, e in zip(sites, round2, strict=True)] == [None] * 3
    assert misses()[0] > before[0]  # unprepared books compute them as they check
    assert prepared.accepted == plain.accepted


def test_the_books_keep_each_sites_spends_grouped_as_they_accept_them(tmp_path):
    """A reply's check reads the site's accepted spends as the accountants group them, kept up
    to date entry by entry (`SpendTotals`), its (σ, q) and its hashes: after rounds of
    different σ, a replayed entry and a restore, they are exactly what the accepted entries
    give when counted afresh, and `run_epsilon` is the accountant's ε over those entries."""
    from fedshield.privacy.accountant import SpendTotals
    from fedshield.privacy.events import LedgerEntry

    site = Site(tmp_path)
    check = books(site)
    for r in range(1, 9):
        entry = site.spend(r, sigma=1.1 if r % 3 else 2.5)
        assert check.check(site.name, r, [entry], PLAN).problem is None
    assert check.check(site.name, 8, [entry], PLAN).new_entries == ()  # sent again: recognised, not counted twice
    assert check.holds(site.name, entry) and not check.holds(site.name, {**entry, "hash": "0" * 64})
    assert not check.holds(site.name, {"hash": ["not", "a", "hash"]}) and not check.holds("nobody", entry)

    def afresh(books: LedgerCheck) -> tuple:
        entries = books.accepted[site.name]
        events = [LedgerEntry.from_dict(e).event for e in entries]
        return (SpendTotals(ev.spend() for ev in events).grouped(),
                {(ev.noise_multiplier, ev.sample_rate) for ev in events}, {e["hash"] for e in entries})

    chain = check._accepted(site.name)
    assert (chain.totals.grouped(), chain.mechanisms, chain.hashes) == afresh(check)
    assert chain.totals.grouped() == ((1.1, 0.25, 24), (2.5, 0.25, 8))
    spends = [Spend(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in check.accepted[site.name]]
    assert check.run_epsilon(site.name) == epsilon(spends, DELTA, "rdp")

    resumed = books(site)
    assert resumed.restore(check.accepted[site.name]) is None
    kept = resumed._accepted(site.name)
    assert resumed.holds(site.name, entry)  # a resumed run holds what its ledger had
    assert (kept.totals.grouped(), kept.mechanisms, kept.hashes) == afresh(check)
    assert resumed.check(site.name, 9, [site.spend(9)], PLAN).problem is None
    assert resumed._accepted(site.name).totals.grouped() == ((1.1, 0.25, 28), (2.5, 0.25, 8))

"""A site spends before it computes, once per request, within its run's target and its budget.

Every test drives the real ClientApp (fedshield.client.app.train) with a deployed node config, as
`fedshield client` starts it, and attacks as a malicious coordinator would (issue 20):

1. a round replayed with other weights after a later round: no release without its own entry;
2. a training that fails after steps ran is still a spend; any n trains (n=744 at batch 8);
5. an explicit σ, or a plan's number of rounds, cannot take a run past the site's target.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedshield import protocol
from tests.helpers import synthetic_rows, write_csv
from tests.test_site_policy import ask_to_train, coordinator_plan, deployed, spent

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


@pytest.fixture
def site_data(tmp_path):
    return write_csv(tmp_path / "site.csv", synthetic_rows(200, seed=3))


def other(weights: dict, k: int) -> dict:
    """The coordinator's k-th choice of global weights (k = 0: the plan's own)."""
    return {name: (w + np.float32(1e-3 * k)).astype(w.dtype) for name, w in weights.items()}


def train(plan, weights, context, server_round: int):
    plan[protocol.SERVER_ROUND] = server_round
    return ask_to_train(plan, weights, context)


def released(reply) -> str:
    """What identifies a release: the bytes of the weights it carried."""
    h = hashlib.sha256()
    for name in sorted(reply.arrays):
        h.update(name.encode() + np.ascontiguousarray(reply.arrays[name]).tobytes())
    return h.hexdigest()


def independent_epsilon(spends: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's PLD accountant (add-or-remove, pessimistic, interval 1e-3: the recorded
    accountant's settings), built here from the releases alone, not from fedshield's code."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in spends:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    acc = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                        value_discretization_interval=1e-3)
    for (sigma, q), steps in merged.items():
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))


# ------------------------------------------------------------ 1: replay with other weights


def test_a_round_replayed_with_other_weights_20_times_releases_nothing_its_books_do_not_hold(
        tiny_bert, site_data, tmp_path):
    """Round 1 (W1), round 2, then round 1 again with W2, W3, ... each asked twice: before,
    the second ask was answered with weights trained on W_k under round 1's old entry (20
    releases, no entry). Now each is declined: the site's recorded ε equals an independent
    recomputation over every release it sent (the count, and one spend per distinct release).
    The site's lifetime budget (40) is far from reached: only the books stop the attack."""
    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{"training.local_epochs": 1,
                                                                        "privacy.budget_epsilon": 40})
    context = deployed(tmp_path, site_data, **{"privacy.budget_epsilon": 40.0})
    replies = [train(plan, weights, context, 1), train(plan, other(weights, 1), context, 2)]
    for k in range(2, 22):
        replies += [train(plan, other(weights, k), context, 1), train(plan, other(weights, k), context, 1)]
    sent = [r for r in replies if isinstance(r, protocol.TrainReply)]
    declines = [r for r in replies if isinstance(r, protocol.Decline)]
    assert len(sent) + len(declines) == len(replies)

    ledger = spent(tmp_path)
    count = [e for e in ledger if e["release"] == "record-count"]
    assert len(count) == 1 and all(r.num_examples == count[0]["released_count"] for r in sent)
    n, batch = count[0]["released_count"], 32
    q, steps = 1.0 / -(-n // batch), -(-n // batch)  # one epoch of ceil(n / batch) draws at q = 1 / that
    releases = {}
    for reply in sent:  # each distinct release cost its round's σ over the plan's q and steps
        (entry,) = [e for e in reply.ledger_entries if e.get("release") == "dp-sgd"]
        releases[released(reply)] = (entry["noise_multiplier"], q, steps)
    truth = independent_epsilon([(count[0]["noise_multiplier"], 1.0, 1), *releases.values()], 1e-5)
    assert ledger[-1]["epsilon"] == pytest.approx(truth, rel=1e-6), f"{len(releases)} releases sent"
    assert len(releases) == 2 and [e["round"] for e in ledger if e["release"] == "dp-sgd"] == [1, 2]
    assert all(d.kind == "protocol" and "\n" not in d.reason for d in declines), declines[:2]


def test_the_same_request_again_is_answered_with_the_kept_release_and_no_new_spend(
        tiny_bert, site_data, tmp_path, caplog):
    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{"training.local_epochs": 1})
    context = deployed(tmp_path, site_data)
    first = train(plan, weights, context, 1)
    # The round's own entry is marked unreported before its steps (spend before compute):
    # an ordinary round is not reported as a crash's interrupted spend.
    assert "earlier spend" not in caplog.text
    again = train(plan, weights, context, 1)
    assert isinstance(first, protocol.TrainReply) and isinstance(again, protocol.TrainReply)
    assert released(first) == released(again) and len(spent(tmp_path)) == 2  # the count and round 1
    (entry,) = [e for e in spent(tmp_path) if e["release"] == "dp-sgd"]
    assert entry["plan_digest"] and [e["hash"] for e in again.ledger_entries] == [entry["hash"]]


# ------------------------------------------------------------ 2: a failed training is spent; any n trains


def test_a_training_that_fails_after_steps_ran_is_spent_and_reported_with_the_next_reply(
        tiny_bert, site_data, tmp_path, caplog):
    """A learning rate of 1e30 diverges after DP steps ran: before, the site declined with no
    entry (a free bit). Now the entry written before the first step stays, the decline says
    so, the same request is not trained again, and the next reply carries the entry."""
    from fedshield.privacy.ledger_check import Expected, LedgerCheck

    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{"training.learning_rate": 1e30,
                                                                        "training.local_epochs": 1})
    context = deployed(tmp_path, site_data)
    failed = train(plan, weights, context, 1)
    assert isinstance(failed, protocol.Decline) and failed.kind == "error", failed
    assert "training failed after its spend was recorded" in failed.reason and "\n" not in failed.reason
    (entry,) = [e for e in spent(tmp_path) if e["release"] == "dp-sgd"]
    assert entry["round"] == 1 and entry["plan_digest"]
    again = train(plan, weights, context, 1)
    assert isinstance(again, protocol.Decline) and "did not complete" in again.reason
    assert len(spent(tmp_path)) == 2  # the count and round 1: nothing more

    good, _ = coordinator_plan(tiny_bert, site_data, tmp_path, **{"training.local_epochs": 1})
    reply = train(good, weights, context, 2)
    assert isinstance(reply, protocol.TrainReply), reply
    ledger = spent(tmp_path)
    assert [e["hash"] for e in reply.ledger_entries] == [e["hash"] for e in ledger]  # count, round 1, round 2
    assert f"reporting 2 earlier spend(s) that no reply carried (a decline, a failure or a crash came after them; " \
           f"seq 0, {entry['seq']})" in caplog.text  # the count released with the declined round, and round 1
    # The coordinator takes the reply: no gap in the site's chain.
    from fedshield.privacy.signing import load_public_key

    pub = load_public_key((tmp_path / "state" / "site.pub").read_bytes())
    check = LedgerCheck("run-1", {"st-marys": pub}, dp=True, delta=1e-5, accountant=ledger[-1]["accountant"])
    last = ledger[-1]
    verdict = check.check("st-marys", 2, list(reply.ledger_entries), Expected(last["sample_rate"], last["steps"]))
    assert verdict.problem is None, verdict.problem


def test_a_process_that_dies_while_training_leaves_a_spend_and_is_not_trained_again_for_free(
        tiny_bert, site_data, tmp_path, monkeypatch):

    class Died(BaseException):
        """The process is killed mid-training (nothing of the site's code runs after it)."""

    def die(*args, **kwargs):
        raise Died

    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path)
    context = deployed(tmp_path, site_data)
    with monkeypatch.context() as m:
        import fedshield.client.app
        m.setattr(fedshield.client.app, "train_local", die)
        with pytest.raises(Died):
            train(plan, weights, context, 1)
    (entry,) = [e for e in spent(tmp_path) if e["release"] == "dp-sgd"]
    again = train(plan, weights, context, 1)
    assert isinstance(again, protocol.Decline) and again.kind == "error" and "did not complete" in again.reason
    assert [e["hash"] for e in spent(tmp_path) if e["release"] == "dp-sgd"] == [entry["hash"]]
    other_weights = train(plan, other(weights, 1), context, 1)
    assert isinstance(other_weights, protocol.Decline) and other_weights.kind == "protocol"
    assert len(spent(tmp_path)) == 2


def test_n_744_at_batch_8_trains_the_steps_it_spends(tiny_bert, tmp_path):
    """93 batches an epoch: Opacus' sampler ran int(1/q) = 92 draws logged at q = 1/92, and the
    site refused every round. (replace-one: the count 744 is public, so q = 1/93 exactly.)"""
    data = write_csv(tmp_path / "site.csv", synthetic_rows(744, seed=4))
    plan, weights = coordinator_plan(tiny_bert, data, tmp_path, **{
        "privacy.neighbouring": "replace-one", "training.batch_size": 8, "training.local_epochs": 1})
    got = train(plan, weights, deployed(tmp_path, data, **{"privacy.neighbouring": "replace-one"}), 1)
    assert isinstance(got, protocol.TrainReply), got
    (entry,) = spent(tmp_path)
    assert (entry["sample_rate"], entry["steps"]) == (1 / 93, 93) and got.num_examples == 744


# ------------------------------------------------------------ 5: the run's target, whatever the plan says


def test_an_explicit_plan_sigma_cannot_spend_past_the_runs_target(tiny_bert, site_data, tmp_path):
    """Site: target 2 per run, budget 20. Before, σ = 0.5 from the plan was taken as given and
    one round spent ε 7.69; now the round is declined before anything is trained."""
    policy = {"privacy.target_epsilon": 2.0, "privacy.budget_epsilon": 20.0}
    plan, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{
        "privacy.target_epsilon": 2, "privacy.budget_epsilon": 20, "privacy.noise_multiplier": 0.5})
    got = train(plan, weights, deployed(tmp_path, site_data, **policy), 1)
    assert isinstance(got, protocol.Decline) and got.kind == "budget", got
    assert "past the run's target 2" in got.reason
    assert [e["release"] for e in spent(tmp_path)] == ["record-count"]


@pytest.mark.parametrize("later_rounds", [1, 7])
def test_a_plan_for_one_round_cannot_get_seven(tiny_bert, site_data, tmp_path, later_rounds):
    """σ calibrated for rounds=1 at target 2, then 7 rounds asked (the later plans saying 1 or 7
    rounds): before, all 7 trained (the cached σ ignored rounds and target). Now the run's
    spends stay within 2: the rounds past it are declined."""
    policy = {"privacy.target_epsilon": 2.0, "privacy.budget_epsilon": 20.0}
    context = deployed(tmp_path, site_data, **policy)
    hostile = {"privacy.target_epsilon": 2, "privacy.budget_epsilon": 20, "training.local_epochs": 1}
    first, weights = coordinator_plan(tiny_bert, site_data, tmp_path, **{**hostile, "federation.rounds": 1})
    later, _ = coordinator_plan(tiny_bert, site_data, tmp_path, **{**hostile, "federation.rounds": later_rounds})
    replies = [train(first, weights, context, 1)]
    replies += [train(later, other(weights, r), context, r) for r in range(2, 8)]
    assert isinstance(replies[0], protocol.TrainReply)
    assert all(isinstance(r, protocol.Decline) and r.kind == "budget" for r in replies[1:]), replies[1:]
    ledger = spent(tmp_path)
    assert [e["round"] for e in ledger if e["release"] == "dp-sgd"] == [1]
    assert ledger[-1]["epsilon"] <= 2.0


def test_the_cached_sigma_is_reused_only_for_the_same_question(tmp_path):
    from fedshield.client.site import SiteState
    from fedshield.privacy.accountant import Spend, epsilon

    state = SiteState(tmp_path / "site", "s")
    one = state.noise_multiplier("run-a", 2.0, 1e-5, 0.25, 4, 1, "rdp")
    seven = state.noise_multiplier("run-a", 2.0, 1e-5, 0.25, 4, 7, "rdp")
    assert seven > one and epsilon([Spend(seven, 0.25, 28)], 1e-5) <= 2.0
    assert state.noise_multiplier("run-a", 8.0, 1e-5, 0.25, 4, 7, "rdp") < seven  # another target: again
    saved = json.loads((tmp_path / "site" / "runs" / "run-a.json").read_text())
    assert saved["target_epsilon"] == 8.0 and saved["rounds"] == 7

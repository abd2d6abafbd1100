"""Site-level DP-FedAvg (`privacy.unit=site`): Poisson sampling of sites, clipping, noise on
the sum over a fixed denominator, the coordinator's signed ledger, and its audit."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from fedshield import conf, protocol
from fedshield.conf.config import Config
from fedshield.privacy import signing
from fedshield.privacy.accountant import PLD_RECORD_INTERVAL, Spend, epsilon
from fedshield.privacy.ledger import FEDERATION, SITE_MECHANISM, SITE_UNIT, Ledger
from fedshield.strategies.flower import flower_strategy
from fedshield.strategies.site_dp import SiteLevelDP
from fedshield.strategies.stack import SiteLevel, build_stack
from tests.test_site_aware import EIGHT, EXPECTED, FakeGrid, moves

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def mechanism(**kw) -> SiteLevelDP:
    return SiteLevelDP(**{"clip_norm": 1.0, "noise_multiplier": 1e-9, "sample_rate": 0.5, "planned_sites": 8,
                          "seed": 3, **kw})


def test_each_update_is_clipped_and_the_sum_has_a_fixed_denominator():
    base = {"w": np.zeros(3, np.float32)}
    updates = [{"w": np.array([3.0, 4.0, 0.0], np.float32)},  # norm 5: clipped to 1
               {"w": np.array([0.0, 0.0, 0.5], np.float32)}]  # norm 0.5: kept
    new, norms = mechanism().aggregate(base, updates, 1)
    assert norms == pytest.approx([5.0, 0.5])
    # (0.6, 0.8, 0) + (0, 0, 0.5), divided by q N = 4 whatever the number that replied
    assert new["w"] == pytest.approx(np.array([0.6, 0.8, 0.5]) / 4.0, abs=1e-6)
    assert new["w"].dtype == np.float32


def test_the_noise_has_std_z_s_a_fresh_draw_every_round():
    m = mechanism(noise_multiplier=2.0, clip_norm=0.5)
    base = {"w": np.zeros(200_000, np.float32)}
    r1, _ = m.aggregate(base, [], 1)
    r2, _ = m.aggregate(base, [], 2)
    noise1 = r1["w"].astype(np.float64) * m.denominator
    assert noise1.std() == pytest.approx(2.0 * 0.5, rel=0.01) and abs(noise1.mean()) < 0.01
    assert abs(np.corrcoef(noise1, r2["w"].astype(np.float64))[0, 1]) < 0.01  # never the same noise twice
    again, _ = m.aggregate(base, [], 1)
    assert np.array_equal(again["w"], r1["w"])  # simulation: (seed, round) fixes it, for a resumed run
    deployed = mechanism(noise_multiplier=2.0, seed=None)
    a, _ = deployed.aggregate(base, [], 1)
    b, _ = deployed.aggregate(base, [], 1)
    assert not np.array_equal(a["w"], b["w"])  # deployment: os.urandom, every time


def test_sites_are_poisson_sampled_at_rate_q():
    m = mechanism(sample_rate=0.3)
    eligible = list(range(1000))
    sizes = [len(m.sample(eligible, r)) for r in range(1, 21)]
    assert len(set(sizes)) > 5  # not a fixed-size sample
    assert np.mean(sizes) == pytest.approx(300, rel=0.05)
    assert m.sample(eligible, 4) == m.sample(eligible, 4)


class Spends:
    """ReleaseBooks that keep the rounds spent (server/federation_books.py writes them)."""

    def __init__(self, spent: list[int]) -> None:
        self.spent = spent

    def record_round(self, server_round: int) -> float:
        self.spent.append(server_round)
        return float(len(self.spent))

    def record_skellam_round(self, server_round: int, variance: float) -> bool:
        raise AssertionError("no secure aggregation here")


def test_the_strategy_releases_the_noised_model_after_the_spend_every_round():
    sites = dict(list(EIGHT.items()))
    behaviours = {name: moves(i) for i, name in enumerate(sites.values())}
    spent: list[int] = []
    dp = mechanism(sample_rate=1.0, clip_norm=10.0)
    books = Spends(spent)
    strategy = build_stack(flower_strategy("fedavg"), sites, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                           site_level=SiteLevel(dp, books))
    plan = protocol.plan_record(config_yaml="x", run_id="r", run_dir="", frozen_fingerprint="", class_names=["a"])
    result = strategy.start(grid=FakeGrid(behaviours, sites),
                            initial_arrays=protocol.to_array_record({"w": np.zeros(3, np.float32)}),
                            num_rounds=3, timeout=5, train_config=plan)
    assert spent == [1, 2, 3]
    # Every site moves by about STEP (norm 1.1 < S): the model moves by the mean step a round.
    from tests.test_site_aware import STEP
    assert np.abs(result.arrays["w"].numpy() - 3 * STEP).max() < 0.1
    with pytest.raises(ValueError, match="privacy.unit=site with federation.strategy=krum"):
        build_stack(flower_strategy("krum"), sites, fraction_train=1.0, seed=1, expected_arrays=EXPECTED,
                    site_level=SiteLevel(dp, books))


def test_config_refuses_what_site_level_dp_cannot_make_honest():
    for extra, says in ((["federation.strategy=krum"], "privacy.unit=site with federation.strategy=krum"),
                        (["federation.update_norm_bound=2"], "site_clip_norm already bounds"),
                        (["privacy.site_delta=0.5"], "privacy.site_delta=0.5: must be below 1 / federation.num_sites")):
        with pytest.raises(conf.ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
            Config.load(["privacy.unit=site", "training.center_features=false", *extra])
    assert Config.load(["privacy.unit=site", "training.center_features=false"]).privacy.unit == "site"
    # The feature mean every site releases for centering is outside the site-level books.
    with pytest.raises(conf.ConfigError, match="training.center_features=false"):
        Config.load(["privacy.unit=site"])
    assert Config.load(["privacy.unit=site", "task=heart-disease"]).training.center_features  # no centering


def test_the_federation_ledger_is_the_poisson_gaussian_composition_and_audits(tmp_path):
    from fedshield.privacy.audit import audit

    assert not protocol.SITE_NAME.match(FEDERATION)  # no site can sign as the federation's books

    key_path = tmp_path / "federation.key"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / f"{FEDERATION}.pub").write_bytes(signing.generate_site_key(key_path))
    key = signing.load_private_key(key_path)
    ledger = Ledger(tmp_path / "federation-ledger.jsonl")
    for r in range(1, 21):
        ledger.append({"run_id": "r", "round": r, "site": FEDERATION, "mechanism": SITE_MECHANISM,
                       "privacy_unit": SITE_UNIT, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 1,
                       "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "pld", "neighbouring": "add-remove",
                       "release": "global-model", "budget_epsilon": 8.0}, key)
    acc = PLDAccountant(value_discretization_interval=PLD_RECORD_INTERVAL)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 20))
    last = json.loads(ledger.path.read_text().splitlines()[-1])
    assert last["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert last["epsilon"] == pytest.approx(epsilon([Spend(1.1, 0.1, 20)], 1e-5, "pld"))
    result = audit(ledger.path, tmp_path / "keys")
    assert result.ok, result.flags
    assert result.sites[FEDERATION].pld_epsilon == pytest.approx(last["epsilon"])
    # A tampered entry (less noise claimed than the signature covers) fails the audit.
    lines = ledger.path.read_text().splitlines()
    edited = json.loads(lines[5])
    edited["noise_multiplier"] = 5.0
    ledger.path.write_text("\n".join([*lines[:5], json.dumps(edited), *lines[6:]]) + "\n")
    assert not audit(ledger.path, tmp_path / "keys").ok
    assert math.isfinite(last["epsilon"])


@pytest.mark.e2e
def test_site_level_dp_in_simulation_writes_a_ledger_that_audits(tiny_bert, synthetic_csv, tmp_path):
    from fedshield.privacy.audit import audit
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation
    from tests.helpers import tiny_overrides

    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "privacy.unit": "site", "training.center_features": False,
        "privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 100, "privacy.target_epsilon": 100,
        "federation.num_sites": 4, "federation.fraction_train": 0.5, "federation.rounds": 3,
        "privacy.site_clip_norm": 5.0, "privacy.site_target_epsilon": 20.0, "privacy.site_delta": 0.01,
        "output.save_model": False,
    }))
    run = run_simulation(cfg)
    fed = read_jsonl(run / "privacy" / "federation-ledger.jsonl")
    assert [e["round"] for e in fed] == [1, 2, 3] and {e["site"] for e in fed} == {FEDERATION}
    assert all(e["sample_rate"] == 0.5 and e["max_grad_norm"] == 5.0 for e in fed)
    assert 19.0 < fed[-1]["epsilon"] <= 20.0  # calibrated to the site-level target over 3 rounds
    assert audit(run / "privacy" / "federation-ledger.jsonl").ok
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[-1]["site_level_epsilon"] == pytest.approx(fed[-1]["epsilon"])
    report = (run / "report.md").read_text()
    assert "### Site-level DP (DP-FedAvg" in report and "one whole site" in report
    assert "Without amplification by sampling" in report
    assert (run / "privacy" / "federation.key").stat().st_mode & 0o077 == 0
    assert audit(run).ok  # the sites' own record-level ledger, as before


def test_an_explicit_site_noise_that_would_overspend_the_target_is_refused(tmp_path):
    from fedshield.privacy.errors import FedShieldError
    from fedshield.server.federation_books import open_books
    from fedshield.server.settings import CoordinatorSettings

    (tmp_path / "run" / "privacy").mkdir(parents=True)
    cfg = Config.load(["privacy.unit=site", "training.center_features=false",
                            "privacy.site_noise_multiplier=0.3", "privacy.site_target_epsilon=2",
                            "federation.rounds=40"])
    with pytest.raises(FedShieldError, match=r"privacy\.site_noise_multiplier=0\.3: 40 rounds at q=1 spend"):
        open_books(CoordinatorSettings.from_config(cfg), tmp_path / "run", simulated=True)
    ok = Config.load(["privacy.unit=site", "training.center_features=false",
                           "privacy.site_target_epsilon=2", "federation.rounds=40",
                           "federation.fraction_train=0.5"])
    books = open_books(CoordinatorSettings.from_config(ok), tmp_path / "run", simulated=True)
    assert books.mechanism.sample_rate == 0.5 and books.epsilon == 0.0
    assert epsilon([Spend(books.mechanism.noise_multiplier, 0.5, 40)], 1e-5, "pld") <= 2.0
    assert (tmp_path / "run" / "privacy" / "federation.key").stat().st_mode & 0o077 == 0


@pytest.mark.e2e
def test_site_level_dp_under_secure_aggregation_records_the_sites_skellam_noise(tiny_bert, synthetic_csv, tmp_path):
    from fedshield.privacy.audit import audit
    from fedshield.privacy.ledger import SKELLAM_MECHANISM
    from fedshield.server.run_dir import read_jsonl
    from fedshield.simulations.simulate import run_simulation
    from tests.helpers import tiny_overrides

    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "privacy.unit": "site", "training.center_features": False,
        "privacy.budget_epsilon": 100, "federation.secure_aggregation": "secaggplus",
        "federation.num_sites": 4, "federation.fraction_train": 1.0, "federation.rounds": 2,
        "privacy.site_clip_norm": 5.0, "privacy.site_target_epsilon": 20.0, "privacy.site_delta": 0.01,
        "output.save_model": False,
    }))
    run = run_simulation(cfg)
    fed = read_jsonl(run / "privacy" / "federation-ledger.jsonl")
    assert [e["round"] for e in fed] == [1, 2] and {e["mechanism"] for e in fed} == {SKELLAM_MECHANISM}
    assert all(e["neighbouring"] == "replace-one" and e["sample_rate"] == 1.0 for e in fed)
    assert fed[-1]["epsilon"] <= 20.0
    assert audit(run / "privacy" / "federation-ledger.jsonl").ok
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["skipped"] == "" and r["secagg_dropped"] == {} for r in rows[1:])
    assert rows[-1]["site_level_epsilon"] == pytest.approx(fed[-1]["epsilon"])
    report = (run / "report.md").read_text()
    assert "Skellam" in report and "never a noise-free one" in report
    assert audit(run).ok

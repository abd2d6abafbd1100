"""The cross-device preset (`preset=cross-device`: BBC News over 1,000 virtual users,
site-level DP-FedAvg) and the site-level sweep: ε from the federation ledger next to the ε
Flower's own server-side accountant states for the same noise and rounds."""

from __future__ import annotations

import csv

import dp_accounting
import pytest
from dp_accounting import rdp

from fedshield import conf
from fedshield.conf.config import Config
from fedshield.privacy.accountant import Spend, epsilon
from fedshield.privacy.ledger import SITE_MECHANISM
from fedshield.server.federation_books import flower_epsilon_no_amplification
from fedshield.simulations.sweep import point_overrides, split_axes, sweep_main
from tests.helpers import tiny_overrides


def test_the_preset_is_one_override_and_valid_for_site_level_dp():
    cfg = Config.load(["preset=cross-device"])
    fed, p = cfg.federation, cfg.privacy
    assert cfg.task.name == "news-topics" and fed.num_sites == 1000 and fed.partition == "iid"
    assert p.unit == "site" and fed.strategy == "fedavg" and fed.update_norm_bound is None
    assert p.mode == "none"  # no record-level DP-SGD on one or two articles per user
    assert p.site_delta < 1 / fed.num_sites
    assert 10 <= fed.fraction_train * fed.num_sites <= 200  # tens of users per round
    # The feature-centering release is not site-level accounted: off in a site-level preset.
    assert cfg.training.center_features is False
    assert "cross-device" in conf.presets("preset")


def test_the_preset_goes_first_so_group_presets_and_keys_refine_it():
    late = Config.load(["privacy=dp-sgd", "federation.rounds=7", "preset=cross-device"])
    assert late.privacy.mode == "dp-sgd" and late.federation.rounds == 7
    assert late.federation.num_sites == 1000 and late.privacy.unit == "site"
    with pytest.raises(conf.ConfigError, match=r"preset='nope': no such preset; allowed: .*cross-device"):
        Config.load(["preset=nope"])


def test_every_one_of_the_thousand_users_has_articles():
    from fedshield.simulations.simulate import check_sites

    sizes = check_sites(Config.load(["preset=cross-device"]))
    assert len(sizes) == 1000
    assert {n for _, n in sizes} <= {1, 2, 3} and min(n for _, n in sizes) >= 1


def test_site_level_inf_is_the_reference_without_site_level_dp():
    axes, fixed = split_axes(["preset=cross-device", "privacy.site_target_epsilon=1,8,inf"])
    assert axes == {"privacy.site_target_epsilon": ["1", "8", "inf"]} and fixed == ["preset=cross-device"]
    assert point_overrides({"privacy.site_target_epsilon": "inf"}) == ["privacy.unit=record"]
    assert point_overrides({"privacy.site_target_epsilon": "8"}) == ["privacy.site_target_epsilon=8"]
    ref = Config.load([*fixed, *point_overrides({"privacy.site_target_epsilon": "inf"})])
    assert ref.privacy.unit == "record" and ref.federation.num_sites == 1000


def test_a_site_level_axis_without_site_level_dp_is_refused_before_any_run(tmp_path):
    says = r"privacy\.site_target_epsilon=1 does nothing with privacy\.unit=record"
    with pytest.raises(conf.ConfigError, match=says):
        sweep_main(["--out", str(tmp_path / "sweep"), "privacy.site_target_epsilon=1,inf"])
    assert not (tmp_path / "sweep").exists()


def ledger_entries(z: float, q: float, rounds: int, delta: float = 1e-4, sites: int = 1000) -> list[dict]:
    return [{"mechanism": SITE_MECHANISM, "neighbouring": "add-remove", "noise_multiplier": z, "sample_rate": q,
             "steps": 1, "delta": delta, "planned_sites": sites, "round": r} for r in range(1, rounds + 1)]


def test_flowers_accountant_composes_the_plain_gaussian_once_per_round():
    z, q, rounds, delta = 0.9, 0.03, 50, 1e-4
    got = flower_epsilon_no_amplification(ledger_entries(z, q, rounds, delta))
    # Independently: dp-accounting's RDP on the Gaussian mechanism without sampling, per round.
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert got != pytest.approx(flower_epsilon_no_amplification(ledger_entries(z, q, rounds - 1, delta)))
    # What Poisson sampling of sites at q buys: the ledger's ε is far below it.
    assert epsilon([Spend(z, q, rounds)], delta, "pld") < got / 5
    with pytest.raises(ValueError, match="several"):
        flower_epsilon_no_amplification(ledger_entries(z, q, 2, 1e-4) + ledger_entries(z, q, 1, 1e-5))
    # Noise that is not the Gaussian of Flower's accountant (secure aggregation's Skellam): no figure.
    skellam = [{**e, "mechanism": "secagg-distributed-skellam", "neighbouring": "replace-one"}
               for e in ledger_entries(z, 1.0, 3)]
    with pytest.raises(ValueError, match="not the Gaussian mechanism"):
        flower_epsilon_no_amplification(skellam)


@pytest.mark.e2e
def test_a_site_level_sweep_writes_the_ledgers_and_flowers_epsilon(tiny_bert, synthetic_csv, tmp_path):
    from fedshield.server.run_dir import read_jsonl

    over = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{
        "privacy": "none", "privacy.unit": "site", "federation.num_sites": 4, "federation.fraction_train": 0.5,
        "federation.rounds": 2, "privacy.site_clip_norm": 5.0, "privacy.site_delta": 0.01,
        "training.center_features": False, "output.save_model": False,
    })
    out = tmp_path / "sweep"
    assert sweep_main(["--out", str(out), "privacy.site_target_epsilon=20,inf", *over]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["privacy.site_target_epsilon"] for r in rows] == ["20", "inf"]
    site, ref = rows
    ledger = read_jsonl(tmp_path / "sweep" / "site_target_epsilon-20" / "privacy" / "federation-ledger.jsonl")
    assert site["run_dir"].endswith("site_target_epsilon-20") and len(ledger) == 2
    assert float(site["site_epsilon"]) == ledger[-1]["epsilon"]  # as the ledger records it, not recomputed
    assert 0 < float(site["site_epsilon"]) <= 20.0
    assert float(site["flower_epsilon_no_amplification"]) >= float(site["site_epsilon"])
    assert float(site["site_noise_multiplier"]) == ledger[-1]["noise_multiplier"]
    assert (site["site_rounds"], site["site_sample_rate"], site["site_delta"]) == ("2", "0.5", "0.01")
    # inf: no site-level DP, so no federation ledger and no site-level figures.
    assert ref["site_epsilon"] == ref["flower_epsilon_no_amplification"] == ""
    assert not (tmp_path / "sweep" / "site_target_epsilon-inf" / "privacy" / "federation-ledger.jsonl").exists()
    table = (out / "results.md").read_text()
    assert "site-level ε (ledger)" in table and "ε Flower's accountant states (no amplification)" in table
    assert (out / "accuracy_vs_epsilon.png").is_file()

"""Made tests/data/ledger-v1 with privacy/ledger.py of commit 52c3de8 (ledger format v1)."""
import json, sys
from pathlib import Path
from fedshield.privacy.accountant import Spend, epsilon, REPLACE_ONE
from fedshield.privacy.ledger import Ledger, SITE_MECHANISM, SITE_UNIT, SKELLAM_MECHANISM, FEDERATION, chain_epsilon
from fedshield.privacy.signing import generate_site_key, load_private_key
from fedshield.privacy.skellam import skellam_history_epsilon

out = Path(sys.argv[1])
keys = out / "keys"
keys.mkdir(parents=True)
def key(name):
    pub = generate_site_key(out / f"{name}.key")
    (keys / f"{name}.pub").write_bytes(pub)
    return load_private_key(out / f"{name}.key")

# A site as client/app.py _record wrote it: count release, feature mean, two training rounds.
def site(name, relation, accountant):
    k = key(name)
    led = Ledger(out / f"{name}.jsonl")
    hist = []
    def rec(rnd, s, clip, extra):
        hist.append(s)
        return led.append({"run_id": "run-v1", "round": rnd, "site": name,
            "mechanism": "dp-sgd-poisson-gaussian", "privacy_unit": "record",
            "noise_multiplier": s.noise_multiplier, "sample_rate": s.sample_rate, "steps": s.steps,
            "max_grad_norm": float(clip), "delta": 1e-5, "accountant": accountant, "neighbouring": relation,
            "epsilon": epsilon(hist, 1e-5, accountant, relation), "budget_epsilon": 10.0, **extra}, k)
    if relation == "add-remove":
        rec(0, Spend(8.0, 1.0, 1), 1.0, {"release": "record-count", "released_count": 97, "data_digest": "ab" * 32})
    rec(0, Spend(20.0, 1.0, 1), 5.0, {"release": "feature-mean"})
    for r in (1, 2):
        rec(r, Spend(3.1, 0.25, 8), 1.0, {"release": "dp-sgd", "plan_digest": f"{r:064x}"})
site("alpha", "add-remove", "pld")
site("beta", "replace-one", "rdp")
# An entry written before `neighbouring` and `release` existed (fields of the oldest code).
k = key("gamma")
Ledger(out / "gamma.jsonl").append({"run_id": "run-v0", "round": 1, "site": "gamma", "noise_multiplier": 1.1,
    "sample_rate": 0.05, "steps": 40, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}, k)
# The coordinator's books: DP-FedAvg rounds, and a Skellam round.
k = key(FEDERATION)
led = Ledger(out / "federation.jsonl")
for r in (1, 2):
    led.append({"run_id": "run-v1", "round": r, "site": FEDERATION, "mechanism": SITE_MECHANISM,
        "privacy_unit": SITE_UNIT, "noise_multiplier": 1.2, "sample_rate": 0.5, "steps": 1,
        "max_grad_norm": 0.5, "delta": 1e-5, "accountant": "rdp", "neighbouring": "add-remove",
        "release": "global-model", "planned_sites": 4}, k)
k = key("skellam")
led = Ledger(out / "skellam.jsonl")
for r in (1, 2):
    led.append({"run_id": "run-v1", "round": r, "site": "skellam", "mechanism": SKELLAM_MECHANISM,
        "privacy_unit": SITE_UNIT, "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1,
        "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp", "neighbouring": REPLACE_ONE,
        "release": "global-model", "skellam_variance": 4.0e6, "skellam_l1": 1.0e3, "skellam_l2": 1.0e3,
        "planned_sites": 3}, k)

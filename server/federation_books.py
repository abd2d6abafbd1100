"""The coordinator's own privacy ledger, for site-level DP (`privacy.unit=site`).

    runs/<run>/privacy/federation.key              the coordinator's ledger signing key (0600)
    runs/<run>/privacy/ledger-keys/@federation.pub its public half (what `fedshield audit` uses)
    runs/<run>/privacy/federation-ledger.jsonl     one signed, hash-chained entry per round

Each round of DP-FedAvg (strategies/site_dp.py) is one step of the Poisson-subsampled
Gaussian mechanism on the clipped sum of the sites' updates: the entry records it exactly as
a site records a DP-SGD segment (σ = z, q, 1 step, clip S, δ, accountant, add-remove of one
site), written and fsynced before the round's model is released, so that `fedshield audit
runs/<run>/privacy/federation-ledger.jsonl` verifies and recomputes it like a site's ledger.
A resumed run keeps appending to the same chain (a round redone after a crash is charged
twice: over-count, never under-count). `privacy.site_target_epsilon` is the federation's
budget: an explicit `privacy.site_noise_multiplier` whose planned rounds would spend more is
refused before the run starts.

Under secure aggregation (federation.secure_aggregation=secaggplus) the sites add the noise
(distributed Skellam, privacy/secure_sum.py) and each round's entry records the noise the
unmasked sum really held (Σ μ / t over the sites in it, never less than the planned μ),
mechanism `secagg-distributed-skellam`, replace-one site, no amplification (q = 1); a round
that would take ε past `privacy.site_target_epsilon` (a run resumed after a crash) is not
released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield import rules
from fedshield.privacy import signing
from fedshield.privacy.accountant import ADD_REMOVE, Spend, calibrate_noise_multiplier, epsilon
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.events import (
    MODEL_RELEASE,
    Mechanism,
    Neighbouring,
    PrivacyEvent,
    SkellamNoise,
    entry_fields,
)
from fedshield.privacy.ledger import FEDERATION, SITE_MECHANISM, Ledger, chain_epsilon
from fedshield.privacy.secure_sum import DistributedNoise, distributed_noise
from fedshield.server.run_dir import LEDGER_KEYS
from fedshield.server.settings import CoordinatorSettings, SiteLevelPolicy
from fedshield.strategies.site_dp import SiteLevelDP

LEDGER_FILE = "federation-ledger.jsonl"
KEY_FILE = "federation.key"


@dataclass
class FederationBooks:
    mechanism: SiteLevelDP
    ledger: Ledger
    key: signing.PrivateKey
    run_id: str
    delta: float
    accountant: str
    budget: float
    epsilon: float = 0.0  # after the last recorded round
    noise: DistributedNoise | None = None  # secure aggregation: the sites' Skellam noise

    def record_skellam_round(self, server_round: int, variance: float) -> bool:
        """Sign and fsync a secure round's spend, the noise its sum held; False (nothing
        written, the round not to be released) if it would pass the federation's budget."""
        assert self.noise is not None
        if variance < self.noise.total_variance * (1 - 1e-12):
            raise FedShieldError(f"round {server_round}: the sum held Skellam noise of variance {variance:.6g}, "
                                 f"less than the planned {self.noise.total_variance:.6g}")
        # σ is the equivalent sqrt(variance) / l2, for reading; q = 1: no amplification claimed.
        event = PrivacyEvent(Mechanism.SKELLAM, math.sqrt(variance) / self.noise.l2, 1.0, 1, Neighbouring.REPLACE_ONE,
                             float(self.mechanism.clip_norm),
                             SkellamNoise(float(variance), float(self.noise.l1), float(self.noise.l2)))
        fields = entry_fields(event, site=FEDERATION, run_id=self.run_id, round=int(server_round), delta=self.delta,
                              accountant="rdp", release=MODEL_RELEASE, extra={
                                  "planned_sites": int(self.mechanism.planned_sites), "budget_epsilon": self.budget})
        after = chain_epsilon([*self.ledger.read().entries, fields], self.delta)
        if after > self.budget * (1 + 1e-9):
            return False
        self.epsilon = float(self.ledger.append(fields, self.key)["epsilon"])
        return True

    def record_round(self, server_round: int) -> float:
        """Sign and fsync the round's spend (before its model leaves); the composed ε."""
        m = self.mechanism
        event = PrivacyEvent(Mechanism.DP_FEDAVG, float(m.noise_multiplier), float(m.sample_rate), 1,
                             Neighbouring.ADD_REMOVE, float(m.clip_norm))
        entry = self.ledger.append(entry_fields(
            event, site=FEDERATION, run_id=self.run_id, round=int(server_round), delta=self.delta,
            accountant=self.accountant, release=MODEL_RELEASE,
            extra={"planned_sites": int(m.planned_sites), "budget_epsilon": self.budget}), self.key)
        self.epsilon = float(entry["epsilon"])
        return self.epsilon


def open_books(settings: CoordinatorSettings, run_dir: Path, simulated: bool, dim: int = 0) -> FederationBooks:
    """The site-level mechanism of this run (privacy.unit=site) and its ledger (made, or
    reopened on resume); `dim`: the number of trainable coordinates (for the integer
    sensitivities under SecAgg+)."""
    site = settings.site_level
    if site is None:
        raise ValueError("privacy.unit=record: the run has no site-level books")
    q, rounds, planned = settings.sites.fraction_train, settings.rounds, settings.sites.expected
    seed = settings.seed * 1_000_033 + 17 if simulated else None
    if settings.secagg is not None:
        try:
            noise = distributed_noise(settings.secagg.settings, site.clip_norm, int(dim), site.target_epsilon,
                                      site.delta, rounds, site.noise_multiplier)
        except ValueError as exc:
            raise FedShieldError(str(exc)) from None
        return _books(settings, site, run_dir, SiteLevelDP(
            clip_norm=site.clip_norm, noise_multiplier=noise.noise_multiplier, sample_rate=q,
            planned_sites=planned, seed=seed, distributed=True), noise)
    accountant = settings.accounting.accountant
    z = site.noise_multiplier if site.noise_multiplier is not None else calibrate_noise_multiplier(
        site.target_epsilon, site.delta, q, rounds, accountant)
    spent = epsilon([Spend(z, q, rounds)], site.delta, accountant)
    if spent > site.target_epsilon:  # an explicit z: the target is the federation's budget
        raise FedShieldError(
            f"privacy.site_noise_multiplier={z:g}: {rounds} rounds at q={q:g} spend site-level ε={spent:.4g} "
            f"> privacy.site_target_epsilon={site.target_epsilon:g} (δ={site.delta:g}); raise "
            "the noise or the target")
    mechanism = SiteLevelDP(clip_norm=site.clip_norm, noise_multiplier=z, sample_rate=q, planned_sites=planned,
                            seed=seed)
    return _books(settings, site, run_dir, mechanism, None)


def _books(settings: CoordinatorSettings, site: SiteLevelPolicy, run_dir: Path, mechanism: SiteLevelDP,
           noise: DistributedNoise | None) -> FederationBooks:
    folder = run_dir / "privacy"
    key_path = folder / KEY_FILE
    if not key_path.exists():
        pub = signing.generate_site_key(key_path)
        (folder / LEDGER_KEYS).mkdir(parents=True, exist_ok=True)
        (folder / LEDGER_KEYS / f"{FEDERATION}.pub").write_bytes(pub)
    key = signing.load_private_key(key_path)
    ledger = Ledger(folder / LEDGER_FILE)
    read = ledger.recover(key.public_key())
    ledger.check_own(FEDERATION, key.public_key(), read.entries)  # the coordinator's own books verify
    books = FederationBooks(mechanism, ledger, key, run_dir.name, site.delta, settings.accounting.accountant,
                            site.target_epsilon, noise=noise)
    if read.entries:
        books.epsilon = float(read.entries[-1]["epsilon"])
    return books


def flower_epsilon_no_amplification(entries: list[dict[str, Any]]) -> float:
    """The ε Flower 1.41's server-side accountant states for these federation-ledger
    entries: its RdpAccountant with SamplingMethod.NO_AMPLIFICATION (the only sampling its
    fixed-clipping DP wrappers accept), add-or-remove-one client, the population the
    entries planned, one GaussianPrivacyEvent per entry with the entry's noise multiplier,
    at the entries' δ. Refuses entries that are not that mechanism (the Poisson-sampled
    Gaussian of DP-FedAvg, add/remove one site: e.g. the distributed Skellam noise of secure
    aggregation) or that do not share one δ and one population."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    if not entries:
        raise ValueError("no federation-ledger entries")
    other = sorted({f"{e.get('mechanism')} ({e.get('neighbouring')})" for e in entries
                    if e.get("mechanism") != SITE_MECHANISM or e.get("neighbouring") != ADD_REMOVE})
    if other:
        raise ValueError(f"not the Gaussian mechanism of Flower's accountant: {', '.join(other)}")
    deltas = {float(e["delta"]) for e in entries}
    populations = {int(e["planned_sites"]) for e in entries}
    if len(deltas) != 1 or len(populations) != 1:
        raise ValueError(f"federation-ledger entries with several δ {sorted(deltas)} or populations "
                         f"{sorted(populations)}")
    (delta,), (population,) = deltas, populations
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for e in entries:
        # The sample size is metadata under NO_AMPLIFICATION (it does not change ε); Flower's
        # wrapper would pass its fixed num_sampled_clients: the expected q x N here.
        size = rules.sites_per_round(float(e["sample_rate"]), population)
        for _ in range(int(e["steps"])):
            accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(e["noise_multiplier"]),
                                                    sample_size=size, population_size=population))
    return float(accountant.get_privacy_spent().epsilon)

"""Site-level DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018), `privacy.unit=site`.

The unit of privacy is a whole site: the released global model of every round changes by
a bounded, noised amount whether or not any one site took part. Per round:

1. **Poisson sampling of sites**: each eligible site is asked independently with
   probability q (`federation.fraction_train`), so that privacy amplification by sampling
   holds (a fixed-size sample would need another analysis).
2. **Clipping**: each usable update's difference from the round's global weights (all
   trainable float tensors together) is scaled to L2 norm at most S
   (`privacy.site_clip_norm`).
3. **Noise on the sum**: Gaussian noise of standard deviation z * S (`privacy.site_noise_multiplier`,
   or calibrated to `privacy.site_target_epsilon`) on every coordinate of the sum of the
   clipped differences.
4. **A fixed denominator**: the noisy sum is divided by q * N, N the planned number of sites
   (`federation.num_sites`, public configuration), not by the number that replied: a count
   that depends on who took part would itself leak. (Their "fixed-denominator estimator".)

The global model moves by noisy_sum / (q N). One round is one step of the Poisson-subsampled
Gaussian mechanism with noise multiplier z on a sensitivity-S sum under add-or-remove-one-site,
so the federation's ε composes over rounds exactly as a site's DP-SGD steps do
(`privacy.accountant.Spend(z, q, 1)` per round), with the same accountants. The coordinator
writes each round's spend into its own signed, hash-chained ledger before the new global
model leaves it (server/app.py), and `fedshield audit` verifies and recomputes it.

With secure aggregation (`distributed`, federation.secure_aggregation=secaggplus) the noise
is the sites' own: each adds integer Skellam noise before masking (privacy/secure_sum.py),
the coordinator sees only the noisy sum, and each round is accounted as it ran, without
amplification (server/federation_books.py).

Trust: without secure aggregation the coordinator sees each site's update and adds the
noise itself, so the site-level guarantee holds against everyone who sees the released
models (other sites, the model's users), not against the coordinator. A site's record-level
DP (its own DP-SGD) holds against the coordinator too, and runs alongside.

The noise is numpy's floating-point Gaussian (PCG64 seeded from os.urandom in deployment):
the floating-point caveat of Mironov 2012 applies as it does to Opacus' noise.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Weights = Mapping[str, np.ndarray[Any, Any]]


class ReleaseBooks(Protocol):
    """The federation's own signed ledger (server/federation_books.py): a site-level DP
    round's spend is written there before its model is released, by the wrapper that
    releases it (strategies/site_dp_fedavg.py, strategies/secagg_aggregation.py)."""

    def record_round(self, server_round: int) -> float:
        """Sign and fsync a round of the Poisson-sampled Gaussian mechanism; the composed ε."""

    def record_skellam_round(self, server_round: int, variance: float) -> bool:
        """Sign and fsync a secure round's spend (the noise its sum held); False, nothing
        written, if it would pass the federation's budget (the round is then not released)."""


@dataclass
class SiteLevelDP:
    """The DP-FedAvg mechanism's parameters and its noise source."""

    clip_norm: float  # S
    noise_multiplier: float  # z
    sample_rate: float  # q
    planned_sites: int  # N: the denominator is q N
    seed: int | None = None  # None (deployment): sampling and noise from os.urandom
    # True under secure aggregation: the sites add the noise (Skellam, before masking) and
    # the coordinator adds none; noise_multiplier is then the equivalent sqrt(μ) / Δ2.
    distributed: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"site clip norm {self.clip_norm!r}: must be a finite number > 0")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"site noise multiplier {self.noise_multiplier!r}: must be a finite number > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"site sample rate {self.sample_rate!r}: must be in (0, 1]")
        if self.planned_sites < 1:
            raise ValueError(f"planned sites {self.planned_sites!r}: must be >= 1")

    def _noise(self, server_round: int) -> np.random.Generator:
        """A fresh noise source per round: one noise draw must never be added twice (two
        releases with the same noise would cancel it). Seeded by (seed, round) in simulation,
        so a resumed run redoes a round with that round's own noise."""
        if self.seed is None:
            return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "big")))
        return np.random.default_rng(np.random.SeedSequence([self.seed, server_round]))

    @property
    def denominator(self) -> float:
        return self.sample_rate * self.planned_sites

    def sample(self, eligible: Sequence[int], server_round: int) -> list[int]:
        """Each eligible node independently with probability q (Poisson sampling)."""
        if self.seed is None:
            rng: random.Random = random.SystemRandom()
        else:
            rng = random.Random(self.seed * 7919 + server_round)
        return [n for n in eligible if rng.random() < self.sample_rate]

    def aggregate(self, base: Weights, updates: Sequence[Weights],
                  server_round: int) -> tuple[dict[str, np.ndarray[Any, Any]], list[float]]:
        """The new global weights from the round's usable `updates`, and each update's norm
        before clipping. Tensors that are not floating point (none in fedshield's models)
        keep the global value."""
        names = [k for k, v in base.items() if np.issubdtype(v.dtype, np.floating)]
        total = {k: np.zeros(base[k].shape, dtype=np.float64) for k in names}
        norms = []
        for update in updates:
            delta = {k: update[k].astype(np.float64) - base[k].astype(np.float64) for k in names}
            norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
            norms.append(norm)
            scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            for k in names:
                total[k] += delta[k] * scale
        std = self.noise_multiplier * self.clip_norm
        noise = self._noise(server_round)
        out = {k: np.array(v, copy=True) for k, v in base.items()}
        for k in sorted(names):
            noisy = total[k] + noise.normal(0.0, std, size=total[k].shape)
            out[k] = (base[k].astype(np.float64) + noisy / self.denominator).astype(base[k].dtype)
        return out, norms

"""The arithmetic of SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020): what a
site does to its update before it leaves, and what the coordinator does to the sum.

Both sides of the protocol (client/secagg.py at the site, strategies/secagg.py at the
coordinator) call these functions; the messages themselves are protocol.py's. The
cryptographic primitives are Flower's (`flwr.common.secure_aggregation`: ECDH + HKDF shared
keys, Fernet encryption, quantization; `flwr.supercore.primitives.asymmetric`: SECP384R1 key
pairs), `cryptography`'s AES and ECDSA (privacy/signing.py), and textbook Shamir sharing over
a prime field (privacy/shamir.py: Flower's GF(2^128) Shamir in pure Python made a full
neighbourhood of 50 sites cost 6.6x a plain round):

- **Quantization** (Flower's `quantize` / `dequantize`, stochastic rounding): every
  coordinate of a site's update minus the round's global weights is clipped to
  [-clip_range, clip_range] and mapped to an integer in [0, 2^bits - 1]; the site
  multiplies it by its integer weight (its released record count, or 1 for site-level DP)
  and adds the weight itself as the first coordinate, so that the sum carries Σ w and
  Σ w·q and the coordinator divides one by the other (FedAvg) without learning any w.
- **Masks in Z_2^64**: uint64 arithmetic wraps, so the sum needs no modular reduction
  and, for the default sizes, cannot overflow (check_capacity). Each site adds a private
  mask PRG(b) and, for every neighbour j, ±PRG(s_ij) with s_ij = ECDH(sk1_i, pk1_j): the
  pairwise masks cancel in the sum, the private ones are removed with b reconstructed
  from t Shamir shares, and a neighbour that dropped after sharing its keys has its
  pairwise masks removed with its sk1 reconstructed the same way.
- **The PRG is AES-256 in counter mode** (`cryptography`), keyed by the 32-byte seed.
  Flower's `pseudo_rand_gen` is not used: it folds the seed to 32 bits and draws from
  numpy's Mersenne Twister, so a curious coordinator could search all 2^32 seeds of a
  site's private mask; AES-CTR is a PRG under the standard assumption on AES, and it is
  also faster (bench/RESULTS.md).
- **Distributed noise** (`privacy.unit=site`): each site clips its whole update to L2 norm
  S, and adds integer Skellam noise (privacy/skellam.py, Agarwal et al. 2021) of variance
  μ / t before masking, t its neighbourhood's threshold. No site unmasks unless t of its
  neighbours are in the sum, so the sum holds at least t · μ / t = μ, whoever dropped;
  the coordinator records what the survivors really put in (Σ μ / t_i), never less.
  The neighbouring relation is replace-one site's update (the coordinator knows who took
  part); Flower's quantizer adds an offset that cancels in that difference.
- **Threshold**: each site splits b and sk1 into one share per member of its
  neighbourhood (itself included), t of which reconstruct. t is the largest number of
  shares that the tolerated dropout fraction still leaves, and never below a strict
  majority of the neighbourhood, so that no minority of colluding sites can rebuild a
  secret; a round in which some needed secret has fewer than t shares is skipped.
- **Signed keys and views** (Bell et al.'s malicious-server variant): `key_statement` is
  what a site signs of its round keys, `view` / `view_statement` what it signs of the
  neighbourhood it was shown; both sides build them here, so they cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedshield.privacy.skellam import calibrate_skellam_variance, integer_sensitivities, skellam_epsilon
from fedshield.rules import secagg_settings_problem

UInt64Array = np.ndarray[Any, np.dtype[np.uint64]]
FloatArray = np.ndarray[Any, np.dtype[np.float64]]

SEED_BYTES = 32
COMMITMENT_BYTES = 32  # SHA-256
WEIGHT_SLOT = "@weight"  # the name of the first coordinate: the site's integer weight
AUTO_RING_ABOVE = 20  # secagg_neighbours=null: everyone masks with everyone up to this many sites


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run (federation.secagg_*), checked by `problem`."""

    clip_range: float = 1.0
    bits: int = 20
    # Sites each site masks with: even; 0 = every other sampled site; None (auto) = every
    # other up to AUTO_RING_ABOVE sampled sites, else the even 2·ceil(log2 n) of SecAgg+ (the
    # cost of masking with everyone grows with the square of n: bench/RESULTS.md).
    neighbours: int | None = None
    max_dropout_fraction: float = 0.3
    # The share of a neighbourhood whose shares rebuild a secret (None: the largest that the
    # tolerated dropouts leave); more is harder to collude against, less tolerates more loss.
    reconstruction_threshold: float | None = None

    def problem(self) -> str | None:
        """One line naming the setting that is out of range, or None (fedshield.rules)."""
        return secagg_settings_problem(self.clip_range, self.bits, self.neighbours, self.max_dropout_fraction,
                                       self.reconstruction_threshold)

    @property
    def levels(self) -> int:
        """The largest quantized value (Flower's `target_range`)."""
        return int(2**self.bits - 1)

    @property
    def scale(self) -> float:
        """Quantization levels per unit of the update."""
        return self.levels / (2 * self.clip_range)

    def share_count(self, active: int) -> int:
        """Shares per secret (the neighbourhood with the site itself) among `active` sites."""
        k = self.neighbours
        if k is None:
            k = 0 if active <= AUTO_RING_ABOVE else 2 * math.ceil(math.log2(active))
        if k == 0 or k + 1 >= active:
            return active
        return k + 1

    def threshold(self, shares: int) -> int:
        """Shares that reconstruct a secret: as many as `max_dropout_fraction` leaves, and
        at least a strict majority (and 2)."""
        majority = shares // 2 + 1
        if self.reconstruction_threshold is not None:
            return min(shares, max(2, majority, math.ceil(self.reconstruction_threshold * shares - 1e-9)))
        return max(2, majority, math.floor((1 - self.max_dropout_fraction) * shares + 1e-9))


def settings_of(federation: Any) -> SecAggSettings:
    """The SecAgg+ settings of a config's `federation` section (its secagg_* keys)."""
    t = federation.secagg_reconstruction_threshold
    return SecAggSettings(float(federation.secagg_clip_range), int(federation.secagg_bits),
                          None if federation.secagg_neighbours is None else int(federation.secagg_neighbours),
                          float(federation.secagg_max_dropout_fraction),
                          None if t is None else float(t))


def neighbourhoods(node_ids: Sequence[int], settings: SecAggSettings,
                   rng: random.Random) -> dict[int, tuple[int, ...]]:
    """Each node's neighbourhood (itself included): a ring over a random order of the nodes,
    `neighbours / 2` on each side (Bell et al.'s random k-regular graph as Flower builds it),
    or everyone."""
    order = list(node_ids)
    rng.shuffle(order)
    count = settings.share_count(len(order))
    if count >= len(order):
        return {n: tuple(sorted(order)) for n in order}
    half = (count - 1) // 2
    return {n: tuple(sorted({order[(i + off) % len(order)] for off in range(-half, half + 1)}))
            for i, n in enumerate(order)}


def prg(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[UInt64Array]:
    """Uniform uint64 arrays of `shapes` from AES-256-CTR keyed by a 32-byte seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, not {len(seed)}")
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * sum(sizes)))
    flat = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    out, at = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out


def pairwise_seed(shared_key: bytes) -> bytes:
    """The 32-byte mask seed of a pair, from Flower's `generate_shared_key` (urlsafe base64)."""
    raw = base64.urlsafe_b64decode(shared_key)
    return hashlib.sha256(b"fedshield secagg+ pairwise mask\0" + raw).digest()


def mask_key_secret(private_key: Any) -> bytes:
    """The mask key sk1 as the secret that is shared: its 48-byte scalar (Flower's SecAgg+
    shares the raw key too), not the 300-byte PEM, which costs 20 Shamir chunks instead of 4."""
    return int(private_key.private_numbers().private_value).to_bytes(48, "big")


def mask_key_from_secret(secret: bytes) -> Any:
    """sk1 back from its shared scalar (SECP384R1, the curve of Flower's key pairs)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP384R1())


def commitment(seed: bytes) -> bytes:
    """What a site publishes of its private-mask seed, so that a reconstruction from bad
    shares is detected instead of released (the seed is 32 random bytes: the hash hides it)."""
    return hashlib.sha256(b"fedshield secagg+ seed commitment\0" + seed).digest()


# ---------------------------------------------------------------- signed keys (malicious coordinator)
#
# Bell et al. 2020, malicious variant: each site signs its round keys with its ledger
# signing key, and every site signs the neighbourhood it was shown, so that a coordinator
# that swaps a key in one site's view is caught by the others before any share is handed
# over. The statements are length-prefixed fields under a domain tag: no two different
# field lists encode to the same bytes.

VIEW_ENTRY_BYTES = 4 + 32  # a view entry: the slot (4 bytes, big-endian), the SHA-256 of its key statement


def _statement(tag: bytes, *fields: bytes) -> bytes:
    return tag + b"\0" + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def key_statement(run_id: str, server_round: int, slot: int, name: str, ledger_key: bytes,
                  pk1: bytes, pk2: bytes) -> bytes:
    """What a site signs with its ledger key at setup: its two round keys, bound to the run,
    the round, its slot, its name and the ledger public key (PEM) that verifies it."""
    return _statement(b"fedshield secagg+ round keys", run_id.encode(), server_round.to_bytes(8, "big"),
                      slot.to_bytes(4, "big"), name.encode(), ledger_key, pk1, pk2)


def view(entries: Mapping[int, bytes]) -> bytes:
    """A neighbourhood as one site was shown it: (slot, SHA-256 of the slot's key statement)
    in slot order."""
    return b"".join(s.to_bytes(4, "big") + hashlib.sha256(entries[s]).digest() for s in sorted(entries))


def read_view(data: bytes) -> dict[int, bytes]:
    """A `view`'s entries (slot -> digest); ValueError if it is not one."""
    if not data or len(data) % VIEW_ENTRY_BYTES:
        raise ValueError("not a neighbourhood view")
    out = {int.from_bytes(data[i:i + 4], "big"): data[i + 4:i + VIEW_ENTRY_BYTES]
           for i in range(0, len(data), VIEW_ENTRY_BYTES)}
    if len(out) * VIEW_ENTRY_BYTES != len(data) or list(out) != sorted(out):
        raise ValueError("a neighbourhood view lists a slot twice or out of order")
    return out


def view_statement(run_id: str, server_round: int, slot: int, seen: bytes) -> bytes:
    """What a site signs at share: the neighbourhood (`view`) it was shown in this round."""
    return _statement(b"fedshield secagg+ neighbourhood", run_id.encode(), server_round.to_bytes(8, "big"),
                      slot.to_bytes(4, "big"), seen)


def encode(update: Mapping[str, FloatArray], weight: int, settings: SecAggSettings,
           noise: Mapping[str, np.ndarray[Any, np.dtype[np.int64]]] | None = None) -> dict[str, UInt64Array]:
    """A site's contribution before masking: its weight, then weight × quantized(update)
    (+ integer noise, for distributed DP), every value in Z_2^64."""
    if weight < 1:
        raise ValueError(f"weight={weight}: must be >= 1")
    names = sorted(update)
    quantized = quantize([np.asarray(update[k], dtype=np.float64) for k in names], settings.clip_range,
                         settings.levels)
    out: dict[str, UInt64Array] = {WEIGHT_SLOT: np.array([weight], dtype=np.uint64)}
    for name, q in zip(names, quantized, strict=True):
        value = q.astype(np.int64) * np.int64(weight)
        if noise is not None:
            value = value + noise[name]
        out[name] = value.astype(np.uint64)  # two's complement: negative noise wraps, the sum unwraps
    return out


def _shapes(values: Mapping[str, np.ndarray[Any, Any]]) -> list[tuple[int, ...]]:
    return [tuple(values[k].shape) for k in sorted(values)]


def _add(into: dict[str, UInt64Array], masks: list[UInt64Array], sign: int) -> None:
    for name, mask in zip(sorted(into), masks, strict=True):
        into[name] = into[name] + mask if sign > 0 else into[name] - mask


def mask(encoded: Mapping[str, UInt64Array], node_id: int, private_seed: bytes,
         pairwise: Mapping[int, bytes]) -> dict[str, UInt64Array]:
    """Add the private mask and, for every neighbour j (node id -> pairwise seed), +PRG(s_ij)
    if this node's id is the larger, else -PRG(s_ij): the pair's masks cancel in the sum."""
    out = {k: np.array(v, dtype=np.uint64) for k, v in encoded.items()}
    shapes = _shapes(out)
    _add(out, prg(private_seed, shapes), +1)
    for other, seed in pairwise.items():
        if other != node_id:
            _add(out, prg(seed, shapes), +1 if node_id > other else -1)
    return out


def add_up(vectors: Sequence[Mapping[str, UInt64Array]]) -> dict[str, UInt64Array]:
    """The sum of masked vectors in Z_2^64."""
    total = {k: np.zeros_like(v, dtype=np.uint64) for k, v in vectors[0].items()}
    for v in vectors:
        for k in total:
            total[k] = total[k] + v[k]
    return total


def unmask(total: Mapping[str, UInt64Array], private_seeds: Sequence[bytes],
           dropped_pairs: Sequence[tuple[int, int, bytes]]) -> dict[str, UInt64Array]:
    """Remove the survivors' private masks and, for each (dropped node d, surviving
    neighbour j, pairwise seed of the pair), the mask j added for d."""
    out = {k: np.array(v, dtype=np.uint64) for k, v in total.items()}
    shapes = _shapes(out)
    for seed in private_seeds:
        _add(out, prg(seed, shapes), -1)
    for dropped, survivor, seed in dropped_pairs:
        _add(out, prg(seed, shapes), -1 if survivor > dropped else +1)
    return out


def decode(total: Mapping[str, UInt64Array], settings: SecAggSettings) -> tuple[int, dict[str, FloatArray]]:
    """(Σ w, Σ w·update / Σ w): the weighted mean of the updates that are in the sum
    (within the quantization error: one level, 2·clip_range / (2^bits - 1), per update)."""
    weight = int(total[WEIGHT_SLOT].view(np.int64)[0])
    if weight < 1:
        raise ValueError(f"the unmasked sum of weights is {weight}: the masks did not cancel")
    names = sorted(k for k in total if k != WEIGHT_SLOT)
    sums = [total[k].view(np.int64).astype(np.float64) / weight for k in names]
    means = dequantize(sums, settings.clip_range, settings.levels)  # type: ignore[arg-type]  # floats work
    return weight, dict(zip(names, means, strict=True))


def check_capacity(total_weight: int, settings: SecAggSettings) -> str | None:
    """None if a sum of updates with weights adding up to `total_weight` fits in int64."""
    if total_weight * (settings.levels + 1) >= 2**62:
        return (f"secure aggregation: weights adding up to {total_weight} times 2^{settings.bits} levels "
                "overflow the 64-bit sum; lower federation.secagg_bits")
    return None


@dataclass(frozen=True)
class DistributedNoise:
    """The Skellam noise one round's sum must hold (in quantization levels²), and the
    integer sensitivities it is accounted at (replace one site's clipped update)."""

    total_variance: float
    l1: float
    l2: float

    def per_site(self, threshold: int) -> float:
        """What one site adds: enough that any t of them reach the total."""
        return self.total_variance / threshold

    @property
    def noise_multiplier(self) -> float:
        """The equivalent Gaussian z = sqrt(μ) / Δ2 (for reading; the accounting is Skellam's)."""
        return math.sqrt(self.total_variance) / self.l2


@lru_cache(maxsize=32)
def distributed_noise(settings: SecAggSettings, clip_norm: float, dim: int, target_epsilon: float, delta: float,
                      rounds: int, noise_multiplier: float | None = None) -> DistributedNoise:
    """The round's Skellam noise for site-level DP under SecAgg+: calibrated so that `rounds`
    releases spend `target_epsilon` at `delta`, or (explicit z) μ = (z Δ2)², which must not
    spend more (ValueError, one line)."""
    one = integer_sensitivities(clip_norm, settings.scale, dim)
    l1, l2 = 2 * one.l1, 2 * one.l2  # replace-one: the triangle inequality doubles both
    if noise_multiplier is None:
        return DistributedNoise(calibrate_skellam_variance(target_epsilon, delta, l1, l2, rounds), l1, l2)
    variance = (noise_multiplier * l2) ** 2
    planned, _ = skellam_epsilon(variance, l1, l2, rounds, delta)
    if planned > target_epsilon:
        raise ValueError(f"privacy.site_noise_multiplier={noise_multiplier:g}: {rounds} rounds of distributed "
                         f"Skellam noise spend site-level ε={planned:.4g} > privacy.site_target_epsilon="
                         f"{target_epsilon:g} (δ={delta:g}); raise the noise or the target")
    return DistributedNoise(variance, l1, l2)

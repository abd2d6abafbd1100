"""The coordinator's side of SecAgg+ (Bell et al., CCS 2020) on Flower's Message API.

Flower 1.41 ships SecAgg+ as `SecAggPlusWorkflow` + `secaggplus_mod`, but the workflow
drives the legacy `DefaultWorkflow` (`configure_fit`, `FitRes`) and the mod reads the
reply through `compat.recorddict_to_fitres`: neither runs under a Message-API `Strategy`.
So the stages are written here, as Flower's workflow writes them, with Flower's `Grid`
for every message and Flower's primitives (through privacy/secure_sum.py) for every
cryptographic step but Shamir sharing (privacy/shamir.py). `SecAggAggregation`
(strategies/secagg_aggregation.py) calls `prepare` from `configure_train` (setup, key
sharing and the check, before the TRAIN messages leave) and `finish` from
`aggregate_train` (unmasking), so the round loop stays Flower's `Strategy.start`.

Sites are named by slots 1..m in the round (Flower's node ids are uint64; a ConfigRecord
carries sint64). Per round, with A1 the sites that sent signed keys, A2 those that sent
their shares and passed the check, and A3 those whose masked vector is usable:

- **setup**: every sampled site makes two key pairs (pk1 for masks, pk2 for shares) and signs
  them with its ledger key; a signature that the ledger key of its hello does not verify
  drops the site (the coordinator binds each forwarded ledger key to the name it joined with);
- **share**: the neighbourhoods are a random ring over A1 (`neighbourhoods`); each site gets
  its neighbours' keys with their names, ledger keys and signatures, and returns one
  encrypted share of b and sk1 per neighbour, a commitment to b and its signature of the
  neighbourhood it was shown (checked here against what it was sent);
- **check**: each site gets the ciphertexts its neighbours made for it and their signed
  views, and reports whose shares do not decrypt; those senders are dropped before anyone
  masks with them (a site cannot stall the round with bad ciphertexts), and the round is
  skipped here if some site of A2 keeps fewer than t neighbours of A2;
- **collect** (the TRAIN message): each site of A2 is told its neighbours in A2, trains and
  sends weight × quantized(update - global) + masks;
- **unmask**: each site of A3 is told which neighbours are in the sum (A3: it returns b's
  share) and which vanished after the check (A2 - A3: it returns sk1's share). Every secret
  needs t shares (privacy/shamir.py); a rebuilt b must match its commitment and a rebuilt
  sk1 its pk1, so a wrong share skips the round instead of releasing a corrupted model.

A round that cannot be unmasked is skipped with one line, and nothing of a single site is
revealed: no site hands over shares unless at least t of its neighbours are in the sum,
and none hands over both shares of one neighbour (client/secagg.py). Who dropped, and at
which stage, is in the round's report.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from fedshield import protocol
from fedshield.privacy import secure_sum, shamir, signing
from fedshield.privacy.errors import FedShieldError

log = logging.getLogger("fedshield.secagg")

Vector = Mapping[str, np.ndarray[Any, Any]]


def _ints(value: object) -> list[int]:
    """A list of slots this coordinator put in its own ask (typed back from the ask's record)."""
    assert isinstance(value, list)
    return value


@dataclass
class SecureRound:
    """One round's SecAgg+ state at the coordinator (public values only)."""

    server_round: int
    slot_of: dict[int, int]  # node id -> slot
    node_of: dict[int, int]  # slot -> node id
    names: dict[int, str]  # slot -> site name
    neighbourhood: dict[int, tuple[int, ...]] = field(default_factory=dict)  # slot -> slots, itself included
    threshold: dict[int, int] = field(default_factory=dict)  # slot -> t of its secrets
    pk1: dict[int, bytes] = field(default_factory=dict)
    pk2: dict[int, bytes] = field(default_factory=dict)
    commitment: dict[int, bytes] = field(default_factory=dict)
    statement: dict[int, bytes] = field(default_factory=dict)  # slot -> its signed key statement
    key_sig: dict[int, bytes] = field(default_factory=dict)
    view: dict[int, bytes] = field(default_factory=dict)  # slot -> the neighbourhood it was shown
    view_sig: dict[int, bytes] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # A2: sent their shares, and passed the check
    dropped: dict[str, str] = field(default_factory=dict)  # site -> the stage it vanished at
    skipped: str = ""

    def drop(self, slot: int, stage: str) -> None:
        self.dropped.setdefault(self.names[slot], stage)


@dataclass(frozen=True)
class Unmasked:
    """The round's sum, unmasked and decoded: Σ w over the sites in it, Σ w·update / Σ w."""

    total_weight: int
    mean: dict[str, np.ndarray[Any, Any]]
    sites: tuple[str, ...]
    thresholds: tuple[int, ...] = ()  # each summed site's threshold t (its noise share is μ / t)


class SecAggPlus:
    """SecAgg+ stages over a Flower `Grid`.

    Parameters
    ----------
    settings : SecAggSettings
        Quantization, neighbourhood and dropout settings (checked here).
    names : Mapping[int, str]
        Node id -> site name.
    ledger_keys : Mapping[int, str | bytes]
        Node id -> the site's ledger public key (PEM, from its hello): it must sign the
        site's round keys, and it is what the other sites check them with.
    timeout : float
        Seconds each key stage waits for replies (federation.secagg_timeout_s).
    rng : random.Random, optional
        Orders the neighbourhood ring (default: the system's CSPRNG).
    noise : DistributedNoise, optional
        With site-level DP: the noise the sites add (each μ / t), to account what a sum held.
    """

    def __init__(self, settings: secure_sum.SecAggSettings, names: Mapping[int, str],
                 ledger_keys: Mapping[int, str | bytes], *, timeout: float, rng: random.Random | None = None,
                 noise: secure_sum.DistributedNoise | None = None) -> None:
        problem = settings.problem()
        if problem:
            raise ValueError(problem)
        if set(ledger_keys) != set(names):
            raise ValueError("SecAggPlus: a ledger public key for every site, and only for them")
        self.settings = settings
        self.names = dict(names)
        self.ledger_pem = {n: k.encode() if isinstance(k, str) else bytes(k) for n, k in ledger_keys.items()}
        try:
            self.ledger_key = {n: signing.load_public_key(k) for n, k in self.ledger_pem.items()}
        except FedShieldError as exc:
            raise ValueError(f"SecAggPlus: {exc}") from None
        self.timeout = float(timeout)
        self.rng = rng or random.SystemRandom()
        self.noise = noise  # site-level DP: the Skellam noise each round's sum must hold
        self._rounds: dict[int, SecureRound] = {}
        self._plans: dict[int, ConfigRecord] = {}

    # ------------------------------------------------------------ stages 0 and 1

    def prepare(self, server_round: int, node_ids: Sequence[int], plan: ConfigRecord, grid: Grid) -> SecureRound:
        """Setup and key sharing with the sampled `node_ids`; the round's state (check `skipped`)."""
        order = sorted(node_ids, key=self.names.__getitem__)
        rnd = SecureRound(server_round, {n: i + 1 for i, n in enumerate(order)},
                          {i + 1: n for i, n in enumerate(order)}, {i + 1: self.names[n] for i, n in enumerate(order)})
        self._rounds[server_round] = rnd
        self._plans[server_round] = plan
        run_id = str(plan[protocol.RUN_ID])
        keys = self._ask(grid, rnd, "setup", {s: {protocol.SA_ROUND: server_round, protocol.SA_SLOT: s}
                                              for s in rnd.node_of})
        for slot, reply in keys.items():
            pk1, pk2 = reply.fields[protocol.SA_PK1], reply.fields[protocol.SA_PK2]
            try:
                bytes_to_public_key(pk1)
                bytes_to_public_key(pk2)
            except Exception:
                rnd.drop(slot, "setup: unreadable public key")
                continue
            node = rnd.node_of[slot]
            statement = secure_sum.key_statement(run_id, server_round, slot, rnd.names[slot], self.ledger_pem[node],
                                                 pk1, pk2)
            if not signing.verify(self.ledger_key[node], reply.fields[protocol.SA_KEY_SIG], statement):
                rnd.drop(slot, "setup: round keys not signed by the ledger key of its hello")
                continue
            rnd.pk1[slot], rnd.pk2[slot] = pk1, pk2
            rnd.statement[slot], rnd.key_sig[slot] = statement, reply.fields[protocol.SA_KEY_SIG]
        if self._too_few(rnd, set(rnd.pk1), "after key setup"):
            return rnd
        rnd.neighbourhood = secure_sum.neighbourhoods(sorted(rnd.pk1), self.settings, self.rng)
        for slot, hood in rnd.neighbourhood.items():
            rnd.threshold[slot] = self.settings.threshold(len(hood))
            rnd.view[slot] = secure_sum.view({h: rnd.statement[h] for h in hood})
        asks = {s: {protocol.SA_ROUND: server_round, protocol.SA_SLOTS: list(hood),
                    protocol.SA_PK1S: [rnd.pk1[h] for h in hood], protocol.SA_PK2S: [rnd.pk2[h] for h in hood],
                    protocol.SA_NAMES: [rnd.names[h].encode() for h in hood],
                    protocol.SA_LEDGER_KEYS: [self.ledger_pem[rnd.node_of[h]] for h in hood],
                    protocol.SA_KEY_SIGS: [rnd.key_sig[h] for h in hood]}
                for s, hood in rnd.neighbourhood.items()}
        inbox: dict[int, tuple[list[int], list[bytes]]] = {s: ([], []) for s in rnd.neighbourhood}
        for slot, reply in self._ask(grid, rnd, "share", asks).items():
            destinations = reply.fields[protocol.SA_DESTINATIONS]
            ciphertexts = reply.fields[protocol.SA_CIPHERTEXTS]
            if sorted(destinations) != sorted(set(rnd.neighbourhood[slot]) - {slot}) \
                    or len(ciphertexts) != len(destinations):
                rnd.drop(slot, "share: shares not for exactly its neighbourhood")
                continue
            if len(reply.fields[protocol.SA_COMMITMENT]) != secure_sum.COMMITMENT_BYTES:
                rnd.drop(slot, "share: the seed commitment is not a SHA-256 digest")
                continue
            seen = secure_sum.view_statement(run_id, server_round, slot, rnd.view[slot])
            if not signing.verify(self.ledger_key[rnd.node_of[slot]], reply.fields[protocol.SA_VIEW_SIG], seen):
                rnd.drop(slot, "share: its view of the neighbourhood is not signed by its ledger key")
                continue
            rnd.view_sig[slot] = reply.fields[protocol.SA_VIEW_SIG]
            rnd.shared.add(slot)
            rnd.commitment[slot] = reply.fields[protocol.SA_COMMITMENT]
            for dst, ciphertext in zip(destinations, ciphertexts, strict=True):
                inbox[dst][0].append(slot)
                inbox[dst][1].append(ciphertext)
        if self._too_few(rnd, rnd.shared, "after key sharing"):
            return rnd
        # check: forward only what came from sites that shared, with each source's signed view;
        # a site whose shares a neighbour cannot read is dropped here, before anyone masks with it
        asks = {}
        for slot in sorted(rnd.shared):
            sources = [s for s in inbox[slot][0] if s in rnd.shared]
            asks[slot] = {protocol.SA_ROUND: server_round, protocol.SA_SOURCES: sources,
                          protocol.SA_CIPHERTEXTS: [c for s, c in zip(*inbox[slot], strict=True) if s in rnd.shared],
                          protocol.SA_VIEWS: [rnd.view[s] for s in sources],
                          protocol.SA_VIEW_SIGS: [rnd.view_sig[s] for s in sources]}
        replies = self._ask(grid, rnd, "check", asks)
        accused: dict[int, int] = {}
        for slot, reply in replies.items():
            unreadable = reply.fields[protocol.SA_UNREADABLE]
            if not set(unreadable) <= set(_ints(asks[slot][protocol.SA_SOURCES])):
                rnd.drop(slot, "check: reported shares it was not sent")
                continue
            for bad in unreadable:
                accused[bad] = accused.get(bad, 0) + 1
        checked = set(replies) - {s for s in replies if rnd.names[s] in rnd.dropped}
        for bad, count in sorted(accused.items()):
            rnd.drop(bad, f"check: its shares did not decrypt at {count} neighbour(s)")
        rnd.shared = checked - set(accused)
        self._too_few(rnd, rnd.shared, "after the share check")
        return rnd

    def collect_fields(self, server_round: int, node_id: int) -> dict[str, Any] | None:
        """The SECAGG fields of the TRAIN message to `node_id` (None: it is not in the round any more)."""
        rnd = self._rounds[server_round]
        slot = rnd.slot_of.get(node_id)
        if rnd.skipped or slot not in rnd.shared:
            return None
        return {protocol.SA_ROUND: server_round,
                protocol.SA_SOURCES: [h for h in rnd.neighbourhood[slot] if h in rnd.shared and h != slot]}

    def expected(self, arrays: Mapping[str, protocol.ArraySpec]) -> dict[str, protocol.ArraySpec]:
        """What a masked vector must be: one uint64 tensor per trainable tensor, and the weight."""
        out: dict[str, protocol.ArraySpec] = {k: (shape, np.dtype(np.uint64)) for k, (shape, _) in arrays.items()}
        out[secure_sum.WEIGHT_SLOT] = ((1,), np.dtype(np.uint64))
        return out

    # ------------------------------------------------------------ stages 2 and 3

    def round_state(self, server_round: int) -> SecureRound | None:
        return self._rounds.get(server_round)

    def finish(self, server_round: int, vectors: Mapping[int, Vector], grid: Grid) -> SecureRound | Unmasked:
        """Unmask the sum of the usable masked `vectors` (node id -> vector); the round's
        state with `skipped` set if it cannot be."""
        rnd = self._rounds.pop(server_round)
        plan = self._plans.pop(server_round)
        if rnd.skipped:
            return rnd
        alive = {rnd.slot_of[n] for n in vectors if rnd.slot_of.get(n) in rnd.shared}
        for slot in rnd.shared - alive:
            rnd.drop(slot, "collect")
        gone = rnd.shared - alive
        if self._too_few(rnd, alive, "in the sum", needs_of=rnd.shared):
            return rnd
        asks = {s: {protocol.SA_ROUND: server_round,
                    protocol.SA_ACTIVE: [h for h in rnd.neighbourhood[s] if h in alive],
                    protocol.SA_DROPPED: [h for h in rnd.neighbourhood[s] if h in gone]} for s in sorted(alive)}
        shares: dict[int, list[bytes]] = {s: [] for s in rnd.shared}
        replies = self._ask(grid, rnd, "unmask", asks, plan=plan)
        for slot, reply in replies.items():
            owners, got = reply.fields[protocol.SA_SLOTS], reply.fields[protocol.SA_SHARES]
            if len(owners) != len(got) or set(owners) != set(_ints(asks[slot][protocol.SA_ACTIVE])) | set(
                    _ints(asks[slot][protocol.SA_DROPPED])):
                rnd.drop(slot, "unmask: shares for other slots than asked (its vector stays in the sum)")
                continue
            for owner, share in zip(owners, got, strict=True):
                shares[owner].append(share)
        for slot in alive - set(replies):
            rnd.dropped.setdefault(rnd.names[slot], "unmask (its vector stays in the sum)")
        seeds, pairs = [], []
        for slot in sorted(rnd.shared):
            secret = self._rebuild(rnd, slot, shares[slot], in_sum=slot in alive)
            if secret is None:
                return rnd
            if slot in alive:
                seeds.append(secret)
                continue
            sk1 = secure_sum.mask_key_from_secret(secret)
            for other in rnd.neighbourhood[slot]:
                if other in alive:
                    key = generate_shared_key(sk1, bytes_to_public_key(rnd.pk1[other]))
                    pairs.append((slot, other, secure_sum.pairwise_seed(key)))
        total = secure_sum.unmask(secure_sum.add_up([vectors[rnd.node_of[s]] for s in sorted(alive)]), seeds, pairs)
        try:
            weight, mean = secure_sum.decode(total, self.settings)
        except ValueError as exc:
            rnd.skipped = f"secure aggregation: {exc}"
            return rnd
        order = sorted(alive, key=rnd.names.__getitem__)
        return Unmasked(weight, mean, tuple(rnd.names[s] for s in order), tuple(rnd.threshold[s] for s in order))

    # ------------------------------------------------------------ helpers

    def _rebuild(self, rnd: SecureRound, slot: int, shares: list[bytes], *, in_sum: bool) -> bytes | None:
        """b (`in_sum`: its vector is in the sum) or sk1 (it vanished) from its shares, checked."""
        need = rnd.threshold[slot]
        what = "mask seed" if in_sum else "mask key"
        if len(shares) < need:
            rnd.skipped = (f"secure aggregation: {len(shares)} share(s) of {rnd.names[slot]}'s {what}, "
                           f"fewer than the threshold {need}: the sum cannot be unmasked")
            return None
        try:  # exactly t shares: more cost time and add nothing (a wrong one fails the check below)
            secret = shamir.combine(shares[:need])
            if what == "mask seed":
                ok = secure_sum.commitment(secret) == rnd.commitment[slot]
            else:
                key = secure_sum.mask_key_from_secret(secret)
                ok = public_key_to_bytes(key.public_key()) == rnd.pk1[slot]
        except Exception:
            ok = False
        if not ok:
            rnd.skipped = (f"secure aggregation: {rnd.names[slot]}'s {what} rebuilt from its shares does not match "
                           "what it published (a wrong share): the round is not released")
            return None
        return secret

    def _too_few(self, rnd: SecureRound, alive: set[int], when: str, needs_of: set[int] | None = None) -> bool:
        """Skip the round if fewer than 2 sites remain, or some site's secrets (or, for
        `needs_of`, those of every site the sum must clear) have fewer than t holders."""
        if len(alive) < 2:
            rnd.skipped = (f"secure aggregation: {len(alive)} site(s) {when}: a sum of one update would "
                           "be that update")
        else:
            for slot in sorted(needs_of or alive):
                hood = rnd.neighbourhood.get(slot, ())
                holders = sum(h in alive for h in hood)
                if hood and holders < rnd.threshold[slot]:
                    rnd.skipped = (f"secure aggregation: {holders} of {rnd.names[slot]}'s {len(hood)} neighbours "
                                   f"{when}, fewer than the threshold {rnd.threshold[slot]} (more dropped than "
                                   "federation.secagg_max_dropout_fraction allows)")
                    break
        if rnd.skipped:
            log.info("round %s: %s", rnd.server_round, rnd.skipped)
        return bool(rnd.skipped)

    def _ask(self, grid: Grid, rnd: SecureRound, stage: str, asks: Mapping[int, Mapping[str, Any]],
             plan: ConfigRecord | None = None) -> dict[int, protocol.SecAggReply]:
        """Send a key stage to the slots in `asks`; the usable replies by slot (the rest dropped)."""
        plan = plan or self._plans[rnd.server_round]
        messages = [protocol.secagg_instruction(stage, plan, rnd.node_of[s], fields) for s, fields in asks.items()]
        out: dict[int, protocol.SecAggReply] = {}
        for msg in grid.send_and_receive(messages, timeout=self.timeout):
            slot = rnd.slot_of.get(msg.metadata.src_node_id)
            if slot is None or slot not in asks:
                continue
            parsed = protocol.read_secagg_reply(msg, stage)
            if isinstance(parsed, protocol.SecAggReply) and parsed.site == rnd.names[slot]:
                out[slot] = parsed
            else:
                reason = getattr(parsed, "reason", f"replied as {getattr(parsed, 'site', '?')!r}")
                rnd.drop(slot, f"{stage}: {reason}")
        for slot in asks:
            if slot not in out:
                rnd.drop(slot, stage if stage != "unmask" else "unmask (its vector stays in the sum)")
        return out

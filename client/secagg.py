"""The site's side of SecAgg+ (federation.secure_aggregation=secaggplus).

A round is five messages (protocol.py): SETUP (make two fresh key pairs, signed with the
site's ledger key), SHARE (check every neighbour's signed keys, split the private-mask seed
b and the mask key sk1 into Shamir shares, one per neighbour, each encrypted for that
neighbour, and sign the neighbourhood it was shown), CHECK (the neighbours' signed views and
shares: stop if any neighbour was shown other keys, keep the shares that decrypt, report the
others), TRAIN with the neighbours to mask with (train, then send the masked vector only) and
UNMASK (hand over the shares that remove the masks: b's for the neighbours whose vector is in
the sum, sk1's for those who vanished). The arithmetic is privacy/secure_sum.py's, the
sharing privacy/shamir.py's, the key agreement and encryption Flower's.

What a site checks, because the coordinator may be malicious (Bell et al. 2020, the
malicious-server variant: authenticated keys and a consistency check before unmasking):
- the stages come in order, for one run and round, with this site's own keys, name and
  ledger key in its neighbourhood and no key, name or ledger key twice; a neighbourhood no
  larger than the run's setting;
- every neighbour's round keys are signed by the ledger key forwarded with them, bound to the
  run, round, slot and name, and that ledger key is the one pinned for the name in the site's
  state folder (`check_peers`: trust on first use, or written by the operator);
- every neighbour whose shares it receives signed the same keys for every slot both were
  shown (`_check_views`), before anything is masked: a coordinator that swapped a key in one
  site's view is caught there, and the site never masks, so nothing of it can be unmasked;
- every share it keeps decrypts, comes from the slot that claims it and is for this site;
  one that does not is reported (the coordinator drops its sender before anyone masks with
  it); it masks only with neighbours whose shares it holds, and only if those and itself
  reach the threshold;
- at UNMASK, it never hands over both shares of one neighbour (the slots marked alive and
  those marked gone are disjoint), only for neighbours it holds shares of, itself among
  the alive, and only if at least a threshold of them is alive;
- with `privacy.unit=site`, it clips its whole update to privacy.site_clip_norm and adds
  its share μ / t of the round's Skellam noise (privacy/secure_sum.py) before masking, μ
  computed from its own copy of the plan: the coordinator never sees a noise-free sum;
- **one masked vector per round, ever** (a marker in the site's state folder, written
  before the vector leaves): two unmasked sums over different sets of sites that both
  hold this site's update would give its update away by subtraction. A round asked
  again (a coordinator restart) is declined; the run goes on without this site for it.

What this cannot stop without a closed list of keys the site trusts (docs/auditor.md): a
coordinator may present a site a neighbourhood of its own sybils under names it has not met.

The secrets (the key pairs, b, the shares) live in the Flower node's in-memory context
for the round and are erased at UNMASK; nothing of them touches disk.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedshield import protocol
from fedshield.conf.config import Config
from fedshield.privacy import secure_sum, shamir, signing
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.files import create_file
from fedshield.privacy.skellam import sample_skellam

log = logging.getLogger("fedshield.site")
STATE = "fedshield-secagg"  # the record in the node's context that holds the round's secrets


class SecAggError(FedShieldError):
    """A SecAgg+ stage that this site will not go through (one line)."""


def settings(cfg: Config) -> secure_sum.SecAggSettings:
    return secure_sum.settings_of(cfg.federation)


def round_noise(cfg: Config, dim: int) -> secure_sum.DistributedNoise:
    """The Skellam noise a round's sum must hold, from this site's own copy of the plan
    (the coordinator computes the same from its own, and records what the sum held)."""
    p = cfg.privacy
    try:
        return secure_sum.distributed_noise(
            settings(cfg), p.site_clip_norm, dim, p.site_target_epsilon, p.site_delta,
            cfg.federation.rounds, None if p.site_noise_multiplier is None else float(p.site_noise_multiplier))
    except ValueError as exc:
        raise SecAggError(str(exc)) from None


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)


def _load(context: Context, run_id: str, server_round: int, stage: str) -> dict[str, Any]:
    """The round's state, which must be at `stage` for this run and round."""
    record = context.state.get(STATE)
    state = json.loads(str(record["state"])) if isinstance(record, ConfigRecord) and "state" in record else {}
    if state.get("run") != run_id or state.get("round") != server_round or state.get("stage") != stage:
        raise SecAggError(f"secure aggregation: a {_next(stage)} message for round {server_round} came "
                          f"out of order (this site is at {state.get('stage', 'no stage')} of round "
                          f"{state.get('round', '-')})")
    return state


def _next(stage: str) -> str:
    return {"setup": "share", "share": "check", "check": "collect", "collect": "unmask"}.get(stage, "?")


def _save(context: Context, state: Mapping[str, Any] | None) -> None:
    context.state[STATE] = ConfigRecord({"state": json.dumps(state or {})})


def setup(context: Context, step: protocol.SecAggStep, run_id: str, signer: signing.PrivateKey,
          name: str) -> dict[str, Any]:
    """Two fresh key pairs: sk1/pk1 for the pairwise masks, sk2/pk2 to encrypt shares; the
    public halves signed with the site's ledger key, bound to the run, round, slot and name."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    slot = int(step.fields[protocol.SA_SLOT])
    pk1_bytes, pk2_bytes = public_key_to_bytes(pk1), public_key_to_bytes(pk2)
    ledger_key = signing.public_key_pem(signer)
    statement = secure_sum.key_statement(run_id, step.server_round, slot, name, ledger_key, pk1_bytes, pk2_bytes)
    state = {"run": run_id, "round": step.server_round, "stage": "setup", "slot": slot, "name": name,
             "ledger_key": ledger_key.decode(),
             "sk1": _b64(private_key_to_bytes(sk1)), "pk1": _b64(pk1_bytes),
             "sk2": _b64(private_key_to_bytes(sk2)), "pk2": _b64(pk2_bytes)}
    _save(context, state)
    return {protocol.SA_PK1: pk1_bytes, protocol.SA_PK2: pk2_bytes,
            protocol.SA_KEY_SIG: signing.sign(signer, statement)}


def _check_neighbourhood(state: Mapping[str, Any], step: protocol.SecAggStep, run_id: str) -> dict[int, bytes]:
    """Every neighbour's round keys checked against the signature of the ledger key forwarded
    with them; this site's own entry exactly as it is. The key statements by slot."""
    f = step.fields
    slots, pk1s, pk2s = f[protocol.SA_SLOTS], f[protocol.SA_PK1S], f[protocol.SA_PK2S]
    names, ledger_keys, sigs = f[protocol.SA_NAMES], f[protocol.SA_LEDGER_KEYS], f[protocol.SA_KEY_SIGS]
    me = int(state["slot"])
    if not len(slots) == len(pk1s) == len(pk2s) == len(names) == len(ledger_keys) == len(sigs):
        raise SecAggError("secure aggregation: the neighbourhood's slots, names and keys differ in number")
    if me not in slots:
        raise SecAggError("secure aggregation: this site's own keys are not in its neighbourhood as it sent them")
    i = slots.index(me)
    if (pk1s[i], pk2s[i], names[i], ledger_keys[i]) != (_unb64(state["pk1"]), _unb64(state["pk2"]),
                                                        str(state["name"]).encode(), str(state["ledger_key"]).encode()):
        raise SecAggError("secure aggregation: this site's own keys are not in its neighbourhood as it sent them")
    if len(set(pk1s) | set(pk2s)) != 2 * len(slots):
        raise SecAggError("secure aggregation: a public key appears twice in the neighbourhood")
    if len(set(names)) != len(slots):
        raise SecAggError("secure aggregation: a site name or ledger key appears twice in the neighbourhood")
    statements, fingerprints = {}, set()
    for slot, pk1, pk2, raw_name, ledger_key, sig in zip(slots, pk1s, pk2s, names, ledger_keys, sigs, strict=True):
        try:
            name = raw_name.decode()
            key = signing.load_public_key(ledger_key)
        except (UnicodeDecodeError, FedShieldError):
            raise SecAggError(f"secure aggregation: the name or ledger key of slot {slot} is not readable") from None
        statement = secure_sum.key_statement(run_id, step.server_round, slot, name, ledger_key, pk1, pk2)
        if not signing.verify(key, sig, statement):
            raise SecAggError(f"secure aggregation: the round keys of slot {slot} ({name!r}) are not signed by the "
                              "ledger key forwarded with them (a swapped key): not sharing")
        statements[slot] = statement
        fingerprints.add(signing.fingerprint(key))  # one key in two encodings (PEM, OpenSSH) is one key
    if len(fingerprints) != len(slots):
        raise SecAggError("secure aggregation: a site name or ledger key appears twice in the neighbourhood")
    return statements


PEERS = "peers.json"  # in the site's state folder, secagg/: site name -> its ledger key's fingerprint
CLOSED = "*"  # an entry "*": "closed" in PEERS: names not in the file are refused, not pinned


def check_peers(state_dir: Path, names: list[str], ledger_keys: list[bytes]) -> None:
    """The ledger keys forwarded for these site names are the ones pinned for them.

    Without a PKI the coordinator could present a key of its own under a neighbour's name
    (a sybil); the pins bound that to the first time this site meets a name: a name is
    pinned to its key's fingerprint the first time it is seen (trust on first use), and the
    operator may write the file beforehand with fingerprints exchanged out of band
    (`SHA256:<hex>` of each site's ledger public key, `privacy.signing.fingerprint`). A
    name with another key, or a key under two names, is refused before any share is made.
    Pinning on first use cannot tell a new site from a name the coordinator made up; with
    the entry `"*": "closed"` the file is a closed list: a name not in it is refused."""
    path = state_dir / "secagg" / PEERS
    try:
        pinned = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise SecAggError(f"secure aggregation: {path}: not a readable JSON object of site name -> key "
                          f"fingerprint ({exc.__class__.__name__})") from None
    if not isinstance(pinned, dict) or not all(isinstance(v, str) for v in pinned.values()):
        raise SecAggError(f"secure aggregation: {path}: not a JSON object of site name -> key fingerprint")
    closed = pinned.get(CLOSED) == "closed"
    owner = {fp: name for name, fp in pinned.items() if name != CLOSED}
    added = False
    for name, pem in zip(names, ledger_keys, strict=True):
        fp = signing.fingerprint(signing.load_public_key(pem))
        if closed and name not in pinned:
            raise SecAggError(f"secure aggregation: the coordinator put {name!r} in this site's neighbourhood, a "
                              f"site not in the closed list {path}: not sharing")
        if pinned.get(name, fp) != fp or owner.get(fp, name) != name:
            raise SecAggError(f"secure aggregation: the coordinator forwarded a ledger key for {name!r} ({fp}) that "
                              f"is not the one pinned in {path}: not sharing (if that site really changed its "
                              "key, check the new fingerprint with its operator and edit the file)")
        if name not in pinned:
            pinned[name], owner[fp], added = fp, name, True
    if added:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{PEERS}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        create_file(tmp, json.dumps(pinned, indent=1, sort_keys=True).encode(), private=False, error=SecAggError)
        os.replace(tmp, path)


def share(context: Context, step: protocol.SecAggStep, run_id: str, cfg: Config,
          signer: signing.PrivateKey, state_dir: Path | None) -> dict[str, Any]:
    """Shares of b and sk1 for the neighbourhood, each encrypted for its holder, once every
    neighbour's keys are checked (signed by the ledger key forwarded with them, that key the
    one pinned for the name in `state_dir`); the neighbourhood as this site saw it, signed."""
    state = _load(context, run_id, step.server_round, "setup")
    statements = _check_neighbourhood(state, step, run_id)
    if state_dir is not None:
        check_peers(state_dir, [n.decode() for n in step.fields[protocol.SA_NAMES]],
                    list(step.fields[protocol.SA_LEDGER_KEYS]))
    slots, pk2s = step.fields[protocol.SA_SLOTS], step.fields[protocol.SA_PK2S]
    me = int(state["slot"])
    s = settings(cfg)
    if s.neighbours and len(slots) > s.neighbours + 1:
        raise SecAggError(f"secure aggregation: a neighbourhood of {len(slots)} is larger than "
                          f"federation.secagg_neighbours={s.neighbours} + 1")
    threshold = s.threshold(len(slots))
    if threshold > len(slots):
        raise SecAggError(f"secure aggregation: a neighbourhood of {len(slots)} cannot reach the threshold "
                          f"{threshold}")
    seed = os.urandom(secure_sum.SEED_BYTES)
    b_shares = shamir.split(seed, threshold, len(slots))
    sk1_shares = shamir.split(secure_sum.mask_key_secret(bytes_to_private_key(_unb64(state["sk1"]))), threshold,
                              len(slots))
    sk2 = bytes_to_private_key(_unb64(state["sk2"]))
    destinations, ciphertexts = [], []
    held_b, held_sk1 = {}, {}
    for i, (slot, pk2) in enumerate(zip(slots, pk2s, strict=True)):
        if slot == me:
            held_b[str(me)], held_sk1[str(me)] = _b64(b_shares[i]), _b64(sk1_shares[i])
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2))
        destinations.append(slot)
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(me, slot, b_shares[i], sk1_shares[i])))
    seen = secure_sum.view(statements)
    state.update(stage="share", seed=_b64(seed), threshold=threshold, slots=slots,
                 pk1s=[_b64(k) for k in step.fields[protocol.SA_PK1S]], pk2s=[_b64(k) for k in pk2s],
                 ledger_keys=[k.decode() for k in step.fields[protocol.SA_LEDGER_KEYS]],
                 names=[n.decode() for n in step.fields[protocol.SA_NAMES]], view=_b64(seen),
                 b_shares=held_b, sk1_shares=held_sk1)
    _save(context, state)
    return {protocol.SA_DESTINATIONS: destinations, protocol.SA_CIPHERTEXTS: ciphertexts,
            protocol.SA_COMMITMENT: secure_sum.commitment(seed),
            protocol.SA_VIEW_SIG: signing.sign(signer, secure_sum.view_statement(run_id, step.server_round, me, seen))}


def _check_views(state: Mapping[str, Any], step: protocol.SecAggStep, run_id: str) -> None:
    """Every source saw this site, and every neighbour both were shown, with the keys this
    site saw (its signed view, checked with its ledger key as this site was shown it)."""
    me, slots = int(state["slot"]), list(state["slots"])
    mine = secure_sum.read_view(_unb64(state["view"]))
    sources, views, sigs = (step.fields[k] for k in (protocol.SA_SOURCES, protocol.SA_VIEWS, protocol.SA_VIEW_SIGS))
    if not len(sources) == len(views) == len(sigs):
        raise SecAggError("secure aggregation: the forwarded views and shares differ in number")
    for src, seen, sig in zip(sources, views, sigs, strict=True):
        name = state["names"][slots.index(src)]
        key = signing.load_public_key(state["ledger_keys"][slots.index(src)])
        try:
            theirs = secure_sum.read_view(seen)
        except ValueError:
            theirs = {}
        ok = signing.verify(key, sig, secure_sum.view_statement(run_id, step.server_round, src, seen))
        if not ok or me not in theirs or any(theirs[s] != mine[s] for s in set(theirs) & set(mine)):
            raise SecAggError(f"secure aggregation: neighbour slot {src} ({name!r}) was shown other keys for this "
                              "round than this site was (the coordinator showed different views): not masking, "
                              "no share of this round will be handed over")


def check(context: Context, step: protocol.SecAggStep, run_id: str) -> dict[str, Any]:
    """The CHECK stage, before anything is masked: every source saw the same keys
    (`_check_views`: a mismatch ends the round for this site, which never masks), then the
    neighbours' shares are decrypted and kept. A share that does not decrypt, or says it is
    from another slot or for another, is reported, not fatal: the coordinator drops its
    sender before anyone masks with it, so a hostile site cannot stall the round."""
    state = _load(context, run_id, step.server_round, "share")
    me, slots = int(state["slot"]), list(state["slots"])
    sources, ciphertexts = step.fields[protocol.SA_SOURCES], step.fields[protocol.SA_CIPHERTEXTS]
    if len(sources) != len(ciphertexts) or not set(sources) <= set(slots) - {me}:
        raise SecAggError("secure aggregation: forwarded shares from slots outside this site's neighbourhood")
    _check_views(state, step, run_id)
    sk2 = bytes_to_private_key(_unb64(state["sk2"]))
    good, unreadable = [], []
    for src, ciphertext in zip(sources, ciphertexts, strict=True):
        key = generate_shared_key(sk2, bytes_to_public_key(_unb64(state["pk2s"][slots.index(src)])))
        try:
            actual, dst, b_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        except Exception:
            actual = dst = -1
        if (actual, dst) != (src, me):
            log.warning("secure aggregation: the share from slot %s does not decrypt to a share from it for this "
                        "site: reported, so that nobody masks with that neighbour", src)
            unreadable.append(src)
            continue
        good.append(src)
        state["b_shares"][str(src)], state["sk1_shares"][str(src)] = _b64(b_share), _b64(sk1_share)
    if len(good) + 1 < int(state["threshold"]):
        raise SecAggError(f"secure aggregation: readable shares of {len(good)} neighbour(s) and this site's own "
                          f"are fewer than the threshold {state['threshold']}: not masking with so few")
    state.update(stage="check", held=good)
    _save(context, state)
    return {protocol.SA_UNREADABLE: unreadable}


def begin_collect(context: Context, step: protocol.SecAggStep, run_id: str) -> dict[str, Any]:
    """The COLLECT stage's first half (before training): the neighbours to mask with, each
    one this site holds a readable share of, and with itself at least the threshold."""
    state = _load(context, run_id, step.server_round, "check")
    sources = step.fields[protocol.SA_SOURCES]
    if not set(sources) <= set(state["held"]):
        raise SecAggError("secure aggregation: asked to mask with neighbours whose shares this site does not hold")
    if len(sources) + 1 < int(state["threshold"]):
        raise SecAggError(f"secure aggregation: {len(sources)} neighbour(s) to mask with and this site are fewer "
                          f"than the threshold {state['threshold']}: not masking with so few")
    state["sources"] = list(sources)
    return state


def claim_round(state_dir: Path, run_id: str, server_round: int) -> None:
    """Mark (run, round) as masked once, before the vector leaves; refuse a second time."""
    folder = state_dir / "secagg"
    folder.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    try:
        os.close(os.open(folder / f"{name}.round-{server_round}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise SecAggError(f"secure aggregation: this site sent a masked update for round {server_round} of run "
                          f"{run_id} already; a second sum over other sites could give it away") from None


def masked(context: Context, state: dict[str, Any], update: Mapping[str, np.ndarray[Any, Any]],
           weights: Mapping[str, np.ndarray[Any, Any]], weight: int, cfg: Config,
           noise: Mapping[str, np.ndarray[Any, Any]] | None = None) -> dict[str, np.ndarray[Any, Any]]:
    """The COLLECT stage's second half: weight × quantized(update - weights), masked."""
    s = settings(cfg)
    delta = {k: np.asarray(update[k], np.float64) - np.asarray(weights[k], np.float64) for k in sorted(update)}
    if cfg.privacy.unit == "site":  # DP-FedAvg: the site clips its whole update to S itself
        norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
        clip = cfg.privacy.site_clip_norm
        if norm > clip:
            delta = {k: d * (clip / norm) for k, d in delta.items()}
    if cfg.privacy.unit == "site" and noise is None:  # this site's share of the round's Skellam noise
        dim = sum(int(d.size) for d in delta.values())
        per_site = round_noise(cfg, dim).per_site(int(state["threshold"]))
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))  # never a shared or logged seed
        noise = {k: sample_skellam(rng, per_site, d.shape) for k, d in delta.items()}
    beyond = sum(int(np.count_nonzero(np.abs(d) > s.clip_range)) for d in delta.values())
    if beyond:  # the site's own log: the quantizer clips these (a bias, not a refusal)
        log.warning("secure aggregation: %d of %d coordinates of this update are beyond "
                    "federation.secagg_clip_range=%g and are clipped to it", beyond,
                    sum(int(d.size) for d in delta.values()), s.clip_range)
    encoded = secure_sum.encode(delta, weight, s, noise)
    me, slots = int(state["slot"]), list(state["slots"])
    sk1 = bytes_to_private_key(_unb64(state["sk1"]))
    pairwise = {src: secure_sum.pairwise_seed(generate_shared_key(
        sk1, bytes_to_public_key(_unb64(state["pk1s"][slots.index(src)])))) for src in state["sources"]}
    out = secure_sum.mask(encoded, me, _unb64(state["seed"]), pairwise)
    state["stage"] = "collect"
    _save(context, state)
    return out


def unmask(context: Context, step: protocol.SecAggStep, run_id: str) -> dict[str, Any]:
    """b's shares for the neighbours in the sum, sk1's for those who vanished; never both."""
    state = _load(context, run_id, step.server_round, "collect")
    me = int(state["slot"])
    active, dropped = step.fields[protocol.SA_ACTIVE], step.fields[protocol.SA_DROPPED]
    held = {me, *state["sources"]}
    if set(active) & set(dropped):
        raise SecAggError("secure aggregation: the unmask request marks a neighbour both in the sum and gone "
                          "(both its shares would rebuild its update)")
    if me not in active or not set(active) | set(dropped) <= held:
        raise SecAggError("secure aggregation: the unmask request names slots this site holds no shares of")
    if len(active) < int(state["threshold"]):
        raise SecAggError(f"secure aggregation: {len(active)} neighbour(s) in the sum, fewer than the "
                          f"threshold {state['threshold']}: not unmasking")
    shares = [_unb64(state["b_shares"][str(a)]) for a in active] + [
        _unb64(state["sk1_shares"][str(d)]) for d in dropped]
    _save(context, None)  # the round is over for this site: its secrets go
    return {protocol.SA_SLOTS: list(active) + list(dropped), protocol.SA_SHARES: shares}

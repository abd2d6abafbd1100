"""SecAgg+ (federation.secure_aggregation=secaggplus): the coordinator's stages
(strategies/secagg.py) against the sites' own stage code (client/secagg.py), message by
message through the protocol, with dropouts at every stage, hostile requests, and the
arithmetic (privacy/secure_sum.py) checked against the plaintext sum."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message, RecordDict
from omegaconf import OmegaConf
from scipy import stats

from fedshield import conf, protocol
from fedshield.client import secagg as site_side
from fedshield.conf.config import Config
from fedshield.privacy import secure_sum, signing
from fedshield.privacy.secure_sum import SecAggSettings
from fedshield.strategies.secagg import SecAggPlus, SecureRound, Unmasked

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

RUN = "run-1"
PLAN = protocol.plan_record(config_yaml="x: 1\n", run_id=RUN, run_dir="", frozen_fingerprint="", class_names=["a"])
SHAPES = {"head.weight": (4, 3), "head.bias": (4,)}


def site_cfg(**fed: object):
    return OmegaConf.create({
        "federation": {"secure_aggregation": "secaggplus", "secagg_clip_range": 1.0, "secagg_bits": 20,
                       "secagg_neighbours": 0, "secagg_max_dropout_fraction": 0.3,
                       "secagg_reconstruction_threshold": None, **fed},
        "privacy": {"unit": "record", "site_clip_norm": 1.0},
    })


class Federation:
    """Sites that run client/secagg.py's stages behind a Grid; `vanish` = {(site, stage)}
    whose reply never comes (a site that died at that stage)."""

    def __init__(self, n: int, vanish: Iterable[tuple[str, str]] = (), state_root: Path | None = None,
                 **fed: object) -> None:
        self.names = {1000 + i: f"site-{i}" for i in range(n)}
        self.keys = {nid: ec.generate_private_key(signing.CURVE()) for nid in self.names}  # ledger signing keys
        self.state_dirs = {nid: None if state_root is None else state_root / name for nid, name in self.names.items()}
        self.contexts = {nid: Context(run_id=7, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in self.names}
        self.cfg = site_cfg(**fed)
        self.vanish = set(vanish)
        self.sent: list[tuple[str, str]] = []  # (stage, site)
        self.declined: list[tuple[str, str, str]] = []  # (stage, site, reason)
        self.unmasked: list[tuple[str, list[int]]] = []  # (site, the slots whose shares it handed over)
        rng = np.random.default_rng(5)
        self.updates = {nid: {k: rng.normal(0, 0.3, s) for k, s in SHAPES.items()} for nid in self.names}
        self.weights = {nid: int(rng.integers(5, 200)) for nid in self.names}
        self.base = {k: np.zeros(s) for k, s in SHAPES.items()}

    def get_node_ids(self) -> list[int]:
        return list(self.names)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            step = protocol.read_secagg(msg)
            assert step is not None
            self.sent.append((step.stage, self.names[nid]))
            if (self.names[nid], step.stage) in self.vanish:
                continue
            ctx = self.contexts[nid]
            try:
                if step.stage == "setup":
                    fields = site_side.setup(ctx, step, RUN, self.keys[nid], self.names[nid])
                elif step.stage == "share":
                    fields = site_side.share(ctx, step, RUN, self.cfg, self.keys[nid], self.state_dirs[nid])
                elif step.stage == "check":
                    fields = site_side.check(ctx, step, RUN)
                else:
                    fields = site_side.unmask(ctx, step, RUN)
                    self.unmasked.append((self.names[nid], list(fields[protocol.SA_SLOTS])))
            except site_side.SecAggError as exc:
                self.declined.append((step.stage, self.names[nid], str(exc)))
                replies.append(protocol.decline_reply(msg, site=self.names[nid], kind="protocol", reason=str(exc)))
                continue
            replies.append(protocol.secagg_reply(msg, site=self.names[nid], stage=step.stage, fields=fields))
        return replies

    def collect(self, coordinator: SecAggPlus, server_round: int = 1) -> dict[int, dict[str, np.ndarray]]:
        """The TRAIN stage: each site still in the round masks its update."""
        vectors = {}
        for nid in self.names:
            fields = coordinator.collect_fields(server_round, nid)
            if fields is None:
                continue
            self.sent.append(("collect", self.names[nid]))
            msg = Message(RecordDict({protocol.PLAN: PLAN}), dst_node_id=nid, message_type=protocol.TRAIN)
            step = protocol.read_secagg(protocol.with_secagg(msg, fields))
            if (self.names[nid], "collect") in self.vanish:
                continue
            state = site_side.begin_collect(self.contexts[nid], step, RUN)
            vectors[nid] = site_side.masked(self.contexts[nid], state, self.updates[nid], self.base,
                                            self.weights[nid], self.cfg)
        return vectors

    def run(self, coordinator: SecAggPlus | None = None, server_round: int = 1) -> SecureRound | Unmasked:
        coordinator = coordinator or self.coordinator()
        coordinator.prepare(server_round, list(self.names), PLAN, self)
        return coordinator.finish(server_round, self.collect(coordinator, server_round), self)

    def coordinator(self) -> SecAggPlus:
        return SecAggPlus(secure_sum.settings_of(self.cfg.federation), self.names,
                          {nid: signing.public_key_pem(key) for nid, key in self.keys.items()}, timeout=1.0,
                          rng=random.Random(3))

    def plain_mean(self, sites: Iterable[str]) -> dict[str, np.ndarray]:
        nids = [n for n, s in self.names.items() if s in set(sites)]
        total = sum(self.weights[n] for n in nids)
        return {k: sum(self.updates[n][k] * self.weights[n] for n in nids) / total for k in SHAPES}


DEFAULTS = SecAggSettings()


def step_size(settings: SecAggSettings = DEFAULTS) -> float:
    return 2 * settings.clip_range / settings.levels


@pytest.mark.parametrize("n, neighbours", [(3, 0), (6, 0), (11, 4), (15, 6)])
def test_the_unmasked_sum_is_the_plaintext_weighted_mean_within_the_quantization_error(n, neighbours):
    fed = Federation(n, secagg_neighbours=neighbours)
    out = fed.run()
    assert isinstance(out, Unmasked), getattr(out, "skipped", "")
    assert out.sites == tuple(sorted(fed.names.values()))
    assert out.total_weight == sum(fed.weights.values())
    plain = fed.plain_mean(fed.names.values())
    for k in SHAPES:  # stochastic rounding: at most one level per coordinate of each update
        assert np.max(np.abs(out.mean[k] - plain[k])) <= step_size()
        assert np.max(np.abs(out.mean[k] - plain[k])) > 0  # the quantizer really ran


def test_a_masked_vector_is_uniform_to_the_coordinator_while_the_unmasked_encoding_is_not():
    fed = Federation(4)
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    nid = next(iter(fed.names))
    big = {"w": np.random.default_rng(1).normal(0, 0.1, 20_000)}
    fields = coordinator.collect_fields(1, nid)
    msg = protocol.with_secagg(Message(RecordDict({protocol.PLAN: PLAN}), dst_node_id=nid,
                                       message_type=protocol.TRAIN), fields)
    state = site_side.begin_collect(fed.contexts[nid], protocol.read_secagg(msg), RUN)
    vector = site_side.masked(fed.contexts[nid], state, big, {"w": np.zeros(20_000)}, 17, fed.cfg)["w"]
    encoded = secure_sum.encode(big, 17, SecAggSettings())["w"]

    def uniformity(values: np.ndarray) -> float:  # chi-square over 64 buckets of the top 6 bits
        counts = np.bincount((values >> np.uint64(58)).astype(np.int64), minlength=64)
        return float(stats.chisquare(counts).pvalue)

    assert uniformity(vector) > 1e-3
    assert uniformity(encoded) < 1e-12  # the test can tell: the encoding alone is far from uniform
    low = (vector & np.uint64(0xFFFF)).astype(np.int64)  # and the low bits too
    assert stats.kstest(low / 65536.0, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("stage", ["collect", "unmask"])
def test_a_site_that_vanishes_after_sharing_its_keys_is_recovered(stage):
    fed = Federation(6, vanish=[("site-2", stage)])
    out = fed.run()
    assert isinstance(out, Unmasked), getattr(out, "skipped", "")
    # Gone before masking: out of the sum, its masks removed with its sk1 rebuilt from shares.
    # Gone after masking: its vector stays in the sum, its private mask removed with b rebuilt.
    in_sum = [s for s in fed.names.values() if stage == "unmask" or s != "site-2"]
    assert out.sites == tuple(in_sum)
    plain = fed.plain_mean(in_sum)
    for k in SHAPES:
        assert np.max(np.abs(out.mean[k] - plain[k])) <= step_size()


def test_sites_that_vanish_before_sharing_leave_nothing_to_recover():
    fed = Federation(6, vanish=[("site-0", "setup"), ("site-4", "share")])
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    state = coordinator.round_state(1)
    assert state is not None and state.dropped == {"site-0": "setup", "site-4": "share"}
    out = coordinator.finish(1, fed.collect(coordinator), fed)
    assert isinstance(out, Unmasked)
    in_sum = [s for s in fed.names.values() if s not in ("site-0", "site-4")]
    assert out.sites == tuple(in_sum)
    assert np.max(np.abs(out.mean["head.bias"] - fed.plain_mean(in_sum)["head.bias"])) <= step_size()


def test_more_dropouts_than_tolerated_skip_the_round_before_any_share_is_asked_for():
    # 6 sites, threshold 4 of 6 (30% tolerated): 3 gone after sharing leaves 3 holders.
    fed = Federation(6, vanish=[(f"site-{i}", "collect") for i in (0, 1, 2)])
    out = fed.run()
    assert isinstance(out, SecureRound)
    assert "fewer than the threshold 4" in out.skipped and "\n" not in out.skipped
    assert not [s for s in fed.sent if s[0] == "unmask"]  # no site was asked for a share
    assert out.dropped == {"site-0": "collect", "site-1": "collect", "site-2": "collect"}


def test_three_sites_survive_one_dropout_but_not_two():
    fed = Federation(3, vanish=[("site-1", "collect")])  # t = 2 of 3
    out = fed.run()
    assert isinstance(out, Unmasked) and out.sites == ("site-0", "site-2")
    fed = Federation(3, vanish=[("site-1", "collect"), ("site-2", "collect")])
    out = fed.run()
    assert isinstance(out, SecureRound) and "a sum of one update" in out.skipped
    assert not [s for s in fed.sent if s[0] == "unmask"]


def test_unmask_dropouts_beyond_the_threshold_skip_the_round():
    fed = Federation(5, vanish=[(f"site-{i}", "unmask") for i in (0, 1, 2)])  # t = 3 of 5; 2 answer
    out = fed.run()
    assert isinstance(out, SecureRound) and "fewer than the threshold 3" in out.skipped


def test_a_wrong_share_is_caught_by_the_commitment_and_nothing_is_released():
    fed = Federation(5)
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    vectors = fed.collect(coordinator)
    real = fed.send_and_receive

    def corrupt(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        first = replies[0]
        fields = dict(first.content[protocol.SECAGG])
        fields[protocol.SA_SHARES] = [s[:-1] + bytes([s[-1] ^ 1]) for s in fields[protocol.SA_SHARES]]
        first.content[protocol.SECAGG] = protocol.ConfigRecord(fields)
        return replies

    fed.send_and_receive = corrupt  # type: ignore[method-assign]
    out = coordinator.finish(1, vectors, fed)
    assert isinstance(out, SecureRound) and "does not match what it published" in out.skipped


# ---------------------------------------------------------------- what a site refuses


def _at_collect(fed: Federation) -> tuple[SecAggPlus, int]:
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    fed.collect(coordinator)
    return coordinator, next(iter(fed.names))


def unmask_step(active: list[int], dropped: list[int]) -> protocol.SecAggStep:
    return protocol.SecAggStep("unmask", 1, {protocol.SA_ROUND: 1, protocol.SA_ACTIVE: active,
                                             protocol.SA_DROPPED: dropped})


def test_a_site_never_hands_over_both_shares_of_one_neighbour():
    fed = Federation(5)
    _, nid = _at_collect(fed)
    with pytest.raises(site_side.SecAggError, match="both in the sum and gone"):
        site_side.unmask(fed.contexts[nid], unmask_step([1, 2, 3, 4], [4]), RUN)


def test_a_site_refuses_to_unmask_with_fewer_than_the_threshold_in_the_sum():
    fed = Federation(5)
    _, nid = _at_collect(fed)
    with pytest.raises(site_side.SecAggError, match="fewer than the threshold"):
        site_side.unmask(fed.contexts[nid], unmask_step([1, 2], [3, 4, 5]), RUN)


def test_a_site_refuses_slots_it_holds_no_shares_of_and_stages_out_of_order():
    fed = Federation(5)
    _, nid = _at_collect(fed)
    with pytest.raises(site_side.SecAggError, match="holds no shares"):
        site_side.unmask(fed.contexts[nid], unmask_step([1, 2, 3, 4, 9], []), RUN)
    fresh = Federation(4)
    nid = next(iter(fresh.names))
    with pytest.raises(site_side.SecAggError, match="out of order"):
        site_side.unmask(fresh.contexts[nid], unmask_step([1, 2, 3], []), RUN)


def signed_hood(members: list[tuple[int, str, ec.EllipticCurvePrivateKey, dict]]) -> protocol.SecAggStep:
    """A share stage for `members` (slot, name, ledger key, setup reply), each signed as a site does."""
    fields: dict = {protocol.SA_ROUND: 1, protocol.SA_SLOTS: [], protocol.SA_PK1S: [], protocol.SA_PK2S: [],
                    protocol.SA_NAMES: [], protocol.SA_LEDGER_KEYS: [], protocol.SA_KEY_SIGS: []}
    for slot, name, key, keys in members:
        pem = signing.public_key_pem(key)
        pk1, pk2 = keys[protocol.SA_PK1], keys[protocol.SA_PK2]
        for k, v in ((protocol.SA_SLOTS, slot), (protocol.SA_PK1S, pk1), (protocol.SA_PK2S, pk2),
                     (protocol.SA_NAMES, name.encode()), (protocol.SA_LEDGER_KEYS, pem),
                     (protocol.SA_KEY_SIGS, signing.sign(key, secure_sum.key_statement(RUN, 1, slot, name, pem, pk1,
                                                                                        pk2)))):
            fields[k].append(v)
    return protocol.SecAggStep("share", 1, fields)


def test_a_site_refuses_a_neighbourhood_without_its_own_keys_or_with_a_key_twice():
    fed = Federation(4)
    nid = next(iter(fed.names))
    ctx = fed.contexts[nid]
    me, them = fed.keys[nid], ec.generate_private_key(signing.CURVE())
    keys = site_side.setup(ctx, protocol.SecAggStep("setup", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 1}), RUN,
                           me, "site-0")
    other = site_side.setup(Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                            protocol.SecAggStep("setup", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 2}), RUN,
                            them, "site-1")
    third = ec.generate_private_key(signing.CURVE())
    with pytest.raises(site_side.SecAggError, match="own keys"):  # its slot, with another site's keys
        site_side.share(ctx, signed_hood([(1, "site-0", them, other), (2, "site-1", them, other),
                                          (3, "site-2", third, other)]), RUN, fed.cfg, me, None)
    with pytest.raises(site_side.SecAggError, match="appears twice"):
        site_side.share(ctx, signed_hood([(1, "site-0", me, keys), (2, "site-1", them, other),
                                          (3, "site-2", third, other)]), RUN, fed.cfg, me, None)
    with pytest.raises(site_side.SecAggError, match="name or ledger key appears twice"):
        step = signed_hood([(1, "site-0", me, keys), (2, "site-1", them, other)])
        step.fields[protocol.SA_NAMES][1] = b"site-0"
        site_side.share(ctx, step, RUN, fed.cfg, me, None)
    from cryptography.hazmat.primitives import serialization

    openssh = them.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    step = signed_hood([(1, "site-0", me, keys), (2, "site-1", them, other)])
    third_keys = site_side.setup(Context(run_id=7, node_id=2, node_config={}, state=RecordDict(), run_config={}),
                                 protocol.SecAggStep("setup", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 3}), RUN,
                                 them, "site-2")
    for k, v in ((protocol.SA_SLOTS, 3), (protocol.SA_PK1S, third_keys[protocol.SA_PK1]),
                 (protocol.SA_PK2S, third_keys[protocol.SA_PK2]), (protocol.SA_NAMES, b"site-2"),
                 (protocol.SA_LEDGER_KEYS, openssh),
                 (protocol.SA_KEY_SIGS, signing.sign(them, secure_sum.key_statement(
                     RUN, 1, 3, "site-2", openssh, third_keys[protocol.SA_PK1], third_keys[protocol.SA_PK2])))):
        step.fields[k].append(v)
    with pytest.raises(site_side.SecAggError, match="name or ledger key appears twice"):  # one key, two encodings
        site_side.share(ctx, step, RUN, fed.cfg, me, None)


def test_a_site_masks_one_update_per_round_ever(tmp_path):
    site_side.claim_round(tmp_path, RUN, 3)
    site_side.claim_round(tmp_path, RUN, 4)
    with pytest.raises(site_side.SecAggError, match="already"):
        site_side.claim_round(tmp_path, RUN, 3)
    assert (tmp_path / "secagg").is_dir()


# ---------------------------------------------------------------- the wire and the settings


def test_secagg_replies_with_a_missing_extra_or_mistyped_field_are_rejected():
    msg = protocol.secagg_instruction("setup", PLAN, 5, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 1})
    sig = {protocol.SA_KEY_SIG: b"s"}
    good = protocol.secagg_reply(msg, site="a", stage="setup", fields={protocol.SA_PK1: b"x", protocol.SA_PK2: b"y",
                                                                       **sig})
    assert isinstance(protocol.read_secagg_reply(good, "setup"), protocol.SecAggReply)
    for fields in ({protocol.SA_PK1: b"x", **sig}, {protocol.SA_PK1: b"x", protocol.SA_PK2: b"y", "extra": 1, **sig},
                   {protocol.SA_PK1: "x", protocol.SA_PK2: b"y", **sig},
                   {protocol.SA_PK1: b"x" * 5000, protocol.SA_PK2: b"y", **sig},
                   {protocol.SA_PK1: b"x", protocol.SA_PK2: b"y"}):
        bad = Message(RecordDict({protocol.SITE: protocol.ConfigRecord({protocol.NAME: "a"}),
                                  protocol.SECAGG: protocol.ConfigRecord(fields)}), reply_to=msg)
        assert isinstance(protocol.read_secagg_reply(bad, "setup"), protocol.Rejected)
    unmask = protocol.secagg_instruction("unmask", PLAN, 5, {protocol.SA_ROUND: 1, protocol.SA_ACTIVE: [1, 1],
                                                             protocol.SA_DROPPED: []})
    with pytest.raises(protocol.ProtocolError, match="listed twice"):
        protocol.read_secagg(unmask)


def test_the_threshold_is_a_majority_that_leaves_room_for_the_tolerated_dropouts():
    s = SecAggSettings(max_dropout_fraction=0.3)
    assert [s.threshold(n) for n in (3, 5, 6, 10, 11)] == [2, 3, 4, 7, 7]
    assert all(s.threshold(n) > n / 2 and n - s.threshold(n) >= int(0.3 * n) for n in range(3, 200))
    assert SecAggSettings(max_dropout_fraction=0.0).threshold(10) == 10
    auto = SecAggSettings()  # secagg_neighbours=null: everyone up to 20 sites, then a ring of 2 ceil(log2 n)
    assert [auto.share_count(n) for n in (3, 20, 21, 50, 100)] == [3, 20, 11, 13, 15]
    assert SecAggSettings(neighbours=0).share_count(50) == 50 and SecAggSettings(neighbours=6).share_count(50) == 7
    explicit = SecAggSettings(max_dropout_fraction=0.2, reconstruction_threshold=0.6)
    assert [explicit.threshold(n) for n in (3, 5, 10)] == [2, 3, 6]


@pytest.mark.parametrize("override, words", [
    (["federation.secure_aggregation=secaggplus", "federation.strategy=krum"], ["robust rule", "fedavg or fedprox"]),
    (["federation.secure_aggregation=secaggplus", "federation.strategy=fedadam"], ["FedAdam"]),
    (["federation.secure_aggregation=secaggplus", "federation.update_norm_bound=1"], ["update_norm_bound"]),
    (["federation.secure_aggregation=secaggplus", "federation.num_sites=2"], ["needs at least 3"]),
    (["federation.secure_aggregation=secaggplus", "federation.secagg_bits=40"], ["secagg_bits=40", "30"]),
    (["federation.secure_aggregation=secaggplus", "federation.secagg_neighbours=5"], ["secagg_neighbours=5"]),
    (["federation.secure_aggregation=secaggplus", "federation.secagg_max_dropout_fraction=0.5"], ["[0, 0.5)"]),
    (["federation.secure_aggregation=secaggplus", "federation.secagg_clip_range=0"], ["secagg_clip_range"]),
    (["federation.secure_aggregation=shamir"], ["off, secaggplus"]),
    (["federation.secagg_reconstruction_threshold=0.5"], ["(0.5, 1]"]),
    (["federation.secagg_reconstruction_threshold=0.9"], ["secagg_max_dropout_fraction=0.3", "lower one"]),
])
def test_settings_that_cannot_be_honest_are_refused_in_one_line(override, words):
    with pytest.raises(conf.ConfigError) as err:
        Config.load(override)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_site_that_requires_secure_aggregation_refuses_a_plan_without_it():
    from fedshield.client.app import PolicyError, check_policy

    for mode in ("dp-sgd", "none"):
        policy = Config.load([f"privacy.mode={mode}", "federation.secure_aggregation=secaggplus"])
        check_policy(Config.load([f"privacy.mode={mode}", "federation.secure_aggregation=secaggplus"]), policy)
        with pytest.raises(PolicyError, match="only masked"):
            check_policy(Config.load([f"privacy.mode={mode}"]), policy)


def test_the_mask_prg_is_aes_ctr_and_pairwise_masks_cancel():
    a, b = b"\x01" * 32, b"\x02" * 32
    x, y = secure_sum.prg(a, [(1000,)])[0], secure_sum.prg(a, [(1000,)])[0]
    assert np.array_equal(x, y) and not np.array_equal(x, secure_sum.prg(b, [(1000,)])[0])
    zero = {"w": np.zeros(1000, np.uint64)}
    one = secure_sum.mask(zero, 1, a, {2: b})
    two = secure_sum.mask(zero, 2, b"\x03" * 32, {1: b})
    total = secure_sum.unmask(secure_sum.add_up([one, two]), [a, b"\x03" * 32], [])
    assert not total["w"].any()


# ---------------------------------------------------------------- site-level DP: distributed Skellam noise

SECURE_SITE_LEVEL = ["federation.secure_aggregation=secaggplus", "privacy.unit=site", "training.center_features=false"]


def test_with_site_level_dp_each_site_clips_and_the_sum_holds_the_planned_skellam_noise():
    fed = Federation(5)
    fed.cfg = OmegaConf.merge(fed.cfg, {"privacy": {"unit": "site", "site_clip_norm": 0.5, "site_target_epsilon": 50.0,
                                                    "site_delta": 1e-3, "site_noise_multiplier": None},
                                        "federation": {"rounds": 3}})
    rng = np.random.default_rng(2)
    dim = 40_000
    fed.updates = {nid: {"w": rng.normal(0, 0.01, dim)} for nid in fed.names}
    fed.base = {"w": np.zeros(dim)}
    fed.weights = dict.fromkeys(fed.names, 1)
    out = fed.run()
    assert isinstance(out, Unmasked) and out.total_weight == 5 and len(out.thresholds) == 5
    clipped = [u["w"] * min(1.0, 0.5 / np.linalg.norm(u["w"])) for u in fed.updates.values()]
    residual = out.mean["w"] * out.total_weight - sum(clipped)  # the noise, in the update's units
    noise = site_side.round_noise(fed.cfg, dim)
    expected = sum(noise.per_site(t) for t in out.thresholds) / site_side.settings(fed.cfg).scale ** 2
    assert sum(noise.per_site(t) for t in out.thresholds) >= noise.total_variance  # over-provisioned for dropouts
    assert np.var(residual) == pytest.approx(expected, rel=0.05)
    assert abs(np.mean(residual)) < 5 * np.sqrt(expected / dim)


def test_the_federation_records_what_the_sum_held_and_the_audit_recomputes_the_skellam_bound(tmp_path):
    import json

    from fedshield.privacy.audit import audit
    from fedshield.privacy.ledger import SKELLAM_MECHANISM
    from fedshield.privacy.skellam import skellam_history_epsilon
    from fedshield.server.federation_books import open_books
    from fedshield.server.settings import CoordinatorSettings

    cfg = Config.load([*SECURE_SITE_LEVEL, "federation.rounds=3", "privacy.site_target_epsilon=4",
                            "privacy.site_delta=1e-3"])
    run = tmp_path / "run"
    books = open_books(CoordinatorSettings.from_config(cfg), run, simulated=True, dim=1000)
    assert books.noise is not None and books.mechanism.distributed
    mu = books.noise.total_variance
    for r, extra in ((1, 1.0), (2, 1.4), (3, 1.0)):
        assert books.record_skellam_round(r, mu * extra)
    assert not books.record_skellam_round(4, mu)  # a fourth round would pass the budget: not written
    ledger = run / "privacy" / "federation-ledger.jsonl"
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert [e["mechanism"] for e in entries] == [SKELLAM_MECHANISM] * 3
    assert entries[-1]["epsilon"] == pytest.approx(skellam_history_epsilon(
        [(mu, books.noise.l1, books.noise.l2), (1.4 * mu, books.noise.l1, books.noise.l2),
         (mu, books.noise.l1, books.noise.l2)], 1e-3))
    assert entries[-1]["epsilon"] < 4.0
    result = audit(ledger, max_epsilon=4.0)
    assert result.ok, result.flags
    federation = next(iter(result.sites.values()))  # judged by its own accountant, the Skellam bound
    assert federation.verdict_accountant == "skellam-rdp" and federation.verdict_epsilon < 4.0
    from fedshield.privacy.report import write_report

    md, _ = write_report(result, tmp_path / "audit")  # the ε plot has the Skellam chain's points too
    assert "fedshield's Skellam RDP bound" in md.read_text() and (tmp_path / "audit" / "epsilon.png").is_file()
    with pytest.raises(Exception, match="less than the planned"):
        books.record_skellam_round(5, mu / 2)
    edited = dict(entries[1], skellam_variance=entries[1]["skellam_variance"] * 10)
    ledger.write_text("\n".join(json.dumps(e) for e in [entries[0], edited, entries[2]]) + "\n")
    assert not audit(ledger).ok  # a tampered entry fails


def test_an_explicit_site_noise_that_overspends_under_secure_aggregation_is_refused(tmp_path):
    from fedshield.privacy.errors import FedShieldError
    from fedshield.server.federation_books import open_books
    from fedshield.server.settings import CoordinatorSettings

    cfg = Config.load([*SECURE_SITE_LEVEL, "privacy.site_noise_multiplier=0.1", "privacy.site_delta=1e-3"])
    with pytest.raises(FedShieldError, match="distributed Skellam noise spend"):
        open_books(CoordinatorSettings.from_config(cfg), tmp_path, simulated=True, dim=100)


def test_a_site_whose_seed_commitment_is_not_a_digest_is_dropped_at_sharing_and_the_round_goes_on():
    fed = Federation(5)
    real = fed.send_and_receive

    def bad_commitment(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        for reply in replies:
            if protocol.SECAGG in reply.content and protocol.SA_COMMITMENT in reply.content[protocol.SECAGG]:
                if reply.content[protocol.SITE][protocol.NAME] == "site-3":
                    fields = dict(reply.content[protocol.SECAGG])
                    fields[protocol.SA_COMMITMENT] = b"x" * 100
                    reply.content[protocol.SECAGG] = protocol.ConfigRecord(fields)
        return replies

    fed.send_and_receive = bad_commitment  # type: ignore[method-assign]
    out = fed.run()
    assert isinstance(out, Unmasked) and "site-3" not in out.sites
    plain = fed.plain_mean(out.sites)
    assert np.max(np.abs(out.mean["head.bias"] - plain["head.bias"])) <= step_size()


# ---------------------------------------------------------------- a malicious coordinator (Bell et al. 2020)

VICTIM = 1000  # site-0: slot 1 (slots follow the names' order)


class HostileCoordinator(Federation):
    """A coordinator that rewrites the share stage VICTIM is sent: every neighbour's (or only
    `only`'s) `swap` key ("pk1": the mask key, "pk2": the key its shares are encrypted to)
    replaced by one of its own; with `resign`, the neighbour's ledger key replaced by one of
    its own too and the round keys signed with it (else the real signature is left); with
    `forge_views`, it also plays those neighbours at the check stage: shares of its own and
    the victim's own view signed under those ledger keys."""

    def __init__(self, n: int, swap: str, *, resign: bool, forge_views: bool = False,
                 only: set[int] | None = None, **kw: object) -> None:
        super().__init__(n, **kw)
        self.swap, self.resign, self.forge_views, self.only = swap, resign, forge_views, only
        self.active = True
        self.fake_sk: dict[int, object] = {}  # slot -> the coordinator's private key in place of the neighbour's
        self.fake_ledger: dict[int, ec.EllipticCurvePrivateKey] = {}
        self.statements: dict[int, bytes] = {}  # the key statements of the victim's view
        self.victim_pk2 = b""
        self.victim_ciphertexts: dict[int, bytes] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = [self._rewrite(m) for m in messages]
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == VICTIM and protocol.SECAGG in reply.content:
                fields = reply.content[protocol.SECAGG]
                if protocol.SA_PK2 in fields:
                    self.victim_pk2 = fields[protocol.SA_PK2]
                if protocol.SA_DESTINATIONS in fields:
                    self.victim_ciphertexts = dict(zip(fields[protocol.SA_DESTINATIONS],
                                                       fields[protocol.SA_CIPHERTEXTS], strict=True))
        return replies

    def _rewrite(self, msg: Message) -> Message:
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

        step = protocol.read_secagg(msg)
        if not self.active or msg.metadata.dst_node_id != VICTIM or step is None:
            return msg
        if step.stage == "check":
            return self._rewrite_check(msg)
        if step.stage != "share":
            return msg
        f = {k: list(v) if isinstance(v, list) else v for k, v in msg.content[protocol.SECAGG].items()}
        for i, slot in enumerate(f[protocol.SA_SLOTS]):
            if slot != 1 and (self.only is None or slot in self.only):
                sk, pk = generate_key_pairs()
                self.fake_sk[slot] = sk
                f[protocol.SA_PK1S if self.swap == "pk1" else protocol.SA_PK2S][i] = public_key_to_bytes(pk)
                if self.resign:
                    self.fake_ledger[slot] = ec.generate_private_key(signing.CURVE())
                    f[protocol.SA_LEDGER_KEYS][i] = signing.public_key_pem(self.fake_ledger[slot])
            statement = secure_sum.key_statement(RUN, step.server_round, slot, f[protocol.SA_NAMES][i].decode(),
                                                 f[protocol.SA_LEDGER_KEYS][i], f[protocol.SA_PK1S][i],
                                                 f[protocol.SA_PK2S][i])
            self.statements[slot] = statement
            if slot in self.fake_ledger:
                f[protocol.SA_KEY_SIGS][i] = signing.sign(self.fake_ledger[slot], statement)
        msg.content[protocol.SECAGG] = protocol.ConfigRecord(f)
        rnd = self.attacker.round_state(step.server_round)  # its books agree with what it showed the victim
        assert rnd is not None
        rnd.view[1] = secure_sum.view(self.statements)
        return msg

    def coordinator(self) -> SecAggPlus:
        self.attacker = super().coordinator()
        return self.attacker

    def collect(self, coordinator: SecAggPlus, server_round: int = 1) -> dict[int, dict[str, np.ndarray]]:
        vectors = super().collect(coordinator, server_round)
        if self.active and self.forge_views and VICTIM not in vectors and ("check", "site-0") not in {
                (stage, site) for stage, site, _ in self.declined}:  # the sybils' round goes on for the victim
            step = protocol.SecAggStep("collect", server_round, {protocol.SA_ROUND: server_round,
                                                                 protocol.SA_SOURCES: sorted(self.fake_ledger)})
            state = site_side.begin_collect(self.contexts[VICTIM], step, RUN)
            vectors[VICTIM] = site_side.masked(self.contexts[VICTIM], state, self.updates[VICTIM], self.base,
                                               self.weights[VICTIM], self.cfg)
        return vectors

    def _rewrite_check(self, msg: Message) -> Message:
        if not self.forge_views:
            return msg
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
        from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
        from flwr.supercore.primitives.asymmetric import bytes_to_public_key

        f = {k: list(v) if isinstance(v, list) else v for k, v in msg.content[protocol.SECAGG].items()}
        seen = secure_sum.view(self.statements)
        for i, src in enumerate(f[protocol.SA_SOURCES]):
            if src in self.fake_ledger:  # the sybil's own shares (of nothing), its own view signature
                key = generate_shared_key(self.fake_sk[src], bytes_to_public_key(self.victim_pk2))
                f[protocol.SA_CIPHERTEXTS][i] = encrypt(key, share_keys_plaintext_concat(src, 1, b"b" * 70, b"k" * 70))
                f[protocol.SA_VIEWS][i] = seen
                f[protocol.SA_VIEW_SIGS][i] = signing.sign(
                    self.fake_ledger[src], secure_sum.view_statement(RUN, 1, src, seen))
        msg.content[protocol.SECAGG] = protocol.ConfigRecord(f)
        return msg

    def recover(self, vectors: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The pk2 man in the middle's payoff: the victim's update from its masked vector and
        the shares it encrypted to the coordinator's keys (None: there is nothing to recover)."""
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
        from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
        from flwr.supercore.primitives.asymmetric import bytes_to_public_key

        from fedshield.privacy import shamir

        if VICTIM not in vectors:
            return None
        b_shares, sk1_shares = [], []
        for slot, ciphertext in self.victim_ciphertexts.items():
            if slot in self.fake_sk:
                key = generate_shared_key(self.fake_sk[slot], bytes_to_public_key(self.victim_pk2))
                _, _, b_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
                b_shares.append(b_share)
                sk1_shares.append(sk1_share)
        t = site_side.settings(self.cfg).threshold(len(self.statements))
        seed, sk1 = shamir.combine(b_shares[:t]), secure_sum.mask_key_from_secret(shamir.combine(sk1_shares[:t]))
        pairs = []
        for slot, statement in self.statements.items():
            if slot != 1:
                pk1 = self._pk1_in(statement)
                pairs.append((slot, 1, secure_sum.pairwise_seed(generate_shared_key(sk1, bytes_to_public_key(pk1)))))
        _, mean = secure_sum.decode(secure_sum.unmask(vectors[VICTIM], [seed], pairs), site_side.settings(self.cfg))
        return mean

    @staticmethod
    def _pk1_in(statement: bytes) -> bytes:
        """The pk1 field of a key statement (length-prefixed fields after the tag)."""
        at, fields = statement.index(b"\0") + 1, []
        while at < len(statement):
            size = int.from_bytes(statement[at:at + 4], "big")
            fields.append(statement[at + 4:at + 4 + size])
            at += 4 + size
        return fields[5]


def _attack(fed: HostileCoordinator) -> tuple[SecureRound | Unmasked, dict[int, dict[str, np.ndarray]]]:
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    vectors = fed.collect(coordinator)
    return coordinator.finish(1, vectors, fed), vectors


def test_a_mask_key_swapped_in_one_sites_view_is_refused_before_it_shares_and_the_round_goes_on_without_it():
    fed = HostileCoordinator(6, "pk1", resign=False)
    out, vectors = _attack(fed)
    assert [(stage, site) for stage, site, _ in fed.declined] == [("share", "site-0")]
    assert "not signed by the ledger key forwarded with them" in fed.declined[0][2]
    assert VICTIM not in vectors and "site-0" not in [site for site, _ in fed.unmasked]
    assert isinstance(out, Unmasked) and "site-0" not in out.sites  # the others' round is unharmed
    assert np.max(np.abs(out.mean["head.bias"] - fed.plain_mean(out.sites)["head.bias"])) <= step_size()


@pytest.mark.parametrize("swap", ["pk1", "pk2"])
def test_a_key_swapped_under_a_ledger_key_of_the_coordinators_is_caught_by_the_neighbours_views(swap):
    # The coordinator swaps one neighbour's key (site-1, slot 2) in the victim's view and signs it
    # with a ledger key of its own, which the victim cannot tell from site-1's: the views differ.
    fed = HostileCoordinator(6, swap, resign=True, only={2})
    out, vectors = _attack(fed)
    assert ("check", "site-0") in {(stage, site) for stage, site, _ in fed.declined}
    assert all("showed different views" in reason for stage, _, reason in fed.declined if stage == "check")
    assert VICTIM not in vectors  # the victim never masks: there is nothing of it to unmask
    assert isinstance(out, SecureRound) and out.skipped  # all of its neighbours saw the mismatch too
    assert not fed.unmasked and not [s for s in fed.sent if s[0] == "unmask"]


def test_a_man_in_the_middle_of_every_pk2_gets_shares_of_a_vector_that_is_never_sent():
    fed = HostileCoordinator(6, "pk2", resign=True)  # every neighbour's pk2, under the coordinator's ledger keys
    out, vectors = _attack(fed)
    assert ("check", "site-0") in {(stage, site) for stage, site, _ in fed.declined}
    assert fed.recover(vectors) is None
    assert isinstance(out, SecureRound) and not fed.unmasked


def test_without_pins_a_coordinator_that_fakes_every_neighbour_on_first_contact_recovers_the_update():
    """The documented limit (docs/auditor.md): with no pinned key and no PKI, a coordinator that
    presents the victim a whole neighbourhood of its own (sybils: every ledger key, every view
    signature its own) reads its update. This is the attack the pins below stop."""
    fed = HostileCoordinator(6, "pk2", resign=True, forge_views=True)
    _, vectors = _attack(fed)
    got = fed.recover(vectors)
    assert got is not None
    assert np.max(np.abs(got["head.bias"] - fed.updates[VICTIM]["head.bias"])) <= step_size()


def test_with_pinned_ledger_keys_a_coordinator_that_fakes_every_neighbour_is_refused(tmp_path):
    fed = HostileCoordinator(6, "pk2", resign=True, forge_views=True, state_root=tmp_path)
    fed.active = False
    coordinator = fed.coordinator()
    assert isinstance(fed.run(coordinator, server_round=1), Unmasked)  # an honest round pins the neighbours' keys
    pins = json.loads((tmp_path / "site-0" / "secagg" / site_side.PEERS).read_text())
    assert pins == {name: signing.fingerprint(fed.keys[nid]) for nid, name in fed.names.items()}
    fed.active, fed.victim_ciphertexts = True, {}
    coordinator.prepare(2, list(fed.names), PLAN, fed)
    assert [(stage, site) for stage, site, _ in fed.declined] == [("share", "site-0")]
    assert "not the one pinned" in fed.declined[0][2] and "\n" not in fed.declined[0][2]
    assert not fed.victim_ciphertexts  # no share of the victim's secrets was made


def test_a_closed_list_of_peers_refuses_a_name_the_coordinator_made_up(tmp_path):
    # Pinning on first use cannot tell a new site from a sybil under a fresh name; an operator
    # who exchanged fingerprints closes the list, and a name not in it stops the site.
    fed = HostileCoordinator(6, "pk2", resign=True, forge_views=True, state_root=tmp_path)
    pins = {name: signing.fingerprint(fed.keys[nid]) for nid, name in fed.names.items() if name != "site-5"}
    folder = tmp_path / "site-0" / "secagg"
    folder.mkdir(parents=True)
    (folder / site_side.PEERS).write_text(json.dumps({**pins, "*": "closed"}))
    fed.active = False
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    assert [(stage, site) for stage, site, _ in fed.declined] == [("share", "site-0")]
    assert "'site-5'" in fed.declined[0][2] and "closed list" in fed.declined[0][2]
    assert json.loads((folder / site_side.PEERS).read_text()) == {**pins, "*": "closed"}  # nothing pinned


def test_a_site_whose_shares_do_not_decrypt_is_dropped_and_the_round_goes_on():
    fed = Federation(6)
    real = fed.send_and_receive

    def garbage_from_site_3(messages, *, timeout=None):  # site-3 (slot 4) sends junk to slots 1 and 2
        replies = real(messages, timeout=timeout)
        for reply in replies:
            fields = reply.content.get(protocol.SECAGG)
            if reply.content[protocol.SITE][protocol.NAME] == "site-3" and protocol.SA_DESTINATIONS in fields:
                f = {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}
                for i, dst in enumerate(f[protocol.SA_DESTINATIONS]):
                    if dst in (1, 2):
                        f[protocol.SA_CIPHERTEXTS][i] = b"not a fernet token"
                reply.content[protocol.SECAGG] = protocol.ConfigRecord(f)
        return replies

    fed.send_and_receive = garbage_from_site_3  # type: ignore[method-assign]
    coordinator = fed.coordinator()
    rnd = coordinator.prepare(1, list(fed.names), PLAN, fed)
    assert rnd.dropped == {"site-3": "check: its shares did not decrypt at 2 neighbour(s)"}
    out = coordinator.finish(1, fed.collect(coordinator), fed)
    assert not fed.declined  # no stage of any site failed
    assert isinstance(out, Unmasked), getattr(out, "skipped", "")
    assert out.sites == ("site-0", "site-1", "site-2", "site-4", "site-5")
    plain = fed.plain_mean(out.sites)
    for k in SHAPES:
        assert np.max(np.abs(out.mean[k] - plain[k])) <= step_size()


def test_a_site_whose_shares_all_fail_is_dropped_and_nobody_masked_with_it():
    fed = Federation(5)
    real = fed.send_and_receive

    def all_garbage(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        for reply in replies:
            fields = reply.content.get(protocol.SECAGG)
            if reply.content[protocol.SITE][protocol.NAME] == "site-4" and protocol.SA_DESTINATIONS in fields:
                f = dict(fields)
                f[protocol.SA_CIPHERTEXTS] = [b"junk"] * len(f[protocol.SA_CIPHERTEXTS])
                reply.content[protocol.SECAGG] = protocol.ConfigRecord(f)
        return replies

    fed.send_and_receive = all_garbage  # type: ignore[method-assign]
    coordinator = fed.coordinator()
    coordinator.prepare(1, list(fed.names), PLAN, fed)
    out = coordinator.finish(1, fed.collect(coordinator), fed)
    assert isinstance(out, Unmasked), getattr(out, "skipped", "")
    assert "site-4" not in out.sites
    assert np.max(np.abs(out.mean["head.bias"] - fed.plain_mean(out.sites)["head.bias"])) <= step_size()


def test_a_report_of_shares_a_site_was_never_sent_drops_the_reporter_not_the_accused():
    fed = Federation(5)
    real = fed.send_and_receive

    def false_report(messages, *, timeout=None):  # site-1 blames slot 9, which is not in the round
        replies = real(messages, timeout=timeout)
        for reply in replies:
            fields = reply.content.get(protocol.SECAGG)
            if reply.content[protocol.SITE][protocol.NAME] == "site-1" and protocol.SA_UNREADABLE in fields:
                reply.content[protocol.SECAGG] = protocol.ConfigRecord({protocol.SA_UNREADABLE: [9]})
        return replies

    fed.send_and_receive = false_report  # type: ignore[method-assign]
    coordinator = fed.coordinator()
    rnd = coordinator.prepare(1, list(fed.names), PLAN, fed)
    assert rnd.dropped == {"site-1": "check: reported shares it was not sent"}
    out = coordinator.finish(1, fed.collect(coordinator), fed)
    assert isinstance(out, Unmasked) and out.sites == ("site-0", "site-2", "site-3", "site-4")


# ---------------------------------------------------------------- Shamir over GF(2^31 - 1) (privacy/shamir.py)


@pytest.mark.parametrize("size, t, n", [(32, 2, 3), (48, 35, 50), (48, 9, 13), (1, 1, 1), (100, 7, 7)])
def test_shamir_rebuilds_the_secret_from_any_t_shares(size, t, n):
    from fedshield.privacy import shamir

    rng = random.Random(size * 1000 + t)
    secret = bytes(rng.randrange(256) for _ in range(size))
    shares = shamir.split(secret, t, n)
    assert len(shares) == n and len(set(shares)) == n
    for _ in range(5):
        assert shamir.combine(rng.sample(shares, t)) == secret


def test_shamir_with_fewer_than_t_shares_fails_or_gives_another_secret():
    from fedshield.privacy import shamir

    secret = bytes(range(48))
    for t in (2, 5, 35):
        shares = shamir.split(secret, t, t + 3)
        try:
            assert shamir.combine(shares[:t - 1]) != secret
        except ValueError:
            pass


def test_shamir_t_minus_1_shares_are_uniform_whatever_the_secret():
    """Information-theoretic hiding, checked empirically: with t = 2, the one share a party
    holds is uniform over the field for a secret of all zeros and for one of all ones."""
    from fedshield.privacy import shamir

    def first_share_top_bits(secret: bytes) -> np.ndarray:
        values = [np.frombuffer(shamir.split(secret, 2, 3)[0][6:], dtype=">u4") for _ in range(400)]
        return (np.concatenate(values).astype(np.int64) >> 26)  # top 5 of 31 bits: 32 buckets (the last is short)

    for secret in (bytes(30), b"\xff" * 30):
        counts = np.bincount(first_share_top_bits(secret), minlength=32)
        expected = np.full(32, 4000 * (2**26) / (2**31 - 1))
        expected[-1] = 4000 - expected[:-1].sum()
        assert stats.chisquare(counts, expected).pvalue > 1e-4


def test_shamir_refuses_malformed_or_mixed_shares_in_one_line():
    from fedshield.privacy import shamir

    a, b = shamir.split(b"a" * 32, 2, 3), shamir.split(b"b" * 48, 2, 3)
    for bad in ([a[0], b[1]], [a[0], a[0]], [a[0][:-1], a[1][:-1]], [], [a[0][:5]]):
        with pytest.raises(ValueError) as err:
            shamir.combine(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        shamir.split(b"", 2, 3)
    with pytest.raises(ValueError):
        shamir.split(b"x", 4, 3)


def test_shamir_shares_travel_in_the_encrypted_share_and_the_unmask_reply():
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    from fedshield.privacy import shamir

    seed, scalar = bytes(range(32)), bytes(range(48))
    b_shares, k_shares = shamir.split(seed, 3, 5), shamir.split(scalar, 3, 5)
    assert max(len(s) for s in b_shares + k_shares) <= protocol.MAX_SECAGG_BYTES
    sk, pk = generate_key_pairs()
    key = generate_shared_key(sk, pk)
    _, _, b_share, k_share = share_keys_plaintext_separate(decrypt(key, encrypt(
        key, share_keys_plaintext_concat(1, 2, b_shares[1], k_shares[1]))))
    assert (b_share, k_share) == (b_shares[1], k_shares[1])
    msg = protocol.secagg_instruction("unmask", PLAN, 5, {protocol.SA_ROUND: 1, protocol.SA_ACTIVE: [1, 2, 3],
                                                          protocol.SA_DROPPED: []})
    reply = protocol.read_secagg_reply(protocol.secagg_reply(msg, site="a", stage="unmask", fields={
        protocol.SA_SLOTS: [1, 2, 3], protocol.SA_SHARES: b_shares[:3]}), "unmask")
    assert isinstance(reply, protocol.SecAggReply)
    assert shamir.combine(reply.fields[protocol.SA_SHARES]) == seed

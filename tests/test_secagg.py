"""SecAgg+ (federation.secure_aggregation=secaggplus): the coordinator's stages
(strategies/secagg.py) against the sites' own stage code (client/secagg.py), message by
message through the protocol, with dropouts at every stage, hostile requests, and the
arithmetic (privacy/secure_sum.py) checked against the plaintext sum."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from omegaconf import OmegaConf
from scipy import stats

import conf
import protocol
from client import secagg as site_side
from privacy import secure_sum
from privacy.secure_sum import SecAggSettings
from strategies.secagg import SecAggPlus, SecureRound, Unmasked

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

    def __init__(self, n: int, vanish: Iterable[tuple[str, str]] = (), **fed: object) -> None:
        self.names = {1000 + i: f"site-{i}" for i in range(n)}
        self.contexts = {nid: Context(run_id=7, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in self.names}
        self.cfg = site_cfg(**fed)
        self.vanish = set(vanish)
        self.sent: list[tuple[str, str]] = []  # (stage, site)
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
                    fields = site_side.setup(ctx, step, RUN)
                elif step.stage == "share":
                    fields = site_side.share(ctx, step, RUN, self.cfg)
                else:
                    fields = site_side.unmask(ctx, step, RUN)
            except site_side.SecAggError as exc:
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
            state = site_side.receive_shares(self.contexts[nid], step, RUN)
            vectors[nid] = site_side.masked(self.contexts[nid], state, self.updates[nid], self.base,
                                            self.weights[nid], self.cfg)
        return vectors

    def run(self, coordinator: SecAggPlus | None = None, server_round: int = 1) -> SecureRound | Unmasked:
        coordinator = coordinator or self.coordinator()
        coordinator.prepare(server_round, list(self.names), PLAN, self)
        return coordinator.finish(server_round, self.collect(coordinator, server_round), self)

    def coordinator(self) -> SecAggPlus:
        return SecAggPlus(secure_sum.settings_of(self.cfg.federation), self.names, timeout=1.0, rng=random.Random(3))

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
    state = site_side.receive_shares(fed.contexts[nid], protocol.read_secagg(msg), RUN)
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


def test_a_site_refuses_a_neighbourhood_without_its_own_keys_or_with_a_key_twice():
    fed = Federation(4)
    nid = next(iter(fed.names))
    ctx = fed.contexts[nid]
    keys = site_side.setup(ctx, protocol.SecAggStep("setup", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 1}), RUN)
    other = site_side.setup(Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                            protocol.SecAggStep("setup", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 2}), RUN)

    def share(pk1s, pk2s):
        return protocol.SecAggStep("share", 1, {protocol.SA_ROUND: 1, protocol.SA_SLOTS: [1, 2, 3],
                                                protocol.SA_PK1S: pk1s, protocol.SA_PK2S: pk2s})

    mine, theirs = (keys[protocol.SA_PK1], keys[protocol.SA_PK2]), (other[protocol.SA_PK1], other[protocol.SA_PK2])
    with pytest.raises(site_side.SecAggError, match="own keys"):
        site_side.share(ctx, share([theirs[0]] * 3, [theirs[1]] * 3), RUN, fed.cfg)
    with pytest.raises(site_side.SecAggError, match="appears twice"):
        site_side.share(ctx, share([mine[0], theirs[0], theirs[0]], [mine[1], theirs[1], theirs[1]]), RUN, fed.cfg)


def test_a_site_masks_one_update_per_round_ever(tmp_path):
    site_side.claim_round(tmp_path, RUN, 3)
    site_side.claim_round(tmp_path, RUN, 4)
    with pytest.raises(site_side.SecAggError, match="already"):
        site_side.claim_round(tmp_path, RUN, 3)
    assert (tmp_path / "secagg").is_dir()


# ---------------------------------------------------------------- the wire and the settings


def test_secagg_replies_with_a_missing_extra_or_mistyped_field_are_rejected():
    msg = protocol.secagg_instruction("setup", PLAN, 5, {protocol.SA_ROUND: 1, protocol.SA_SLOT: 1})
    good = protocol.secagg_reply(msg, site="a", stage="setup", fields={protocol.SA_PK1: b"x", protocol.SA_PK2: b"y"})
    assert isinstance(protocol.read_secagg_reply(good, "setup"), protocol.SecAggReply)
    for fields in ({protocol.SA_PK1: b"x"}, {protocol.SA_PK1: b"x", protocol.SA_PK2: b"y", "extra": 1},
                   {protocol.SA_PK1: "x", protocol.SA_PK2: b"y"},
                   {protocol.SA_PK1: b"x" * 5000, protocol.SA_PK2: b"y"}):
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
        conf.load_config(override)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_site_that_requires_secure_aggregation_refuses_a_plan_without_it():
    from client.app import PolicyError, check_policy

    for mode in ("dp-sgd", "none"):
        policy = conf.load_config([f"privacy.mode={mode}", "federation.secure_aggregation=secaggplus"])
        check_policy(conf.load_config([f"privacy.mode={mode}", "federation.secure_aggregation=secaggplus"]), policy)
        with pytest.raises(PolicyError, match="only masked"):
            check_policy(conf.load_config([f"privacy.mode={mode}"]), policy)


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

    from privacy.audit import audit
    from privacy.ledger import SKELLAM_MECHANISM
    from privacy.skellam import skellam_history_epsilon
    from server.federation_books import open_books

    cfg = conf.load_config([*SECURE_SITE_LEVEL, "federation.rounds=3", "privacy.site_target_epsilon=4",
                            "privacy.site_delta=1e-3"])
    run = tmp_path / "run"
    books = open_books(cfg, run, simulated=True, dim=1000)
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
    result = audit(ledger)
    assert result.ok, result.flags
    with pytest.raises(Exception, match="less than the planned"):
        books.record_skellam_round(5, mu / 2)
    edited = dict(entries[1], skellam_variance=entries[1]["skellam_variance"] * 10)
    ledger.write_text("\n".join(json.dumps(e) for e in [entries[0], edited, entries[2]]) + "\n")
    assert not audit(ledger).ok  # a tampered entry fails


def test_an_explicit_site_noise_that_overspends_under_secure_aggregation_is_refused(tmp_path):
    from privacy.errors import FedShieldError
    from server.federation_books import open_books

    cfg = conf.load_config([*SECURE_SITE_LEVEL, "privacy.site_noise_multiplier=0.1", "privacy.site_delta=1e-3"])
    with pytest.raises(FedShieldError, match="distributed Skellam noise spend"):
        open_books(cfg, tmp_path, simulated=True, dim=100)


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

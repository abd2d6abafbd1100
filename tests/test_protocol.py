"""The wire: every builder's message parses back to what was built, and every way a reply
can break the protocol is one line from a reader that never raises."""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedshield import protocol

EXPECTED = {"w": ((2, 3), np.dtype(np.float32)), "b": ((3,), np.dtype(np.float32))}
PEM = "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----\n"


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def plan(**extra) -> ConfigRecord:
    record = protocol.plan_record(config_yaml="task:\n  name: news-topics\n", run_id="run-1", run_dir="/runs/run-1",
                                  frozen_fingerprint="abc", class_names=["a", "b"])
    for k, v in extra.items():
        record[k] = v
    return record


def train_instruction(node: int = 5, **extra) -> Message:
    weights = {k: np.zeros(shape, dtype) for k, (shape, dtype) in EXPECTED.items()}
    content = RecordDict({protocol.PLAN: plan(**{protocol.SERVER_ROUND: 3, **extra}),
                          protocol.ARRAYS: protocol.to_array_record(weights)})
    return Message(content=content, message_type=protocol.TRAIN, dst_node_id=node)


def weights(**changes) -> dict[str, np.ndarray]:
    out = {k: np.ones(shape, dtype) for k, (shape, dtype) in EXPECTED.items()}
    out.update(changes)
    return out


def good_train_reply(instruction: Message | None = None, **metrics) -> Message:
    msg = instruction or train_instruction()
    return protocol.train_reply(msg, site="st-marys", arrays=weights(), num_examples=40,
                                ledger_entries=[{"seq": 0, "epsilon": 1.0}])


def with_content(msg: Message, content: RecordDict) -> Message:
    msg.content = content
    return msg


# ------------------------------------------------------------ round trips


def test_plan_round_trips_and_adds_what_flower_adds():
    got = protocol.read_plan(train_instruction(**{protocol.PROXIMAL_MU: 0.1}))
    assert got == protocol.Plan(config_yaml="task:\n  name: news-topics\n", run_id="run-1", run_dir="/runs/run-1",
                                frozen_fingerprint="abc", class_names=("a", "b"), server_round=3, proximal_mu=0.1)
    centred = protocol.with_feature_center(plan(), [0.5, -1.0])
    hello = protocol.instruction(protocol.FEATURE_SUM, centred, 9)
    assert hello.metadata.message_type == "query.feature_mean" and hello.metadata.dst_node_id == 9
    assert protocol.read_plan(hello).feature_center == (0.5, -1.0)
    assert protocol.FEATURE_CENTER not in plan()  # with_feature_center copies


def test_train_reply_round_trips():
    got = protocol.read_train_reply(good_train_reply(), EXPECTED)
    assert isinstance(got, protocol.TrainReply)
    assert (got.site, got.num_examples) == ("st-marys", 40)
    assert got.ledger_entries == ({"seq": 0, "epsilon": 1.0},)
    assert set(got.arrays) == {"w", "b"} and got.arrays["w"].sum() == 6
    content = protocol.aggregation_content(got)
    assert set(content.keys()) == {protocol.ARRAYS, protocol.METRICS}
    assert dict(content[protocol.METRICS]) == {protocol.NUM_EXAMPLES: 40}


def test_hello_feature_sum_and_decline_round_trip():
    q = protocol.instruction(protocol.HELLO, plan(), 4)
    hello = protocol.read_hello(protocol.hello_reply(q, site="VA Long Beach", num_examples=12, ledger_public_key=PEM))
    assert hello == protocol.SiteHello("VA Long Beach", 12, PEM)
    fs = protocol.instruction(protocol.FEATURE_SUM, plan(), 4)
    total = np.arange(4, dtype=np.float64)
    got = protocol.read_feature_sum(protocol.feature_sum_reply(fs, site="a", num_examples=3, feature_sum=total,
                                                               ledger_entries=[]), width=4)
    assert isinstance(got, protocol.FeatureSumReply) and got.feature_sum.tolist() == [0, 1, 2, 3]
    assert protocol.read_feature_sum(protocol.feature_sum_reply(fs, site="a", num_examples=3, feature_sum=total,
                                                                ledger_entries=[]), width=5) == protocol.Rejected(
        "arrays: tensor 'feature-sum' has shape (4,), expected (5,)", "a")
    no = protocol.decline_reply(q, site="a", kind="budget", reason="over\nbudget   now")
    for read in (protocol.read_hello, lambda m: protocol.read_train_reply(m, EXPECTED),
                 lambda m: protocol.read_feature_sum(m, 4)):
        assert read(no) == protocol.Decline("a", "budget", "over budget now")  # one line


def test_flower_errors_are_failures_with_the_last_line():
    err = Message(Error(code=3, reason="Traceback (most recent call last):\n  File x\nValueError: bad thing\n"),
                  reply_to=train_instruction())
    assert protocol.read_train_reply(err, EXPECTED) == protocol.Failed("ValueError: bad thing")
    wrapped = Message(Error(code=3, reason="<class 'flwr.ClientAppException'>:<'\nException ClientAppException "
                            "occurred. Message: boom\nValueError: site vanished'>"), reply_to=train_instruction())
    assert protocol.read_train_reply(wrapped, EXPECTED) == protocol.Failed("ValueError: site vanished")


# ------------------------------------------------------------ hostile replies


def _bad(mutate) -> protocol.Rejected:
    msg = good_train_reply()
    mutate(msg.content)
    got = protocol.read_train_reply(msg, EXPECTED)
    assert isinstance(got, protocol.Rejected), got
    assert "\n" not in got.reason
    return got


@pytest.mark.parametrize("mutate, says", [
    (lambda c: c.__delitem__(protocol.LEDGER), "record 'ledger' is missing"),
    (lambda c: c.__setitem__("extra", ConfigRecord({"x": 1})), "unexpected record 'extra'"),
    (lambda c: c[protocol.METRICS].__setitem__("accuracy", 0.9), "metrics: unexpected key 'accuracy'"),
    (lambda c: c[protocol.METRICS].__delitem__(protocol.NUM_EXAMPLES), "metrics: 'num-examples' is missing"),
    (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, 1e9), "expected an integer"),
    (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, 0), "must be between 1 and"),
    (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, -5), "must be between 1 and"),
    (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, 2**40), "must be between 1 and"),
    (lambda c: c[protocol.METRICS].__setitem__("train-loss", 0.5), "metrics: unexpected key 'train-loss'"),
    (lambda c: c.__setitem__(protocol.METRICS, ConfigRecord({"num-examples": 4})), "expected a MetricRecord"),
    (lambda c: c[protocol.SITE].__setitem__(protocol.NAME, "/abs/dir/evil2"), "name '/abs/dir/evil2' is not valid"),
    (lambda c: c[protocol.SITE].__setitem__(protocol.NAME, ".."), "is not valid"),
    (lambda c: c[protocol.SITE].__setitem__(protocol.NAME, 7), "site.name: expected text"),
    (lambda c: c[protocol.SITE].__setitem__("role", "admin"), "site: unexpected key 'role'"),
    (lambda c: c[protocol.LEDGER].__setitem__(protocol.ENTRIES, "{not json"), "ledger.entries: not valid JSON"),
    (lambda c: c[protocol.LEDGER].__setitem__(protocol.ENTRIES, json.dumps({"a": 1})), "expected a JSON list"),
    (lambda c: c[protocol.LEDGER].__setitem__(protocol.ENTRIES, "[1, 2]"), "expected a JSON list of entries"),
    (lambda c: c[protocol.ARRAYS].__setitem__("w", Array(np.full((2, 3), np.nan, np.float32))), "non-finite"),
    (lambda c: c[protocol.ARRAYS].__setitem__("w", Array(np.zeros((3, 2), np.float32))), "has shape (3, 2)"),
    (lambda c: c[protocol.ARRAYS].__setitem__("w", Array(np.zeros((2, 3), np.float64))), "has dtype float64"),
    (lambda c: c[protocol.ARRAYS].__delitem__("b"), "missing tensor 'b'"),
    (lambda c: c[protocol.ARRAYS].__setitem__("z", Array(np.zeros(1, np.float32))), "unexpected tensor 'z'"),
])
def test_a_reply_that_breaks_the_protocol_is_rejected_in_one_line(mutate, says):
    assert says in _bad(mutate).reason


def test_a_decline_must_be_exactly_a_decline():
    q = train_instruction()
    msg = protocol.decline_reply(q, site="a", kind="budget", reason="no")
    msg.content[protocol.DECLINE][protocol.KIND] = "vacation"
    assert "decline.kind='vacation'" in protocol.read_train_reply(msg, EXPECTED).reason
    msg = protocol.decline_reply(q, site="a", kind="budget", reason="no")
    msg.content[protocol.ARRAYS] = ArrayRecord()  # weights smuggled into a decline
    assert protocol.read_train_reply(msg, EXPECTED) == protocol.Rejected("unexpected record 'arrays'", "a")


def test_a_reply_of_the_wrong_record_types_never_raises():
    msg = with_content(good_train_reply(), RecordDict({protocol.SITE: MetricRecord({"x": 1.0}),
                                                       protocol.ARRAYS: ConfigRecord({"w": 1})}))
    got = protocol.read_train_reply(msg, EXPECTED)
    assert isinstance(got, protocol.Rejected) and "expected a ConfigRecord" in got.reason and got.site is None
    assert isinstance(protocol.read_hello(with_content(good_train_reply(), RecordDict())), protocol.Rejected)


def test_hello_needs_a_pem_key_and_a_count():
    q = protocol.instruction(protocol.HELLO, plan(), 4)
    msg = protocol.hello_reply(q, site="a", num_examples=3, ledger_public_key="ssh-rsa AAAA")
    assert "not a PEM public key" in protocol.read_hello(msg).reason
    msg = protocol.hello_reply(q, site="a", num_examples=3, ledger_public_key=PEM)
    msg.content[protocol.METRICS][protocol.NUM_EXAMPLES] = 3.0
    assert "expected an integer, got float" in protocol.read_hello(msg).reason


# ------------------------------------------------------------ the site reads the plan


@pytest.mark.parametrize("change, says", [
    ({protocol.SERVER_ROUND: "3"}, "config.server-round: expected an integer, got str"),
    ({"shell": "rm -rf /"}, "config: unexpected key 'shell'"),
    ({protocol.CLASS_NAMES: []}, "expected a non-empty list of text"),
    ({protocol.FEATURE_CENTER: [0.1, math.inf]}, "expected a list of finite numbers"),
    ({protocol.PROXIMAL_MU: -1.0}, "must be a finite number >= 0"),
])
def test_the_site_refuses_a_plan_that_breaks_the_protocol(change, says):
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.read_plan(train_instruction(**change))
    assert says in str(info.value)


def test_a_training_instruction_needs_its_round_and_weights():
    msg = protocol.instruction(protocol.HELLO, plan(), 4)
    msg.metadata.message_type = protocol.TRAIN
    with pytest.raises(protocol.ProtocolError, match="record 'arrays' is missing"):
        protocol.read_plan(msg)
    bare = train_instruction()
    del bare.content[protocol.PLAN][protocol.SERVER_ROUND]
    with pytest.raises(protocol.ProtocolError, match="server-round is missing"):
        protocol.read_plan(bare)
    with pytest.raises(ValueError, match="not a query kind"):
        protocol.instruction(protocol.TRAIN, plan(), 4)
    with pytest.raises(ValueError, match="decline kind"):
        protocol.decline_reply(bare, site="a", kind="bored", reason="x")


ARRAYS = [np.zeros((3, 4), np.float32), np.arange(7, dtype=np.int64), np.array(2.5), np.ones((2, 0, 3)),
          np.array([True, False]), np.arange(6, dtype=">f4").reshape(2, 3), np.float16([1, 2, 3]),
          np.arange(12.0).reshape(3, 4).T]  # the last is Fortran-ordered: sent C-ordered


@pytest.mark.parametrize("value", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_arrays_are_flowers_bytes_and_read_back_as_flower_reads_them(value):
    """protocol's fast (de)serialisation is Flower's `Array`, byte for byte, both ways."""
    value = np.ascontiguousarray(value)  # as protocol sends it (a 0-d array goes as shape (1,))
    ours, flowers = protocol.encode_array(value), Array(value)
    assert (ours.dtype, tuple(ours.shape), ours.stype, ours.data) == \
        (flowers.dtype, tuple(flowers.shape), flowers.stype, flowers.data)
    saved = io.BytesIO()
    np.save(saved, value, allow_pickle=False)
    assert protocol.npy_bytes(value) == saved.getvalue()  # what a kept release stores (client/site.py)
    back = protocol.decode_array(flowers)
    assert back.dtype == value.dtype and back.shape == value.shape and np.array_equal(back, value)
    assert back.flags.writeable and back.flags.c_contiguous


@pytest.mark.parametrize("value", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_an_encoded_array_is_the_object_flowers_constructor_makes(value):
    """encode_array builds the Array without its constructor: the same fields, the same dirty
    mark, the same pickle and protobuf form, and it behaves as one when a field is set."""
    from flwr.common.serde import array_to_proto

    value = np.ascontiguousarray(value)
    ours = protocol.encode_array(value)
    theirs = Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=ours.stype, data=ours.data)
    assert type(ours) is Array and ours == theirs and ours == Array(value)
    assert ours.__dict__ == theirs.__dict__ and ours.is_dirty
    assert array_to_proto(ours).SerializeToString() == array_to_proto(theirs).SerializeToString()
    assert pickle.loads(pickle.dumps(ours)) == theirs
    ours.data = theirs.data[:0]  # Flower's __setattr__ still runs on the fields
    assert ours.data == b"" and ours.is_dirty


def test_a_filled_record_is_the_object_flowers_item_assignment_makes():
    """protocol.filled (array_record, a site's plan with its books head) fills a record's own
    dict after the record's own checks: the same fields as the record filled item by item
    (these very values, in order, an ArrayRecord's dirty mark), the same pickle and protobuf
    form, and Flower's own refusal of a key or value of another type."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import (
        array_record_to_proto,
        config_record_to_proto,
        metric_record_to_proto,
        recorddict_to_proto,
    )

    arrays = {f"t{i}": protocol.encode_array(np.ascontiguousarray(v)) for i, v in enumerate(ARRAYS)}
    config = {"yaml": "a: 1", "names": ["x", "y"], "seq": 3, "on": True, "rate": 0.5, "blob": b"\x00"}
    metrics = {"n": 8, "loss": 0.25, "curve": [0.5, 0.25]}
    records = {"plan": ConfigRecord(config), "arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}
    kinds = [(ArrayRecord, arrays, array_record_to_proto), (ConfigRecord, config, config_record_to_proto),
             (MetricRecord, metrics, metric_record_to_proto), (RecordDict, records, recorddict_to_proto)]
    for kind, items, to_proto in kinds:
        ours, theirs = protocol.filled(kind(), items.items()), kind()
        for name, value in items.items():
            theirs[name] = value
        assert type(ours) is kind and ours.__dict__ == theirs.__dict__ and ours.is_dirty == theirs.is_dirty
        assert list(ours) == list(items) and all(ours[k] is v for k, v in items.items())
        assert to_proto(ours).SerializeToString() == to_proto(theirs).SerializeToString()
        assert pickle.loads(pickle.dumps(ours)) == theirs
    assert protocol.array_record(arrays).__dict__ == protocol.filled(ArrayRecord(), arrays.items()).__dict__
    # A RecordDict's key given again: its own assignment (the record replaced where it was).
    again = protocol.filled(RecordDict(), [*records.items(), ("plan", ConfigRecord({"x": 1}))])
    assert list(again) == list(records) and dict(again["plan"]) == {"x": 1}
    odd = [(ArrayRecord, {3: arrays["t0"]}), (ArrayRecord, {"t": np.zeros(2)}), (ArrayRecord, {"t": b"x"}),
           (ConfigRecord, {"t": {"nested": 1}}), (ConfigRecord, {"t": None}), (MetricRecord, {"t": "text"}),
           (MetricRecord, {"t": True}), (RecordDict, {"t": {"a": 1}}), (RecordDict, {4: ConfigRecord()})]
    for kind, items in odd:
        with pytest.raises(TypeError):
            protocol.filled(kind(), items.items())  # type: ignore[arg-type]


def test_array_value_reads_each_array_once_read_only_and_never_a_stale_value():
    """array_value: one read-only view per Array object, handed to every reader; an Array
    given new bytes is read again; an Array that is gone takes its entry with it."""
    import gc

    first = protocol.encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    value = protocol.array_value(first)
    assert np.array_equal(value, np.arange(6).reshape(2, 3)) and not value.flags.writeable
    assert protocol.array_value(first) is value  # the same object: read once
    with pytest.raises(ValueError, match="read-only"):
        value[0, 0] = 9.0  # no reader can change what the next one reads
    assert protocol.decode_array(first).flags.writeable  # decode_array still gives a copy of its own
    first.data = protocol.encode_array(np.ones((2, 3), np.float32)).data
    assert np.array_equal(protocol.array_value(first), np.ones((2, 3)))  # new bytes: read again
    again = protocol.array_value(first)
    first.shape = (3, 2)  # a declared shape its bytes do not have: read again, as Flower reads it
    assert protocol.array_value(first) is not again
    assert protocol.array_value(first).shape == first.numpy().shape
    record = ArrayRecord({"w": protocol.encode_array(np.zeros(3, np.float32))})
    assert all(not v.flags.writeable for v in protocol.array_values(record).values())
    keys = {id(first), id(record["w"])}
    assert keys <= set(protocol._VALUES)
    del first, record
    gc.collect()
    assert not keys & set(protocol._VALUES)  # gone with their Arrays


@pytest.mark.parametrize("lie", ["shape", "dtype", "short", "long", "header", "negative"])
def test_an_array_whose_bytes_do_not_match_what_it_declares_is_read_as_flower_reads_it(lie):
    """A site's Array that declares one dtype or shape and carries other bytes is never read
    the fast way: np.load decides from the bytes (and refuses what it must), as in Flower."""
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    fields = {"dtype": good.dtype, "shape": tuple(good.shape), "stype": good.stype, "data": good.data}
    fields.update({"shape": {"shape": (3, 2), "negative": (-2, -3)}.get(lie, fields["shape"]),
                   "dtype": "int32" if lie == "dtype" else fields["dtype"],
                   "data": {"short": good.data[:-4], "long": good.data + b"\0" * 4,
                            "header": good.data.replace(b"(2, 3)", b"(6,)  ")}.get(lie, good.data)})
    bad = Array(**fields)
    try:
        expected = bad.numpy()
    except Exception as exc:  # noqa: BLE001  Flower's reading refuses it: so does ours, the same way
        with pytest.raises(type(exc)):
            protocol.decode_array(bad)
        return
    got = protocol.decode_array(bad)
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)


def test_what_an_array_declares_is_worked_out_once_and_read_as_before_whatever_its_form():
    """The fast way keeps what a declared (dtype, shape) needs (protocol._LAYOUTS); a shape
    written with floats or numpy integers reads as its integers would, a list or another
    stype as Flower reads it, and the same declaration with other bytes is read afresh."""
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    good = Array(value)
    for declared in [(2, 3), (2.0, 3.0), (np.int64(2), np.int64(3)), [2, 3]]:
        array = Array(dtype=good.dtype, shape=(2, 3), stype=good.stype, data=good.data)
        array.shape = declared  # as an unpickled or hand-made Array may hold it
        got = protocol.decode_array(array)
        assert got.dtype == np.float32 and got.shape == (2, 3) and np.array_equal(got, value)
    assert protocol._LAYOUTS[("float32", (2, 3))].shape == (2, 3)
    other = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data[:-4])
    with pytest.raises(Exception):  # noqa: B017  np.load refuses a short body, as Flower's reading does
        other.numpy()
    with pytest.raises(Exception):  # noqa: B017
        protocol.decode_array(other)
    unhashable, torch = (Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data) for _ in range(2))
    unhashable.dtype = ["float32"]
    torch.stype = "torch.Tensor"
    for odd in [unhashable, torch]:
        try:
            expected = odd.numpy()
        except Exception as exc:  # noqa: BLE001
            with pytest.raises(type(exc)):
                protocol.decode_array(odd)
        else:
            assert np.array_equal(protocol.decode_array(odd), expected)


def test_an_updates_problem_is_the_first_one_in_tensor_order_whatever_else_is_wrong():
    """update_problem checks every tensor's values in one pass (`_sound`) and names, when
    something is wrong, the first problem in the expected order (`_first_problem`, tensor by
    tensor): a NaN or infinity in any float dtype, a shape, a dtype, integer tensors left
    alone, several problems at once; a sound update has none."""
    rng = np.random.default_rng(5)
    expected = {"a": ((3, 2), np.dtype(np.float32)), "b": ((4,), np.dtype(np.float16)),
                "c": ((2,), np.dtype(np.float64)), "n": ((3,), np.dtype(np.int64))}

    def sound() -> dict[str, np.ndarray]:
        return {k: rng.normal(size=shape).astype(dtype) for k, (shape, dtype) in expected.items()}

    assert protocol.update_problem(sound(), expected) is None
    big = sound()
    big["c"][:] = [1e308, 1e308]  # finite; their sum would not be
    assert protocol.update_problem(big, expected) is None
    faults = {"nan": lambda u, k: u[k].reshape(-1).__setitem__(0, np.nan),
              "inf": lambda u, k: u[k].reshape(-1).__setitem__(-1, -np.inf),
              "shape": lambda u, k: u.__setitem__(k, np.zeros(7, u[k].dtype)),
              "dtype": lambda u, k: u.__setitem__(k, u[k].astype(np.float32 if u[k].dtype == "f8" else np.float64))}
    names = [k for k in expected if k != "n"]
    for _ in range(60):
        update = sound()
        for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
            faults[str(rng.choice(list(faults)))](update, str(name))
        got = protocol.update_problem(update, expected)
        assert got is not None and got == protocol._first_problem(update, expected)
    assert "non-finite" in protocol.update_problem({**sound(), "b": np.full(4, np.inf, np.float16)}, expected)

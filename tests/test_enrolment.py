"""Names bound to enrolled connection keys (issue 20 item 7, issue 21 item 8), revocation
without a restart, through the coordinator's discovery and the TLS front.

The fake Grid plays what Flower 1.41's SuperLink gives the ServerApp: node ids, each with
the public key its SuperNode registered and authenticates with (`NodeInfo.public_key`), and
the HELLO replies. The impostor is a registered site with a valid key of its own (enrolled
as "rogue") that calls itself "st-marys"; before the binding, the first claim in node-id
order won the name, so it took it whenever its node id was the lower one.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterable

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo

from fedshield import protocol
from fedshield.conf.config import Config
from fedshield.deploy import pki
from fedshield.deploy.enrolment import REGISTRY, LiveEnrolment, load_enrolment, save_enrolment
from fedshield.deploy.front import fleet_app
from fedshield.privacy import signing
from fedshield.server.app import (
    ENROLMENT_KEY,
    REVOKED_KEY,
    discover_sites,
    exclude_revoked,
    identity_from_run_config,
)
from tests.test_front import SuperLink

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py

PLAN = protocol.plan_record(config_yaml="{}", run_id="run-1", run_dir="/tmp/run-1", frozen_fingerprint="f" * 64,
                            class_names=["a", "b"])


@pytest.fixture
def federation(tmp_path):
    """A coordinator PKI with st-marys, st-johns and rogue enrolled by CSR; their private keys."""
    d = tmp_path / "pki"
    pki.init_pki(d, "fl.example.org", ["127.0.0.1"])
    keys = {}
    for name in ("st-marys", "st-johns", "rogue"):
        pki.make_csr(name, tmp_path / name)
        pki.sign_csr(tmp_path / name / f"{name}.csr", d)
        keys[name] = pki.load_connection_private_key(tmp_path / name / f"{name}.key")
    return d, keys


def flower_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return signing.public_key_pem(key)  # PEM SubjectPublicKeyInfo, as NodeInfo.public_key carries it


class Grid:
    """Nodes (id -> (connection key, the name its HELLO claims)); answers HELLOs, each signed
    as client/app.py signs it (`signer`: node id -> the key that signs its HELLO, default its
    own; None: unsigned)."""

    def __init__(self, nodes: dict[int, tuple[ec.EllipticCurvePrivateKey, str]],
                 signer: dict[int, ec.EllipticCurvePrivateKey | None] | None = None) -> None:
        self.nodes = nodes
        self.signer = signer or {}
        self.ledger_key = signing.public_key_pem(ec.generate_private_key(ec.SECP256R1())).decode()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=flower_pem(k)) for n, (k, _) in self.nodes.items()]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            key, name = self.nodes[node]
            reply = protocol.hello_reply(m, site=name, num_examples=10, ledger_public_key=self.ledger_key)
            signer = self.signer.get(node, key)
            if signer is not None:
                statement = protocol.connection_statement(str(PLAN[protocol.RUN_ID]), node, name)
                reply = protocol.with_connection_proof(reply, signing.sign(signer, statement))
            replies.append(reply)
        return replies


def discover(grid: Grid, identity: LiveEnrolment | None) -> tuple[dict[int, dict], list[str]]:
    refused: list[str] = []
    sites = discover_sites(grid, PLAN, len(grid.nodes), 5.0, refused, identity)
    return sites, refused


@pytest.mark.parametrize("impostor_first", [True, False])
def test_an_impostor_with_a_valid_key_of_its_own_never_takes_another_sites_name(federation, impostor_first):
    d, keys = federation
    ids = (3, 9) if impostor_first else (9, 3)  # the first claim in node-id order used to win
    grid = Grid({ids[0]: (keys["rogue"], "st-marys"), ids[1]: (keys["st-marys"], "st-marys"),
                 5: (keys["st-johns"], "st-johns")})
    sites, refused = discover(grid, LiveEnrolment(d / REGISTRY))
    assert {n: s["site"] for n, s in sites.items()} == {ids[1]: "st-marys", 5: "st-johns"}
    assert len(refused) == 1 and f"node {ids[0]}: not joining as 'st-marys'" in refused[0]
    assert "enrolled as 'rogue'" in refused[0]


def test_each_hello_carries_the_books_head_of_the_site_its_key_is_enrolled_as(federation, tmp_path):
    """The coordinator knows a node's site from its connection key before the HELLO: the HELLO
    carries the head it holds of that site's books (server/site_heads.py), so books put back
    to before a count's release decline at HELLO (tests/test_site_books.py) instead of
    releasing a second count. A name with no head held, or a key not enrolled, gets none."""
    from fedshield.server.site_heads import SiteHeads

    d, keys = federation
    heads = SiteHeads(tmp_path / "site-heads.json")
    heads.advance("st-marys", [{"seq": 4, "hash": "ab" * 32, "key_fingerprint": "SHA256:ledger"}])
    heads.advance("rogue", [{"seq": 1, "hash": "cd" * 32, "key_fingerprint": "SHA256:other"}])
    unenrolled = ec.generate_private_key(ec.SECP384R1())
    grid = Grid({3: (keys["st-marys"], "st-marys"), 5: (keys["st-johns"], "st-johns"), 7: (keys["rogue"], "x"),
                 8: (unenrolled, "y")})
    sent: dict[int, protocol.BooksHead | None] = {}
    answer = grid.send_and_receive

    def record(messages, *, timeout=None):
        messages = list(messages)
        sent.update({m.metadata.dst_node_id: protocol.read_plan(m).books_head for m in messages})
        return answer(messages, timeout=timeout)

    grid.send_and_receive = record  # type: ignore[method-assign]
    discover_sites(grid, PLAN, 4, 5.0, [], LiveEnrolment(d / REGISTRY), heads)
    assert sent == {3: protocol.BooksHead(4, "ab" * 32), 5: None, 7: protocol.BooksHead(1, "cd" * 32), 8: None}


def test_without_the_binding_the_first_claim_wins(federation):
    """What the binding closes: with no registry (the simulation runtime has no keys) the
    lower node id keeps the name, whoever it is."""
    _, keys = federation
    grid = Grid({3: (keys["rogue"], "st-marys"), 9: (keys["st-marys"], "st-marys")})
    sites, _ = discover(grid, None)
    assert list(sites) == [3]


def test_a_hello_answered_in_another_sites_place_is_refused(federation):
    """Flower 1.41 does not check that a reply's src_node_id is the node that pushed it: a
    registered site that guesses st-marys' HELLO message id can answer it as node 9. The
    reply then arrives from st-marys' node, but it cannot be signed with st-marys' key."""
    d, keys = federation
    for signer in (keys["rogue"], None):
        grid = Grid({9: (keys["st-marys"], "st-marys"), 5: (keys["st-johns"], "st-johns")}, signer={9: signer})
        sites, refused = discover(grid, LiveEnrolment(d / REGISTRY))
        assert [s["site"] for s in sites.values()] == ["st-johns"]
        assert "node 9: not joining as 'st-marys'" in refused[0] and "not signed with its connection key" in refused[0]
    other_run = Grid({9: (keys["st-marys"], "st-marys")})  # a proof from another run is not this run's
    other_run.send_and_receive = lambda messages, timeout=None: [  # type: ignore[method-assign]
        protocol.with_connection_proof(
            protocol.hello_reply(m, site="st-marys", num_examples=10, ledger_public_key=other_run.ledger_key),
            signing.sign(keys["st-marys"], protocol.connection_statement("run-0", 9, "st-marys"))) for m in messages]
    assert not discover(other_run, LiveEnrolment(d / REGISTRY))[0]


def test_a_deployed_sites_hello_is_signed_with_its_connection_key(tmp_path, tiny_bert):
    """The real ClientApp with a deployed node config (what `fedshield client` passes)."""
    from flwr.app import Context, RecordDict

    from fedshield.client import app as site
    from fedshield.deploy.enrolment import proves
    from tests.helpers import synthetic_rows, tiny_overrides, write_csv

    data = write_csv(tmp_path / "site.csv", synthetic_rows(40, seed=3))
    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{"privacy.delta": 1e-5}))
    plan = protocol.plan_record(config_yaml=cfg.to_yaml(), run_id="run-9", run_dir="", frozen_fingerprint="",
                                class_names=["markets", "weather"])
    pki.make_csr("st-marys", tmp_path / "keys")
    key = pki.load_connection_private_key(tmp_path / "keys" / "st-marys.key")
    node = {"site-name": "st-marys", "data-path": str(data), "state-dir": str(tmp_path / "state"),
            "connection-key": str(tmp_path / "keys" / "st-marys.key")}
    msg = protocol.instruction(protocol.HELLO, plan, 42)
    got = protocol.read_hello(site.hello(msg, Context(run_id=7, node_id=42, node_config=node, state=RecordDict(),
                                                      run_config={})))
    assert isinstance(got, protocol.SiteHello) and got.site == "st-marys"
    assert proves(flower_pem(key), got.connection_proof, protocol.connection_statement("run-9", 42, "st-marys"))
    assert not proves(flower_pem(key), got.connection_proof, protocol.connection_statement("run-9", 43, "st-marys"))


def test_a_key_that_is_not_enrolled_or_unknown_is_refused(federation):
    d, keys = federation
    stranger = ec.generate_private_key(ec.SECP384R1())
    grid = Grid({1: (stranger, "st-johns"), 2: (keys["st-marys"], "st-marys")})
    sites, refused = discover(grid, LiveEnrolment(d / REGISTRY))
    assert [s["site"] for s in sites.values()] == ["st-marys"]
    assert "is not enrolled" in refused[0]

    class NoKeys(Grid):
        def get_nodes(self):
            return [NodeInfo(node_id=n) for n in self.nodes]

    sites, refused = discover(NoKeys({2: (keys["st-marys"], "st-marys")}), LiveEnrolment(d / REGISTRY))
    assert not sites and "cannot tell which connection key" in refused[0]


def test_a_revoked_key_is_refused_at_hello_and_dropped_before_the_next_round(federation):
    d, keys = federation
    identity = LiveEnrolment(d / REGISTRY)
    grid = Grid({1: (keys["st-marys"], "st-marys"), 2: (keys["st-johns"], "st-johns")})
    sites, refused = discover(grid, identity)
    assert len(sites) == 2 and not refused

    pki.revoke("st-johns", d, "laptop stolen")  # while the run goes on: no restart
    excluded: dict[str, str] = {}
    exclude_revoked(identity, sites, excluded)
    assert list(excluded) == ["st-johns"] and "was revoked" in excluded["st-johns"]

    again, refused = discover(grid, identity)  # a later run, or the same key at a new HELLO
    assert [s["site"] for s in again.values()] == ["st-marys"] and "was revoked" in refused[0]


def test_rolling_the_registry_back_does_not_unrevoke_a_key_in_a_running_coordinator(federation):
    d, keys = federation
    identity = LiveEnrolment(d / REGISTRY)
    before = (d / REGISTRY).read_bytes()
    identity.current()
    pki.revoke("st-marys", d)
    assert identity.check("st-marys", flower_pem(keys["st-marys"])) is not None
    (d / REGISTRY).write_bytes(before)  # the old file, with st-marys enrolled and nothing revoked
    assert "was revoked" in identity.check("st-marys", flower_pem(keys["st-marys"]))
    (d / REGISTRY).write_text("{not json")  # a broken file keeps the last good view, and says so
    assert "was revoked" in identity.check("st-marys", flower_pem(keys["st-marys"]))
    assert identity.check("st-johns", flower_pem(keys["st-johns"])) is None
    assert "not a fedshield registry" in identity.take_problem() and identity.take_problem() is None


def test_a_rotated_site_is_admitted_with_its_new_key_only(federation, tmp_path):
    d, keys = federation
    pki.make_csr("st-marys", tmp_path / "new")
    pki.sign_csr(tmp_path / "new" / "st-marys.csr", d, rotate=True)
    new = pki.load_connection_private_key(tmp_path / "new" / "st-marys.key")
    identity = LiveEnrolment(d / REGISTRY)
    assert identity.check("st-marys", flower_pem(new)) is None
    assert "was revoked" in identity.check("st-marys", flower_pem(keys["st-marys"]))


def test_the_serverapp_gets_the_registry_from_the_run_config(federation, tmp_path, tiny_bert, synthetic_csv):
    from fedshield.server.cli import write_app
    from tests.helpers import tiny_overrides

    d, keys = federation
    cfg = Config.load(tiny_overrides(tiny_bert, synthetic_csv, tmp_path))
    write_app(tmp_path / "app", cfg, identity=(d / REGISTRY, d / REGISTRY))
    import tomllib

    run_config = dict(tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    identity = identity_from_run_config(run_config)
    assert ENROLMENT_KEY not in run_config and REVOKED_KEY not in run_config  # popped: not config keys
    assert identity is not None and identity.check("rogue", flower_pem(keys["rogue"])) is None
    assert identity_from_run_config({}) is None  # a simulation: names are not bound

    # Hand-collected keys (--connection-keys): names from file names, the deny-list still the PKI's.
    pki.connection_key_pair("city-bank", tmp_path / "keys")
    admitted, _ = pki.hand_collected([tmp_path / "keys" / "city-bank.pub"], d)
    save_enrolment(tmp_path / "bound.json", pki.bindings(admitted))
    identity = identity_from_run_config({ENROLMENT_KEY: str(tmp_path / "bound.json"),
                                         REVOKED_KEY: str(d / REGISTRY)})
    city = pki.load_connection_public_key(tmp_path / "keys" / "city-bank.pub")
    assert identity.check("city-bank", signing.public_key_pem(city)) is None
    assert "not enrolled" in identity.check("st-marys", flower_pem(keys["st-marys"]))
    pki.revoke(str(tmp_path / "keys" / "city-bank.pub"), d)
    assert "was revoked" in identity.check("city-bank", signing.public_key_pem(city))


def test_the_front_refuses_a_revoked_key_before_the_superlink_sees_it(federation):
    d, keys = federation
    identity = LiveEnrolment(d / REGISTRY)
    pki.revoke("rogue", d)
    link = SuperLink()
    seen = link.requests

    def post(key: ec.EllipticCurvePrivateKey | None, path: str = "/v1/fleet/pull-messages") -> int:
        async def go() -> int:
            async with link.client() as upstream:
                app = fleet_app("https://127.0.0.1:9999", upstream, refuse=identity.refuses)
                headers = {"flwr-public-key": base64.b64encode(flower_pem(key)).decode()} if key else {}
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                             base_url="https://fl.example.org") as c:
                    return (await c.post(path, content=b"x", headers=headers)).status_code
        return asyncio.run(go())

    assert post(keys["rogue"]) == 403 and not seen
    assert post(keys["st-marys"]) == 200 and len(seen) == 1
    assert post(None) == 200  # unsigned: the SuperLink's own authentication refuses it
    # activation passes: the SuperLink's answer for a key it does not hold is what the site's agent
    # turns into its one-line refusal ("not registered")
    assert post(keys["rogue"], "/v1/fleet/activate-node") == 200 and len(seen) == 3


def test_the_registry_file_is_checked(tmp_path):
    from fedshield.deploy.enrolment import EnrolmentError

    assert not load_enrolment(tmp_path / "none.json").sites  # no registry yet: nothing enrolled
    for text in ("[]", '{"version": 2}', '{"version": 1, "sites": {"a": {"name": "b", "key": "SHA256:x", '
                 '"public_key": "k"}}}', '{"version": 1, "revoked": [{"key": "md5"}]}'):
        (tmp_path / "r.json").write_text(text)
        with pytest.raises(EnrolmentError, match=r"r.json: not a fedshield registry"):
            load_enrolment(tmp_path / "r.json")
    (tmp_path / "ok.json").write_text(json.dumps({"version": 1}))
    assert not load_enrolment(tmp_path / "ok.json").revoked


def test_the_coordinator_admits_the_enrolled_sites_and_says_which_it_leaves_out(federation, tmp_path, tiny_bert):
    from fedshield.privacy.errors import FedShieldError
    from fedshield.server.cli import admitted_sites, server_main
    from tests.helpers import synthetic_rows, tiny_overrides, write_csv

    d, _ = federation
    pki.revoke("rogue", d)
    admitted, left_out, registry = admitted_sites(d, None)
    assert [n for n, _ in admitted] == ["st-johns", "st-marys"] and not left_out and registry == d / REGISTRY
    # hand-collected keys: each under its file name, a revoked one left out with a line
    admitted, left_out, _ = admitted_sites(d, [str(d / "sites")])  # rogue.pub is still there
    assert [n for n, _ in admitted] == ["st-johns", "st-marys"]
    assert len(left_out) == 1 and left_out[0].startswith("site rogue: not admitted: its connection key SHA256:")
    empty = tmp_path / "empty-pki"
    pki.init_pki(empty, "fl.example.org", [])
    with pytest.raises(FedShieldError, match=r"no site is enrolled .*certs sign"):
        admitted_sites(empty, None)

    data = write_csv(tmp_path / "server.csv", synthetic_rows(40, seed=1))
    over = [o for o in tiny_overrides(tiny_bert, data, tmp_path, **{"federation.num_sites": 3,
                                                                    "federation.min_sites": 3})
            if not o.startswith("simulation.")]
    with pytest.raises(FedShieldError, match=r"^federation.min_sites=3: only 2 connection keys are admitted"):
        server_main(["--pki", str(d), "--address", "127.0.0.1:1", *over])  # no --connection-keys: the enrolled
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ deployed: real Flower processes


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_deployed_enrolled_sites_train_and_an_impostor_is_refused(tmp_path, tiny_bert):
    """`certs csr`/`sign`/`revoke`, `fedshield server` admitting the enrolled sites (no
    --connection-keys), three SuperNodes: st-marys, st-johns, and rogue (enrolled as rogue)
    calling itself st-marys; city-bank's key revoked before the start."""
    from tests.helpers import synthetic_rows, tiny_overrides, write_csv
    from tests.test_deployment import STARTED, client_args, fedshield, finish, finish_group, free_port

    d = tmp_path / "pki"
    assert pki.certs_main(["init", "--out", str(d), "--server-name", "fl.example.org", "--san", "127.0.0.1"]) == 0
    for name in ("st-marys", "st-johns", "rogue", "city-bank"):
        assert pki.certs_main(["csr", name, "--out", str(tmp_path / name)]) == 0
        assert pki.certs_main(["sign", str(tmp_path / name / f"{name}.csr"), "--pki", str(d)]) == 0
    assert pki.certs_main(["revoke", "city-bank", "--pki", str(d)]) == 0
    port = free_port()
    over = [o for o in tiny_overrides(tiny_bert, write_csv(tmp_path / "server.csv", synthetic_rows(120, seed=7)),
                                      tmp_path, **{"federation.round_timeout_s": 120, "privacy.delta": 1e-5,
                                                   "output.run_name": "enrolled", "federation.num_sites": 3,
                                                   "federation.min_sites": 2, "federation.rounds": 1,
                                                   # not under test here (tests/test_deployment.py's run has
                                                   # it): a message round less
                                                   "training.center_features": False})
            if not o.startswith("simulation.")]
    try:
        server = fedshield("server", "--pki", str(d), "--address", f"127.0.0.1:{port}", *over, cwd=tmp_path)
        procs = {}
        for i, (name, key) in enumerate((("st-marys", "st-marys"), ("st-johns", "st-johns"),
                                         ("impostor", "rogue"), ("city-bank", "city-bank"))):
            data = write_csv(tmp_path / f"{name}.csv", synthetic_rows(60, seed=30 + i))
            extra = ("--name", "st-marys") if name == "impostor" else ()
            procs[name] = fedshield(*client_args(port, d / "ca.crt", tmp_path / key / f"{key}.key", data,
                                                 tmp_path / f"state-{name}", *extra), cwd=tmp_path)
        rc, out = finish_group(server, 600)  # its output, whatever happens (a busy machine: a slow start)
        results = {n: finish(p, 120) if n != "impostor" else finish_group(p, 60) for n, p in procs.items()}
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    assert rc == 0, out[-4000:]
    assert "warning" not in out.split("checked:")[1].split("SuperLink up")[0]  # the revoked key: not even listed
    run_dir = tmp_path / "runs" / "enrolled"
    assert sorted(json.loads((run_dir / "privacy" / "sites.json").read_text())) == ["st-johns", "st-marys"]
    report = (run_dir / "report.md").read_text()
    assert "not joining as 'st-marys'" in report and "is enrolled as 'rogue'" in report
    honest = signing.load_public_key((tmp_path / "state-st-marys" / "site.pub").read_bytes())
    kept = signing.load_public_key((run_dir / "privacy" / "ledger-keys" / "st-marys.pub").read_bytes())
    assert signing.fingerprint(kept) == signing.fingerprint(honest)  # the name went to the real st-marys
    for n in ("st-marys", "st-johns"):
        assert results[n][0] == 0, results[n][1][-3000:]
    assert results["city-bank"][0] == 2 and "not registered" in results["city-bank"][1]

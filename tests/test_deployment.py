"""Deployment on loopback: `fedshield certs`, `fedshield server`, three `fedshield client`s.

Real processes: a SuperLink (TLS, SuperNode authentication), the ServerApp, three
SuperNodes each with its own CSV and state folder, 2 rounds of a tiny BERT with DP-SGD.
The refusals come in that same coordinator run, which must still complete with its good
sites: an unregistered key, a wrong CA, a plaintext client, bad data files. Then a
coordinator certificate that has expired or names another host. Last, crashes: a site's
agent and then the coordinator killed with SIGKILL mid-run (no orphan Flower process, the
site rejoins, each site's exit code and line say how the run ended).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedshield.deploy import pki
from fedshield.privacy.signing import fingerprint
from tests.helpers import synthetic_rows, tiny_overrides, write_csv

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")  # flower-superexec
    return e


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def reap():
    """A failed assertion must not leave coordinators or sites running."""
    yield
    for p in STARTED:
        if p.poll() is None:
            p.terminate()  # fedshield server/client stop their own children on SIGTERM
    for p in STARTED:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def fedshield(*args: str, cwd: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "fedshield.simulations.cli", *args], cwd=cwd, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    STARTED.append(p)
    return p


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def finish_group(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait until the process itself exits (up to `timeout`; its exit code, else -SIGKILL),
    then end what is left of its session (a child that outlives it holds its output open);
    never raises. Its output is read all along, so that a full pipe never stalls it."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = -signal.SIGKILL
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not a session leader, or nothing of it left
        pass
    p.wait()
    reader.join(30)
    return rc, "".join(lines)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, _ = p.communicate(timeout=30)
        raise AssertionError(f"timed out after {timeout}s:\n{out[-4000:]}") from None
    return p.returncode, out


def server_args(pki_dir: Path, keys: list[Path], port: int, tiny_bert: Path, data: Path, tmp: Path,
                **extra) -> list[str]:
    # δ = 1e-5: a deployed site's policy (its defaults, as no site here sets one) refuses a
    # plan with a larger δ (client/app.py, POLICY).
    over = tiny_overrides(tiny_bert, data, tmp, **{"federation.round_timeout_s": 120, "privacy.delta": 1e-5,
                                                  "output.run_name": "deploy", **extra})
    over = [o for o in over if not o.startswith("simulation.")]
    return ["server", "--pki", str(pki_dir), "--connection-keys", *map(str, keys),
            "--address", f"127.0.0.1:{port}", *over]


def client_args(port: int, ca: Path, key: Path, data: Path, state: Path, *extra: str) -> list[str]:
    return ["client", "--server", f"127.0.0.1:{port}", "--ca", str(ca), "--connection-key", str(key),
            "--data", str(data), "--state-dir", str(state), "--connect-timeout", "60",
            "--reconnect-s", "5", *extra]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    assert pki.certs_main(["init", "--out", str(d), "--server-name", "fl.example.org", "--san", "127.0.0.1"]) == 0
    for name in ("st-marys", "st-johns", "city-bank", "rogue"):
        assert pki.certs_main(["site", name, "--out", str(d)]) == 0
    return d


def last_epsilon(ledger: Path) -> float:
    lines = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
    return float(lines[-1]["epsilon"])


# ------------------------------------------------------------ one coordinator run: the happy path, the refusals


BAD_DATA = {
    "missing": (None, "no such file"),
    "empty": ("", "file is empty"),
    "malformed": ('text,label\n"sunny rain",weather\n"stock,markets\n', "malformed.csv:3"),
    "label": ("text,label\nsunny rain,weather\nstock bank,sports\n", "label.csv:3: label 'sports'"),
}
NAMES = ("st-marys", "st-johns", "city-bank")  # the good sites: registered, with good data and the right CA


@pytest.fixture(scope="module")
def deployment(pki_dir, tiny_bert, tmp_path_factory) -> dict:
    """A coordinator expecting 3 good sites for 2 rounds with DP, while intruders and broken
    sites try to join: the happy path (test_three_sites_two_rounds_with_dp) and the refusals
    share this one run (a coordinator run is the costly part; none of the intruders gets as
    far as the coordinator's ServerApp, so none changes what the good sites do)."""
    tmp = tmp_path_factory.mktemp("deployment")
    t0 = time.time()
    server_data = write_csv(tmp / "server.csv", synthetic_rows(120, seed=7))
    port = free_port()
    registered = [pki_dir / f"{n}.pub" for n in NAMES]
    server = fedshield(*server_args(pki_dir, registered, port, tiny_bert, server_data, tmp), cwd=tmp)
    ca = pki_dir / "ca.crt"
    procs: dict[str, subprocess.Popen] = {}

    # intruders first, so that they are there while the coordinator waits for sites. Those
    # with a registered key (city-bank's) are refused for their CA, --insecure or their data,
    # each before it connects: never for the key.
    other = tmp / "other-pki"
    pki.init_pki(other, "fl.example.org", ["127.0.0.1"])
    good_csv = write_csv(tmp / "good.csv", synthetic_rows(60, seed=3))
    procs["rogue"] = fedshield(*client_args(port, ca, pki_dir / "rogue.key", good_csv, tmp / "state-rogue"), cwd=tmp)
    procs["wrong-ca"] = fedshield(*client_args(port, other / "ca.crt", pki_dir / "city-bank.key", good_csv,
                                               tmp / "state-wrong-ca"), cwd=tmp)
    procs["insecure-cli"] = fedshield(*client_args(port, ca, pki_dir / "city-bank.key", good_csv,
                                                   tmp / "state-insecure", "--insecure"), cwd=tmp)
    for kind, (content, _) in BAD_DATA.items():
        path = tmp / f"{kind}.csv"
        if content is not None:
            path.write_text(content)
        procs[f"data-{kind}"] = fedshield(*client_args(port, ca, pki_dir / "city-bank.key", path,
                                                       tmp / f"state-{kind}", "--labels", "markets,weather"), cwd=tmp)
    # the good sites (each waits up to --connect-timeout for the coordinator's port)
    for i, n in enumerate(NAMES):
        data = write_csv(tmp / f"{n}.csv", synthetic_rows(60, seed=10 + i))
        procs[n] = fedshield(*client_args(port, ca, pki_dir / f"{n}.key", data, tmp / f"state-{n}"), cwd=tmp)
    bindir = Path(sys.executable).parent
    wait_listening(port, 240)  # plaintext against the live TLS port, not against nothing
    plaintext = subprocess.Popen(
        [str(bindir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--insecure",
         "--max-retries", "3", "--max-wait-time", "20", "--port", str(free_port())],
        cwd=tmp, env={**env(), "FLWR_HOME": str(tmp / "plain-home")}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    STARTED.append(plaintext)

    # a raw plaintext HTTP request to the TLS port while the run goes on
    plain_http = {}

    def poke() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    plain_http["reply"] = s.recv(200)
                    return
            except ConnectionRefusedError:
                time.sleep(1)
            except OSError as exc:
                plain_http["reply"] = repr(exc).encode()
                return

    t = threading.Thread(target=poke)
    t.start()
    results = {"server": finish(server)}
    for name, p in procs.items():
        results[name] = finish(p, 180)
    # Flower's SuperNode gives up and exits, but its SuperExec child keeps retrying (and keeps
    # the output open): reap the whole group once the SuperNode is gone (bounded; Flower's
    # behaviour, the coordinator is unaffected).
    results["plaintext"] = finish_group(plaintext, 60)
    t.join()
    results["plain-http"] = plain_http.get("reply", b"")
    results["tmp"] = tmp
    print(f"deployment e2e: {time.time() - t0:.0f}s")
    return results


def test_three_sites_two_rounds_with_dp(deployment, pki_dir):
    rc, out = deployment["server"]
    tmp = deployment["tmp"]
    outs = {n: deployment[n] for n in NAMES}
    assert rc == 0, out[-4000:]
    run_dir = tmp / "runs" / "deploy"
    assert f"run directory: {run_dir}" in out
    for n, (crc, cout) in outs.items():
        assert crc == 0, f"{n}:\n{cout[-3000:]}"
        assert "admitted by the coordinator" in cout
        fp = fingerprint(pki.load_connection_public_key(pki_dir / f"{n}.pub"))  # one format on both sides
        assert f"admitted connection key {n}: {fp}" in out
        assert f"connection key {fp}" in cout

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics][-2:] == [1, 2]
    assert metrics[-1]["trained"] == 3
    ledger = [json.loads(x) for x in (run_dir / "privacy" / "ledger.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "privacy" / "sites.json").read_text())
    for n in NAMES:
        own = tmp / f"state-{n}" / "ledger.jsonl"
        own_entries = [json.loads(x) for x in own.read_text().splitlines() if x.strip()]
        mine = [e for e in ledger if e["site"] == n]
        # The protected record count and the feature-mean release (round 0), then one spend per round.
        assert [(e["release"], e["round"]) for e in mine] == [
            ("record-count", 0), ("feature-mean", 0), ("dp-sgd", 1), ("dp-sgd", 2)]
        assert mine == own_entries[-4:]  # the coordinator's copy is the site's own entries
        assert mine[0]["released_count"] == summary[n]["records"] and summary[n]["neighbouring"] == "add-remove"
        assert summary[n]["epsilon"] == pytest.approx(last_epsilon(own))
        # Calibrated so that the release and the 2 rounds together spend the target, not more.
        assert 7.8 < summary[n]["epsilon"] <= 8.0
        assert (run_dir / "privacy" / "ledger-keys" / f"{n}.pub").is_file()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert model.config.num_labels == 2
    assert (run_dir / "report.md").is_file()


def test_refusal_run_completes_with_the_good_sites(deployment):
    rc, out = deployment["server"]
    assert rc == 0, out[-4000:]
    run_dir = deployment["tmp"] / "runs" / "deploy"
    sites = json.loads((run_dir / "privacy" / "sites.json").read_text())
    assert sorted(sites) == sorted(NAMES)  # none of the intruders
    for n in NAMES:
        assert deployment[n][0] == 0, deployment[n][1][-3000:]


def test_unregistered_connection_key_is_refused(deployment):
    rc, out = deployment["rogue"]
    assert rc == 2, out[-3000:]
    assert "error: site rogue: the coordinator refused connection key rogue.key (SHA256:" in out
    assert "not registered" in out


def test_site_with_another_ca_is_refused(deployment):
    rc, out = deployment["wrong-ca"]
    assert rc == 2
    assert "its TLS certificate is not signed by" in out and "wrong CA" in out


def test_plaintext_client_is_refused(deployment):
    rc, out = deployment["insecure-cli"]
    assert rc == 2 and "--insecure: refused" in out
    rc, out = deployment["plaintext"]
    assert rc != 0  # Flower's own SuperNode over plaintext never gets in
    assert "SuperNode ID" not in out
    assert b"HTTP/1.1 200" not in deployment["plain-http"]


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_file_is_refused(deployment, kind):
    rc, out = deployment[f"data-{kind}"]
    assert rc == 2, out
    lines = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and BAD_DATA[kind][1] in lines[0], out
    assert f"{kind}.csv" in lines[0]


# ------------------------------------------------------------------ the coordinator's certificate


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def serve() -> None:
        sock.settimeout(30)
        try:
            conn, _ = sock.accept()
            try:
                ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()
        except OSError:
            pass
        sock.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock.getsockname()[1], t


@pytest.mark.parametrize("case", ["expired", "other-host"])
def test_bad_coordinator_certificate_is_refused(pki_dir, tmp_path, case):
    d = tmp_path / case
    if case == "expired":
        pki.init_pki(d, "fl.example.org", ["127.0.0.1"], days=1,
                     not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
        want = "its TLS certificate has expired"
    else:
        pki.init_pki(d, "other.example.org", [])
        want = "its TLS certificate is for another host"
    port, t = _tls_server(d / "server.crt", d / "server.key")
    data = write_csv(tmp_path / "d.csv", synthetic_rows(20, seed=1))
    p = fedshield(*client_args(port, d / "ca.crt", pki_dir / "st-marys.key", data, tmp_path / "state"), cwd=tmp_path)
    rc, out = finish(p, 60)
    t.join(5)
    assert rc == 2, out
    assert want in out


# ------------------------------------------------------------------ crashes


def flower_processes(home: Path) -> list[int]:
    """Live processes whose FLWR_HOME is `home`: every Flower process of one agent command."""
    want = f"FLWR_HOME={home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if want in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def wait_for(what, timeout: float, step: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    return what()


def log_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


ROUNDS = 30  # many: the run must outlast a site's restart; the coordinator is killed long before the end


@pytest.mark.timeout(900)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_crashes_leave_no_orphans_sites_rejoin_and_say_how_it_ended(pki_dir, tiny_bert, tmp_path):
    """kill -9 of a site's agent mid-run: its SuperNode and ClientApp go with it, and the
    agent started again rejoins the run. kill -9 of the coordinator: no SuperLink, SuperExec,
    ServerApp or `flwr run` survives it (no orphan writes a report), and each site exits 3
    with one line saying after which round it lost the coordinator."""
    server_data = write_csv(tmp_path / "server.csv", synthetic_rows(120, seed=7))
    port = free_port()
    names = ("st-marys", "st-johns")
    server = fedshield(*server_args(pki_dir, [pki_dir / f"{n}.pub" for n in names], port, tiny_bert, server_data,
                                    tmp_path, **{"federation.num_sites": 2, "federation.rounds": ROUNDS,
                                                 "federation.round_timeout_s": 30,
                                                 # not under test here (the happy path's run has it): a
                                                 # message round less before the first TRAIN
                                                 "training.center_features": False}), cwd=tmp_path)
    data = {n: write_csv(tmp_path / f"{n}.csv", synthetic_rows(60, seed=30 + i)) for i, n in enumerate(names)}
    state = {n: tmp_path / f"state-{n}" for n in names}
    sites = {n: fedshield(*client_args(port, pki_dir / "ca.crt", pki_dir / f"{n}.key", data[n], state[n]),
                          cwd=tmp_path) for n in names}
    run_dir = tmp_path / "runs" / "deploy"
    coordinator_home = tmp_path / "runs" / ".deploy.flower"

    # 1. a site's agent killed while it trains round 1
    marys_log = state["st-marys"] / "supernode.log"
    assert wait_for(lambda: "Receiving: train message" in log_text(marys_log), 240), log_text(marys_log)[-3000:]
    assert flower_processes(state["st-marys"] / ".flower")
    sites["st-marys"].kill()
    rc, first = finish(sites["st-marys"], 30)
    assert rc == -signal.SIGKILL
    left = wait_for(lambda: not flower_processes(state["st-marys"] / ".flower"), 20)
    assert left, f"the killed site's Flower processes survived: {flower_processes(state['st-marys'] / '.flower')}"

    # 2. started again with the same state folder: admitted again (at once, or once its old session expired)
    again = fedshield(*client_args(port, pki_dir / "ca.crt", pki_dir / "st-marys.key", data["st-marys"],
                                   state["st-marys"]), cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(again.stdout), daemon=True)
    reader.start()
    assert wait_for(lambda: any("admitted by the coordinator" in x for x in lines), 150), "".join(lines)[-3000:]
    assert not any("not registered" in x for x in lines)

    # 3. the coordinator killed once the rejoined site has trained a round of this session
    def rounds_done() -> int:
        try:
            return max(json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines())
        except (OSError, ValueError, KeyError):
            return 0

    def marys_trained_again() -> bool:
        return log_text(marys_log).count("Receiving: train message") >= 2 and rounds_done() >= 2

    assert wait_for(marys_trained_again, 300), log_text(marys_log)[-3000:]
    assert rounds_done() < ROUNDS, "the run ended before the coordinator could be killed"
    assert flower_processes(coordinator_home)
    server.kill()
    finish(server, 30)
    gone = wait_for(lambda: not flower_processes(coordinator_home), 20)
    assert gone, f"orphans of the coordinator: {flower_processes(coordinator_home)}"
    time.sleep(3)
    assert not (run_dir / "report.md").exists()  # no orphan ServerApp finishing the run on its own

    # 4. each site says it lost the coordinator, and after which round (exit 3)
    reader.join(120)
    again.wait(30)
    outs = {"st-marys": (again.returncode, "".join(lines)), "st-johns": finish(sites["st-johns"], 120)}
    for n, (rc, out) in outs.items():
        assert rc == 3, f"{n} (exit {rc}):\n{out[-3000:]}"
        lost = [x for x in out.splitlines() if "lost the coordinator during the run, after round" in x]
        assert len(lost) == 1 and f"site {n}:" in lost[0] and f" of {ROUNDS} " in lost[0], out[-3000:]
        assert "the coordinator closed the federation; done" not in out
        assert not flower_processes(state[n] / ".flower")
    access = (coordinator_home / "front-access.log").read_text().splitlines()
    assert any(" POST /v1/fleet/push-object 200 " in x for x in access)


# ------------------------------------------------------------------ resume after a coordinator crash


@pytest.mark.timeout(900)
def test_a_killed_coordinator_resumes_and_no_site_spends_a_round_twice(pki_dir, tiny_bert, tmp_path):
    """kill -9 of the coordinator after round 1 of 3, then `fedshield server --resume deploy`
    and the two sites started again: the run completes; each site's ledger holds the release
    and exactly one spend per round (the round in flight is re-sent from the site's kept
    reply, or trained once), and its ε is the uninterrupted run's (calibrated to the target)."""
    # The kill comes once round 1 is logged: a whole round (seconds of SuperNode polling and
    # a ClientApp process per site) still lies between it and the end of the run.
    rounds = 3
    server_data = write_csv(tmp_path / "server.csv", synthetic_rows(120, seed=7))
    port = free_port()
    names = ("st-marys", "st-johns")
    keys = [pki_dir / f"{n}.pub" for n in names]
    extra = {"federation.num_sites": 2, "federation.rounds": rounds, "federation.round_timeout_s": 60}
    server = fedshield(*server_args(pki_dir, keys, port, tiny_bert, server_data, tmp_path, **extra), cwd=tmp_path)
    data = {n: write_csv(tmp_path / f"{n}.csv", synthetic_rows(60, seed=40 + i)) for i, n in enumerate(names)}
    state = {n: tmp_path / f"state-{n}" for n in names}

    def start_sites() -> dict[str, subprocess.Popen]:
        return {n: fedshield(*client_args(port, pki_dir / "ca.crt", pki_dir / f"{n}.key", data[n], state[n]),
                             cwd=tmp_path) for n in names}

    sites = start_sites()
    run_dir = tmp_path / "runs" / "deploy"

    def rounds_logged() -> int:
        try:
            return max(json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines())
        except (OSError, ValueError, KeyError):
            return -1

    assert wait_for(lambda: rounds_logged() >= 1, 400), finish(server, 5)[1][-3000:]
    server.kill()
    finish(server, 30)
    for n, p in sites.items():
        assert finish(p, 120)[0] == 3, n  # each says it lost the coordinator
    assert not (run_dir / "report.md").exists() and (run_dir / "checkpoint.npz").is_file()

    resumed = fedshield(*server_args(pki_dir, keys, port, tiny_bert, server_data, tmp_path, **extra)[:6 + len(keys)],
                        "--resume", "deploy", f"output.dir={tmp_path / 'runs'}", cwd=tmp_path)
    sites = start_sites()
    rc, out = finish(resumed, 600)
    assert rc == 0, out[-4000:]
    assert "resuming after round" in out
    outs = {n: finish(p, 120) for n, p in sites.items()}
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(rounds + 1))
    summary = json.loads((run_dir / "privacy" / "sites.json").read_text())
    for n in names:
        assert outs[n][0] == 0, f"{n}:\n{outs[n][1][-3000:]}"
        own = [json.loads(x) for x in (state[n] / "ledger.jsonl").read_text().splitlines() if x.strip()]
        assert [(e["release"], e["round"]) for e in own] == [("record-count", 0), ("feature-mean", 0)] + [
            ("dp-sgd", r) for r in range(1, rounds + 1)]
        assert 7.8 < summary[n]["epsilon"] <= 8.0 and summary[n]["epsilon"] == pytest.approx(own[-1]["epsilon"])
    copy = [json.loads(x) for x in (run_dir / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert len({e["hash"] for e in copy}) == len(copy) == len(names) * (rounds + 2)

"""The privacy ledger: durable, tamper-evident, recoverable; and the audit that checks it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from fedshield.privacy.accountant import Spend, epsilon, epsilon_dp_accounting_rdp
from fedshield.privacy.audit import audit
from fedshield.privacy.cli import audit_main
from fedshield.privacy.errors import FedShieldError, LedgerError
from fedshield.privacy.ledger import GENESIS, Ledger, canonical, entry_hash, verify_ledger
from fedshield.privacy.signing import (
    fingerprint,
    generate_site_key,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 40, 1e-5


def _fields(site, rnd, run="run-1", **kw):
    f = dict(run_id=run, round=rnd, site=site, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS,
             max_grad_norm=1.0, delta=DELTA, accountant="rdp")
    f.update(kw)
    return f


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two sites with their own ledgers, and a run directory holding both, as the coordinator keeps it."""
    root = tmp_path_factory.mktemp("ledger")
    run = root / "run"
    (run / "privacy" / "site-keys").mkdir(parents=True)
    keys = {}
    for site in ("alpha", "beta"):
        state = root / f"state-{site}"
        pub = generate_site_key(state / "site.key")
        (state / "site.pub").write_bytes(pub)
        (run / "privacy" / "site-keys" / f"{site}.pub").write_bytes(pub)
        keys[site] = load_private_key(state / "site.key")
    lines = []
    for rnd in (1, 2, 3):
        for site in ("alpha", "beta"):
            e = Ledger(root / f"state-{site}" / "ledger.jsonl").append(_fields(site, rnd), keys[site])
            lines.append(json.dumps(e, sort_keys=True))
    (run / "privacy" / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    return root, run, keys


def _signed(key, fields: dict, seq: int, prev_hash: str, run_seq: int | None = None, **kw) -> dict:
    """An entry made by hand and signed with `key` (a valid signature; the contents are ours)."""
    e = dict(fields, mechanism="dp-sgd-poisson-gaussian", privacy_unit="record", seq=seq,
             run_seq=seq if run_seq is None else run_seq, prev_hash=prev_hash,
             time="2026-01-01T00:00:00Z", key_fingerprint=fingerprint(key))
    e.update(kw)
    e["hash"] = entry_hash(e)
    e["signature"] = base64.b64encode(sign(key, e["hash"].encode())).decode()
    return e


def _copy_run(world, tmp_path) -> Path:
    _, run, _ = world
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _entries(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]


def _write(run: Path, entries: list[dict]) -> None:
    (run / "privacy" / "ledger.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _pubs(run: Path) -> dict:
    return {p.stem: load_public_key(p) for p in (run / "privacy" / "site-keys").glob("*.pub")}


# -- keys ------------------------------------------------------------------------------

def test_key_files_are_0600_and_never_overwritten(tmp_path):
    path = tmp_path / "k" / "site.key"
    pub = generate_site_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(FedShieldError, match="already exists"):
        generate_site_key(path)
    assert path.read_bytes() == before
    generate_site_key(path, force=True)
    assert path.read_bytes() != before and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    priv = load_private_key(path)
    assert fingerprint(load_public_key(pub)).startswith("SHA256:") and len(fingerprint(priv)) == 7 + 64
    sig = sign(priv, b"data")
    assert verify(priv.public_key(), sig, b"data") and not verify(priv.public_key(), sig, b"date")
    assert not verify(load_public_key(pub), sig, b"data")  # the old key does not verify the new one
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(FedShieldError, match="junk.pem"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(FedShieldError, match="missing.key"):
        load_private_key(tmp_path / "missing.key")


# -- append / read ---------------------------------------------------------------------

def test_append_read_round_trip(world):
    root, _, keys = world
    ledger = Ledger(root / "state-alpha" / "ledger.jsonl")
    read = ledger.read()
    assert read.truncated_bytes == 0 and len(read.entries) == 3
    raw = (root / "state-alpha" / "ledger.jsonl").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    e0, e1, e2 = read.entries
    assert e0["prev_hash"] == GENESIS and e1["prev_hash"] == e0["hash"] and e2["prev_hash"] == e1["hash"]
    assert [e["seq"] for e in read.entries] == [0, 1, 2]
    for e in read.entries:
        assert e["hash"] == entry_hash(e)
        assert verify(keys["alpha"].public_key(), base64.b64decode(e["signature"]), e["hash"].encode())
        assert e["key_fingerprint"] == fingerprint(keys["alpha"])
        assert e["time"].endswith("Z") and e["mechanism"] == "dp-sgd-poisson-gaussian"
    # ε is the cumulative ε over all of this site's entries
    assert e2["epsilon"] == epsilon([Spend(SIGMA, Q, STEPS)] * 3, DELTA)
    assert ledger.history("alpha") == [Spend(SIGMA, Q, STEPS)] * 3
    assert verify_ledger(read.entries, {"alpha": keys["alpha"].public_key()}).ok
    assert canonical({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def test_fingerprints_are_kept_per_key_object_and_never_cross_keys(tmp_path):
    """A key's fingerprint is computed once per key object: the same string for the private
    key and its public half, whichever is asked first, and never another key's."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def by_hand(key):
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashes.Hash(hashes.SHA256())
        digest.update(der)
        return "SHA256:" + digest.finalize().hex()

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    for key in keys:
        public = key.public_key()
        assert fingerprint(public) == fingerprint(key) == by_hand(public)
        assert fingerprint(key) == fingerprint(key) and fingerprint(public) == by_hand(public)
    assert len({fingerprint(k) for k in keys}) == 3
    fresh = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(50)]  # new objects, new ids
    assert [fingerprint(k) for k in fresh] == [by_hand(k) for k in fresh]


def test_an_appended_entrys_event_is_the_one_its_fields_give(tmp_path):
    """The event `append` computed for a spend is the one `event_of` finds in the entry as
    written (and as read back): what the site composes its history from."""
    from fedshield.privacy.events import event_of

    key_path = tmp_path / "site.key"
    generate_site_key(key_path)
    key = load_private_key(key_path)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for rnd in (1, 2):
        entry = ledger.append(_fields("alpha", rnd), key)
        assert ledger.event(entry) == event_of(entry)
        assert ledger.event(entry).spend() == Spend(SIGMA, Q, STEPS)
    read = Ledger(tmp_path / "ledger.jsonl").read().entries
    assert [Ledger(tmp_path / "x.jsonl").event(e) for e in read] == [event_of(e) for e in read]


def test_append_never_lowers_epsilon_and_refuses_bad_input(tmp_path):
    key_path = tmp_path / "site.key"
    generate_site_key(key_path)
    key = load_private_key(key_path)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    e = ledger.append(_fields("s", 1, epsilon=0.001), key)  # an under-counting caller is corrected
    assert e["epsilon"] == epsilon([Spend(SIGMA, Q, STEPS)], DELTA)
    e = ledger.append(_fields("s", 2, epsilon=99.0), key)  # a larger claim is kept
    assert e["epsilon"] == 99.0
    with pytest.raises(LedgerError, match="round 1 after round 2"):
        ledger.append(_fields("s", 1), key)
    with pytest.raises(LedgerError, match="sample_rate"):
        ledger.append(_fields("s", 3, sample_rate=2.0), key)
    other = tmp_path / "other.key"
    generate_site_key(other)
    with pytest.raises(LedgerError, match="one key"):
        ledger.append(_fields("s", 3), load_private_key(other))
    assert len(ledger.read().entries) == 2


# -- tampering -------------------------------------------------------------------------

def _bad(run: Path):
    return verify_ledger(_entries(run), _pubs(run))


def test_honest_ledger_verifies(world, tmp_path):
    run = _copy_run(world, tmp_path)
    res = _bad(run)
    assert res.ok and res.signatures_checked and res.checked["signatures"] == 6 and res.checked["links"] == 6
    unsigned = verify_ledger(_entries(run), None)
    assert unsigned.ok and not unsigned.signatures_checked and "signatures not checked" in unsigned.notes[-1]


def test_edited_number_is_detected(world, tmp_path):
    run = _copy_run(world, tmp_path)
    entries = _entries(run)
    entries[2]["noise_multiplier"] = 5.0
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and res.first_bad_index == 2 and "edited" in res.reason and "round 2" in res.reason


def test_edited_number_with_recomputed_hash_fails_the_signature(world, tmp_path):
    run = _copy_run(world, tmp_path)
    entries = _entries(run)
    entries[0]["noise_multiplier"] = 5.0
    entries[0]["hash"] = entry_hash(entries[0])
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and res.first_bad_index == 0 and "signature" in res.reason


def test_removed_entry_is_detected(world, tmp_path):
    run = _copy_run(world, tmp_path)
    entries = _entries(run)
    del entries[2]  # alpha, round 2
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and "removed" in res.reason and "'alpha'" in res.reason


def test_reordered_entries_are_detected(world, tmp_path):
    run = _copy_run(world, tmp_path)
    entries = _entries(run)
    entries[0], entries[2] = entries[2], entries[0]  # alpha round 1 and round 2 swapped
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and res.first_bad_index == 0


def test_inserted_entry_signed_by_another_key_is_detected(world, tmp_path):
    run = _copy_run(world, tmp_path)
    generate_site_key(tmp_path / "mallory.key")
    mallory = load_private_key(tmp_path / "mallory.key")
    forged_ledger = Ledger(tmp_path / "forged.jsonl")
    entries = _entries(run)
    # a valid-looking entry: correct prev_hash/seq for alpha after round 3, own valid hash and signature
    last_alpha = entries[4]
    fake = _signed(mallory, dict(_fields("alpha", 4), epsilon=last_alpha["epsilon"] + 0.1),
                   seq=last_alpha["seq"] + 1, prev_hash=last_alpha["hash"],
                   key_fingerprint=last_alpha["key_fingerprint"])
    entries.insert(5, fake)
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and res.first_bad_index == 5 and "signature" in res.reason
    # and an entry signed with the other key's own fingerprint names the wrong key
    e2 = forged_ledger.append(_fields("alpha", 1), mallory)
    res2 = verify_ledger([e2], _pubs(run))
    assert not res2.ok and "not site 'alpha'" not in res2.reason and "signed with key" in res2.reason


def test_forged_signature_is_detected(world, tmp_path):
    run = _copy_run(world, tmp_path)
    entries = _entries(run)
    sig = bytearray(base64.b64decode(entries[3]["signature"]))
    sig[-1] ^= 1
    entries[3]["signature"] = base64.b64encode(bytes(sig)).decode()
    _write(run, entries)
    res = _bad(run)
    assert not res.ok and res.first_bad_index == 3 and "signature does not verify" in res.reason


def test_round_going_backwards_is_detected(world, tmp_path):
    root, _, keys = world
    # a site's chain that is intact but whose rounds go backwards (re-signed by the site key itself)
    entries = []
    prev = GENESIS
    for seq, rnd in enumerate((1, 3, 2)):
        entries.append(_signed(keys["alpha"], dict(_fields("alpha", rnd), epsilon=float(seq + 1)), seq, prev))
        prev = entries[-1]["hash"]
    res = verify_ledger(entries, {"alpha": keys["alpha"].public_key()})
    assert not res.ok and res.first_bad_index == 2 and "backwards" in res.reason and "round 2" in res.reason


def test_missing_key_for_a_site_fails(world, tmp_path):
    run = _copy_run(world, tmp_path)
    keys = _pubs(run)
    del keys["beta"]
    res = verify_ledger(_entries(run), keys)
    assert not res.ok and res.first_bad_index == 1 and "no public key" in res.reason


# -- crash recovery --------------------------------------------------------------------

def test_truncated_ledger_is_recovered_and_the_tail_kept(world, tmp_path):
    root, _, _ = world
    path = tmp_path / "ledger.jsonl"
    data = (root / "state-alpha" / "ledger.jsonl").read_bytes()
    cut = len(data) - 57
    path.write_bytes(data[:cut])
    first_two = data[: data.rfind(b"\n", 0, cut) + 1]
    r = Ledger(path).read()
    assert len(r.entries) == 2 and r.truncated_bytes == cut - len(first_two)
    assert f"cut off at byte {len(first_two)}" in r.message and "recovered 2 entries" in r.message
    r2 = Ledger(path).recover()
    assert path.read_bytes() == first_two
    torn = list(tmp_path.glob("ledger.jsonl.torn-*"))
    assert len(torn) == 1 and torn[0].read_bytes() == data[len(first_two):cut]
    assert str(torn[0]) in r2.message
    assert Ledger(path).read().truncated_bytes == 0
    assert verify_ledger(Ledger(path).read().entries, None).ok


def test_corrupt_middle_line_is_an_error_with_its_line_number(world, tmp_path):
    root, _, _ = world
    lines = (root / "state-alpha" / "ledger.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=r"line 2 "):
        Ledger(path).read()
    with pytest.raises(LedgerError, match=str(path)):
        Ledger(path).recover()


# -- audit -----------------------------------------------------------------------------

def test_audit_recomputes_what_honest_sites_recorded(world, tmp_path):
    run = _copy_run(world, tmp_path)
    res = audit(run, None)
    assert res.ok and res.key_source == "run directory" and "only as trustworthy" in res.key_note
    for row in res.entries:
        assert row["rdp"] == pytest.approx(row["recorded"], rel=1e-9)
        assert not row["flag"]
    s = res.sites["alpha"]
    assert s.rdp_epsilon == pytest.approx(epsilon_dp_accounting_rdp([Spend(SIGMA, Q, STEPS)] * 3, DELTA), rel=1e-12)
    assert 0 < s.pld_epsilon < s.rdp_epsilon and s.steps == 3 * STEPS and s.rounds == 3


def test_audit_flags_under_reported_epsilon(world, tmp_path):
    root, _, keys = world
    run = _copy_run(world, tmp_path)
    # a site that signs a too-small ε (its chain and signature are fine)
    e = _signed(keys["alpha"], dict(_fields("alpha", 1), epsilon=0.5), 0, GENESIS)
    _write(run, [e])
    res = audit(run, None)
    assert not res.ok and res.entries[0]["flag"] == "under-reported ε"
    assert "recorded ε=0.5 is below" in res.flags[0]


def test_audit_flags_over_budget(world, tmp_path):
    run = _copy_run(world, tmp_path)
    res = audit(run, None, budgets={"alpha": 1.0, "beta": 100.0})
    assert not res.ok and res.sites["alpha"].over_budget and not res.sites["beta"].over_budget
    assert "past its budget" in res.flags[0]


def test_audit_main_exit_codes_and_reports(world, tmp_path, capsys):
    root, _, _ = world
    run = _copy_run(world, tmp_path)
    keys_dir = tmp_path / "keys-from-sites"
    keys_dir.mkdir()
    for site in ("alpha", "beta"):
        shutil.copy(root / f"state-{site}" / "site.pub", keys_dir / f"{site}.pub")
    assert audit_main([str(run), "--site-keys", str(keys_dir)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "alpha" in out
    md, html = run / "audit" / "audit.md", run / "audit" / "audit.html"
    assert md.is_file() and html.is_file()
    for text in (md.read_text(), html.read_text()):
        for needle in ("δ", "Privacy unit", "Accountant", "Sampling assumption", "Poisson", "PLD", "RDP"):
            assert needle in text, needle
    assert "data:image/png;base64," in html.read_text()

    assert audit_main([str(run), "--json", "--out", str(tmp_path / "rep")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["verification"]["signatures_checked"]

    assert audit_main([str(run), "--budget", "alpha=0.5"]) == 1
    assert "past its budget" in capsys.readouterr().err

    entries = _entries(run)
    entries[1]["steps"] = 1
    _write(run, entries)
    assert audit_main([str(run)]) == 1
    err = capsys.readouterr().err
    assert "entry 1 (round 1, site 'beta')" in err

    assert audit_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert audit_main([str(run), "--budget", "alpha"]) == 2
    (run / "privacy" / "site-keys" / "alpha.pub").write_text("not a key")
    assert audit_main([str(run)]) == 2


def test_audit_of_a_site_state_folder_uses_its_key(world):
    root, _, _ = world
    res = audit(root / "state-alpha", None)
    assert res.ok and res.key_source == "state folder" and res.verify.checked["signatures"] == 3


def test_audit_without_keys_does_not_pass(world, tmp_path):
    root, _, _ = world
    shutil.copy(root / "state-alpha" / "ledger.jsonl", tmp_path / "l.jsonl")
    res = audit(tmp_path / "l.jsonl", None)
    assert not res.ok and res.verify.ok and "signatures not checked" in res.flags[0]


def test_run_ledger_of_a_later_run_is_partial_but_losing_its_first_entry_is_not(tmp_path):
    generate_site_key(tmp_path / "s.key")
    key = load_private_key(tmp_path / "s.key")
    site_ledger = Ledger(tmp_path / "ledger.jsonl")
    for run, rnd in (("run-1", 1), ("run-1", 2), ("run-2", 1), ("run-2", 2)):
        site_ledger.append(_fields("s", rnd, run=run), key)
    entries = site_ledger.read().entries
    run2 = [e for e in entries if e["run_id"] == "run-2"]  # what run-2's coordinator holds
    res = verify_ledger(run2, {"s": key.public_key()})
    assert res.ok and res.partial_sites == {"s": 2} and "2 earlier spend(s)" in res.notes[0]
    res = verify_ledger(run2[1:], {"s": key.public_key()})  # run-2's first spend dropped
    assert not res.ok and res.first_bad_index == 0 and "removed" in res.reason
    del entries[0]  # a site's own ledger that lost its first entry
    assert not verify_ledger(entries, {"s": key.public_key()}).ok


# ------------------------------------------------------------ what the audit takes on whose word


def _site_folder(tmp_path, sigma: float, rounds: int, budget: float | None):
    state = tmp_path / "site"
    pub = generate_site_key(state / "site.key")
    (state / "site.pub").write_bytes(pub)
    key = load_private_key(state / "site.key")
    ledger = Ledger(state / "ledger.jsonl")
    for r in range(1, rounds + 1):
        fields = {"run_id": "run-1", "round": r, "site": "st-marys", "noise_multiplier": sigma, "sample_rate": 0.5,
                  "steps": 2, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}
        if budget is not None:
            fields["budget_epsilon"] = budget
        ledger.append(fields, key)
    return state


def test_the_audit_takes_a_sites_budget_from_what_the_site_signed(tmp_path):
    result = audit(_site_folder(tmp_path, 1.0, 5, budget=1.0))
    assert result.budget_source.startswith("signed by each site")
    assert not result.ok and any("past its budget 1" in f for f in result.flags)


def test_max_epsilon_fails_the_audit_and_a_weak_guarantee_is_said(tmp_path):
    state = _site_folder(tmp_path, 0.6, 20, budget=None)
    relaxed = audit(state)
    eps = relaxed.sites["st-marys"].rdp_epsilon
    assert eps > 10 and relaxed.ok
    assert any(n.startswith("warning: site st-marys") and "weak guarantee" in n for n in relaxed.notes)
    strict = audit(state, max_epsilon=5.0)
    assert not strict.ok and any("above --max-epsilon 5" in f for f in strict.flags)
    assert audit_main([str(state), "--max-epsilon", "5", "--out", str(tmp_path / "a")]) == 1
    assert audit_main([str(state), "--max-epsilon", "-1"]) == 2


def test_files_are_opened_in_their_folder_made_only_when_missing(tmp_path):
    """open_in_folder makes a missing folder (and parents) for a file it may create, never for
    one it may only open; a ledger's first entry still creates its folder and file."""
    from fedshield.privacy.files import open_in_folder

    deep = tmp_path / "a" / "b" / "c.txt"
    fd = open_in_folder(deep, os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    assert deep.is_file() and stat.S_IMODE(deep.stat().st_mode) & 0o777 == 0o644 & ~_umask()
    with pytest.raises(FileNotFoundError):
        open_in_folder(tmp_path / "x" / "y.txt", os.O_RDONLY)
    assert not (tmp_path / "x").exists()
    fd = open_in_folder(deep, os.O_RDONLY)  # there: opened as it is
    os.close(fd)
    key_path = tmp_path / "site.key"
    generate_site_key(key_path)
    ledger = Ledger(tmp_path / "new" / "books" / "ledger.jsonl")
    ledger.append(_fields("alpha", 1), load_private_key(key_path))
    ledger.append(_fields("alpha", 2), load_private_key(key_path))
    assert [e["round"] for e in ledger.read().entries] == [1, 2]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""PKI: certificates with the right SANs, 0600 keys, no silent overwrite, `certs show`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy import pki
from privacy import signing
from privacy.errors import FedShieldError

FINGERPRINT = r"SHA256:[0-9a-f]{64}"


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_makes_ca_and_server_cert_with_sans(tmp_path):
    made = pki.init_pki(tmp_path, "fl.example.org", ["127.0.0.1", "fl2.example.org", "::1"])
    assert [m.path.name for m in made] == ["ca.crt", "ca.key", "server.crt", "server.key"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "fl2.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=pki.DEFAULT_DAYS)
    # Python's TLS stack accepts the pair and the CA (what the sites' pre-flight uses).
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    assert made[2].fingerprint == "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()


def test_private_keys_are_0600_and_public_files_are_not_secret(tmp_path):
    pki.init_pki(tmp_path, "fl.example.org", [])
    pki.connection_key_pair("st-marys", tmp_path)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "server.key") == 0o600
    assert mode(tmp_path / "st-marys.key") == 0o600
    assert mode(tmp_path / "ca.crt") == 0o644
    assert mode(tmp_path / "st-marys.pub") == 0o644


def test_never_overwrites_without_force(tmp_path):
    pki.init_pki(tmp_path, "fl.example.org", [])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FedShieldError, match="ca.crt: already exists"):
        pki.init_pki(tmp_path, "fl.example.org", [])
    assert (tmp_path / "ca.key").read_bytes() == before
    pki.init_pki(tmp_path, "fl.example.org", [], force=True)
    assert (tmp_path / "ca.key").read_bytes() != before
    assert mode(tmp_path / "ca.key") == 0o600
    pki.connection_key_pair("a", tmp_path)
    with pytest.raises(FedShieldError, match=r"a\.key: already exists.*--force"):
        pki.connection_key_pair("a", tmp_path)


def test_connection_key_is_in_the_format_flower_loads(tmp_path):
    made = pki.connection_key_pair("bank-1", tmp_path)
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, EC.
    key = serialization.load_ssh_private_key((tmp_path / "bank-1.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    # flwr supernode register: load_ssh_public_key, a NIST curve.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert try_load_public_key(tmp_path / "bank-1.pub") == public_key_to_bytes(key.public_key())
    assert made[0].fingerprint == made[1].fingerprint == signing.fingerprint(key)
    assert signing.fingerprint(key) == signing.fingerprint(key.public_key())
    assert re.fullmatch(FINGERPRINT, made[0].fingerprint)
    assert (tmp_path / "bank-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_bad_names_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(FedShieldError, match="site name"):
        pki.connection_key_pair("../evil", tmp_path)
    with pytest.raises(FedShieldError, match="not a host name"):
        pki.init_pki(tmp_path, "fl.example.org", ["a b"])
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(FedShieldError, match="not an OpenSSH ECDSA private key"):
        pki.load_connection_private_key(tmp_path / "junk.key")
    with pytest.raises(FedShieldError, match="no such file"):
        pki.describe(tmp_path / "missing.crt")


def test_show_describes_certificates_and_keys(tmp_path, capsys):
    made = pki.init_pki(tmp_path, "fl.example.org", ["127.0.0.1"])
    pki.connection_key_pair("st-marys", tmp_path)
    text = pki.describe(tmp_path / "server.crt")
    assert "subject:      CN=fl.example.org" in text
    assert "issuer:       CN=fedshield CA" in text
    assert "DNS:fl.example.org, IP:127.0.0.1" in text
    assert "valid until:" in text and "days left" in text
    assert made[2].fingerprint in text
    assert "public key, ECDSA secp384r1" in pki.describe(tmp_path / "st-marys.pub")
    assert "private key, ECDSA secp384r1" in pki.describe(tmp_path / "st-marys.key")
    assert "private key" in pki.describe(tmp_path / "ca.key")
    # the command prints fingerprints of what it made
    assert pki.certs_main(["site", "other", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "other.key" in out and "SHA256:" in out
    assert pki.certs_main(["show", str(tmp_path / "ca.crt")]) == 0
    assert "certificate:  CA" in capsys.readouterr().out


def test_expired_certificate_is_shown_as_expired(tmp_path):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pki.init_pki(tmp_path, "fl.example.org", [], days=2, not_before=past)
    assert "EXPIRED" in pki.describe(tmp_path / "server.crt")


def test_one_fingerprint_format_for_every_key_and_certificate(tmp_path, capsys):
    """`SHA256:<lowercase hex>` everywhere: what certs init/site/show print, and what a ledger
    entry stores in `key_fingerprint` for a site's ledger signing key (P-256)."""
    made = pki.init_pki(tmp_path, "fl.example.org", [])
    made += pki.connection_key_pair("st-marys", tmp_path)
    for m in made:
        assert re.fullmatch(FINGERPRINT, m.fingerprint), m
        assert m.line().endswith(f"  {m.fingerprint}")
    connection = serialization.load_ssh_private_key((tmp_path / "st-marys.key").read_bytes(), None)
    assert f"fingerprint:  {signing.fingerprint(connection)}" in pki.describe(tmp_path / "st-marys.pub")
    server_key = serialization.load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    shown = pki.describe(tmp_path / "server.crt")
    assert f"secp384r1, {signing.fingerprint(server_key)}" in shown  # the certificate's key
    assert f"fingerprint:  {made[2].fingerprint} (of the certificate)" in shown
    assert made[2].fingerprint != signing.fingerprint(server_key)

    ledger_pem = signing.generate_site_key(tmp_path / "state" / "site.key")
    (tmp_path / "state" / "site.pub").write_bytes(ledger_pem)
    ledger_key = signing.load_public_key(ledger_pem)
    assert f"fingerprint:  {signing.fingerprint(ledger_key)}" in pki.describe(tmp_path / "state" / "site.pub")
    shown = pki.describe(tmp_path / "state" / "site.key")
    assert f"fingerprint:  {signing.fingerprint(ledger_key)} (of its public key)" in shown

    assert pki.certs_main(["site", "bank-1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fps = re.findall(r"SHA256:\S+", out)
    assert len(fps) == 2 and fps[0] == fps[1] and re.fullmatch(FINGERPRINT, fps[0])
    assert "--connection-keys" in out and "--connection-key" in out

"""PKI: certificates with the right SANs, 0600 keys, no silent overwrite, `certs show`."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.deploy import pki
from fedshield.privacy import signing
from fedshield.privacy.errors import FedShieldError

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


# ------------------------------------------------------------------ enrolment: csr, sign, revoke


def enrol(tmp_path, name: str, folder: str | None = None, **sign):
    """A site makes its key and CSR in its own folder; the coordinator signs it."""
    site = tmp_path / (folder or name)
    pki.make_csr(name, site)
    return site, pki.sign_csr(site / f"{name}.csr", tmp_path / "pki", **sign)


@pytest.fixture
def coordinator(tmp_path):
    pki.init_pki(tmp_path / "pki", "fl.example.org", ["127.0.0.1"])
    return tmp_path / "pki"


def test_csr_key_stays_at_the_site_0600_and_is_what_flower_loads(tmp_path):
    made = pki.make_csr("st-marys", tmp_path)
    assert [m.path.name for m in made] == ["st-marys.key", "st-marys.csr"]
    assert mode(tmp_path / "st-marys.key") == 0o600 and mode(tmp_path / "st-marys.csr") == 0o644
    key = pki.load_connection_private_key(tmp_path / "st-marys.key")  # flower-supernode's format
    csr = x509.load_pem_x509_csr((tmp_path / "st-marys.csr").read_bytes())
    assert csr.is_signature_valid and signing.fingerprint(csr.public_key()) == signing.fingerprint(key)
    assert csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "st-marys"
    assert made[0].fingerprint == made[1].fingerprint == signing.fingerprint(key)
    assert b"PRIVATE" not in (tmp_path / "st-marys.csr").read_bytes()
    with pytest.raises(FedShieldError, match=r"st-marys\.key: already exists"):
        pki.make_csr("st-marys", tmp_path)


def test_sign_enrols_the_name_with_the_key_of_the_csr(tmp_path, coordinator):
    site, made = enrol(tmp_path, "st-marys")
    ca = x509.load_pem_x509_certificate((coordinator / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((coordinator / "sites" / "st-marys.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = pki.load_connection_private_key(site / "st-marys.key")
    fp = signing.fingerprint(key)
    assert signing.fingerprint(pki.load_connection_public_key(coordinator / "sites" / "st-marys.pub")) == fp
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` reads
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert try_load_public_key(coordinator / "sites" / "st-marys.pub") == public_key_to_bytes(key.public_key())
    from fedshield.deploy.enrolment import REGISTRY, load_enrolment

    registry = load_enrolment(coordinator / REGISTRY)
    assert registry.sites["st-marys"].key == fp and registry.check("st-marys", fp) is None
    assert registry.sites["st-marys"].certificate == made[0].fingerprint
    assert pki.enrolled_keys(coordinator) == ([("st-marys", coordinator / "sites" / "st-marys.pub")], [])


def forged_csr(path, name: str, key, signer=None, extra_cn: str | None = None):
    """A CSR for `name` carrying `key`'s public key, signed by `signer` (default: `key`)."""
    attrs = [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]
    if extra_cn:
        attrs.append(x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, extra_cn))
    signing_key = signer or key
    algorithm = hashes.SHA256() if isinstance(signing_key, ec.EllipticCurvePrivateKey) else None
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(signing_key, algorithm)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    if signer is not None and signer is not key:  # swap in `key`'s SubjectPublicKeyInfo
        spki_signer = signer.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        spki_key = key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        der = bytearray(bytes(der).replace(spki_signer, spki_key))
    path.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
                     + b"-----END CERTIFICATE REQUEST-----\n")
    return path


def test_sign_refuses_a_wrong_csr_and_a_name_clash_with_one_line(tmp_path, coordinator):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    site, _ = enrol(tmp_path, "st-marys")
    theirs = pki.load_connection_private_key(site / "st-marys.key")
    mine = ec.generate_private_key(ec.SECP384R1())
    cases = {
        "junk": ((tmp_path / "junk.csr").write_text("hello") and tmp_path / "junk.csr",
                 "not a PEM certificate signing request"),
        # st-marys' public key in a CSR its holder did not sign: the key is not proven
        "unproven": (forged_csr(tmp_path / "unproven.csr", "rogue", theirs, signer=mine),
                     "its signature does not verify"),
        "clash": (forged_csr(tmp_path / "clash.csr", "st-marys", mine), "already enrolled with another key"),
        "key-reuse": (forged_csr(tmp_path / "reuse.csr", "rogue", theirs), "already enrolled as 'st-marys'"),
        "two-names": (forged_csr(tmp_path / "two.csr", "rogue", mine, extra_cn="st-marys"),
                      "names 2 sites"),
        "bad-name": (forged_csr(tmp_path / "bad.csr", "../evil", mine), "site name '../evil'"),
        "ed25519": (forged_csr(tmp_path / "ed.csr", "rogue", ed25519.Ed25519PrivateKey.generate()),
                    "needs ECDSA"),
    }
    from fedshield.deploy.enrolment import REGISTRY

    before = (coordinator / REGISTRY).read_bytes()
    for what, (path, message) in cases.items():
        with pytest.raises(FedShieldError, match=message) as err:
            pki.sign_csr(path, coordinator)
        assert "\n" not in str(err.value), what
    assert (coordinator / REGISTRY).read_bytes() == before  # nothing enrolled, nothing changed
    from fedshield.simulations.cli import main

    assert main(["certs", "sign", str(tmp_path / "clash.csr"), "--pki", str(coordinator)]) == 2


def test_rotation_replaces_and_revokes_the_old_key_renewal_keeps_it(tmp_path, coordinator):
    from fedshield.deploy.enrolment import REGISTRY, load_enrolment

    old_site, _ = enrol(tmp_path, "st-marys")
    old = signing.fingerprint(pki.load_connection_private_key(old_site / "st-marys.key"))
    pki.sign_csr(old_site / "st-marys.csr", coordinator)  # renewal: same key, a new certificate
    assert load_enrolment(coordinator / REGISTRY).sites["st-marys"].key == old
    new_site, _ = (tmp_path / "new", pki.make_csr("st-marys", tmp_path / "new"))
    made = pki.sign_csr(new_site / "st-marys.csr", coordinator, rotate=True)
    new = signing.fingerprint(pki.load_connection_private_key(new_site / "st-marys.key"))
    registry = load_enrolment(coordinator / REGISTRY)
    assert registry.sites["st-marys"].key == new and old in registry.revoked
    assert made[-1].fingerprint == old
    assert "was revoked" in registry.check("st-marys", old)
    with pytest.raises(FedShieldError, match="was revoked"):  # a revoked key never comes back
        pki.sign_csr(old_site / "st-marys.csr", coordinator, rotate=True)


def test_revoke_by_name_or_key_file(tmp_path, coordinator):
    from fedshield.deploy.enrolment import REGISTRY, load_enrolment

    a, _ = enrol(tmp_path, "st-marys")
    enrol(tmp_path, "st-johns")
    made = pki.revoke("st-marys", coordinator, "laptop stolen")
    registry = load_enrolment(coordinator / REGISTRY)
    assert "st-marys" not in registry.sites and registry.revoked[made.fingerprint]["reason"] == "laptop stolen"
    assert made.fingerprint == signing.fingerprint(pki.load_connection_private_key(a / "st-marys.key"))
    pki.revoke(str(coordinator / "sites" / "st-johns.crt"), coordinator)  # a certificate names its key too
    assert not load_enrolment(coordinator / REGISTRY).sites
    with pytest.raises(FedShieldError, match="was revoked already"):
        pki.revoke("st-marys", coordinator)
    with pytest.raises(FedShieldError, match="not an enrolled site name"):
        pki.revoke("nobody", coordinator)
    assert pki.enrolled_keys(coordinator) == ([], [])


def test_an_expired_or_foreign_certificate_is_not_admitted_with_one_line(tmp_path, coordinator):
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    enrol(tmp_path, "st-marys", days=2, now=long_ago)
    enrol(tmp_path, "st-johns")
    admitted, left_out = pki.enrolled_keys(coordinator)
    assert [n for n, _ in admitted] == ["st-johns"]
    assert len(left_out) == 1 and "site st-marys: not admitted" in left_out[0] and "expired on" in left_out[0]
    from fedshield.deploy.enrolment import REGISTRY, load_enrolment

    site = load_enrolment(coordinator / REGISTRY).sites["st-marys"]
    assert "enrolment certificate expired" in load_enrolment(coordinator / REGISTRY).check("st-marys", site.key)
    other = tmp_path / "other-pki"
    pki.init_pki(other, "fl.example.org", [])
    (coordinator / "sites" / "st-johns.crt").write_bytes((other / "server.crt").read_bytes())
    admitted, left_out = pki.enrolled_keys(coordinator)
    assert not admitted and "not issued by the federation CA" in left_out[0]

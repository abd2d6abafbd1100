"""PKI for a deployment: a CA, the coordinator's TLS certificate, and sites' connection keys.

    fedshield certs init --out pki/ --server-name fl.example.org --san 127.0.0.1
        ca.crt  ca.key  server.crt  server.key
    fedshield certs site st-marys --out pki/
        st-marys.key  st-marys.pub
    fedshield certs csr st-marys --out keys/             (at the site)
        st-marys.key  st-marys.csr
    fedshield certs sign st-marys.csr --pki pki/ [--rotate]    (at the coordinator)
        sites/st-marys.crt  sites/st-marys.pub  enrolment.json
    fedshield certs revoke st-marys|KEYFILE --pki pki/
    fedshield certs show FILE

Everything is made with the `cryptography` package (no openssl subprocess).

Formats, as Flower 1.41 expects them:
- TLS: PEM X.509. The CA (ECDSA P-384, `basicConstraints CA:TRUE, pathlen:0`) signs the
  server certificate (ECDSA P-384, SANs: DNS entries for names, IP entries for addresses,
  EKU serverAuth). `ca.crt` is what sites pass as `--ca`; `server.crt`/`server.key` go to
  the coordinator only.
- Connection keys (a site's SuperNode authentication key; not its ledger signing key, the
  P-256 key in its state folder that `client/site.py` makes and that signs its privacy
  ledger): an ECDSA key on a NIST curve (P-384, like `ssh-keygen -t ecdsa -b 384`).
  `flower-supernode --auth-supernode-private-key` reads the private key with
  `load_ssh_private_key` (OpenSSH private key format), and `flwr supernode register` reads
  the public key with `load_ssh_public_key` (one line, `ecdsa-sha2-nistp384 AAAA...`). So
  `NAME.key` is an OpenSSH private key and `NAME.pub` an OpenSSH public key. A site can make
  its pair on its own machine (this command, or `ssh-keygen -t ecdsa -b 384 -N "" -f NAME.key`
  and rename NAME.key.pub to NAME.pub) and hand over only NAME.pub.

Enrolment (`csr` at the site, `sign` at the coordinator) binds a site's name to its
connection key: the site makes its key and a CSR naming itself (the key never leaves it), the
coordinator checks the CSR's self-signature, signs a certificate with the federation CA and
records name -> key in `<pki>/enrolment.json`, the registry the ServerApp checks every HELLO
against and the deny-list `revoke` appends to (deploy/enrolment.py says why and how).
`fedshield certs site` (the coordinator makes the pair) stays for hand-collected keys.

Private keys are created with mode 0600 from the first byte (os.open with O_EXCL), never
overwritten without `force`; every function returns, and every command prints, the
fingerprints of what it made, in fedshield's one format `SHA256:<lowercase hex>`: of the
DER SubjectPublicKeyInfo for a key (`privacy.signing.fingerprint`, the same for both halves
of a pair and the same as a ledger entry's `key_fingerprint`), of the DER certificate for a
certificate (the digest `openssl x509 -noout -fingerprint -sha256` prints, in upper case
with colons).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshield.deploy.enrolment import REGISTRY, Enrolled, Enrolment, load_enrolment, save_enrolment
from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.files import create_file, read_file
from fedshield.privacy.signing import fingerprint as key_fingerprint


class PKIError(FedShieldError):
    """A certificate or key is missing, unreadable, or would be overwritten."""


CURVE = ec.SECP384R1
DEFAULT_DAYS = 825  # the CA/Browser Forum ceiling for server certificates
DEFAULT_CA_DAYS = 3650
SITE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Made:
    path: Path
    kind: str
    fingerprint: str

    def line(self) -> str:
        return f"{self.kind:<22} {self.path}  {self.fingerprint}"


# ------------------------------------------------------------------ writing files


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    """Create `path` (0600 for private keys) atomically w.r.t. permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not force:
            raise PKIError(f"{path}: already exists; not overwriting it (use --force to replace it)")
        path.unlink()
    create_file(path, data, private=private, error=PKIError)


def _check_free(paths: list[Path], force: bool) -> None:
    """Refuse before creating anything, so that a refusal leaves no half-made set."""
    if force:
        return
    for p in paths:
        if p.exists():
            raise PKIError(f"{p}: already exists; not overwriting it (use --force to replace it)")


# ------------------------------------------------------------------ fingerprints


def cert_fingerprint(cert: x509.Certificate) -> str:
    """`SHA256:<lowercase hex>` of the DER certificate (keys: `privacy.signing.fingerprint`)."""
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()


# ------------------------------------------------------------------ CA + server


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshield"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen = set()
    for raw in names:
        n = raw.strip()
        if not n or n in seen:
            continue
        seen.add(n)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if any(c.isspace() for c in n) or "/" in n:
                raise PKIError(f"--san {n!r}: not a host name or an IP address") from None
            entries.append(x509.DNSName(n))
    return entries


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise PKIError(f"validity {days} days: must be at least 1 day")
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    return start, start + dt.timedelta(days=days)


def make_ca(common_name: str = "fedshield CA", days: int = DEFAULT_CA_DAYS,
            not_before: dt.datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    start, end = _validity(days, not_before)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _leaf_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str,
               public_key: ec.EllipticCurvePublicKey, start: dt.datetime, end: dt.datetime,
               usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """An end-entity certificate for `name`'s `public_key`, signed by the CA: digital
    signatures only, for one extended key usage (a server's TLS or a site's client auth)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return (
        builder
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, server_name: str, sans: list[str],
                     days: int = DEFAULT_DAYS, not_before: dt.datetime | None = None
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not server_name.strip():
        raise PKIError("--server-name: empty; give the host name sites connect to (e.g. fl.example.org)")
    key = ec.generate_private_key(CURVE())
    start, end = _validity(days, not_before)
    entries = _san_entries([server_name, *sans])
    cert = _leaf_cert(ca_key, ca_cert, server_name, key.public_key(), start, end,
                      ExtendedKeyUsageOID.SERVER_AUTH, entries)
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_pki(out: str | Path, server_name: str, sans: list[str] | None = None, days: int = DEFAULT_DAYS,
             ca_days: int = DEFAULT_CA_DAYS, force: bool = False,
             not_before: dt.datetime | None = None) -> list[Made]:
    """ca.crt, ca.key, server.crt, server.key in `out`. Returns what was made."""
    out = Path(out)
    paths = {n: out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    _check_free(list(paths.values()), force)
    ca_key, ca_cert = make_ca(days=ca_days, not_before=not_before)
    key, cert = make_server_cert(ca_key, ca_cert, server_name, list(sans or []), days, not_before)
    _write(paths["ca.key"], _key_pem(ca_key), True, force)
    _write(paths["ca.crt"], _cert_pem(ca_cert), False, force)
    _write(paths["server.key"], _key_pem(key), True, force)
    _write(paths["server.crt"], _cert_pem(cert), False, force)
    return [
        Made(paths["ca.crt"], "CA certificate", cert_fingerprint(ca_cert)),
        Made(paths["ca.key"], "CA private key", key_fingerprint(ca_key)),
        Made(paths["server.crt"], "server certificate", cert_fingerprint(cert)),
        Made(paths["server.key"], "server private key", key_fingerprint(key)),
    ]


# ------------------------------------------------------------------ connection keys


def check_site_name(name: str) -> str:
    if not name or not set(name) <= SITE_NAME_CHARS or name.startswith((".", "-")):
        raise PKIError(f"site name {name!r}: use letters, digits, '-', '_' or '.' (e.g. st-marys)")
    return name


def connection_key_pair(name: str, out: str | Path, force: bool = False) -> list[Made]:
    """A site's connection key: NAME.key (OpenSSH private key, 0600) and NAME.pub (OpenSSH
    public key line, what the coordinator admits with `fedshield server --connection-keys`)."""
    check_site_name(name)
    out = Path(out)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    _check_free([key_path, pub_path], force)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    _write(key_path, private, True, force)
    _write(pub_path, public, False, force)
    fp = key_fingerprint(key)
    return [Made(key_path, "connection private key", fp), Made(pub_path, "connection public key", fp)]


def load_connection_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A site's connection key (SuperNode authentication), checked the way flower-supernode loads it."""
    p = Path(path)
    data = read_file(p, "connection key", PKIError)
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise PKIError(f"connection key {p}: not an OpenSSH ECDSA private key "
                       "(make one with `fedshield certs site NAME`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"connection key {p}: a {type(key).__name__}, "
                       "but SuperNode authentication needs an ECDSA (NIST curve) key")
    return key


def load_connection_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A site's connection public key as `flwr supernode register` reads it."""
    p = Path(path)
    data = read_file(p, "connection public key", PKIError)
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise PKIError(f"connection public key {p}: "
                       "not an OpenSSH public key line (ecdsa-sha2-nistp384 AAAA...)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"connection public key {p}: a {type(key).__name__}, but SuperNode authentication needs ECDSA")
    return key


# ------------------------------------------------------------------ enrolment (CSR at the site, signed here)

DEFAULT_SITE_DAYS = 397  # a site certificate: about a year, renewed with a new `certs sign`
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower's SuperNode authentication takes


def make_csr(name: str, out: str | Path, force: bool = False) -> list[Made]:
    """At the site: NAME.key (its connection key, OpenSSH private key, 0600, made here and
    never sent) and NAME.csr (PEM, subject CN=NAME, signed with that key: the proof that
    whoever asks for NAME holds the key). The site sends only NAME.csr to the coordinator."""
    check_site_name(name)
    out = Path(out)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    _check_free([key_path, csr_path], force)
    key = ec.generate_private_key(CURVE())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(_name(name))
           .sign(key, hashes.SHA384()))
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), True, force)
    _write(csr_path, csr.public_bytes(serialization.Encoding.PEM), False, force)
    fp = key_fingerprint(key)
    return [Made(key_path, "connection private key", fp), Made(csr_path, "enrolment request (CSR)", fp)]


def load_csr(path: str | Path) -> tuple[str, ec.EllipticCurvePublicKey, x509.CertificateSigningRequest]:
    """A site's CSR, checked: PEM, self-signature valid, an ECDSA key on a NIST curve, exactly
    one common name that is a valid site name. Returns (name, key, csr)."""
    p = Path(path)
    data = read_file(p, "enrolment request", PKIError)
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise PKIError(f"{p}: not a PEM certificate signing request (make one with `fedshield certs csr NAME`)") \
            from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, TypeError):
        valid, key = False, None
    if not valid:
        raise PKIError(f"{p}: its signature does not verify (not signed with the key it carries); refused")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise PKIError(f"{p}: the key is a {_key_type(key)}; SuperNode authentication needs ECDSA on P-256, "
                       "P-384 or P-521")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PKIError(f"{p}: the request names {len(names)} sites (common names); it must name exactly one")
    name = names[0].value
    if not isinstance(name, str):
        raise PKIError(f"{p}: the common name is not text")
    try:
        check_site_name(name)
    except PKIError as exc:
        raise PKIError(f"{p}: {exc}") from None
    return name, key, csr


def _load_ca(pki: Path, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_cert = load_certificates(pki / "ca.crt")[0]
    try:
        ca_key = serialization.load_pem_private_key(read_file(pki / "ca.key", "CA key", PKIError), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(f"{pki / 'ca.key'}: not a PEM private key") from None
    ca_public = ca_cert.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(ca_public, ec.EllipticCurvePublicKey) or \
            ca_key.public_key().public_numbers() != ca_public.public_numbers():
        raise PKIError(f"{pki / 'ca.key'}: does not belong to {pki / 'ca.crt'}")
    if now > ca_cert.not_valid_after_utc:
        raise PKIError(f"{pki / 'ca.crt'}: expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                       "make a new CA (`fedshield certs init`) and enrol the sites again")
    return ca_key, ca_cert


def sign_csr(csr_path: str | Path, pki: str | Path, days: int = DEFAULT_SITE_DAYS, rotate: bool = False,
             now: dt.datetime | None = None) -> list[Made]:
    """At the coordinator: enrol the site a CSR names. Writes `<pki>/sites/NAME.crt` (signed by
    the federation CA: CN=NAME, clientAuth) and `<pki>/sites/NAME.pub` (the key as
    `flwr supernode register` reads it), and records name -> key in `<pki>/enrolment.json`.

    Refused, each with one line: a CSR that does not verify, a revoked key, a key enrolled
    under another name, and a name enrolled with another key unless `rotate` (the site's new
    key replaces the old one, which is revoked). The same name with the same key renews the
    certificate."""

    pki = Path(pki)
    now = now or dt.datetime.now(dt.UTC)
    name, key, _ = load_csr(csr_path)
    ca_key, ca_cert = _load_ca(pki, now)
    registry = pki / REGISTRY
    enrolment = load_enrolment(registry)
    fp = key_fingerprint(key)
    if fp in enrolment.revoked:
        raise PKIError(f"{csr_path}: its key {fp} was revoked; the site must make a new one "
                       f"(`fedshield certs csr {name} --force`)")
    owner = enrolment.name_of(fp)
    if owner is not None and owner != name:
        raise PKIError(f"{csr_path}: its key {fp} is already enrolled as {owner!r}; every site needs its own key")
    old = enrolment.sites.get(name)
    if old is not None and old.key != fp and not rotate:
        raise PKIError(f"{csr_path}: site {name!r} is already enrolled with another key ({old.key}); "
                       "to replace it, sign with --rotate (the old key is revoked)")
    start, end = _validity(days, now - dt.timedelta(minutes=5))
    end = min(end, ca_cert.not_valid_after_utc)
    cert = _leaf_cert(ca_key, ca_cert, name, key, start, end, ExtendedKeyUsageOID.CLIENT_AUTH)
    public = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public += f" {name}"
    folder = pki / "sites"
    # Public files: a renewal or a rotation replaces them (the registry says which key counts).
    _write(folder / f"{name}.crt", _cert_pem(cert), False, force=True)
    _write(folder / f"{name}.pub", (public + "\n").encode(), False, force=True)
    if old is not None and old.key != fp:
        enrolment.revoke(old.key, name, f"rotated: replaced by {fp}", now)
    enrolment.sites[name] = Enrolled(name=name, key=fp, public_key=public, certificate=cert_fingerprint(cert),
                                     not_after=end.isoformat(timespec="seconds"),
                                     enrolled_at=now.isoformat(timespec="seconds"))
    save_enrolment(registry, enrolment)
    made = [Made(folder / f"{name}.crt", "site certificate", cert_fingerprint(cert)),
            Made(folder / f"{name}.pub", "connection public key", fp)]
    if old is not None and old.key != fp:
        made.append(Made(registry, "revoked (rotated) key", old.key))
    return made


def revoke(target: str, pki: str | Path, reason: str = "", now: dt.datetime | None = None) -> Made:
    """Deny a connection key from now on: `target` is an enrolled site's name (its key) or a
    key or certificate file (NAME.pub, NAME.crt, a PEM public key). A running coordinator
    refuses it at its next HELLO, its next round and at the TLS front (deploy/enrolment.py)."""

    pki = Path(pki)
    registry = pki / REGISTRY
    enrolment = load_enrolment(registry)
    p = Path(target)
    site: str | None
    if target in enrolment.sites and not p.is_file():
        fp, site = enrolment.sites[target].key, target
    elif p.is_file():
        fp = _file_key_fingerprint(p)
        site = enrolment.name_of(fp)
    elif any(r.get("site") == target for r in enrolment.revoked.values()):
        raise PKIError(f"revoke {target!r}: the site has no enrolled key (its key was revoked already)")
    else:
        raise PKIError(f"revoke {target!r}: not an enrolled site name and not a key or certificate file")
    if fp in enrolment.revoked and site is None:
        raise PKIError(f"revoke {target!r}: key {fp} is already revoked")
    enrolment.revoke(fp, site, reason or "revoked by the coordinator", now)
    save_enrolment(registry, enrolment)
    return Made(registry, f"revoked{f' ({site})' if site else ''}", fp)


def _file_key_fingerprint(p: Path) -> str:
    data = read_file(p, "key or certificate", PKIError)
    if b"CERTIFICATE-----" in data:
        return key_fingerprint(load_certificates(p)[0].public_key())
    for load in (lambda d: serialization.load_ssh_public_key(d.strip()), serialization.load_pem_public_key):
        try:
            return key_fingerprint(load(data))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise PKIError(f"{p}: not a public key (OpenSSH or PEM) or a certificate")


def enrolled_keys(pki: str | Path, now: dt.datetime | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """What `fedshield server` admits from the registry: (name, NAME.pub) for each enrolled
    site whose certificate is valid and whose NAME.pub is the enrolled key; and one line for
    each site left out, and why."""

    pki = Path(pki)
    now = now or dt.datetime.now(dt.UTC)
    enrolment = load_enrolment(pki / REGISTRY)
    admitted, left_out = [], []
    ca = load_certificates(pki / "ca.crt")[0]
    for name, site in sorted(enrolment.sites.items()):
        pub, crt = pki / "sites" / f"{name}.pub", pki / "sites" / f"{name}.crt"
        try:
            if key_fingerprint(load_connection_public_key(pub)) != site.key:
                raise PKIError(f"{pub}: not the key enrolled for {name!r} ({site.key})")
            problem = certificate_problem(crt, ca, site.key, now)
            if problem:
                raise PKIError(problem)
        except PKIError as exc:
            left_out.append(f"site {name}: not admitted: {exc}")
            continue
        admitted.append((name, pub))
    return admitted, left_out


def hand_collected(keys: list[Path], pki: str | Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """`fedshield server --connection-keys` (keys collected by hand, no CSR): each NAME.pub
    binds the name NAME (its file name, as `certs site NAME` writes it) to its key; a key the
    registry at `<pki>/enrolment.json` revoked is left out (a line says so)."""

    revoked = load_enrolment(Path(pki) / REGISTRY).revoked
    admitted: list[tuple[str, Path]] = []
    left_out: list[str] = []
    names: dict[str, Path] = {}
    for k in keys:
        try:
            name = check_site_name(k.stem)
        except PKIError as exc:
            raise PKIError(f"{k}: the file name is the site's name: {exc}") from None
        if name in names:
            raise PKIError(f"{k}: the same site name as {names[name]}; one key per site")
        names[name] = k
        fp = key_fingerprint(load_connection_public_key(k))
        if fp in revoked:
            left_out.append(f"site {name}: not admitted: its connection key {fp} is revoked")
            continue
        admitted.append((name, k))
    return admitted, left_out


def bindings(admitted: list[tuple[str, Path]]) -> Enrolment:
    """The name -> key registry of the sites admitted (what the ServerApp checks HELLOs against)."""

    sites = {}
    for name, pub in admitted:
        key = load_connection_public_key(pub)
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        sites[name] = Enrolled(name=name, key=key_fingerprint(key), public_key=f"{line} {name}")
    return Enrolment(sites)


def certificate_problem(path: Path, ca: x509.Certificate, key: str, now: dt.datetime | None = None) -> str | None:
    """Why the site certificate at `path` does not enrol connection key `key` (None: it does):
    unreadable, not issued by `ca`, expired or not yet valid, or for another key."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = load_certificates(path)[0]
    except PKIError as exc:
        return str(exc)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"{path}: not issued by the federation CA"
    if now > cert.not_valid_after_utc:
        return (f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                "renew it with `fedshield certs sign NAME.csr`")
    if now < cert.not_valid_before_utc:
        return f"{path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if key_fingerprint(cert.public_key()) != key:
        return f"{path}: certifies key {key_fingerprint(cert.public_key())}, not the enrolled {key}"
    return None


# ------------------------------------------------------------------ reading / show


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    p = Path(path)
    data = read_file(p, "certificate", PKIError)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise PKIError(f"{p}: not a PEM or DER X.509 certificate") from None
    return certs


def certificate_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)] + \
           [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]


def describe(path: str | Path) -> str:
    """What `fedshield certs show` prints."""
    p = Path(path)
    if not p.is_file():
        raise PKIError(f"{p}: no such file")
    data = p.read_bytes()
    if b"CERTIFICATE-----" in data or not data.lstrip().startswith((b"-----", b"ecdsa-", b"ssh-")):
        try:
            certs = load_certificates(p)
        except PKIError:
            certs = []
        if certs:
            return "\n\n".join(_describe_cert(c) for c in certs)
    for loader in (_try_private, _try_public):
        text = loader(data)
        if text:
            return f"file:         {p}\n{text}"
    raise PKIError(f"{p}: not a certificate or a key this tool knows (PEM/DER X.509, PEM/OpenSSH keys)")


def _describe_cert(cert: x509.Certificate) -> str:
    now = dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = "EXPIRED" if now > end else ("not yet valid" if now < start else f"valid, {(end - now).days} days left")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    lines = [
        f"certificate:  {'CA' if is_ca else 'end entity'}",
        f"subject:      {cert.subject.rfc4514_string()}",
        f"issuer:       {cert.issuer.rfc4514_string()}",
        f"SANs:         {', '.join(certificate_sans(cert)) or '-'}",
        f"valid from:   {start.isoformat()}",
        f"valid until:  {end.isoformat()} ({state})",
        f"key:          {_key_type(cert.public_key())}, {key_fingerprint(cert.public_key())}",
        f"fingerprint:  {cert_fingerprint(cert)} (of the certificate)",
    ]
    return "\n".join(lines)


def _key_type(key: object) -> str:
    """What a key is, for a message (anything a loader returned, or None)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")


def _try_private(data: bytes) -> str:
    loaders: tuple[Callable[[bytes], PrivateKeyTypes], ...] = (
        lambda d: serialization.load_ssh_private_key(d, None),
        lambda d: serialization.load_pem_private_key(d, None))
    for load in loaders:
        try:
            key = load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return (f"type:         private key, {_key_type(key)}\n"
                f"fingerprint:  {key_fingerprint(key)} (of its public key)")
    return ""


def _try_public(data: bytes) -> str:
    for load in (lambda d: serialization.load_ssh_public_key(d.strip()),
                 serialization.load_pem_public_key):
        try:
            key = load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return f"type:         public key, {_key_type(key)}\nfingerprint:  {key_fingerprint(key)}"
    return ""


# ------------------------------------------------------------------ command


def certs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedshield certs",
                                     description="CA, server certificate and sites' connection keys.",
                                     epilog="""examples:
  fedshield certs init --out pki/ --server-name fl.example.org --san 127.0.0.1
  fedshield certs csr st-marys --out keys/            at the site: its connection key (stays there) + a CSR
  fedshield certs sign keys/st-marys.csr --pki pki/   at the coordinator: enrols st-marys, bound to that key
  fedshield certs revoke st-marys --pki pki/
  fedshield certs show pki/server.crt
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="a CA and the coordinator's TLS certificate")
    p_init.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.crt, server.key")
    p_init.add_argument("--server-name", required=True, help="the host name sites connect to (a SAN and the CN)")
    p_init.add_argument("--san", action="append", default=[], help="another host name or IP address (repeatable)")
    p_init.add_argument("--days", type=int, default=DEFAULT_DAYS,
                        help=f"server certificate validity (default {DEFAULT_DAYS})")
    p_init.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS, help=f"CA validity (default {DEFAULT_CA_DAYS})")
    p_init.add_argument("--force", action="store_true", help="replace existing files")
    p_site = sub.add_parser("site", help="a site's connection key pair (SuperNode authentication)")
    p_site.add_argument("name", help="site name, e.g. st-marys")
    p_site.add_argument("--out", required=True, help="folder for NAME.key and NAME.pub")
    p_site.add_argument("--force", action="store_true", help="replace existing files")
    p_csr = sub.add_parser("csr", help="at a site: its connection key (stays here) and an enrolment request")
    p_csr.add_argument("name", help="site name, e.g. st-marys (what its HELLO will say)")
    p_csr.add_argument("--out", required=True, help="folder for NAME.key (0600) and NAME.csr")
    p_csr.add_argument("--force", action="store_true", help="replace existing files (a new key: rotation)")
    p_sign = sub.add_parser("sign", help="at the coordinator: enrol a site from its CSR (name bound to its key)")
    p_sign.add_argument("csr", help="the site's NAME.csr")
    p_sign.add_argument("--pki", required=True, help="the coordinator's PKI folder (ca.crt, ca.key; "
                        "enrolment.json and sites/ are written there)")
    p_sign.add_argument("--days", type=int, default=DEFAULT_SITE_DAYS,
                        help=f"certificate validity (default {DEFAULT_SITE_DAYS})")
    p_sign.add_argument("--rotate", action="store_true",
                        help="the site is enrolled with another key: replace it and revoke the old one")
    p_revoke = sub.add_parser("revoke", help="at the coordinator: deny a site's connection key from now on "
                              "(a running coordinator refuses it at once)")
    p_revoke.add_argument("target", help="an enrolled site's NAME, or a key or certificate file")
    p_revoke.add_argument("--pki", required=True, help="the coordinator's PKI folder (its enrolment.json)")
    p_revoke.add_argument("--reason", default="", help="recorded with the revocation")
    p_show = sub.add_parser("show", help="describe a certificate or key")
    p_show.add_argument("file")
    args = parser.parse_args(argv)

    if args.cmd == "show":
        print(describe(args.file))
        return 0
    if args.cmd == "csr":
        made = make_csr(args.name, args.out, args.force)
        print("\n".join(m.line() for m in made))
        print(f"\nsecret (stays at the site, 0600): {made[0].path}  (fedshield client --connection-key)"
              f"\nsend to the coordinator, with its fingerprint: {made[1].path}  (fedshield certs sign)")
        return 0
    if args.cmd == "sign":
        made = sign_csr(args.csr, args.pki, args.days, args.rotate)
        print("\n".join(m.line() for m in made))
        print(f"\nenrolled: {made[1].path.stem} is admitted by `fedshield server --pki {args.pki}` (from its next "
              f"start); give the site {made[0].path} and ca.crt")
        return 0
    if args.cmd == "revoke":
        print(revoke(args.target, args.pki, args.reason).line())
        return 0
    if args.cmd == "init":
        made = init_pki(args.out, args.server_name, args.san, args.days, args.ca_days, args.force)
        print("\n".join(m.line() for m in made))
        print(f"\nsecret (keep on the coordinator, 0600): {made[1].path}, {made[3].path}"
              f"\ngive to every site: {made[0].path}")
        return 0
    made = connection_key_pair(args.name, args.out, args.force)
    print("\n".join(m.line() for m in made))
    print(f"\nsecret (stays at the site, 0600): {made[0].path}  (fedshield client --connection-key)"
          f"\ngive to the coordinator, with its fingerprint: {made[1].path}  (fedshield server --connection-keys)")
    return 0

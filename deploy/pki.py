"""PKI for a deployment: a CA, the coordinator's TLS certificate, and sites' connection keys.

    fedshield certs init --out pki/ --server-name fl.example.org --san 127.0.0.1
        ca.crt  ca.key  server.crt  server.key
    fedshield certs site st-marys --out pki/
        st-marys.key  st-marys.pub
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
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.errors import FedShieldError
from privacy.files import create_file, read_file
from privacy.signing import fingerprint as key_fingerprint


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


def make_server_cert(ca_key, ca_cert: x509.Certificate, server_name: str, sans: list[str],
                     days: int = DEFAULT_DAYS, not_before: dt.datetime | None = None
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not server_name.strip():
        raise PKIError("--server-name: empty; give the host name sites connect to (e.g. fl.example.org)")
    key = ec.generate_private_key(CURVE())
    start, end = _validity(days, not_before)
    entries = _san_entries([server_name, *sans])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _key_pem(key) -> bytes:
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


def _key_type(key) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")


def _try_private(data: bytes) -> str:
    for load in (lambda d: serialization.load_ssh_private_key(d, None),
                 lambda d: serialization.load_pem_private_key(d, None)):
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
                                     description="CA, server certificate and sites' connection keys.")
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
    p_show = sub.add_parser("show", help="describe a certificate or key")
    p_show.add_argument("file")
    args = parser.parse_args(argv)

    if args.cmd == "show":
        print(describe(args.file))
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

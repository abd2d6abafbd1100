"""Site signing keys: ECDSA P-256 (SECP256R1) with SHA-256, `cryptography` only.

Private keys: PEM, PKCS#8, unencrypted (the site's state folder is the protection), created
with mode 0600 from the first byte (os.open with O_CREAT|O_EXCL, 0o600) and never
overwritten unless `force`. Public keys: PEM SubjectPublicKeyInfo. These are the standard
`cryptography` serialisations, so the same EC key can also be converted to the OpenSSH form
Flower's SuperNode authentication reads (`serialization.Encoding.OpenSSH`).

Fingerprint: "SHA256:<hex>" of the DER SubjectPublicKeyInfo.
Every error a user can cause (missing file, not a key, wrong key type) is a one-line
`FedShieldError` naming the path.
"""

from __future__ import annotations

import hashlib
import os
import threading
import typing
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from fedshield.privacy.errors import FedShieldError
from fedshield.privacy.files import create_file, read_file

CURVE = ec.SECP256R1
PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(priv: PrivateKey | PublicKey) -> bytes:
    pub = priv.public_key() if isinstance(priv, ec.EllipticCurvePrivateKey) else priv
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_site_key(path: Path, force: bool = False) -> bytes:
    """Make a P-256 key at `path` (0600, PKCS#8 PEM); returns the public key PEM."""
    path = Path(path)
    if path.exists() and not force:
        raise FedShieldError(f"ledger signing key {str(path)!r} already exists; refusing to overwrite it (use force)")
    key = ec.generate_private_key(CURVE())
    data = _private_pem(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            # Write a fresh 0600 file next to it, then rename over: never a moment with a
            # half-written or wider-permission key.
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            if tmp.exists():
                tmp.unlink()
            _write_new(tmp, data)
            os.replace(tmp, path)
        else:
            _write_new(path, data)
    except FileExistsError:
        raise FedShieldError(
            f"ledger signing key {str(path)!r} already exists; refusing to overwrite it (use force)"
        ) from None
    except OSError as exc:
        raise FedShieldError(f"ledger signing key {str(path)!r}: cannot write: {exc.strerror}") from None
    return public_key_pem(key)


def _write_new(path: Path, data: bytes) -> None:
    create_file(path, data, private=True)


def _read(path: Path, what: str) -> bytes:
    return read_file(path, what)


def load_private_key(path: Path) -> PrivateKey:
    data = _read(path, "ledger signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise FedShieldError(
            f"ledger signing key {str(path)!r}: is encrypted; fedshield needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise FedShieldError(f"ledger signing key {str(path)!r}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
        raise FedShieldError(f"ledger signing key {str(path)!r}: not an ECDSA P-256 key ({type(key).__name__})")
    return key


def load_public_key(path_or_pem: Path | str | bytes) -> PublicKey:
    """A P-256 public key from a PEM file path or from PEM bytes/str."""
    if isinstance(path_or_pem, bytes) or (isinstance(path_or_pem, str) and "-----BEGIN" in path_or_pem):
        data = path_or_pem.encode() if isinstance(path_or_pem, str) else path_or_pem
        where = "public key (PEM text)"
    else:
        data = _read(Path(path_or_pem), "public key")
        where = f"public key {str(path_or_pem)!r}"
    key: PublicKeyTypes
    try:
        if data.lstrip().startswith(b"ecdsa-sha2-"):  # the OpenSSH one-line form of the same key
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise FedShieldError(f"{where}: not a PEM (or OpenSSH) public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
        raise FedShieldError(f"{where}: not an ECDSA P-256 key ({type(key).__name__})")
    return key


def fingerprint(key: PublicKeyTypes | PrivateKeyTypes) -> str:
    """fedshield's one key fingerprint: "SHA256:<lowercase hex>" of the DER SubjectPublicKeyInfo.

    Any `cryptography` public key, or a private key (its public half: a pair's two halves
    have one fingerprint): ledger signing keys (P-256), connection keys (P-384), TLS keys.
    Ledger entries store it in `key_fingerprint`.
    """
    kept = _FINGERPRINTS.get(id(key))
    if kept is not None and kept[0] is key:
        return kept[1]
    private_types = typing.get_args(PrivateKeyTypes)  # a runtime tuple: mypy cannot narrow on it, hence the cast
    pub = typing.cast(PublicKeyTypes, key.public_key() if isinstance(key, private_types) else key)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    found = "SHA256:" + hashlib.sha256(der).hexdigest()
    with _VERIFIED_LOCK:
        if len(_FINGERPRINTS) >= _FINGERPRINTS_KEPT:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[id(key)] = (key, found)
    return found


# Key objects (immutable) -> their fingerprint: a site's key is fingerprinted four times a
# round (its entry, its head record, its chain's check), the coordinator's copy of each
# site's key on every reply. The key is held with it, so its id is never another key's.
_FINGERPRINTS: dict[int, tuple[object, str]] = {}
_FINGERPRINTS_KEPT = 1 << 14


def sign(priv: PrivateKey, data: bytes) -> bytes:
    return priv.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(pub: PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# Signatures that verified, under the fingerprint of the key they verified with: the
# coordinator checks a site's whole chain of the run on every reply, and all but the newest
# entries verified when they arrived. Only successes are kept (a failure is checked again),
# the least recently used dropped first past the bound: 41 MB when full, measured with
# 71-byte signatures of 64-character hashes (57 MB if every entry held its own copy of
# the fingerprint string).
_VERIFIED: dict[tuple[str, bytes, bytes], None] = {}
_VERIFIED_MAX = 1 << 17
_VERIFIED_LOCK = threading.Lock()


def _remember(seen: tuple[str, bytes, bytes]) -> None:
    with _VERIFIED_LOCK:
        if len(_VERIFIED) >= _VERIFIED_MAX:
            del _VERIFIED[next(iter(_VERIFIED))]
        _VERIFIED[seen] = None


def sign_known(priv: PrivateKey, key_fingerprint: str, data: bytes) -> bytes:
    """`sign`, the signature remembered as verified under `key_fingerprint`, which must be
    `fingerprint(priv)`: a signature made here with the private key verifies under its
    public half, so a site's next check of its own books does not verify it again (the
    coordinator, another process, verifies it on arrival)."""
    sig = sign(priv, data)
    _remember((key_fingerprint, sig, data))
    return sig


def verify_known(pub: PublicKey, key_fingerprint: str, sig: bytes, data: bytes) -> bool:
    """`verify`, remembering successes. `key_fingerprint` must be `fingerprint(pub)` (the
    SHA-256 of the key: two keys never share it), computed once by the caller."""
    seen = (key_fingerprint, sig, data)
    with _VERIFIED_LOCK:
        if seen in _VERIFIED:
            _VERIFIED[seen] = _VERIFIED.pop(seen)  # the newest again: a chain's first entries are read every reply
            return True
    if not verify(pub, sig, data):
        return False
    _remember(seen)
    return True

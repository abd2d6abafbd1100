"""Shamir secret sharing (Shamir 1979) over the prime field GF(p), p = 2^31 - 1, vectorised
with numpy over every share and every field element of a secret at once.

Why not Flower's `flwr.common.secure_aggregation.crypto.shamir`: it runs PyCryptodome's
`Shamir.split` once per 16-byte chunk, whose polynomial arithmetic in GF(2^128) is pure
Python, so splitting one secret for a full neighbourhood of 50 sites at t = 35 costs about
as much as a plain round (bench/RESULTS.md: 6.6x a plain round at 50 sites). Here the
secret is cut into 3-byte field elements (< 2^24 < p), each element gets its own random
polynomial of degree t - 1 with coefficients drawn uniformly from GF(p) by rejection from
`os.urandom`, and all shares are evaluated with one Horner loop of t numpy steps over an
(n × elements) array. Products stay below 2^62, so uint64 never overflows.

This is textbook Shamir, information-theoretically hiding: for each element, any t - 1
shares are consistent with every value of the secret, with the same probability (the
polynomial's t - 1 random coefficients are uniform). Reconstruction is Lagrange
interpolation at 0 from exactly t shares (modular inverses with Python's `pow`).

A share is bytes: its index x (4 bytes, little-endian, 1..n, as Flower's format), the
secret's length (2 bytes, big-endian), then one 4-byte big-endian field element per 3
bytes of the secret. Shares cannot be authenticated by this scheme: a wrong share gives a
wrong secret, which the callers detect (SecAgg+ checks the rebuilt seed against its
commitment and the rebuilt mask key against its public key: privacy/secure_sum.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

P = 2**31 - 1  # a Mersenne prime: every product of two field elements fits in 62 bits
ELEMENT_BYTES = 3  # secret bytes per field element (2^24 < P)
MAX_SHARES = 100_000  # protocol.MAX_SLOTS: sites in one secure round
MAX_SECRET_BYTES = 4096

U64 = np.ndarray[Any, np.dtype[np.uint64]]


def _random_elements(shape: tuple[int, ...]) -> U64:
    """Uniform elements of GF(p) from os.urandom: 31 random bits, the one value p rejected."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        draw = np.frombuffer(os.urandom(4 * (count - out.size + 8)), dtype="<u4").astype(np.uint64)
        draw &= np.uint64(P)  # 31 bits, uniform in [0, 2^31 - 1]
        out = np.concatenate([out, draw[draw < np.uint64(P)]])
    return out[:count].reshape(shape)


def _elements(secret: bytes) -> U64:
    padded = secret + bytes(-len(secret) % ELEMENT_BYTES)
    raw = np.frombuffer(padded, dtype=np.uint8).reshape(-1, ELEMENT_BYTES).astype(np.uint64)
    return (raw[:, 0] << np.uint64(16)) | (raw[:, 1] << np.uint64(8)) | raw[:, 2]


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` shares of `secret`, any `threshold` of which rebuild it.

    Parameters
    ----------
    secret : bytes
        1 to MAX_SECRET_BYTES bytes (a 32-byte seed, a 48-byte EC scalar).
    threshold : int
        Shares needed: 1 <= threshold <= count.
    count : int
        Shares made, at indices x = 1..count (at most MAX_SHARES).
    """
    if not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret to share has 1 to {MAX_SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise ValueError(f"shares: need 1 <= threshold ({threshold}) <= count ({count}) <= {MAX_SHARES}")
    constant = _elements(secret)
    coefficients = _random_elements((threshold - 1, constant.size))
    x = np.arange(1, count + 1, dtype=np.uint64)[:, None]
    p = np.uint64(P)
    values = np.zeros((count, constant.size), dtype=np.uint64)
    for c in coefficients[::-1]:  # Horner, highest degree first; the secret is the constant term
        values = (values * x + c) % p
    values = (values * x + constant) % p
    header = len(secret).to_bytes(2, "big")
    body = values.astype(">u4")
    return [int(i).to_bytes(4, "little") + header + body[i - 1].tobytes() for i in range(1, count + 1)]


def combine(shares: Sequence[bytes]) -> bytes:
    """The secret from shares made by `split` (all of them used: pass exactly t).

    Raises ValueError on shares that are malformed, of different secrets' shapes, or that
    repeat an index; shares that are well formed but wrong give a wrong secret (or a
    ValueError when the result is not a byte string), never an exception of another kind.
    """
    if not shares:
        raise ValueError("no shares to combine")
    size = len(shares[0])
    if size < 6 or (size - 6) % 4 or any(len(s) != size for s in shares):
        raise ValueError("shares of different lengths, or not shares")
    length = int.from_bytes(shares[0][4:6], "big")
    if -(-length // ELEMENT_BYTES) != (size - 6) // 4 or any(s[4:6] != shares[0][4:6] for s in shares):
        raise ValueError("shares that disagree on the secret's length")
    xs = [int.from_bytes(s[:4], "little") for s in shares]
    if len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ValueError("shares with a repeated or out-of-range index")
    ys = np.array([np.frombuffer(s[6:], dtype=">u4") for s in shares], dtype=np.uint64)
    if (ys >= np.uint64(P)).any():
        raise ValueError("a share value outside the field")
    p = np.uint64(P)
    secret = np.zeros(ys.shape[1], dtype=np.uint64)
    for i, xi in enumerate(xs):  # Lagrange basis at 0: prod x_j / (x_j - x_i)
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % P
                den = den * (xj - xi) % P
        weight = np.uint64(num * pow(den, -1, P) % P)
        secret = (secret + ys[i] * weight % p) % p
    if (secret >= np.uint64(2 ** (8 * ELEMENT_BYTES))).any():
        raise ValueError("the shares do not rebuild a secret (a wrong share)")
    raw = np.stack([(secret >> np.uint64(16)) & np.uint64(255), (secret >> np.uint64(8)) & np.uint64(255),
                    secret & np.uint64(255)], axis=1).astype(np.uint8).tobytes()
    if any(raw[length:]):
        raise ValueError("the shares do not rebuild a secret (a wrong share)")
    return raw[:length]

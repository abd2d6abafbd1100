"""Durable and private file writes, and reads that fail with one line.

Keys and ledgers are the two kinds of file whose loss or exposure hurts: keys are created
0600 from the first byte (never chmod-ed after the fact), ledger bytes are fsynced before
anyone is told they exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedshield.privacy.errors import FedShieldError


def write_fully(fd: int, data: bytes) -> None:
    """os.write until every byte is written, then fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def create_file(path: Path, data: bytes, *, private: bool, error: type[FedShieldError] = FedShieldError) -> None:
    """Create `path` (which must not exist), 0600 if private, fsynced; never follows a symlink."""
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise error(f"{path}: already exists; not overwriting it") from None
    except OSError as exc:
        raise error(f"{path}: cannot create: {exc.strerror}") from None
    try:
        if private:
            os.fchmod(fd, 0o600)  # a umask can only remove bits; this keeps exactly 0600
        write_fully(fd, data)
    finally:
        os.close(fd)


def read_file(path: Path | str, what: str, error: type[FedShieldError] = FedShieldError) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {str(p)!r}: not found") from None
    except IsADirectoryError:
        raise error(f"{what} {str(p)!r}: is a folder, not a file") from None
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: cannot read: {exc.strerror}") from None

"""Durable and private file writes, and reads that fail with one line.

Keys and ledgers are the two kinds of file whose loss or exposure hurts: keys are created
0600 from the first byte (never chmod-ed after the fact), ledger bytes are fsynced before
anyone is told they exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fedshield.privacy.errors import FedShieldError


def write_fully(fd: int, data: bytes) -> None:
    """os.write until every byte is written, then fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fsync(fd)


def open_in_folder(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags, mode), making its folder (and parents) first if it is missing:
    `mkdir(parents=True, exist_ok=True)` before every open was a failed system call and
    an exception a write, several a virtual site a round."""
    try:
        return os.open(path, flags, mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, flags, mode)


def fsync(fd: int) -> None:
    """os.fsync, or, inside `group_commit`, made durable at its barrier together with the
    other files written there."""
    group = _GROUP.get()
    if group is None:
        os.fsync(fd)
    else:
        group.defer(fd)


# -- group commit: many sites' writes made durable at once ------------------------------
# The batched simulation engine runs a thousand virtual sites' handlers in one process; each
# ledger append fsyncs five times (privacy/ledger.py), and those fsyncs were the larger part
# of a site's time. Within `group_commit()` they are deferred, and one syncfs(2) per file
# system at the barrier makes every write of the group durable. The caller puts the barrier
# where the order matters: before any training that the group's spends pay for, and before
# any reply leaves (simulations/batched.py). Without syncfs (not Linux) every fsync is made
# as it comes.

def _libc(name: str) -> Any | None:  # a ctypes function of the C library (untyped)
    """Linux's C library function `name` (errno kept for ctypes.get_errno), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _load_syncfs() -> Callable[[int], int] | None:
    call = _libc("syncfs")
    if call is None:
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return call  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


class BarrierError(OSError):
    """A group's barrier failed: what the group wrote may not be on disk."""


class GroupCommit:
    """The file systems written to since the last barrier, each by an open descriptor."""

    def __init__(self, syncfs: Callable[[int], int]) -> None:
        self._syncfs = syncfs
        self._open: dict[int, int] = {}  # st_dev -> a descriptor on that file system (dup'ed)

    def defer(self, fd: int) -> None:
        device = os.fstat(fd).st_dev
        if device not in self._open:
            self._open[device] = os.dup(fd)

    def barrier(self) -> None:
        """Everything written within the group so far is on disk when this returns."""
        while self._open:
            device, fd = next(iter(self._open.items()))
            try:
                if self._syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise BarrierError(err, f"syncfs failed: {os.strerror(err) if err else 'no reason given'}")
            finally:
                del self._open[device]
                os.close(fd)


_GROUP: ContextVar[GroupCommit | None] = ContextVar("fedshield_group_commit", default=None)


def in_group_commit() -> bool:
    """Whether fsyncs are deferred to a group's barrier here (`group_commit`)."""
    return _GROUP.get() is not None


@contextlib.contextmanager
def group_commit() -> Iterator[GroupCommit | None]:
    """Defer the fsyncs of `write_fully`/`fsync` made within to `barrier()` (and to the exit,
    which always makes them durable: BarrierError if it cannot, unless the block raised, whose
    exception is then the one that propagates). Yields None where there is no syncfs:
    nothing deferred."""
    if _SYNCFS is None or _GROUP.get() is not None:
        yield _GROUP.get()
        return
    group = GroupCommit(_SYNCFS)
    token = _GROUP.set(group)
    try:
        yield group
    except BaseException:
        _GROUP.reset(token)
        with contextlib.suppress(OSError):  # still made durable if it can be; the block's error is the one told
            group.barrier()
        raise
    _GROUP.reset(token)
    group.barrier()


# -- exchanging a small file's two copies, within a group commit -----------------------
# os.replace over an existing file makes ext4 start writing the new file's data before the
# rename (auto_da_alloc): about 0.12 ms a file on an idle disk and 2 ms under I/O load, for
# a virtual site's head record once a round. renameat2(RENAME_EXCHANGE) swaps two names
# atomically without it (bench/RESULTS.md: 0.012 ms): the record is written over a spare
# copy in place, and the two names swapped, so the spare then holds the previous record.

def _load_renameat2() -> Callable[[bytes, bytes], int] | None:
    call = _libc("renameat2")
    if call is None:
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE

    def swap(a: bytes, b: bytes) -> int:
        return int(call(at_cwd, a, at_cwd, b, exchange))
    return swap


_RENAME_EXCHANGE = _load_renameat2()


def write_by_exchange(path: Path, data: bytes) -> bool:
    """Within a group commit, `path` given exactly `data` atomically: `data` written over its
    spare copy (`.<name>.spare`, created if missing) in place, then the two names exchanged.
    A reader sees the whole old file or the whole new one, as with a rename; the spare keeps
    the old one. False, with nothing changed at `path`, where this does not apply (outside a
    group, no existing `path`, no renameat2 or a file system without RENAME_EXCHANGE): the
    caller writes it another way."""
    if _RENAME_EXCHANGE is None or not in_group_commit():
        return False
    spare = path.with_name(f".{path.name}.spare")
    try:
        if not path.is_file() or path.is_symlink():
            return False
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if info.st_nlink != 1:  # a spare linked to another file: never written through
            return False
        if info.st_size > len(data):
            os.ftruncate(fd, len(data))
        os.lseek(fd, 0, os.SEEK_SET)
        write_fully(fd, data)
    finally:
        os.close(fd)
    return _RENAME_EXCHANGE(os.fsencode(spare), os.fsencode(path)) == 0


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

"""The watchdog of an agent command's Flower processes: they end when the command ends, however it ends.

    python -I deploy/watchdog.py FD [GRACE_S]

Started by `deploy.processes.Children` in a session of its own (a signal to the command's
process group or terminal does not reach it), with the read end FD of a pipe whose write
end only the command holds. The command writes one line per child it starts, `PID d` (`d`:
the child has PR_SET_PDEATHSIG=SIGTERM) or `PID -`, and `stop` before it closes the pipe in
an orderly stop. The pipe closes when the command exits, is killed (SIGKILL included) or
crashes: the kernel closes its descriptors. Then the watchdog stops every process it knows
of and exits.

Which processes: each registered child, everything in the child's session (each child runs
in a session of its own, `start_new_session`), and every descendant of those, wherever it
went: Flower's SuperLink starts its SuperExec in a new session, and the SuperExec starts the
ServerApp. The process table (/proc) is read when a child is registered, every `SCAN_S`
seconds and when the pipe closes, and a process stays known until it exits, so a
grandchild whose parent died first (the direct children get SIGTERM from the kernel when
the command dies, PR_SET_PDEATHSIG) is still found although it was re-parented to init; so
is anything in the session of a known session leader. What it can miss: a process younger
than `SCAN_S`, outside those sessions, whose parent died in the same instant. Every process
is known by pid and start time, so a pid the system has since reused is never signalled.

How: SIGTERM to all of them (Flower's SuperNode then deactivates itself at the SuperLink,
so a restarted site is admitted at once), up to GRACE_S seconds (default 10), then
SIGKILL to what is left. One SIGTERM each: Flower's handler restores the default action
when the first arrives, so a second one would kill a SuperNode in the middle of signing
off. So when the pipe closed without `stop` (the command died), the children marked `d`
already got their SIGTERM from the kernel and get none from the watchdog (SIGKILL only,
if still there after GRACE_S). The watchdog itself ignores SIGINT and SIGHUP.

Standard library only, run with `-I` (isolated): it imports nothing of fedshield, Flower or
torch, starts in milliseconds and cannot be broken by the environment it guards. Linux
(/proc); elsewhere it falls back to signalling the registered process groups.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

SCAN_S = 0.5
PROC = "/proc"


def read_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start time) for every live, non-zombie process."""
    table: dict[int, tuple[int, int, int]] = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{PROC}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ... starttime (field 22); comm may hold spaces and ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) < 20 or fields[0] in (b"Z", b"X"):
            continue
        table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


class Watch:
    def __init__(self) -> None:
        self.roots: dict[int, int] = {}  # pid -> start time
        self.known: dict[int, int] = {}
        self.pdeathsig: set[int] = set()  # roots the kernel signals when the command dies

    def register(self, pid: int, pdeathsig: bool = False) -> None:
        table = read_table()
        if pid in table:
            self.roots[pid] = table[pid][2]
            if pdeathsig:
                self.pdeathsig.add(pid)
        self.scan(table)

    def scan(self, table: dict[int, tuple[int, int, int]] | None = None) -> None:
        table = read_table() if table is None else table
        self.known = {p: t for p, t in self.known.items() if p in table and table[p][2] == t}
        for p, t in self.roots.items():
            if p in table and table[p][2] == t:
                self.known[p] = t
        # The sessions of the children and of any known session leader (Flower's SuperExec):
        # their members are found even after their parent died and they were re-parented.
        sessions = {p for p in self.known if table[p][1] == p}
        grew = True
        while grew:
            grew = False
            for p, (ppid, sid, start) in table.items():
                if p not in self.known and (ppid in self.known or sid in sessions) and p != os.getpid():
                    self.known[p] = start
                    if sid == p:
                        sessions.add(p)
                    grew = True

    def alive(self) -> list[int]:
        table = read_table()
        return [p for p, t in self.known.items() if p in table and table[p][2] == t]

    def stop_all(self, grace_s: float, orphaned: bool = False) -> None:
        """SIGTERM, then SIGKILL after `grace_s`. `orphaned`: the command died, so the roots
        with PR_SET_PDEATHSIG have had their SIGTERM from the kernel already."""
        self.scan()
        if not os.path.isdir(PROC):  # no process table: the registered groups only
            for p in self.roots:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(p, sig)
                    except OSError:
                        pass
            return
        for p in self.alive():
            if not (orphaned and p in self.pdeathsig):
                _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            self.scan()  # a child may start another before it stops
            left = self.alive()
            if not left:
                return
        for p in self.alive():
            _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    grace_s = float(argv[2]) if len(argv) > 2 else 10.0
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch = Watch()
    pending = b""
    orphaned = True
    while True:
        ready, _, _ = select.select([fd], [], [], SCAN_S)
        if not ready:
            watch.scan()
            continue
        data = os.read(fd, 4096)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            words = line.split()
            if words == [b"stop"]:
                orphaned = False
            elif len(words) == 2 and words[0].isdigit():
                watch.register(int(words[0]), pdeathsig=words[1] == b"d")
    watch.stop_all(grace_s, orphaned)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

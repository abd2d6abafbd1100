"""Child processes of the `fedshield server` and `fedshield client` commands.

Flower's SuperLink and SuperNode start processes of their own (SuperExec, ServerApp,
ClientApp), so each child runs in its own session and is stopped as a process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def stop_process_groups(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every live child's group (newest first), wait up to `grace_s` in all,
    then SIGKILL the groups still there."""
    for p in reversed(procs):
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

"""Several runs on one CPU machine: the first spins, later ones wait passively.

torch's OpenMP threads (libgomp) spin between parallel regions instead of sleeping, which is the fastest
choice for a process that has the cores to itself (a warm quickstart run: 16-21 s against 25-26 s with
OMP_WAIT_POLICY=PASSIVE; a cold one 79 s against 112 s). Two such processes on the same cores spin while
the other's threads wait for a core: two warm runs started together took 242 s, against 46 s when both
wait passively and 55 s when only the second does. So a run that finds another run holding the machine's
lock sets OMP_WAIT_POLICY=PASSIVE for itself; the first keeps spinning. A user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT is left as it is. Must run before torch is imported (libgomp reads the policy once).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

_held = []  # the lock's open file, kept for the life of the process


def lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"sae_workbench_cpu_{os.getuid()}.lock"


def wait_passively_if_shared() -> bool:
    """Take the machine's run lock, or, when another run holds it, make this process's OpenMP threads wait
    passively. True when this run yields."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    try:
        f = open(lock_path(), "a+")
    except OSError:  # no writable temp dir: run as torch would
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return True
    _held.append(f)
    return False

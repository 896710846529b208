"""A second run on the same CPU makes its OpenMP threads wait passively (workbench/cpu_share.py)."""
import fcntl
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import os; from workbench.cpu_share import wait_passively_if_shared as w; "
         "print(w(), os.environ.get('OMP_WAIT_POLICY'))")


def probe(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, **env_extra}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_first_run_spins_a_second_waits_passively_and_a_users_policy_stands(tmp_path, monkeypatch):
    import tempfile

    from workbench.cpu_share import lock_path

    env = {"TMPDIR": str(tmp_path)}  # a lock of this test's own, not the machine's
    assert probe(env) == "False None"  # alone: libgomp's default (spinning)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the probes' TMPDIR puts the lock
    with open(lock_path(), "a+") as held:  # another run holds the machine
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert probe(env) == "True PASSIVE"
        assert probe({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "False ACTIVE"
        assert probe({**env, "GOMP_SPINCOUNT": "1000"}) == "False None"
    assert probe(env) == "False None"  # released when its holder closes it

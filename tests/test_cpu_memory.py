"""workbench.cpu_memory: with it, a large block freed and allocated again reuses its pages (no page faults);
glibc's default unmaps blocks above 32 MB and faults every page back in. Measured in fresh processes.
(The first few aligned blocks land at new addresses while the heap settles; by step 12 they are reused.)"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from workbench.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for step in range(12):  # a step's 64 MB temporary, freed at the end of the step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
print(kept, faults)
"""


def faults_on_the_last_step(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_large_block_is_reused_without_page_faults():
    kept, faults = faults_on_the_last_step("keep")
    _, default_faults = faults_on_the_last_step("default")
    assert kept == "True"
    assert default_faults > 8000  # 64 MB / 4 KB pages = 16384: glibc's default faults them in again
    assert faults < 100

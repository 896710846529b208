"""README command 1, literally: parsed out of README.md and typed as a user would, from the root of a copy
of the repository (a path with a space), with the relative --out_dir, an empty HOME (so an empty cache),
in a subprocess. Only the size shrinks, through --set. Every path the user gives is relative here; the
bug this guards against lost the absorption eval when --out_dir was relative."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# the quickstart at a size a test affords; absorption and sae_probes stay in, at reduced size
SMALL = ["data.train_tokens=16384", "data.norm_tokens=4000", "data.buffer_batches=4", "sae.d_sae=512",
         "sae.batch_size=512", "trainer.k=16", "eval.ce_contexts=4", "eval.variance_tokens=3000",
         "eval.absorption_words_per_letter=40", "eval.absorption_min_letters=3",
         "eval.sae_probes_datasets=['155_athlete_sport_basketball']", "log.progress=false"]


def readme_command_1() -> str:
    text = (ROOT / "README.md").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("bash setup.sh &&")]
    assert len(lines) == 1, "README.md must hold command 1 (bash setup.sh && python experiment.py ...) once"
    return lines[0]


def tracked_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (no run directories, no caches)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_readme_command_1_as_typed(tmp_path):
    command = readme_command_1()
    steps = [shlex.split(s) for s in command.split("&&")]
    assert steps[0] == ["bash", "setup.sh"] and steps[1][:2] == ["python", "experiment.py"]
    assert steps[2] == ["python", "plot.py"]
    out_dir = next(a.split("=", 1)[1] for a in steps[1] if a.startswith("--out_dir="))
    assert not os.path.isabs(out_dir)  # the README's own, relative form
    steps[1] += [a for s in SMALL for a in ("--set", s)]
    if os.environ.get("SAE_WB_TEST_SKIP_SETUP") == "1":
        steps = steps[1:]  # for a quick local rerun; by default setup.sh runs too (it finds everything installed)
    repo = tracked_copy(tmp_path / "a clone")
    notes_before = (repo / "notes.txt").read_text()
    home = tmp_path / "empty home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SAE_WB_CACHE",)}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH="")
    script = " && ".join(shlex.join([sys.executable if a == "python" else a for a in step]) for step in steps)
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = repo / out_dir
    info = json.loads((run / "final_info.json").read_text())
    for key in ("core evaluation results", "absorption evaluation results", "sae_probes evaluation results"):
        assert key in info, f"{key} missing; skipped: {info.get('skipped evaluations')}"
    absorption = info["absorption evaluation results"]
    assert absorption["eval_result_unstructured"]["letters_scored"] >= 3
    assert 0 <= absorption["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] <= 1
    assert (run / "eval_artifacts" / "absorption" / "artifacts" / "absorption").is_dir()
    assert not (repo / "artifacts").exists()  # nothing lands in the working directory
    skipped = info["skipped evaluations"]
    assert not any(v.startswith("failed") for v in skipped.values()), skipped
    assert set(skipped) >= {"sparse_probing", "scr", "tpp", "unlearning", "autointerp"}
    # the cache went under the (empty) HOME, so this really was a first run
    assert (home / ".cache" / "sae_workbench" / "gemma-3-270m-hf" / "COMPLETE").is_file()
    # plot.py named no non-run folder (run_configs/ matches run_* but holds no run)
    assert "run_configs" not in proc.stderr
    assert (repo / "summary.md").is_file() and re.search(rf"\| {re.escape(Path(out_dir).name)} \|",
                                                         (repo / "summary.md").read_text())
    added = (repo / "notes.txt").read_text()[len(notes_before):].splitlines()
    assert len(added) == 1 and f"] {Path(out_dir).name}: topk" in added[0]

"""Exact resume: a run SIGKILLed at a random step and resumed ends with the same weights as an
uninterrupted run; a finished run is refused without --overwrite; NaN never yields a final_info."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import experiment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def args_for(out, cache, trainer, use_cache=True):
    sets = ["data.train_tokens=12800", "data.norm_tokens=2000", "data.buffer_batches=8", "sae.d_sae=256",
            "sae.batch_size=64", "log.every_steps=1", "log.checkpoint_every=7", "log.progress=false",
            "eval.types=[]", f"cache.dir='{cache}'", "trainer.k=8", "trainer.warmup_steps=10"]
    if not use_cache:  # activations straight from the LM: a resume skips contexts without running it
        sets += ["cache.enabled=false"]
    if trainer == "momentum":
        sets += ["trainer.name='momentum'", "trainer.base='topk'", "trainer.lambda2=0.5", "trainer.tau=0.3"]
    if trainer == "batchtopk":  # threshold EMA from step 10 (5% of 200): a resume must carry theta and its count
        sets += ["trainer.name='batchtopk'"]
    if trainer in ("ortsae", "c2r"):  # chunks of a seeded permutation: a resume must carry the generator
        sets += [f"trainer.name='{trainer}'", "trainer.chunk_size=100"]
    config = "run_configs/quickstart.toml"
    if trainer == "jumprelu":   # learned log-thresholds and their Adam state; its preset has no k key
        config = "run_configs/quickstart_jumprelu.toml"
        sets = [s for s in sets if s != "trainer.k=8"] + ["trainer.init_l0=8.0"]
    return [f"--out_dir={out}", "--config", str(ROOT / config)] + \
        [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


@pytest.mark.parametrize("trainer,use_cache", [("topk", True), ("momentum", True), ("topk", False),
                                               ("batchtopk", True), ("jumprelu", True), ("ortsae", True),
                                               ("c2r", True)])
def test_sigkill_then_resume_matches_uninterrupted(trainer, use_cache, cache, tmp_path, capsys):
    ref = tmp_path / "run_ref"
    assert experiment.main(args_for(ref, cache, trainer, use_cache)) == 0  # also fills the activation cache
    kill_at = random.Random(f"{trainer}-{use_cache}-kill").randint(8, 190)  # 200 steps, checkpoints every 7
    out = tmp_path / "run_killed"
    env = {**os.environ, "SAE_WB_KILL_AT_STEP": str(kill_at)}
    proc = subprocess.run([sys.executable, str(ROOT / "experiment.py"), *args_for(out, cache, trainer, use_cache)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed
    assert not (out / "final_info.json").exists() and (out / "checkpoint.pt").is_file()
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1] == kill_at - 1  # it got past the last checkpoint before dying
    capsys.readouterr()
    assert experiment.main([f"--out_dir={out}"]) == 0  # resume: no config needed
    assert f"resuming {out} from step {kill_at // 7 * 7}" in capsys.readouterr().err
    a = load_file(str(ref / "sae" / "sae_weights.safetensors"))
    b = load_file(str(out / "sae" / "sae_weights.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(200))  # the log is whole: nothing twice, nothing missing
    info = json.loads((out / "final_info.json").read_text())
    prov = info["training results for layer 6"]["provenance"]
    assert prov["resumed_from_step"] == kill_at // 7 * 7
    assert prov["activation_source"].startswith("cache:" if use_cache else "lm")
    assert not (out / "checkpoint.pt").exists()
    if trainer == "momentum":
        ma = json.loads((ref / "trainer_artifacts.json").read_text())["momentum_final"]
        mb = json.loads((out / "trainer_artifacts.json").read_text())["momentum_final"]
        assert max(abs(x - y) for x, y in zip(ma, mb)) <= 1e-6
    if trainer in ("batchtopk", "jumprelu"):  # thresholds are in the weights file; the EMA's count here
        ref_fi = json.loads((ref / "final_info.json").read_text())["training results for layer 6"]["final_info"]
        fi = info["training results for layer 6"]["final_info"]
        assert "threshold" in b and fi.get("threshold_updates") == ref_fi.get("threshold_updates")
    # finished now: a second call refuses and changes nothing
    before = (out / "final_info.json").read_text()
    assert experiment.main([f"--out_dir={out}"]) == 2
    assert (out / "final_info.json").read_text() == before


def test_resume_with_a_different_config_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "run_k"
    env = {**os.environ, "SAE_WB_KILL_AT_STEP": "20"}
    subprocess.run([sys.executable, str(ROOT / "experiment.py"), *args_for(out, cache, "topk")], cwd=ROOT, env=env,
                   capture_output=True, timeout=600)
    assert (out / "checkpoint.pt").is_file()
    rc = experiment.main(args_for(out, cache, "topk") + ["--set", "trainer.k=4"])
    assert rc == 2 and "another config" in capsys.readouterr().err
    assert not (out / "final_info.json").exists()

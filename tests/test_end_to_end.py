"""The real pipeline on the embedded model (Gemma-3-270M from PyPI, real text), with a tiny budget."""
import json

import pytest
import torch

import experiment

pytestmark = pytest.mark.slow

TINY = ["data.train_tokens=16384", "data.norm_tokens=4000", "data.buffer_batches=4", "sae.d_sae=512",
        "sae.batch_size=512", "eval.ce_contexts=4", "eval.variance_tokens=3000", "log.progress=false",
        "log.every_steps=4",
        # absorption and sae_probes run in test_acceptance.py; here the skip path of the offline-impossible ones
        "eval.types=['core', 'unlearning', 'autointerp']"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("act_cache")


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "run_topk"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart.toml",
                          *sets(TINY + ["trainer.k=16", f"cache.dir='{cache_dir}'"])])
    assert rc == 0
    return out


def test_warm_cache_run_reproduces_the_cold_run_exactly(topk_run, cache_dir, tmp_path):
    from safetensors.torch import load_file

    cold = json.loads((topk_run / "final_info.json").read_text())["training results for layer 6"]["provenance"]
    assert cold["activation_source"].startswith("lm (stored as cache:")
    out = tmp_path / "run_warm"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart.toml",
                          *sets(TINY + ["trainer.k=16", f"cache.dir='{cache_dir}'", "eval.types=[]"])])
    assert rc == 0
    warm = json.loads((out / "final_info.json").read_text())["training results for layer 6"]["provenance"]
    assert warm["activation_source"].startswith("cache:") and warm["normalization_scale"] == cold["normalization_scale"]
    a, b = load_file(str(topk_run / "sae" / "sae_weights.safetensors")), load_file(str(out / "sae" / "sae_weights.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_run_directory_contents(topk_run):
    assert {p.name for p in topk_run.iterdir()} >= {"config.toml", "train_log.jsonl", "sae", "final_info.json"}
    info = json.loads((topk_run / "final_info.json").read_text())
    tr = info["training results for layer 6"]
    assert set(tr) >= {"config", "final_info", "provenance"}
    assert set(tr["final_info"]) >= {"training_steps", "final_loss", "layer", "dict_size", "learning_rate"}
    assert set(tr["config"]) >= {"trainer_class", "dict_class", "lr", "steps", "seed", "activation_dim", "dict_size",
                                 "k", "device", "layer", "lm_name", "submodule_name"}
    assert tr["final_info"]["training_steps"] == 32 and tr["config"]["activation_dim"] == 640
    prov = tr["provenance"]
    assert prov["model"] == "gemma-3-270m" and prov["hook"] == "blocks.6.hook_resid_post"
    assert prov["train_tokens"] == 16384 and prov["normalization_scale"] > 0 and prov["code_version"]
    assert set(info["skipped evaluations"]) == {"unlearning", "autointerp"}
    assert "eval.unlearning_model" in info["skipped evaluations"]["unlearning"]
    core = info["core evaluation results"]["metrics"]
    for group in ("model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                  "shrinkage", "sparsity", "token_stats", "misc"):
        assert group in core
    assert core["sparsity"]["l0"] == pytest.approx(16, abs=0.5)
    # even 32 steps must learn something real: better than the mean, and the model mostly preserved
    assert 0.3 < core["reconstruction_quality"]["explained_variance"] < 1
    assert 0.2 < core["model_performance_preservation"]["ce_loss_score"] <= 1
    notes = (topk_run.parent / "notes.txt").read_text()
    ev = core["reconstruction_quality"]["explained_variance"]
    assert "run_topk: topk lr=0.001 warmup_steps=50 k=16 |" in notes and f"EV {ev:.4g}" in notes
    log = [json.loads(line) for line in (topk_run / "train_log.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "loss_recon", "loss_auxk", "l0", "fvu", "dead_frac", "lr"} <= set(log[0])
    assert log[-1]["step"] == 31 and log[-1]["fvu"] < log[0]["fvu"]


def test_saved_sae_reproduces_core_ev_with_sae_lens(topk_run):
    """The saved SAE, loaded by sae_lens, takes raw activations: its EV on held-out activations
    matches the stored core number."""
    from sae_lens import SAE as LensSAE

    from workbench.activations import hook_activations, special_mask
    from workbench.config import load_config
    from workbench.lm import load_lm, special_token_ids
    from workbench.text import held_out_contexts

    cfg = load_config(topk_run / "config.toml")
    model = load_lm(cfg.model)
    toks = held_out_contexts(cfg.data, model.tokenizer, 24, cfg.seed)
    acts = hook_activations(model, toks, cfg.model.hook, cfg.model.layer)
    x = acts[~special_mask(toks, special_token_ids(model.tokenizer))].float()[:3000].double()
    lens = LensSAE.load_from_disk(topk_run / "sae")
    with torch.no_grad():
        xh = lens.decode(lens.encode(x.float())).double()
    ev = 1 - (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    info = json.loads((topk_run / "final_info.json").read_text())
    stored = info["core evaluation results"]["metrics"]["reconstruction_quality"]["explained_variance"]
    assert ev.item() == pytest.approx(stored, abs=1e-3)


def test_relu_run_and_refusal_to_overwrite(topk_run, cache_dir, tmp_path, capsys):
    out = tmp_path / "run_relu"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart_relu.toml",
                          *sets(TINY + [f"cache.dir='{cache_dir}'"])])
    assert rc == 0
    info = json.loads((out / "final_info.json").read_text())
    assert info["training results for layer 6"]["config"]["trainer_class"] == "ReLUTrainer"
    assert info["core evaluation results"]["metrics"]["sparsity"]["l0"] > 0
    before = (topk_run / "final_info.json").read_text()
    assert experiment.main([f"--out_dir={topk_run}", "--config", "run_configs/quickstart.toml"]) == 2
    assert (topk_run / "final_info.json").read_text() == before


def test_sweep_trains_several_saes_on_one_stream(topk_run, cache_dir, tmp_path):
    """The main trainer of a sweep ends bitwise equal to the same trainer run alone (same stream);
    the extra momentum trainer writes its own complete run directory."""
    from safetensors.torch import load_file

    out = tmp_path / "run_sw"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart.toml",
                          *sets(TINY + ["trainer.k=16", f"cache.dir='{cache_dir}'",
                                        "sweep=[{label='mom', name='momentum', base='topk', k=16, lambda2=0.5}]"])])
    assert rc == 0
    a = load_file(str(topk_run / "sae" / "sae_weights.safetensors"))
    b = load_file(str(out / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    mom = tmp_path / "run_sw_mom"
    info = json.loads((mom / "final_info.json").read_text())
    tr = info["training results for layer 6"]
    assert tr["config"]["trainer_class"] == "MomentumTrainer" and tr["config"]["lambda2"] == 0.5
    assert tr["provenance"]["trainers_on_stream"] == ["run_sw", "run_sw_mom"]
    assert info["core evaluation results"]["metrics"]["sparsity"]["l0"] == pytest.approx(16, abs=0.5)
    log = [json.loads(line) for line in (mom / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["cofiring_pairs"] > 0 and log[-1]["loss_competition"] > 0 and 0 < log[-1]["penalty_share"] < 1
    art = json.loads((mom / "trainer_artifacts.json").read_text())
    assert len(art["momentum_final"]) == 512
    import tomllib
    assert "sweep" not in tomllib.loads((mom / "config.toml").read_text())  # no [[sweep]] in a member's config


def test_nan_stops_the_run_naming_the_step(topk_run, cache_dir, tmp_path, capsys):
    """A diverging run (absurd lr, warm cache so no LM is needed) exits 1 naming the step, and leaves
    no final_info.json, only failed.txt; the read-ahead thread is stopped, not left to the process's exit."""
    import threading
    threads_before = threading.active_count()
    out = tmp_path / "run_nan"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart.toml",
                          *sets(TINY + ["trainer.k=16", f"cache.dir='{cache_dir}'", "eval.types=[]",
                                        "trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.grad_clip=0.0",
                                        "data.prefetch_chunks=2"])])  # a reader thread (auto reads in turn on a CPU)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "at step" in err[0] and "trainer.lr" in err[0]
    assert not (out / "final_info.json").exists() and "at step" in (out / "failed.txt").read_text()
    assert threading.active_count() == threads_before


def test_write_failure_leaves_no_final_info(topk_run, cache_dir, tmp_path, capsys, monkeypatch):
    import errno

    import workbench.pipeline as pipeline  # the disk fills where the pipeline writes final_info.json
    real = pipeline.atomic_write_json

    def disk_full(path, obj):
        if str(path).endswith("final_info.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(pipeline, "atomic_write_json", disk_full)
    out = tmp_path / "run_full"
    rc = experiment.main([f"--out_dir={out}", "--config", "run_configs/quickstart.toml",
                          *sets(TINY + ["trainer.k=16", f"cache.dir='{cache_dir}'", "eval.types=[]"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and "free disk space" in err[0]
    assert not (out / "final_info.json").exists()

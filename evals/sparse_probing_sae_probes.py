"""SAEBench sparse probing through `sae_probes` (113 binary probing datasets shipped in its wheel, so it
runs offline), run by sae_bench 0.6.0's sparse_probing_sae_probes eval on the loaded model.

The model's activations on the probing prompts are cached under a key of model, dtype and sae_probes
version (sae_probes names the files by model and hook); probe results go under the run directory.
sae_probes 0.4.2 stores them in the model's dtype and its raw-activation baseline then hands bfloat16
tensors to sklearn, which fails: we produce them first and store them as float32.
"""
from __future__ import annotations

import os
import shutil
from importlib.metadata import version
from pathlib import Path

import torch

from evals import EvalContext
from evals.sae_bench_bridge import artifacts_dir, device_of, eval_cache_dir, llm_dtype, run_sae_bench

KEY = "sae_probes evaluation results"


def run(ctx: EvalContext) -> list[dict]:
    from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig
    from sae_bench.evals.sparse_probing_sae_probes.main import run_eval

    cfg, e = ctx.run_cfg, ctx.run_cfg.eval
    out = artifacts_dir(ctx, "sae_probes")
    acts_cache = eval_cache_dir(ctx, "sae_probes_model_acts", {
        "model": cfg.model.name, "dtype": llm_dtype(ctx), "sae_probes": version("sae-probes")})
    config = SparseProbingSaeProbesEvalConfig(model_name=cfg.model.name, random_seed=cfg.seed, ks=list(e.sae_probes_ks),
                                              results_path=str(out / "probes"), model_cache_path=str(acts_cache),
                                              include_llm_baseline=e.sae_probes_llm_baseline)
    if e.sae_probes_datasets:
        config.dataset_names = list(e.sae_probes_datasets)
    if not e.sae_probes_llm_baseline:
        ctx.skipped_parts["sae_probes_llm_baseline"] = (
            "the raw-activation probe baseline (the probing ceiling) is off: it costs ~70 s per dataset on a "
            "2-core CPU, once per model, hook and seed (then cached); set eval.sae_probes_llm_baseline=true")
    model_activations(ctx, config.dataset_names, acts_cache)
    # SAE probe results are per run and never reused (sae_probes skips any dataset whose result file
    # exists); the raw-activation baseline depends only on model, hook and seed: it lives in the cache.
    shutil.rmtree(out / "probes", ignore_errors=True)
    baseline_top = f"baseline_results_{cfg.model.name}".split("/")[0]
    baseline_cache = eval_cache_dir(ctx, "sae_probes_baseline", {
        "model": cfg.model.name, "dtype": llm_dtype(ctx), "sae_probes": version("sae-probes"), "seed": cfg.seed,
        "method": config.baseline_method}) / baseline_top
    baseline_cache.mkdir(parents=True, exist_ok=True)
    (out / "probes").mkdir()
    (out / "probes" / baseline_top).symlink_to(baseline_cache, target_is_directory=True)
    return run_sae_bench(run_eval, config, ctx, "sae_probes")


def model_activations(ctx: EvalContext, datasets: list[str], acts_cache: Path) -> None:
    """The LM's activations at the hook on each dataset's prompts (forward stopped at the hook layer by
    sae_probes), cached as float32."""
    from sae_probes.generate_model_activations import ensure_dataset_activations

    cfg = ctx.run_cfg
    ensure_dataset_activations(model_name=cfg.model.name, dataset_short_names=list(datasets), hook_names=[cfg.model.hook],
                               model_cache_path=acts_cache, device=device_of(ctx), batch_size=ctx.run_cfg.eval.llm_batch_size,
                               model=ctx.model)
    for path in acts_cache.glob(f"model_activations_*/*_{cfg.model.hook}.pt"):
        acts = torch.load(path, weights_only=True)
        if acts.dtype != torch.float32:
            tmp = path.with_suffix(".tmp")
            torch.save(acts.float(), tmp)
            os.replace(tmp, path)

"""SAEBench automated interpretability: an OpenAI judge explains latents from their top activations on
the pile and scores the explanations. Needs OPENAI_API_KEY and the hub (monology/pile-uncopyrighted)."""
from __future__ import annotations

import os

from evals import EvalContext, EvalSkipped
from evals.sae_bench_bridge import artifacts_dir, llm_dtype, require_hub_datasets, run_sae_bench

KEY = "autointerp evaluation results"


def run(ctx: EvalContext) -> list[dict]:
    api_key = os.environ.get("OPENAI_API_KEY", "")
    if not api_key:
        raise EvalSkipped("autointerp needs an OpenAI API key: export OPENAI_API_KEY")
    from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig
    from sae_bench.evals.autointerp.main import run_eval

    cfg, e = ctx.run_cfg, ctx.run_cfg.eval
    config = AutoInterpEvalConfig(model_name=cfg.model.name, random_seed=cfg.seed, n_latents=e.autointerp_n_latents,
                                  llm_batch_size=e.llm_batch_size, llm_dtype=llm_dtype(ctx),
                                  llm_context_size=cfg.data.context_size)
    require_hub_datasets([config.dataset_name], "autointerp")
    out = artifacts_dir(ctx, "autointerp")

    def run_with_key(config, selected, device, output_path, **kwargs):  # api_key comes before output_path
        return run_eval(config, selected, device, api_key, output_path, **kwargs)

    return run_sae_bench(run_with_key, config, ctx, "autointerp", artifacts_path=str(out / "artifacts"),
                         save_logs_path=str(out / "logs.txt"))

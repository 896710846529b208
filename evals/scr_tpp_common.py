"""SCR and TPP are one sae_bench eval (scr_and_tpp) with a switch; both modules call this."""
from __future__ import annotations

from evals import EvalContext
from evals.sae_bench_bridge import artifacts_dir, llm_dtype, require_hub_datasets, run_sae_bench


def run_scr_or_tpp(ctx: EvalContext, perform_scr: bool) -> list[dict]:
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.evals.scr_and_tpp.main import run_eval

    name = "scr" if perform_scr else "tpp"
    cfg, e = ctx.run_cfg, ctx.run_cfg.eval
    config = ScrAndTppEvalConfig(model_name=cfg.model.name, random_seed=cfg.seed, perform_scr=perform_scr,
                                 llm_batch_size=e.llm_batch_size, llm_dtype=llm_dtype(ctx),
                                 context_length=e.probe_context_length)
    require_hub_datasets(list(config.dataset_names), name)
    return run_sae_bench(run_eval, config, ctx, name, artifacts_path=str(artifacts_dir(ctx, name) / "artifacts"))

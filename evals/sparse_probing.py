"""SAEBench sparse probing (8 HuggingFace classification datasets, k-sparse probes on SAE latents vs the
residual stream), run by sae_bench 0.6.0 on the loaded model. Needs the hub: skipped offline."""
from __future__ import annotations

from evals import EvalContext
from evals.sae_bench_bridge import artifacts_dir, llm_dtype, require_hub_datasets, run_sae_bench

KEY = "sparse probing evaluation results"


def run(ctx: EvalContext) -> list[dict]:
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig
    from sae_bench.evals.sparse_probing.main import run_eval

    cfg, e = ctx.run_cfg, ctx.run_cfg.eval
    config = SparseProbingEvalConfig(model_name=cfg.model.name, random_seed=cfg.seed, llm_batch_size=e.llm_batch_size,
                                     llm_dtype=llm_dtype(ctx), k_values=list(e.probe_k_values),
                                     probe_train_set_size=e.probe_train_set_size,
                                     probe_test_set_size=e.probe_test_set_size, context_length=e.probe_context_length)
    require_hub_datasets(list(config.dataset_names), "sparse_probing")
    return run_sae_bench(run_eval, config, ctx, "sparse_probing",
                         artifacts_path=str(artifacts_dir(ctx, "sparse_probing") / "artifacts"))

"""SAEBench unlearning (WMDP-bio vs MMLU subsets, by clamping latents). SAEBench runs it on an
instruction-tuned model (the seeds: google/gemma-2-2b-it with the base model's SAE), so this eval loads
`eval.unlearning_model` itself rather than reusing the run's LM. It also needs the gated WMDP
bio-forget corpus (granted on request by the WMDP authors) and the hub (cais/wmdp, cais/mmlu, wikitext)."""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from evals import EvalContext, EvalSkipped
from evals.sae_bench_bridge import artifacts_dir, llm_dtype, require_hub_datasets, run_sae_bench

KEY = "unlearning evaluation results"


def prerequisites(e) -> None:
    if not e.unlearning_model:
        raise EvalSkipped("unlearning needs an instruction-tuned model: set eval.unlearning_model "
                          "(e.g. google/gemma-2-2b-it) and eval.wmdp_corpus")
    if "it" not in e.unlearning_model:  # sae_bench refuses non-instruct models
        raise EvalSkipped(f"eval.unlearning_model '{e.unlearning_model}' is not instruction-tuned (-it)")
    if not (e.wmdp_corpus and Path(e.wmdp_corpus).is_file()):
        raise EvalSkipped("unlearning needs the gated WMDP bio-forget-corpus.jsonl (request it from the WMDP "
                          f"authors) at eval.wmdp_corpus (now '{e.wmdp_corpus}')")


def run(ctx: EvalContext) -> list[dict]:
    e = ctx.run_cfg.eval
    prerequisites(e)
    require_hub_datasets(["cais/wmdp", "cais/mmlu", "wikitext"], "unlearning")
    from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig
    from sae_bench.evals.unlearning.main import run_eval

    config = UnlearningEvalConfig(model_name=e.unlearning_model, random_seed=ctx.run_cfg.seed,
                                  llm_batch_size=e.llm_batch_size, llm_dtype=llm_dtype(ctx))
    from sae_bench.evals.unlearning.utils import feature_activation

    out = artifacts_dir(ctx, "unlearning")
    # sae_bench opens ./sae_bench/evals/unlearning/data/<corpus>.jsonl relative to the working directory;
    # its module gets an `open` that reads the configured corpus instead (no chdir, no symlink).
    with mock.patch.object(feature_activation, "open", create=True, new=corpus_opener(Path(e.wmdp_corpus))):
        return run_sae_bench(run_eval, config, ctx, "unlearning", inject=False, artifacts_path=str(out / "artifacts"))


def corpus_opener(corpus: Path):
    """`open` for sae_bench's feature_activation module: its relative forget-corpus path -> `corpus`."""
    def _open(path, *args, **kwargs):
        if str(path).endswith("bio-forget-corpus.jsonl") and not os.path.isabs(path):
            path = corpus
        return open(path, *args, **kwargs)
    return _open

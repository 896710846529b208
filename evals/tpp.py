"""SAEBench targeted probe perturbation (bias_in_bios, amazon reviews). Needs the hub: skipped offline."""
from evals import EvalContext
from evals.scr_tpp_common import run_scr_or_tpp

KEY = "tpp evaluation results"


def run(ctx: EvalContext) -> list[dict]:
    return run_scr_or_tpp(ctx, perform_scr=False)

"""Evaluation registry. Each eval is one module exposing `KEY` (its final_info.json key) and
`run(ctx: EvalContext) -> list[dict]` (one result per SAE in ctx.saes, so shared work such as the
clean forward passes is done once). An eval that cannot run here raises EvalSkipped with the reason."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


class EvalSkipped(Exception):
    """The eval's data, API key or model support is missing: recorded under 'skipped evaluations'."""


@dataclass
class EvalContext:
    model: Any                 # the loaded HookedTransformer, shared by every eval
    saes: list                 # workbench.sae.SAE objects on raw activations (normalization folded in)
    run_cfg: Any               # RunConfig (model, data and eval keys are shared by all SAEs)
    eval_contexts_NT: torch.Tensor  # held-out context windows
    special_ids: list[int]
    progress: bool = True


def _not_wired(name: str) -> Callable[[EvalContext], list[dict]]:
    def run(ctx: EvalContext) -> list[dict]:
        raise EvalSkipped(f"the '{name}' eval is not wired into this workbench yet")
    return run


def _registry() -> dict[str, tuple[str, Callable[[EvalContext], list[dict]]]]:
    from evals import core
    reg = {"core": (core.KEY, core.run)}
    for name, key in [("absorption", "absorption evaluation results"),
                      ("sparse_probing", "sparse probing evaluation results"),
                      ("sae_probes", "sae_probes evaluation results"),
                      ("scr", "scr evaluation results"), ("tpp", "tpp evaluation results"),
                      ("unlearning", "unlearning evaluation results"),
                      ("autointerp", "autointerp evaluation results")]:
        reg[name] = (key, _not_wired(name))
    return reg


EVALS = {"core", "absorption", "sparse_probing", "sae_probes", "scr", "tpp", "unlearning", "autointerp"}


def run_evals(names: list[str], ctx: EvalContext) -> tuple[list[dict], dict]:
    """(per SAE: results by final_info key; skipped {name: reason})."""
    reg = _registry()
    results, skipped = [{} for _ in ctx.saes], {}
    for name in names:
        key, fn = reg[name]
        try:
            for per_sae, result in zip(results, fn(ctx)):
                per_sae[key] = result
        except EvalSkipped as e:
            skipped[name] = str(e)
    return results, skipped

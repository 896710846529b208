"""Evaluation registry. Each eval is one module exposing `KEY` (its final_info.json key) and
`run(ctx: EvalContext) -> list[dict]` (one result per SAE in ctx.saes, so shared work such as the
clean forward passes is done once). An eval that cannot run here raises EvalSkipped with the reason."""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.config import EVAL_CHECKS, ConfigError


class EvalSkipped(Exception):
    """The eval's data, API key or model support is missing: recorded under 'skipped evaluations'."""


@dataclass
class EvalContext:
    model: Any                 # the loaded HookedTransformer, shared by every eval
    saes: list                 # workbench.sae.TrainableSAE objects (sae_lens SAEs) on raw activations (normalization folded in)
    run_cfg: Any               # RunConfig (model, data and eval keys are shared by all SAEs)
    eval_contexts_NT: torch.Tensor  # held-out context windows
    special_ids: list[int]
    artifacts_root: Path       # per-run eval artifacts (the run directory's eval_artifacts/)
    cache_root: Path           # reusable eval work keyed by what changes it (probes, model activations)
    progress: bool = True
    # parts of an eval left out on purpose (e.g. sae_probes' raw-activation baseline): {name: reason},
    # reported under "skipped evaluations" next to whole evals that were skipped
    skipped_parts: dict = field(default_factory=dict)


def build_context(cfg, model, saes: list, artifacts_root: Path) -> EvalContext:
    """The context every eval of a run shares: the model, the SAEs and held-out text."""
    from workbench.lm import cache_root, special_token_ids
    from workbench.text import held_out_contexts

    n_ctx = max(cfg.eval.ce_contexts, -(-cfg.eval.variance_tokens // (cfg.data.context_size - 1)))
    return EvalContext(model=model, saes=saes, run_cfg=cfg, special_ids=special_token_ids(model.tokenizer),
                       progress=cfg.log.progress, artifacts_root=Path(artifacts_root).absolute(), cache_root=cache_root(cfg.model),
                       eval_contexts_NT=held_out_contexts(cfg.data, model.tokenizer, n_ctx, cfg.seed))


def evaluate(cfg, model, saes: list, artifacts_root: Path, phases=None) -> tuple[list[dict], dict]:
    """The run's configured evals (cfg.eval.types) on all its SAEs: see run_evals."""
    return run_evals(cfg.eval.types, build_context(cfg, model, saes, artifacts_root), phases)


# eval name (SAEBench's) -> module under evals/ exposing KEY and run(ctx)
MODULES = {"core": "core", "absorption": "absorption", "sparse_probing": "sparse_probing",
           "sae_probes": "sparse_probing_sae_probes", "scr": "scr", "tpp": "tpp",
           "unlearning": "unlearning", "autointerp": "autointerp"}
EVALS = set(MODULES)


def check_sae_probes(cfg) -> None:
    """sae_probes: the dataset names must be ones its wheel ships (checked before any model loads)."""
    if cfg.eval.sae_probes_datasets:
        from sae_probes.utils_data import get_numbered_binary_tags
        known = set(get_numbered_binary_tags())
        bad = [x for x in cfg.eval.sae_probes_datasets if x not in known]
        if bad:
            raise ConfigError(f"config key 'eval.sae_probes_datasets' names unknown dataset(s) {bad}; "
                              f"e.g. {sorted(known)[:3]}")


# handed to the config loader, which never imports evals/
EVAL_CHECKS.update({name: None for name in MODULES}, sae_probes=check_sae_probes)


def module(name: str):
    """The eval's module; a skipped part's name (e.g. sae_probes_llm_baseline) maps to its eval's."""
    owner = name if name in MODULES else max((m for m in MODULES if name.startswith(m + "_")), key=len)
    return importlib.import_module(f"evals.{MODULES[owner]}")


def run_evals(names: list[str], ctx: EvalContext, phases=None) -> tuple[list[dict], dict]:
    """(per SAE: results by final_info key; skipped {name: reason}). Each eval's wall time is printed.

    An eval that crashes does not take the trained SAEs and the other evals down with it: it is
    recorded as skipped with "failed:" and the error, and its traceback goes to
    eval_artifacts/<name>.error.txt (re-run it with evals/run.py once fixed)."""
    from workbench.runio import json_safe

    results, skipped = [{} for _ in ctx.saes], {}
    for name in names:
        mod, start = module(name), time.perf_counter()
        try:
            with phases(name) if phases else contextlib.nullcontext():
                per_eval = [json_safe(r) for r in mod.run(ctx)]
            json.dumps(per_eval, allow_nan=False)  # a result that cannot be written fails here, named
            for per_sae, result in zip(results, per_eval):
                per_sae[mod.KEY] = result
            print(f"eval {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        except EvalSkipped as e:
            skipped[name] = str(e)
            print(f"eval {name}: skipped ({e})", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 (a bug in one eval must not lose the run)
            ctx.artifacts_root.mkdir(parents=True, exist_ok=True)
            (ctx.artifacts_root / f"{name}.error.txt").write_text(traceback.format_exc())
            skipped[name] = f"failed: {type(e).__name__}: {str(e)[:300]} (traceback: {ctx.artifacts_root / name}.error.txt)"
            print(f"eval {name}: FAILED ({type(e).__name__}: {e}); see {ctx.artifacts_root / name}.error.txt",
                  file=sys.stderr)
    skipped.update(ctx.skipped_parts)
    return results, skipped

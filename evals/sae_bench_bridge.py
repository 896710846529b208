"""What every sae_bench-backed eval shares: our SAEs as sae_lens SAEs, the already loaded LM handed to
sae_bench (its run_eval functions only take a model *name*), forwards stopped at the hook layer, seeds,
artifact folders, and the offline checks that turn a missing prerequisite into EvalSkipped."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from evals import EvalContext, EvalSkipped


def lens_sae(sae, run_cfg, name: str = "custom_sae"):
    """A sae_lens SAE computing the same map as `sae` on raw activations, with unit-norm decoder rows.

    SAEBench assumes unit decoder rows (absorption compares `latent act * cos(probe, W_dec)` with the
    probe projection of the raw activation). Our saved SAE has decoder rows of norm 1/s (the normalization
    fold). Rescaling latent i by n_i = ||W_dec_i|| (f_i -> n_i f_i, W_dec_i -> W_dec_i / n_i) keeps the
    reconstruction; for TopK it also keeps which latents win only when all n_i are equal, which holds here
    (trained rows are unit norm, the fold divides all by the same s), so otherwise we leave the rows alone.
    JumpReLU thresholds scale with their latent (theta_i -> n_i theta_i), which keeps every latent's gate."""
    n_F = sae.W_dec.detach().float().norm(dim=1)
    uniform = bool(torch.allclose(n_F, n_F.mean().expand_as(n_F), rtol=1e-3))
    # our SAE is a sae_lens SAE already: a copy (weights to rescale, metadata sae_bench reads), no disk trip
    lens = sae.folded(1.0, {**sae.cfg.metadata.to_dict(), "model_name": run_cfg.model.name,
                            "hook_name": run_cfg.model.hook, "hook_head_index": None, "prepend_bos": True,
                            "context_size": run_cfg.data.context_size, "dataset_path": run_cfg.data.dataset,
                            "exclude_special_tokens": True, "sae_name": name})
    jumprelu = sae.architecture == "jumprelu"
    if uniform or jumprelu:
        with torch.no_grad():
            lens.W_enc.mul_(n_F[None, :])
            lens.b_enc.mul_(n_F)
            lens.W_dec.div_(n_F[:, None])
            if jumprelu:
                lens.threshold.mul_(n_F)
    return lens.eval()


def _block_index(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def forwards_stop_at_hook(model):
    """model.run_with_cache(..., names_filter=[hooks in blocks <= L]) stops after block L: sae_bench's
    absorption runs full forwards (on Gemma-3-270M the 262k-way unembedding is most of the cost) but only
    reads the cached hook. Callers of run_with_cache index the cache, never the logits."""
    original = model.run_with_cache

    def run_with_cache(*args, **kwargs):
        names = kwargs.get("names_filter")
        names = [names] if isinstance(names, str) else names
        if "stop_at_layer" not in kwargs and isinstance(names, (list, tuple)) and names:
            layers = [_block_index(n) for n in names]
            if all(x is not None for x in layers):
                kwargs["stop_at_layer"] = max(layers) + 1
        return original(*args, **kwargs)

    model.run_with_cache = run_with_cache
    try:
        yield model
    finally:
        del model.run_with_cache  # the instance attribute; the class method shows through again


@contextlib.contextmanager
def injected_model(model):
    """sae_bench's run_eval functions call HookedTransformer.from_pretrained_no_processing(name, ...);
    for the duration of the call they get the loaded model instead of a second copy (or a hub download)."""
    from transformer_lens import HookedTransformer

    original = HookedTransformer.__dict__["from_pretrained_no_processing"]
    HookedTransformer.from_pretrained_no_processing = classmethod(lambda cls, *a, **k: model)
    try:
        yield model
    finally:
        HookedTransformer.from_pretrained_no_processing = original


def seed_everything(seed: int) -> None:
    """sae_bench's absorption never applies its random_seed (it samples ICL examples with `random`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def llm_dtype(ctx: EvalContext) -> str:
    return str(next(ctx.model.parameters()).dtype).replace("torch.", "")


def device_of(ctx: EvalContext) -> str:
    return str(next(ctx.model.parameters()).device)


def eval_cache_dir(ctx: EvalContext, name: str, key_parts: dict) -> Path:
    """A cache folder for one eval's reusable work (probes, model activations) whose name hashes
    everything that changes the result."""
    blob = json.dumps(key_parts, sort_keys=True, default=str).encode()
    return ctx.cache_root / "evals" / name / hashlib.blake2b(blob, digest_size=8).hexdigest()


def artifacts_dir(ctx: EvalContext, name: str) -> Path:
    """Per-run artifacts of an eval (never site-packages or the working directory)."""
    path = ctx.artifacts_root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_repo(sae_bench_dataset: str) -> str:
    """sae_bench names dataset variants by suffixing the hub repo ('LabHC/bias_in_bios_class_set1')."""
    return re.sub(r"(_class_set\d+|_sentiment)$", "", sae_bench_dataset)


def require_hub_datasets(names: list[str], why: str) -> None:
    """Raise EvalSkipped unless every HF dataset is reachable (gated or offline ones are not)."""
    names = sorted({hub_repo(n) for n in names})
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise EvalSkipped(f"{why} needs the HuggingFace datasets {names}; HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    api = HfApi()
    for name in names:
        try:
            api.dataset_info(name, timeout=10)
        except Exception as e:  # offline, gated without a token, or gone
            raise EvalSkipped(f"{why} needs the HuggingFace dataset '{name}', which is unreachable here "
                              f"({type(e).__name__}); run it where the hub is reachable") from None


def run_sae_bench(run_eval, config, ctx: EvalContext, name: str, inject: bool = True, **kwargs) -> list[dict]:
    """Call a sae_bench run_eval on every SAE of the run with the shared model (inject=False: let it load
    config.model_name itself); one result dict per SAE in SAEBench's own JSON shape. kwargs go to
    run_eval (e.g. artifacts_path where it takes one)."""
    from workbench.runio import json_safe

    out = artifacts_dir(ctx, name)
    selected = [(f"sae{i}", lens_sae(sae, ctx.run_cfg)) for i, sae in enumerate(ctx.saes)]
    seed_everything(config.random_seed)
    with injected_model(ctx.model) if inject else contextlib.nullcontext():
        results = run_eval(config, selected, device_of(ctx), str(out / "results"), force_rerun=True, **kwargs)
    missing = [f"sae{i}" for i in range(len(selected)) if f"sae{i}_custom_sae" not in results]
    if missing:
        raise RuntimeError(f"sae_bench's {name} eval returned no result for {missing}; see its output above")
    return [json_safe(results[f"sae{i}_custom_sae"]) for i in range(len(selected))]

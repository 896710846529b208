"""SAEBench feature absorption (first-letter task), run by sae_bench 0.6.0 itself on the loaded model.

What this wrapper changes, and why (OFFLINE_FACTS.md lists sae_bench's defects):
- the word list is a seeded sample of `eval.absorption_words` single-token alphabetic words from the
  tokenizer (all of them on a 262k vocabulary would take hours on a CPU); the count is recorded;
- `random_seed` is applied (sae_bench never applies it);
- forwards stop at the hook layer; the ground-truth probe is cached under a key of everything that
  changes it (model, hook, dtype, word sample, template, seed) and written atomically;
- artifacts go under the run directory instead of site-packages and ./artifacts.
Fewer than `eval.absorption_min_letters` letters with a ground-truth probe F1 above 0.6 means sae_bench
writes no result: recorded as skipped, with the count and the fix.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import time
import types
from pathlib import Path
from unittest import mock

from evals import EvalContext, EvalSkipped
from evals.sae_bench_bridge import (artifacts_dir, device_of, eval_cache_dir, forwards_stop_at_hook, injected_model,
                                    lens_sae, llm_dtype, seed_everything)

KEY = "absorption evaluation results"


def word_sample(tokenizer, n_words: int, seed: int, per_letter: int = 0) -> tuple[list[str], int]:
    """(a seeded sample of sae_bench's alphabetic vocabulary tokens, how many there were).

    per_letter > 0: up to per_letter words for each first letter (stratified: a uniform sample leaves
    x, q, y, z with a few dozen words and probe F1s below SAEBench's 0.6 cut); else n_words uniformly
    (0 = all, as SAEBench)."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    words = sorted(set(get_alpha_tokens(tokenizer)))
    rng = random.Random(seed)
    if per_letter > 0:
        by_letter: dict[str, list[str]] = {}
        for w in words:
            by_letter.setdefault(w.strip().lower()[:1], []).append(w)
        picked = [w for letter in sorted(by_letter)
                  for w in rng.sample(by_letter[letter], min(per_letter, len(by_letter[letter])))]
        return sorted(picked), len(words)
    if n_words <= 0 or n_words >= len(words):
        return words, len(words)
    return sorted(rng.sample(words, n_words)), len(words)


def os_rooted_at(root: Path) -> types.SimpleNamespace:
    """sae_bench's absorption main writes its k-sparse probing JSON to the relative folder
    artifacts/absorption. Handed to it as its `os`, this resolves relative joins under `root` instead,
    so nothing depends on (or changes) the working directory."""
    def join(first, *rest):
        first = os.fspath(first)
        return os.path.join(first if os.path.isabs(first) else os.path.join(root, first), *rest)

    return types.SimpleNamespace(**{**vars(os), "path": types.SimpleNamespace(**{**vars(os.path), "join": join})})


def run(ctx: EvalContext) -> list[dict]:
    from sae_bench.evals.absorption import common, feature_absorption
    from sae_bench.evals.absorption import main as absorption_main
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    cfg, e = ctx.run_cfg, ctx.run_cfg.eval
    # precalc: the k-sparse probes read the SAE's latents computed once, not re-encoded per probe (260
    # probes); the same numbers, SAEBench leaves it off only to save GPU memory at 65k-latent widths
    config = AbsorptionEvalConfig(model_name=cfg.model.name, random_seed=cfg.seed, llm_batch_size=e.llm_batch_size,
                                  llm_dtype=llm_dtype(ctx), min_feats_for_eval=e.absorption_min_letters,
                                  precalc_k_sparse_probe_sae_acts=True)
    words, n_vocab_words = word_sample(ctx.model.tokenizer, e.absorption_words, config.random_seed,
                                       e.absorption_words_per_letter)
    device, layer = device_of(ctx), cfg.model.layer
    probe_key = {"model": cfg.model.name, "hook": cfg.model.hook, "dtype": config.llm_dtype,
                 "words": e.absorption_words, "per_letter": e.absorption_words_per_letter,
                 "vocab_words": n_vocab_words, "seed": config.random_seed,
                 "template": config.prompt_template, "pos": config.prompt_token_pos, "device": device}
    probes_dir = eval_cache_dir(ctx, "absorption_probe", probe_key)
    out = artifacts_dir(ctx, "absorption")
    start = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(forwards_stop_at_hook(ctx.model))
        stack.enter_context(injected_model(ctx.model))
        for module in (common, feature_absorption):  # both build their word list from the tokenizer
            stack.enter_context(mock.patch.object(module, "get_alpha_tokens", lambda *a, **k: list(words)))
        if not (probes_dir / ctx.model.cfg.model_name / f"layer_{layer}" / "probe.pth").is_file():
            seed_everything(config.random_seed)  # the probe's train/test word split
            tmp = probes_dir.with_name(probes_dir.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            common.train_and_save_probes(ctx.model, [layer], config.prompt_template, config.prompt_token_pos,
                                         probes_dir=tmp, device=device)
            shutil.rmtree(probes_dir, ignore_errors=True)
            os.replace(tmp, probes_dir)  # a killed run leaves only a .tmp folder, never a torn probe
        dirs = {"probes_dir": probes_dir}
        stack.enter_context(mock.patch.object(absorption_main, "run_k_sparse_probing_experiment", functools.partial(
            absorption_main.run_k_sparse_probing_experiment, experiment_dir=out / "k_sparse_probing", **dirs)))
        stack.enter_context(mock.patch.object(absorption_main, "run_feature_absortion_experiment", functools.partial(
            absorption_main.run_feature_absortion_experiment, experiment_dir=out / "feature_absorption",
            sparse_probing_experiment_dir=out / "k_sparse_probing", **dirs)))
        stack.enter_context(mock.patch.object(absorption_main, "os", os_rooted_at(out)))
        (out / "results").mkdir(exist_ok=True)  # sae_bench writes there without creating it
        results = []
        for i, sae in enumerate(ctx.saes):
            seed_everything(config.random_seed)
            name = f"sae{i}"
            got = absorption_main.run_eval(config, [(name, lens_sae(sae, cfg))], device, str(out / "results"),
                                           force_rerun=True)
            if f"{name}_custom_sae" not in got:
                raise EvalSkipped(_too_few_letters(out, name, config, len(words)))
            result = got[f"{name}_custom_sae"]
            result["eval_result_unstructured"] = {
                "vocab_words_used": len(words), "vocab_words_available": n_vocab_words,
                "words_per_letter": e.absorption_words_per_letter or None,
                "letters_scored": len(result["eval_result_details"]), "probe_cache": str(probes_dir),
                "per_letter": per_letter_diagnostics(out, name, result, words, config.min_GT_probe_f1),
                "forward_stopped_at_layer": layer + 1, "eval_runtime_s": time.time() - start}
            results.append(result)
    from workbench.runio import json_safe
    return [json_safe(r) for r in results]


def per_letter_diagnostics(out: Path, name: str, result: dict, words: list[str], min_f1: float) -> dict:
    """What the mean is made of, per first letter: the ground-truth probe's F1 (letters at or below min_f1
    are not scored), the best single SAE latent's F1 for the letter, split features, and the letter's
    absorption numbers where it was scored."""
    n_words: dict[str, int] = {}
    for w in words:
        n_words[w.strip().lower()[:1]] = n_words.get(w.strip().lower()[:1], 0) + 1
    path = out / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    scored = {d["first_letter"]: d for d in result["eval_result_details"]}
    out_rows = {}
    for r in rows:
        letter = r["letter"]
        d = scored.get(letter, {})
        out_rows[letter] = {"words": n_words.get(letter, 0), "probe_f1": r.get("f1_probe"),
                            "scored": r.get("f1_probe", 0) > min_f1, "sae_top1_latent_f1": r.get("f1_sparse_sae_1"),
                            "num_split_features": r.get("num_split_features"),
                            "absorption_fraction": d.get("mean_absorption_fraction"),
                            "full_absorption_rate": d.get("full_absorption_rate"),
                            "probe_true_positives": d.get("num_probe_true_positives")}
    return out_rows


def _too_few_letters(out: Path, name: str, config, n_words: int) -> str:
    path = out / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json"
    try:
        rows = json.loads(path.read_text())
        n = sum(1 for r in rows if r.get("f1_probe", 0) > config.min_GT_probe_f1)
    except (OSError, ValueError):
        n = "fewer"
    return (f"only {n} letters have a ground-truth probe F1 > {config.min_GT_probe_f1} with {n_words} words "
            f"(need eval.absorption_min_letters = {config.min_feats_for_eval}); raise eval.absorption_words")

"""The sae_bench bridge: model injection, forwards stopped at the hook, the SAE handed to sae_bench,
skip reasons for evals whose data, key or model is missing, and the re-evaluation merge."""
from __future__ import annotations

import json

import pytest
import torch

from evals import EVALS, EvalContext, module, run_evals
from evals.sae_bench_bridge import forwards_stop_at_hook, hub_repo, injected_model, lens_sae
from tests.helpers import tiny_lm, tiny_run_config
from workbench.config import ConfigError, config_from_dict
from workbench.sae import make_sae


def _ctx(tmp_path, model=None, **eval_keys):
    cfg = tiny_run_config()
    for k, v in eval_keys.items():
        setattr(cfg.eval, k, v)
    sae = make_sae(16, 64, "topk", k=4)
    sae.init_tied_(torch.Generator().manual_seed(0))
    return EvalContext(model=model or tiny_lm(), saes=[sae], run_cfg=cfg, eval_contexts_NT=torch.zeros(1, 4, dtype=torch.long),
                       special_ids=[], artifacts_root=tmp_path / "art", cache_root=tmp_path / "cache", progress=False)


def test_every_sae_bench_eval_has_a_module_with_its_seed_key():
    keys = {name: module(name).KEY for name in EVALS}
    assert keys["core"] == "core evaluation results"
    assert keys["absorption"] == "absorption evaluation results"
    assert keys["sparse_probing"] == "sparse probing evaluation results"
    assert keys["unlearning"] == "unlearning evaluation results"
    assert {keys[n] for n in ("scr", "tpp", "autointerp", "sae_probes")} == {
        "scr evaluation results", "tpp evaluation results", "autointerp evaluation results", "sae_probes evaluation results"}


def test_misspelt_eval_is_a_config_error():
    with pytest.raises(ConfigError, match="absorbtion"):
        config_from_dict({"eval": {"types": ["core", "absorbtion"]}})


def test_unknown_sae_probes_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_dataset"):
        config_from_dict({"eval": {"types": ["sae_probes"], "sae_probes_datasets": ["no_such_dataset"]}})


def test_missing_prerequisites_are_skipped_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ctx = _ctx(tmp_path)
    results, skipped = run_evals(["sparse_probing", "scr", "tpp", "unlearning", "autointerp"], ctx)
    assert results == [{}]
    assert set(skipped) == {"sparse_probing", "scr", "tpp", "unlearning", "autointerp"}
    assert "LabHC/bias_in_bios" in skipped["sparse_probing"] and "HF_HUB_OFFLINE" in skipped["scr"]
    assert "eval.unlearning_model" in skipped["unlearning"]
    assert "OPENAI_API_KEY" in skipped["autointerp"]


def test_unlearning_needs_an_instruct_model_and_the_wmdp_corpus(tmp_path):
    from evals.unlearning import prerequisites
    from evals import EvalSkipped

    ctx = _ctx(tmp_path, unlearning_model="google/gemma-2-2b")
    with pytest.raises(EvalSkipped, match="not instruction-tuned"):
        prerequisites(ctx.run_cfg.eval)
    ctx.run_cfg.eval.unlearning_model = "google/gemma-2-2b-it"
    with pytest.raises(EvalSkipped, match="bio-forget-corpus"):
        prerequisites(ctx.run_cfg.eval)


def test_hub_repo_strips_sae_bench_variant_suffixes():
    assert hub_repo("LabHC/bias_in_bios_class_set3") == "LabHC/bias_in_bios"
    assert hub_repo("canrager/amazon_reviews_mcauley_1and5_sentiment") == "canrager/amazon_reviews_mcauley_1and5"
    assert hub_repo("fancyzhx/ag_news") == "fancyzhx/ag_news"


def test_injected_model_is_returned_by_name_and_restored():
    from transformer_lens import HookedTransformer

    model = tiny_lm()
    original = HookedTransformer.__dict__["from_pretrained_no_processing"]
    with injected_model(model):
        assert HookedTransformer.from_pretrained_no_processing("google/gemma-2-2b", device="cpu") is model
    assert HookedTransformer.__dict__["from_pretrained_no_processing"] is original


def test_forwards_stop_at_hook_give_the_same_cache_without_later_blocks():
    model = tiny_lm(n_layers=3)
    tokens = torch.randint(0, 50, (2, 7))
    hook = "blocks.0.hook_resid_post"
    _, full = model.run_with_cache(tokens, names_filter=[hook])
    ran = []
    model.blocks[2].hook_resid_post.add_hook(lambda a, hook: ran.append(hook.name))
    with forwards_stop_at_hook(model):
        out, cache = model.run_with_cache(tokens, names_filter=[hook])
    model.reset_hooks()
    torch.testing.assert_close(cache[hook], full[hook])
    assert out.shape == (2, 7, 16) and ran == []  # the residual, not logits; block 2 never ran
    assert "run_with_cache" not in vars(model)  # the patch is gone


def test_lens_sae_has_unit_decoder_rows_and_the_same_reconstruction():
    sae = make_sae(16, 64, "topk", k=4)
    sae.init_tied_(torch.Generator().manual_seed(1), b_dec=torch.randn(16))
    with torch.no_grad():
        sae.b_enc.normal_()
    raw = sae.folded(0.01)  # decoder rows of norm 1/s, as our saved SAEs
    lens = lens_sae(raw, tiny_run_config())
    x = torch.randn(32, 16) * 100
    torch.testing.assert_close(lens.decode(lens.encode(x)), raw(x), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(lens.W_dec.norm(dim=1), torch.ones(64), rtol=1e-5, atol=1e-5)
    # latent i scaled by ||W_dec_i|| = 1/s: the same latents fire, each 1/s = 100 times larger
    torch.testing.assert_close(lens.encode(x), raw.encode(x) * 100, rtol=1e-4, atol=1e-2)
    assert lens.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_lens_sae_jumprelu_scales_thresholds_with_their_latents():
    """A batchtopk/jumprelu SAE with non-uniform decoder norms: unit rows for SAEBench, the same gates."""
    g = torch.Generator().manual_seed(2)
    sae = make_sae(16, 64, "jumprelu").init_tied_(g, b_dec=torch.randn(16, generator=g))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) + 0.5)  # unequal row norms
        sae.threshold.copy_(torch.rand(64, generator=g))
    raw = sae.folded(0.01)
    lens = lens_sae(raw, tiny_run_config())
    x = torch.randn(32, 16, generator=g) * 100
    torch.testing.assert_close(lens.decode(lens.encode(x)), raw(x), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(lens.W_dec.norm(dim=1), torch.ones(64), rtol=1e-5, atol=1e-5)
    assert torch.equal(lens.encode(x) > 0, raw.encode(x) > 0)


def test_word_sample_is_seeded_and_sized():
    from transformers import AutoTokenizer  # noqa: F401  (sae_bench's vocab helper needs a fast tokenizer)

    from evals.absorption import word_sample

    class Tok:
        vocab = {w: i for i, w in enumerate(["▁apple", "▁Bear", "cat", "x1", "▁", "dog", "▁emu", "fig"])}

        def convert_tokens_to_string(self, toks):
            return toks[0].replace("▁", " ")

    words, available = word_sample(Tok(), 3, seed=42)
    assert available == 6 and len(words) == 3 and set(words) <= {" apple", " Bear", "cat", "dog", " emu", "fig"}
    assert word_sample(Tok(), 3, seed=42)[0] == words
    assert word_sample(Tok(), 0, seed=42)[0] == sorted([" apple", " Bear", "cat", "dog", " emu", "fig"])


def test_merge_replaces_results_and_updates_the_skip_list():
    from evals.run import merge

    final = {"core evaluation results": {"metrics": 1}, "absorption evaluation results": {"old": 1},
             "skipped evaluations": {"sae_probes": "not run", "autointerp": "no key"}}
    out = merge(final, {"sae_probes evaluation results": {"new": 2}, "absorption evaluation results": {"new": 3}},
                {"scr": "offline"}, {"types": ["sae_probes", "absorption", "scr"]})
    assert out["core evaluation results"] == {"metrics": 1}
    assert out["absorption evaluation results"] == {"new": 3}
    assert out["skipped evaluations"] == {"autointerp": "no key", "scr": "offline"}
    assert out["re-evaluations"] == [{"types": ["sae_probes", "absorption", "scr"]}]
    json.dumps(out, allow_nan=False)


def test_rerun_refuses_a_directory_without_a_finished_run(tmp_path, capsys):
    from evals.run import main

    assert main([str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_a_crashing_eval_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    import evals.tpp

    def boom(ctx):
        raise RuntimeError("bug in an eval")

    monkeypatch.setattr(evals.tpp, "run", boom)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ctx = _ctx(tmp_path)
    results, skipped = run_evals(["tpp", "autointerp"], ctx)
    assert skipped["tpp"].startswith("failed: RuntimeError: bug in an eval")
    assert "OPENAI_API_KEY" in skipped["autointerp"]
    assert "RuntimeError" in (tmp_path / "art" / "tpp.error.txt").read_text()


def test_results_holding_library_objects_are_written_as_plain_json(tmp_path):
    """sae_bench puts sae_lens config objects (SAEMetadata) into its results; final_info.json must still
    be written, with their contents."""
    import dataclasses

    import numpy as np

    from workbench.runio import atomic_write_json, json_safe

    lens = lens_sae(make_sae(16, 64, "topk", k=4), tiny_run_config())
    obj = {"sae_cfg_dict": dataclasses.asdict(lens.cfg), "x": np.float32(0.5), "t": torch.tensor([1, 2]),
           "bad": float("nan")}
    atomic_write_json(tmp_path / "f.json", obj)
    back = json.loads((tmp_path / "f.json").read_text())
    assert back["sae_cfg_dict"]["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert back["x"] == 0.5 and back["t"] == [1, 2] and back["bad"] is None
    assert json_safe(back) == back


def test_absorption_per_letter_diagnostics_from_sae_bench_artifacts(tmp_path):
    """Per letter: the probe F1 decides whether it is scored; scored letters carry their absorption."""
    from evals.absorption import per_letter_diagnostics

    art = tmp_path / "artifacts" / "absorption"
    art.mkdir(parents=True)
    rows = [{"letter": "a", "f1_probe": 0.55, "f1_sparse_sae_1": 0.0, "num_split_features": 1},
            {"letter": "b", "f1_probe": 0.91, "f1_sparse_sae_1": 0.62, "num_split_features": 2}]
    (art / "sae0_custom_sae_k_sparse_probing.json").write_text(json.dumps(rows))
    result = {"eval_result_details": [{"first_letter": "b", "mean_absorption_fraction": 0.14,
                                       "full_absorption_rate": 0.33, "num_probe_true_positives": 18}]}
    got = per_letter_diagnostics(tmp_path, "sae0", result, ["apple", " an", "Bee", "boat", "cat"], 0.6)
    assert got["a"] == {"words": 2, "probe_f1": 0.55, "scored": False, "sae_top1_latent_f1": 0.0,
                        "num_split_features": 1, "absorption_fraction": None, "full_absorption_rate": None,
                        "probe_true_positives": None}
    assert got["b"]["scored"] and got["b"]["words"] == 2 and got["b"]["absorption_fraction"] == 0.14
    assert set(got) == {"a", "b"}

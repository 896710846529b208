"""The training harvest's fast forward (the HuggingFace model cut after the hook's layer) against
TransformerLens's, on the embedded Gemma-3-270M and real held-out text."""
import dataclasses
import shutil
import unittest.mock

import pytest
import torch

import evals  # noqa: F401  (registers the evals with the config loader)
import trainers  # noqa: F401
from workbench import cpu_kernels
from workbench.activations import special_mask
from workbench.config import load_config
from workbench.lm import (GROUPED_EAGER, HFHookForward, TLHookForward, bf16_native, eager_attention, harvest_label,
                          harvest_path, load_hook_forward, load_lm, special_token_ids)
from workbench.text import held_out_contexts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def forwards():
    """{(path, dtype): hook forward} at the quickstart's hook, and 8 real contexts of 128 tokens."""
    cfg = load_config("run_configs/quickstart.toml")
    out = {}
    for dtype in ("float32", "bfloat16"):
        mcfg = dataclasses.replace(cfg.model, dtype=dtype, device="cpu")
        out["transformer_lens", dtype] = TLHookForward(load_lm(mcfg), mcfg)
        out["hf", dtype] = load_hook_forward(dataclasses.replace(mcfg, harvest="hf"))
    tok = out["hf", "float32"].tokenizer
    tokens_BT = held_out_contexts(cfg.data, tok, 8, cfg.seed)
    return out, tokens_BT, ~special_mask(tokens_BT, special_token_ids(tok))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_auto_takes_hf_for_the_embedded_model_only():
    cfg = load_config("run_configs/quickstart.toml")
    assert harvest_path(cfg.model) == "hf"
    assert harvest_path(dataclasses.replace(cfg.model, hook="blocks.6.hook_mlp_out")) == "transformer_lens"
    assert harvest_path(dataclasses.replace(cfg.model, name="gpt2")) == "transformer_lens"
    assert harvest_path(dataclasses.replace(cfg.model, harvest="transformer_lens")) == "transformer_lens"


@pytest.mark.parametrize("flags,dtype,eager", [("avx512f avx512_bf16", "bfloat16", True),
                                               ("avx512f avx512_bf16 amx_bf16 amx_tile", "bfloat16", False),
                                               ("avx512f avx512_bf16", "float32", False)])
def test_eager_attention_in_bf16_on_cpus_without_amx_only(monkeypatch, flags, dtype, eager):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: f"flags : fpu avx2 {flags}")
    cfg = load_config("run_configs/quickstart.toml", [f"model.dtype={dtype}"])
    assert eager_attention(cfg.model, torch.device("cpu")) == eager
    assert harvest_label(cfg.model, torch.device("cpu")).endswith("+eager_attention") == eager
    assert not eager_attention(dataclasses.replace(cfg.model, harvest="transformer_lens"), torch.device("cpu"))


def test_hf_forward_equals_transformer_lens_in_float32(forwards):
    fwd, tokens_BT, keep_BT = forwards
    assert isinstance(fwd["hf", "float32"], HFHookForward)
    hf, tl = fwd["hf", "float32"](tokens_BT), fwd["transformer_lens", "float32"](tokens_BT)
    assert hf.shape == tl.shape == (8, 128, 640)
    # every kept position (BOS dropped: its norm is ~55000) within float32 round-off
    assert rel_err(hf[keep_BT], tl[keep_BT]) < 1e-5
    per_token = (hf - tl).norm(dim=-1) / tl.norm(dim=-1)
    assert per_token[keep_BT].max() < 1e-4


def test_hf_forward_in_bfloat16_is_as_close_to_float32_as_transformer_lens(forwards):
    """The LM dtype's tolerance: each bf16 path's error against the float32 forward. The fast path may not
    be worse than TransformerLens's own bf16 forward (the one the evals see)."""
    fwd, tokens_BT, keep_BT = forwards
    ref = fwd["transformer_lens", "float32"](tokens_BT)[keep_BT]
    err_tl = rel_err(fwd["transformer_lens", "bfloat16"](tokens_BT)[keep_BT], ref)
    # bf16 on a CPU: the fused kernels (7 layers x (4 residual norms, q and k norms, the MLP) = 49 modules)
    assert fwd["hf", "bfloat16"].fused_modules == (49 if shutil.which("cc") else 0)
    assert fwd["hf", "float32"].fused_modules == (49 if shutil.which("cc") else 0)  # float32 too (the test above)
    # and oneDNN's packed linears (7 layers x q, k, v, o, gate, up, down): in float32, and in bf16 where it is native
    assert fwd["hf", "float32"].packed_linears == 49
    assert fwd["hf", "bfloat16"].packed_linears == (49 if bf16_native(torch.device("cpu"))[0] else 0)
    for dtype in ("float32", "bfloat16"):  # and the rotary kernel runs, on transformers' (1, T, d) position table
        with unittest.mock.patch.object(cpu_kernels, "rope", wraps=cpu_kernels.rope) as rope:
            fwd["hf", dtype](tokens_BT[:2])
        assert rope.call_count == (2 * 7 if shutil.which("cc") else 0)  # q and k in each of the 7 layers
    # attention: SDPA, except eager (grouped) in bf16 on a CPU without AMX (workbench.lm.eager_attention): this test's
    # bf16 error bound holds for whichever this CPU takes
    config = fwd["hf", "bfloat16"].stack.config
    assert config._attn_implementation == ("sdpa" if cpu_kernels.bf16_matrix_engine("cpu") else GROUPED_EAGER)
    assert fwd["hf", "float32"].stack.config._attn_implementation == "sdpa"
    acts = fwd["hf", "bfloat16"](tokens_BT)
    err_hf = rel_err(acts[keep_BT], ref)
    if config._attn_implementation == GROUPED_EAGER:  # the grouped attention gives transformers' eager bits
        config._attn_implementation = "eager"
        try:
            assert torch.equal(fwd["hf", "bfloat16"](tokens_BT), acts)
        finally:
            config._attn_implementation = GROUPED_EAGER
    assert err_tl < 0.05 and err_hf < 0.05, (err_tl, err_hf)  # bf16 keeps 8 mantissa bits; 18 ops deep
    assert err_hf <= 1.25 * err_tl, (err_hf, err_tl)

"""workbench.lm.lens_linear_layout: TransformerLens's weights stored in the layout its forward hands to F.linear.

TL 3.9 copies every projection weight into that layout on every forward call. Stored that way, the copy becomes a
view. The outputs must be the same bits, in float32 and in bfloat16 (where the layout of a matmul's operand can
change its accumulation order), and F.linear must then receive views of the parameters, not copies.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from workbench.lm import lens_linear_layout


def lens_model(dtype: torch.dtype, gemma_like: bool, **extra):
    """A tiny random TransformerLens model: Gemma-like (gated MLP, grouped-query attention, RMSNorm, rotary) or
    GPT-2-like (plain MLP, multi-head attention, LayerNorm)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    arch = (dict(gated_mlp=True, n_key_value_heads=2, normalization_type="RMS", positional_embedding_type="rotary",
                 rotary_dim=8, act_fn="gelu_pytorch_tanh") if gemma_like
            else dict(normalization_type="LN", act_fn="gelu"))
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_mlp=96, d_vocab=61,
                                  seed=0, device="cpu", dtype=dtype, **arch, **extra)
    model = HookedTransformer(cfg)
    with torch.no_grad():  # TL initializes biases to zero: make them count in the comparison
        for name, p in model.named_parameters():
            if ".b_" in name or name.startswith("b_"):
                p.normal_(0, 0.1)
    return model.eval()


def outputs(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return logits, dict(cache.items())


CASES = [pytest.param(dtype, gemma, id=f"{'gemma' if gemma else 'gpt2'}-{str(dtype)[6:]}")
         for gemma in (True, False) for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype,gemma_like", CASES)
def test_outputs_are_the_same_bits(dtype, gemma_like):
    model = lens_model(dtype, gemma_like)
    stock = copy.deepcopy(model)
    n = lens_linear_layout(model)
    # gated MLP 3 + attention Q, K, V, O 4 per layer, and the unembedding; a plain MLP is left as it is
    assert n == (2 * 7 + 1 if gemma_like else 2 * 4 + 1)
    for (name, p), (_, q) in zip(model.named_parameters(), stock.named_parameters()):
        assert torch.equal(p, q), name  # the values never move
    tokens = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(1))
    logits, cache = outputs(model, tokens)
    stock_logits, stock_cache = outputs(stock, tokens)
    assert torch.equal(logits, stock_logits)
    assert cache.keys() == stock_cache.keys()
    for name in cache:
        assert torch.equal(cache[name], stock_cache[name]), name


def linear_weight_sources(model, tokens) -> tuple[int, int]:
    """(F.linear calls whose weight is a view of a parameter's storage, calls whose weight is a copy)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(weight.untyped_storage().data_ptr() in params)
        return real_linear(x, weight, bias)

    torch.nn.functional.linear = spy  # TL's modules call it as F.linear through the module object
    try:
        outputs(model, tokens)
    finally:
        torch.nn.functional.linear = real_linear
    return sum(seen), len(seen) - sum(seen)


def test_forward_reads_the_parameters_without_copying_them():
    model = lens_model(torch.bfloat16, gemma_like=True)
    tokens = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    # stock TL: every projection weight is copied first (3 MLP + Q, K, V, O per layer, the unembedding)
    assert linear_weight_sources(model, tokens) == (0, 2 * 7 + 1)
    lens_linear_layout(model)
    assert linear_weight_sources(model, tokens) == (2 * 7 + 1, 0)


def test_configurations_whose_forward_does_not_use_f_linear_are_left_alone():
    # use_attn_result computes each head's output elementwise from W_O: the attention weights keep their layout
    model = lens_model(torch.bfloat16, gemma_like=True, use_attn_result=True)
    stock = copy.deepcopy(model)
    assert lens_linear_layout(model) == 2 * 3 + 1
    assert model.blocks[0].attn.W_O.is_contiguous() and not model.blocks[0].mlp.W_in.is_contiguous()
    tokens = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(model, tokens)[0], outputs(stock, tokens)[0])


@pytest.mark.slow
def test_embedded_model_is_laid_out_and_gives_the_same_logits():
    """load_lm lays the real model out (18 layers x 7 + the unembedding); undoing the layout (a contiguous copy
    of each weight, TL's stock layout) gives the same bf16 logits on real text."""
    import evals  # noqa: F401  (registers the evals with the config loader)
    import trainers  # noqa: F401  (registers the trainer configs)
    from workbench.config import load_config
    from workbench.lm import load_lm

    cfg = load_config("run_configs/quickstart.toml", ["model.dtype=bfloat16", "model.device=cpu"])
    model = load_lm(cfg.model)
    assert model.W_U.T.is_contiguous() and model.blocks[0].mlp.W_gate.T.is_contiguous()
    text = Path("README.md").read_text(encoding="utf-8")[:4000]
    tokens = model.to_tokens(text)[:, :96]
    laid_out = outputs(model, tokens)[0]
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous()
    assert not model.W_U.T.is_contiguous()
    assert torch.equal(laid_out, outputs(model, tokens)[0])

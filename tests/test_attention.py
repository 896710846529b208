"""The harvest's grouped eager attention (workbench.lm.grouped_eager_attention) against transformers' eager attention:
the same operations on each score, so the same bits, for any grouping of query heads on key/value heads."""
import types

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from workbench.lm import grouped_eager_attention


def inputs(B, n_heads, n_kv, T, d, dtype, seed=0, mask="causal"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(dtype) for h in (n_heads, n_kv, n_kv))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # as the model's are: (B, T, heads, d) transposed
    if mask is None:
        return q, k, v, None
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if mask == "window":  # a sliding-window layer's mask: the last 5 positions
        allowed &= ~torch.ones(T, T, dtype=torch.bool).tril(-5)
    additive = torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    heads = n_heads if mask == "per_head" else 1
    return q, k, v, additive.expand(B, heads, T, T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 1), (8, 2), (3, 3)])
@pytest.mark.parametrize("mask", ["causal", "window", None])
def test_grouped_attention_has_eagers_bits(dtype, n_heads, n_kv, mask):
    module = types.SimpleNamespace(head_dim=32, num_key_value_groups=n_heads // n_kv, training=False)
    q, k, v, m = inputs(3, n_heads, n_kv, 17, 32, dtype, mask=mask)
    for scaling, softcap in ((None, None), (0.125, None), (0.2, 30.0)):
        out, weights = grouped_eager_attention(module, q, k, v, m, scaling=scaling, softcap=softcap)
        ref_out, ref_weights = eager_attention_forward(module, q, k, v, m, scaling=scaling, softcap=softcap)
        assert out.shape == ref_out.shape == (3, 17, n_heads, 32) and out.is_contiguous()
        assert torch.equal(weights, ref_weights)
        assert torch.equal(out, ref_out)


def test_a_per_head_mask_goes_to_eager():
    module = types.SimpleNamespace(head_dim=16, num_key_value_groups=2, training=False)
    q, k, v, m = inputs(2, 4, 2, 9, 16, torch.float32, mask="per_head")
    m = m.clone()
    m[:, 1, :, 0] = torch.finfo(torch.float32).min  # head 1 may not look at position 0
    out, _ = grouped_eager_attention(module, q, k, v, m)
    assert torch.equal(out, eager_attention_forward(module, q, k, v, m)[0])

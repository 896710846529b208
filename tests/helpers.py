"""Small shared builders for tests: configs and a tiny random TransformerLens model."""
from __future__ import annotations

import torch

import evals  # noqa: F401  (registers the evals with the config loader)
import trainers  # noqa: F401  (registers the trainer configs)
from workbench.config import config_from_dict


def tiny_run_config(**trainer):
    return config_from_dict({
        "model": {"name": "gemma-3-270m", "hook": "blocks.1.hook_resid_post", "dtype": "float32"},
        "data": {"dataset": "embedded", "train_tokens": 4096, "context_size": 16},
        "sae": {"d_sae": 64, "batch_size": 32},
        "trainer": {"name": "topk", "k": 4, **trainer} if "name" not in trainer else trainer,
    })


def tiny_lm(seed: int = 0, d_model: int = 16, n_layers: int = 2, d_vocab: int = 50):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_ctx=32, d_head=4, n_heads=d_model // 4,
                                  d_mlp=4 * d_model, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN",
                                  seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    model.eval()
    return model

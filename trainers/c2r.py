"""C2R, cross-sample consistency regularization (Jin et al., ICML 2026, arXiv 2606.30609), squared form,
TRAINERS.md section 7.

    a_i    = ||f_{:,i}||_2                                      latent i's activations over the batch (with gradient)
    mu+_i  = max(0, max_{j in K(i), j != i} d_i . d_j),  j*(i) its argmax      (trainers/max_cosine.py)
    L_c2r  = (1/n) sum_i (a_i + a_{j*(i)}) * (mu+_i)^2
    L      = L_base + lambda * L_c2r

Base: topk (default, the same base as progressive, so the two co-firing-weighted penalties compare on
one footing), batchtopk or relu. Unlike progressive, the weight is activation mass, not a co-firing
overlap, and only each latent's nearest decoder neighbour is penalized.
"""
from __future__ import annotations

from typing import Literal


import torch

from trainers.base import register
from trainers.batchtopk import BatchTopKConfig, BatchTopKTrainer
from trainers.max_cosine import ChunkMax, MaxCosineFields, MaxCosinePenalty
from trainers.relu import ReLUConfig, ReLUTrainer
from trainers.topk import TopKTrainer
from workbench import distributed
from workbench.config import configclass, param
from workbench.sae_ops import Codes

BASES = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "relu": ReLUTrainer}


@configclass
class C2RConfig(BatchTopKConfig, ReLUConfig, MaxCosineFields):
    base: Literal["topk", "batchtopk", "relu"] = param("topk", "base SAE: topk | batchtopk | relu (its keys apply, the "
                                                               "others' are ignored)")
    lam: float = param(10.0, "weight lambda of L_c2r; 10 calibrated on the embedded default (mean max cosine 0.27 -> 0.10 at "
                             "-0.0065 EV; 100 killed 55% of latents). The paper used 5 on Gemma-2-2B, on its own scale", ge=0)


def c2r_loss(chunks: list[ChunkMax], latents: torch.Tensor | Codes) -> torch.Tensor:
    """L_c2r = (1/n) sum_i (a_i + a_j*(i)) (mu+_i)^2 with a = per-latent L2 norm over the batch, from the (B, n)
    latents or the sparse step's codes (their entries' squares: no B x n matrix). Under torchrun a is over the
    global batch (a differentiable all-reduce of the squares; the penalty is then the same on every rank, and
    averaging the ranks' gradients gives the single-process one)."""
    if isinstance(latents, Codes):
        n = latents.shape[1]
        sq_F = latents.vals_E.new_zeros(n, dtype=torch.float32).index_add(0, latents.idx_E, latents.vals_E.float().pow(2))
    else:
        n = latents.shape[1]
        sq_F = latents.float().pow(2).sum(0)
    if distributed.ctx().data_parallel:
        sq_F = distributed.all_sum_differentiable(sq_F)
    a_F = torch.where(sq_F > 0, sq_F.clamp_min(1e-30).sqrt(), 0.0)  # sqrt's gradient at 0 would be inf
    # index_select, as chunk_max_cosines: its backward is an index_add (one summation order; faster than []'s on a CPU)
    return sum(((a_F.index_select(0, c.members_K) + a_F.index_select(0, c.argmax_K)) * c.mu_K.clamp_min(0).pow(2)).sum()
               for c in chunks) / n


class C2RPenalty(MaxCosinePenalty):
    def coefficient(self) -> float:
        return self.cfg.lam

    def penalty(self, chunks: list[ChunkMax], latents: torch.Tensor | Codes) -> torch.Tensor:
        return c2r_loss(chunks, latents)


@register
class C2RTrainer(C2RPenalty, TopKTrainer):
    """c2r on the topk base; constructing it with another cfg.base gives that base's class below."""
    name = "c2r"
    Config = C2RConfig

    def __new__(cls, cfg: C2RConfig, **kw):
        if cls is C2RTrainer and cfg.base != "topk":
            return _ON_BASE[cfg.base](cfg, **kw)  # not a C2RTrainer instance, so __init__ is not run twice
        return super().__new__(cls)


# the penalty mixed in front of each other base trainer (its loss, architecture, threshold and state)
_ON_BASE = {base: type(f"C2RTrainer_{base}", (C2RPenalty, BASES[base]), {"name": "c2r", "Config": C2RConfig})
            for base in ("batchtopk", "relu")}

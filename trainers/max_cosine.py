"""Shared machinery of the decoder-similarity penalties (ortsae, c2r), TRAINERS.md section 7.

Each penalized step permutes the n latents with the trainer's seeded generator and cuts the permutation
into chunks of chunk_size (n <= chunk_size: one chunk, every pair). Within a chunk K, for each latent i:

    mu_i = max_{j in K, j != i} d_i . d_j     (signed cosine of unit decoder rows),  j*(i) its argmax,
    mu+_i = max(mu_i, 0)

The argmax search is a no-grad matmul per chunk (in row blocks: nothing n x n, nothing chunk x chunk kept
for backward); mu_i is then recomputed as the dot product d_i . d_j*(i) in float32 with its gradient, which
is what autograd gives through max() in the naive form (the gradient reaches the maximizing pair only).
A penalty is L = L_base + coefficient * interval * penalty(chunks, latents) on every interval-th step.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from trainers.base import StepOutput
from workbench import distributed
from workbench.config import configclass, param
from workbench.sae_ops import max_cosine


class ChunkMax(NamedTuple):
    members_K: torch.Tensor   # latent indices of the chunk
    mu_K: torch.Tensor        # max signed cosine to another latent of the chunk (float32, with gradient)
    argmax_K: torch.Tensor    # j*(i), as a latent index


@configclass
class MaxCosineFields:
    """Config keys of the chunked max-cosine penalties (mixed into each trainer's Config)."""
    chunk_size: int = param(8192, "latents per chunk of the seeded permutation; pairs are compared within a chunk "
                                  "(n <= chunk_size: all pairs). OrtSAE's default 8192", ge=2)
    interval: int = param(1, "apply the penalty every this many steps, scaled by it (1 = every step)", ge=1)
    search_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "matmul dtype of the per-chunk argmax search: float32 | bfloat16 (the value and its gradient are "
                   "float32 either way)")


def chunks_of(n: int, chunk_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """The seeded permutation of 0..n-1 cut into chunks; one chunk of 0..n-1 (no draw) when n <= chunk_size."""
    if n <= chunk_size:
        return [torch.arange(n, device=device)]
    return list(torch.randperm(n, generator=generator).to(device).split(chunk_size))


def chunk_max_cosines(W_dec_FD: torch.Tensor, chunks: list[torch.Tensor], search_dtype=None) -> list[ChunkMax]:
    """mu_i and j*(i) within each chunk; mu_i carries the gradient of d_i . d_j*(i) (unit rows)."""
    W_FD = W_dec_FD.float()
    unit_FD = W_FD * W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
    out = []
    for members_K in chunks:
        _, argmax_K = max_cosine(W_dec_FD.detach(), members_K, dtype=search_dtype)
        # index_select, not [] indexing: its backward is an index_add, 3-4x faster on CPU than the
        # accumulating index_put that advanced indexing uses (2048 x 640: 27 vs 95 ms with the backward)
        mu_K = (unit_FD.index_select(0, members_K) * unit_FD.index_select(0, argmax_K)).sum(dim=-1)
        out.append(ChunkMax(members_K, mu_K, argmax_K))
    return out


class MaxCosinePenalty:
    """Mixin placed before a base trainer in the MRO: L = L_base + coefficient * interval * penalty.
    A subclass defines coefficient() and penalty(chunks, latents): the step's (B, n) latents or its sparse codes."""

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.generator = torch.Generator().manual_seed(int(kw["seed"]) + 0x5EED)  # the permutation's own stream
        self.search_dtype = getattr(torch, cfg.search_dtype)

    def coefficient(self) -> float:
        raise NotImplementedError

    def penalty(self, chunks: list[ChunkMax], latents) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        out = super().loss(acts_BD, progress)
        if self.step_count % self.cfg.interval:
            return out
        chunks = chunk_max_cosines(self.sae.W_dec, chunks_of(self.sae.d_sae, self.cfg.chunk_size, self.generator,
                                                             self.sae.W_dec.device), self.search_dtype)
        value = self.coefficient() * self.cfg.interval * self.penalty(chunks, out.latents)
        base = out.loss
        out.loss = base + value
        out.parts[self.name] = value.detach()
        with torch.no_grad():
            total = distributed.all_mean(out.loss.detach().float())  # the global loss under torchrun
            out.stats.update({"penalty_share": (value.detach() / total).item() if total.item() != 0 else 0.0,
                              "mean_max_cos_pos": torch.cat([c.mu_K for c in chunks]).clamp_min(0).mean().item()})
        return out

    def extra_state(self) -> dict:
        return {**super().extra_state(), "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.generator.set_state(state["generator"])

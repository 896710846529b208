"""Shared competition machinery of the momentum and progressive trainers (TRAINERS.md).

    M = [f > 0] (B x n);  a_i = sum_b M_bi;  C_ij = sum_b M_bi M_bj
    n_ij = C_ij / min(a_i, a_j)   (overlap coefficient, i != j, both fired)
    s_ij = |d_i . d_j|            (d_i: decoder row i, unit norm)

Only co-firing pairs can have c_ij > 0, so everything runs over the list of co-firing pairs: no n x n
tensor is allocated and nothing n x n is kept between steps. Pairs are enumerated per token from the
active latents (sum_b L0_b^2 / 2 pair occurrences), deduplicated with their counts C_ij.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.sae_ops import max_cosine

# torch marks CSR support as beta and warns once per process; the ops used here are covered by tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")



@dataclass
class CoFiring:
    """Unordered co-firing pairs i < j of one batch."""
    i: torch.Tensor        # (P,) long
    j: torch.Tensor        # (P,) long
    counts: torch.Tensor   # (P,) C_ij
    overlap: torch.Tensor  # (P,) n_ij in (0, 1]
    fires_F: torch.Tensor  # (n,) a_i

    @property
    def n_pairs(self) -> int:
        return int(self.i.numel())


MAX_PAIR_OCCURRENCES = 1 << 24  # per token chunk in the sparse path (bounds its int64 temporaries)
DENSE_BLOCK = 1024               # latent rows per block of M^T M in the dense path


def _pairs_sparse(rows: torch.Tensor, cols: torch.Tensor, per_token: torch.Tensor, n: int):
    """(keys i*n+j for i<j, counts) by enumerating each token's active pairs, in token chunks.
    rows/cols: the active entries in row-major order (cols ascending within a row)."""
    occ = per_token * (per_token - 1) // 2
    row_start = torch.cumsum(per_token, 0) - per_token
    keys, counts, start = [], [], 0
    while start < per_token.shape[0]:
        stop = start + max(1, int((torch.cumsum(occ[start:], 0) <= MAX_PAIR_OCCURRENCES).sum()))
        lo = int(row_start[start])
        hi = int(row_start[stop]) if stop < per_token.shape[0] else rows.numel()
        r, c = rows[lo:hi], cols[lo:hi]
        idx = torch.arange(lo, hi, device=r.device)
        n_partners = (row_start + per_token)[r] - idx - 1
        first = torch.repeat_interleave(idx - lo, n_partners)
        offset = torch.repeat_interleave(torch.cumsum(n_partners, 0) - n_partners, n_partners)
        second = first + 1 + torch.arange(first.numel(), device=r.device) - offset
        k, cnt = torch.unique(c[first] * n + c[second], return_counts=True)
        keys.append(k)
        counts.append(cnt)
        start = stop
    if len(keys) == 1:
        return keys[0], counts[0]
    k_all, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    return k_all, torch.zeros_like(k_all).index_add_(0, inverse, torch.cat(counts))


def _pairs_dense_blocks(active_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from C = M^T M, one block of latent rows at a time (upper triangle only)."""
    n = active_BF.shape[1]
    M = active_BF.float()  # counts up to B are exact in float32
    keys, counts = [], []
    for s in range(0, n, DENSE_BLOCK):
        C = M[:, s:s + DENSE_BLOCK].T @ M[:, s:]  # rows s.., cols s..
        C = torch.triu(C, diagonal=1)
        r, c = C.nonzero(as_tuple=True)
        keys.append((r + s) * n + (c + s))
        counts.append(C[r, c].long())
    return torch.cat(keys), torch.cat(counts)


@torch.no_grad()
def cofiring_pairs(latents_BF: torch.Tensor, method: str = "auto") -> CoFiring:
    """All co-firing pairs with their counts and overlap coefficients, sorted by (i, j).

    auto: enumerate pairs per token unless that is more work than there are possible pairs (dense codes,
    e.g. a ReLU SAE early in training), where blocked M^T M is cheaper."""
    active_BF = latents_BF > 0
    B, n = active_BF.shape
    rows, cols = active_BF.nonzero(as_tuple=True)
    fires_F = torch.bincount(cols, minlength=n)
    per_token = torch.bincount(rows, minlength=B)
    if method == "auto":
        method = "dense" if int((per_token * (per_token - 1) // 2).sum()) > n * (n - 1) // 2 else "sparse"
    if method == "dense":
        keys, counts = _pairs_dense_blocks(active_BF)
    else:
        keys, counts = _pairs_sparse(rows, cols, per_token, n)
    i, j = keys // n, keys % n
    overlap = counts.to(latents_BF.dtype) / torch.minimum(fires_F[i], fires_F[j]).to(latents_BF.dtype)
    return CoFiring(i, j, counts, overlap, fires_F)


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """n x n CSR matrix from entries already sorted by (row, col): no sort, no coalesce."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return torch.sparse_csr_tensor(crow, cols, values, (n, n), check_invariants=False)


@torch.no_grad()
def pair_dots(W_dec: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """d_i . d_j for pairs sorted by (i, j): a sampled matmul (SDDMM) on the pairs' sparsity pattern,
    d flops per pair, no gathered (P, d) temporaries."""
    if i.numel() == 0:
        return W_dec.new_zeros(0)
    pattern = _csr(i, j, W_dec.new_zeros(i.numel()), W_dec.shape[0])
    return torch.sparse.sampled_addmm(pattern, W_dec, W_dec.T, beta=0.0).values()


class _WeightedAbsCosine(torch.autograd.Function):
    """sum_p coef_p |d_{i_p} . d_{j_p}| over unordered pairs sorted by (i, j).

    Backward: dL/dd_i = sum_p coef_p sign(d_i . d_j) d_j and symmetrically, i.e. (K + K^T) @ W_dec
    with K sparse (upper triangle): two sparse-dense products, memory O(P + n d), never O(P d)."""

    @staticmethod
    def forward(ctx, W_dec, i, j, coef):
        dots = pair_dots(W_dec, i, j)
        ctx.save_for_backward(W_dec, i, j, coef * dots.sign())
        return (coef * dots.abs()).sum()

    @staticmethod
    def backward(ctx, grad_out):
        W_dec, i, j, k = ctx.saved_tensors
        n = W_dec.shape[0]
        if i.numel() == 0:
            return torch.zeros_like(W_dec), None, None, None
        upper = _csr(i, j, k, n)
        by_col = torch.argsort(j * n + i)
        lower = _csr(j[by_col], i[by_col], k[by_col], n)
        return grad_out * (upper @ W_dec + lower @ W_dec), None, None, None


def competition_penalty(W_dec: torch.Tensor, pairs: CoFiring, coef_P: torch.Tensor, n: int):
    """(1/n) sum_{i != j} coef_ij s_ij = (2/n) sum_{i<j} coef_ij |d_i . d_j|, and the pairs' s_ij."""
    keep = coef_P > 0
    i, j, coef = pairs.i[keep], pairs.j[keep], coef_P[keep].to(W_dec.dtype)
    value = _WeightedAbsCosine.apply(W_dec, i, j, coef) * (2.0 / n)
    return value


@torch.no_grad()
def max_abs_cosine_F(W_dec: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """max_{j != i} |d_i . d_j| per latent over all pairs (progressive's separation snapshots). The signed
    max within chunks that ortsae and c2r penalize is the same search (workbench.sae.max_cosine)."""
    return max_cosine(W_dec, absolute=True, block=chunk)[0]


def per_latent_sum(pairs: CoFiring, values_P: torch.Tensor, n: int) -> torch.Tensor:
    """sum_{j != i} v_ij for each i, from unordered pairs (each pair counts for both endpoints)."""
    out = torch.zeros(n, dtype=values_P.dtype, device=values_P.device)
    out.index_add_(0, pairs.i, values_P)
    out.index_add_(0, pairs.j, values_P)
    return out


# ---------------------------------------------------------------- the trainers' shared base

from trainers.base import StepOutput, Trainer  # noqa: E402
from trainers.relu import ReLUConfig, relu_loss_parts  # noqa: E402
from trainers.topk import TopKConfig, topk_loss_parts  # noqa: E402
from workbench import distributed  # noqa: E402
from workbench.config import configclass, param  # noqa: E402


@configclass
class CompetitionConfig(TopKConfig, ReLUConfig):
    """Base-SAE keys of both baselines (k, auxk_* for topk; l1_* for relu) plus the choice of base."""
    base: Literal["topk", "relu"] = param("topk", "base SAE: topk or relu (its keys apply, the other's are ignored)")


def global_active(latents_BF: torch.Tensor) -> torch.Tensor:
    """What the co-firing statistics read: the latents (only where they are > 0 matters) of the global
    batch. Under torchrun, the ranks' firing masks all-gathered in batch order (1 byte per entry)."""
    if not distributed.ctx().data_parallel:
        return latents_BF
    return distributed.gather_rows((latents_BF > 0).to(torch.uint8)).to(latents_BF.dtype)


class CompetitionTrainer(Trainer):
    """L = L_base + penalty(pairs); subclasses define the coefficients c_ij (and weights)."""

    def __init__(self, cfg: CompetitionConfig, **kw):
        self.architecture = "topk" if cfg.base == "topk" else "standard"
        self.sparse_codes = cfg.base == "topk"
        super().__init__(cfg, **kw)

    def base_loss(self, acts_BD: torch.Tensor, progress: float):
        if self.cfg.base == "topk":
            return topk_loss_parts(self, acts_BD)
        return relu_loss_parts(self, acts_BD, progress)

    def penalty(self, latents_BF: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        parts, base, latents_BF, recon_BD = self.base_loss(acts_BD, progress)
        penalty, stats = self.penalty(global_active(latents_BF), progress)
        loss = base + penalty  # the penalty is the same on every rank under torchrun (global pairs)
        parts["competition"] = penalty.detach()
        total = distributed.all_mean(loss.detach())
        stats["penalty_share"] = (penalty.detach() / total).item() if total.item() != 0 else 0.0
        return StepOutput(loss, parts, acts_BD, recon_BD, latents_BF, stats)

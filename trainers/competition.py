"""Shared competition machinery of the momentum and progressive trainers (TRAINERS.md).

    M = [f > 0] (B x n);  a_i = sum_b M_bi;  C_ij = sum_b M_bi M_bj
    n_ij = C_ij / min(a_i, a_j)   (overlap coefficient, i != j, both fired)
    s_ij = |d_i . d_j|            (d_i: decoder row i, unit norm)

Only co-firing pairs can have c_ij > 0, so everything runs over the list of co-firing pairs: no n x n
tensor is allocated and nothing n x n is kept between steps. Pairs are enumerated per token from the
active latents (sum_b L0_b^2 / 2 pair occurrences), deduplicated with their counts C_ij.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from workbench.cpu_kernels import bf16_matrix_engine
from workbench.sae_ops import csr, max_cosine


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


@torch.no_grad()
def pair_dots(W_dec: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """d_i . d_j for pairs sorted by (i, j): a sampled matmul (SDDMM) on the pairs' sparsity pattern,
    d flops per pair, no gathered (P, d) temporaries."""
    if i.numel() == 0:
        return W_dec.new_zeros(0)
    pattern = csr(i, j, W_dec.new_zeros(i.numel()), (W_dec.shape[0],) * 2)
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
        upper = csr(i, j, k, (n, n))
        by_col = torch.argsort(j * n + i)
        lower = csr(j[by_col], i[by_col], k[by_col], (n, n))
        return grad_out * (upper @ W_dec + lower @ W_dec), None, None, None


# ---------------------------------------------------------------- per token (TopK codes, k entries per token)
# C_ij counts the tokens where i and j both fire, so a sum over co-firing pairs of g_ij equals the sum over
# co-firing occurrences (token b, entries r != s) of g_ij / C_ij: nothing needs deduplicating, and the pairs'
# decoder dots come as one batched (k x D) @ (D x k) product per token, denser work than the pair list's
# gathers. Chosen while the occurrences (B k^2 / 2) are fewer than the possible pairs (n^2 / 2).

TOKEN_CHUNK_ELEMENTS = 1 << 24  # tokens per chunk * k * D bound the gathered decoder rows (64 MB in float32)
COUNT_TABLE_MAX = 1 << 24       # n^2 up to this: occurrence counts by one bincount over all i*n+j keys


@dataclass
class PairTable:
    """A symmetric n x n table of per-pair sums (both orders, zero diagonal), dense (`values` is n x n, for the Gram
    path) or by rows (CSR: row i's partners cols[row_ptr[i]:row_ptr[i + 1]], their sums `values`; for the CPU pair
    kernel `kernels`, which scales each entry by weight_i + weight_j where `weight_F` is set). Elementwise maps that
    keep 0 at 0 may act on `values` in place, in either form."""
    values: torch.Tensor
    row_ptr: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    kernels: object = None  # the ctypes library that built the rows (and runs the penalty on them)
    weight_F: torch.Tensor | None = None


@dataclass
class TokenPairs:
    """Co-firing occurrences of one batch of TopK codes: entry r of token b is latent idx_Bk[b, r]."""
    idx_Bk: torch.Tensor
    active_Bk: torch.Tensor  # bool: the entry fired (a TopK value > 0)
    fires_F: torch.Tensor
    _counts: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_codes(cls, idx_Bk: torch.Tensor, active_Bk: torch.Tensor, n: int) -> "TokenPairs":
        fires_F = torch.zeros(n, dtype=torch.long, device=idx_Bk.device).index_add_(
            0, idx_Bk.flatten(), active_Bk.flatten().long())
        return cls(idx_Bk, active_Bk, fires_F)

    @functools.cached_property
    @torch.no_grad()
    def both_Bkk(self) -> torch.Tensor:
        """Entries r != s of token b both fire (made on first use: the table by rows does without it)."""
        k = self.idx_Bk.shape[1]
        eye = torch.eye(k, dtype=torch.bool, device=self.idx_Bk.device)
        return self.active_Bk[:, :, None] & self.active_Bk[:, None, :] & ~eye

    @functools.cached_property
    @torch.no_grad()
    def min_fires_Bkk(self) -> torch.Tensor:
        """min(a_i, a_j) of the pair at (b, r, s) (1 where not both)."""
        a_Bk = self.fires_F[self.idx_Bk].float()
        return torch.where(self.both_Bkk, torch.minimum(a_Bk[:, :, None], a_Bk[:, None, :]), 1.0)

    @torch.no_grad()
    def overlap_table(self, kernels) -> tuple[PairTable, torch.Tensor]:
        """(the table of overlaps n_ij by rows (both orders), sum_j n_ij per latent), built by the CPU kernels in one
        pass from the activity mask and the firing counts: each occurrence weighs 1 / min(a_i, a_j), so the sums over
        a pair's C_ij occurrences are n_ij, with no B x k x k tensor."""
        from workbench.cpu_kernels import pair_table_rows

        n = self.fires_F.shape[0]
        row_ptr, cols, overlaps, row_sums = pair_table_rows(kernels, self.idx_Bk.contiguous(),
                                                            self.active_Bk.contiguous(), n, self.fires_F)
        return PairTable(overlaps, row_ptr, cols, kernels), row_sums

    @torch.no_grad()
    def counts_Bkk(self) -> torch.Tensor:
        """C_ij at every occurrence (1 where not both), float."""
        if self._counts is None:
            n, k = self.fires_F.shape[0], self.idx_Bk.shape[1]
            # each occurrence once (r < s), mirrored at the end: half the keys to count (and to sort at large n)
            upper_Bkk = self.both_Bkk & torch.ones(k, k, dtype=torch.bool, device=self.idx_Bk.device).triu_(1)
            i, j = self.idx_Bk[:, :, None], self.idx_Bk[:, None, :]
            keys = (torch.minimum(i, j) * n + torch.maximum(i, j))[upper_Bkk]
            if n * n < 2**31:
                keys = keys.int()  # int32 keys sort ~1.5x faster than int64
            if n * n <= COUNT_TABLE_MAX:
                per_key = torch.bincount(keys, minlength=n * n)[keys]
            else:
                _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
                per_key = counts[inverse]
            upper = torch.zeros_like(self.min_fires_Bkk).masked_scatter_(upper_Bkk, per_key.float())
            self._counts = (upper + upper.transpose(1, 2)).masked_fill_(~self.both_Bkk, 1.0)
        return self._counts

    @torch.no_grad()
    def table(self, values_Bkk: torch.Tensor) -> PairTable:
        """sum_{occurrences of (i, j)} v per pair, both orders (v must be 0 where not both, the diagonal included),
        as the dense n x n float32 table the Gram path reads: one scatter of every occurrence, zeros included
        (cheaper than compacting)."""
        n = self.fires_F.shape[0]
        keys = self.idx_Bk[:, :, None] * n + self.idx_Bk[:, None, :]
        return PairTable(torch.zeros(n * n, dtype=torch.float32, device=keys.device).index_add_(
            0, keys.flatten(), values_Bkk.flatten().float()).view(n, n))

    @torch.no_grad()
    def overlap_share_Bkk(self) -> torch.Tensor:
        """n_ij / C_ij at every occurrence, i.e. 1 / min(a_i, a_j) (0 where not both): its sum over the
        occurrences of a pair is n_ij, so sums over occurrences weighted by it are sums over pairs."""
        return self.both_Bkk / self.min_fires_Bkk

    def n_pairs(self) -> int:
        """Distinct co-firing pairs: each has C_ij occurrences, each counted twice (r, s and s, r)."""
        return round(0.5 * (self.both_Bkk / self.counts_Bkk()).sum().item())

    def per_latent_sum(self, values_Bkk: torch.Tensor) -> torch.Tensor:
        """sum_{j != i} v_ij over occurrences, for each latent i (zero where not both)."""
        n = self.fires_F.shape[0]
        rows_Bk = torch.where(self.both_Bkk, values_Bkk, 0.0).sum(-1)
        return torch.zeros(n, dtype=rows_Bk.dtype, device=rows_Bk.device).index_add_(0, self.idx_Bk.flatten(),
                                                                                     rows_Bk.flatten())


class _TokenPairAbsCosine(torch.autograd.Function):
    """sum_b sum_{r != s} omega_brs |d_{idx_br} . d_{idx_bs}| in token chunks; the backward recomputes each
    chunk's dots (memory: one chunk of gathered rows, never B k D), d/dD_b = 2 (omega_b * sign(S_b)) D_b."""

    @staticmethod
    def _chunk_rows(W: torch.Tensor, idx_Bk: torch.Tensor):
        """(token range, its gathered decoder rows (tokens, k, D)) per chunk; index_select beats W[idx]."""
        B, k = idx_Bk.shape
        step = max(1, TOKEN_CHUNK_ELEMENTS // (k * W.shape[1]))
        for lo in range(0, B, step):
            hi = min(B, lo + step)
            yield lo, hi, W.index_select(0, idx_Bk[lo:hi].flatten()).view(hi - lo, k, W.shape[1])

    @staticmethod
    def forward(ctx, W_dec, idx_Bk, omega_Bkk, dtype):
        ctx.save_for_backward(W_dec, idx_Bk, omega_Bkk)
        ctx.dtype = dtype
        W = W_dec.to(dtype)
        total = W_dec.new_zeros((), dtype=torch.float32)
        for lo, hi, rows in _TokenPairAbsCosine._chunk_rows(W, idx_Bk):
            total += (omega_Bkk[lo:hi] * torch.bmm(rows, rows.transpose(1, 2)).float().abs()).sum()
        return total

    @staticmethod
    def backward(ctx, grad_out):
        W_dec, idx_Bk, omega_Bkk = ctx.saved_tensors
        W = W_dec.to(ctx.dtype)
        grad = torch.zeros_like(W_dec)
        for lo, hi, rows in _TokenPairAbsCosine._chunk_rows(W, idx_Bk):
            # the scalars go into the k x k factor, not over the (tokens, k, D) product
            dS = (omega_Bkk[lo:hi] * torch.bmm(rows, rows.transpose(1, 2)).float().sign()).mul_(2 * grad_out)
            grad.index_add_(0, idx_Bk[lo:hi].flatten(), torch.bmm(dS.to(ctx.dtype), rows).flatten(0, 1).to(grad.dtype))
        return grad, None, None, None


class _GramAbsCosine(torch.autograd.Function):
    """sum_ij K_ij |d_i . d_j| for a dense symmetric K >= 0 (n x n): the full Gram W W^T, which beats gathering
    rows per token when n^2 is small next to B k^2 (the quickstart: 2048^2 vs 1024 * 32^2; bench_trainers).
    With KS = K * sign(G): the value is sum_ij KS_ij G_ij = sum_i (KS W)_i . W_i and the gradient 2 KS W, so
    the one n x n x D product KS W serves both, and the Gram is read once, for its signs."""

    @staticmethod
    def forward(ctx, W_dec, K_FF, dtype):
        W = W_dec.to(dtype)
        # K >= 0 is this call's own: signed in place after the cast to the matmul dtype (a bf16 copysign
        # moves half the bytes; the same values, as the sign does not change the rounding)
        KS_FF = K_FF.to(dtype).copysign_(W @ W.T)
        KSW_FD = (KS_FF @ W).float()
        ctx.save_for_backward(KSW_FD)
        return (KSW_FD * W_dec).sum()

    @staticmethod
    def backward(ctx, grad_out):
        (KSW_FD,) = ctx.saved_tensors
        return grad_out * 2 * KSW_FD, None, None


class _KernelAbsCosine(torch.autograd.Function):
    """The same value and gradient as _GramAbsCosine (its backward, 2 KS W), summed in float32, from a CPU kernel that
    takes W (in rows_dtype: float32, or bf16 for the pair kernel with AVX512-BF16, pair_rows_dtype) and returns
    (value, KS W) working on K's nonzeros only (the co-firing pairs): by rows of the table (pair_rows_abs_cosine) or
    token by token (token_pairs_abs_cosine), d flops a few times per pair where the Gram spends n^2 d twice
    (workbench.cpu_kernels; bench/bench_trainers.py)."""

    @staticmethod
    def forward(ctx, W_dec, kernel, rows_dtype):
        value, KSW_FD = kernel(W_dec.detach().to(rows_dtype).contiguous())
        ctx.save_for_backward(KSW_FD)
        return W_dec.new_tensor(value)

    @staticmethod
    def backward(ctx, grad_out):
        return _GramAbsCosine.backward(ctx, grad_out)[0], None, None  # 2 KS W, saved the same way


def pair_kernels(W_dec: torch.Tensor, dtype: torch.dtype, kernels):
    """The CPU kernels where the pair kernels apply, else None: the Gram or per-token rows in the matmul dtype.
    On a CPU that is every float32 run, and bf16 runs without AMX (bf16_matrix_engine): AMX ran the Gram faster than
    vector code can run the pairs, but on AVX512-BF16 the float32 pair kernel took momentum from 2.1-2.5x topk's step
    to 1.6-1.8x and progressive from 2.0-2.4x to 1.16-1.23x at 2048 latents (notes.txt session 20). At 16384 the
    float32 kernels and the bf16 per-token rows measured alike, so there the kernels need their bf16 rows
    (pair_rows_dtype: progressive 2.4-2.6x -> 1.4x, momentum 2.0x -> 1.7-1.9x, bench_trainers' codes; session 21)."""
    if kernels is None or W_dec.device.type != "cpu":
        return None
    if dtype == torch.float32:
        return kernels
    if bf16_matrix_engine("cpu"):
        return None
    return kernels if W_dec.shape[0] <= GRAM_MAX_LATENTS or pair_rows_dtype(dtype, kernels) == torch.bfloat16 else None


def pair_rows_dtype(dtype: torch.dtype, kernels) -> torch.dtype:
    """The decoder rows' dtype for the pair kernel: bf16 in a bf16 run where the kernels were built with AVX512-BF16
    dot products (half the bytes per partner, the dots at twice the rate: 1.6x faster on a trained quickstart SAE's
    table; the products of the bf16-rounded rows, as the bf16 Gram multiplies them), else float32."""
    from workbench.cpu_kernels import pair_rows_bf16_vectorized

    return torch.bfloat16 if dtype == torch.bfloat16 and pair_rows_bf16_vectorized(kernels) else torch.float32


GRAM_MAX_LATENTS = 8192  # the Gram path's n x n float32 matrices stay under 256 MB each


def gram_wanted(n: int, B: int, k: int) -> bool:
    """The full Gram (n^2 D) while n^2 <= 4 B k^2 (and n <= GRAM_MAX_LATENTS), else gathered rows per token."""
    return n <= GRAM_MAX_LATENTS and n * n <= 4 * B * k * k


def token_pair_penalty(W_dec: torch.Tensor, pairs: TokenPairs, omega_Bkk: torch.Tensor, n: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1/n) sum_{i != j} coef_ij s_ij per token, given omega = coef_ij / C_ij at every occurrence (0 where
    not both): the path where the Gram is not wanted (gram_wanted; there, table_penalty on the count table)."""
    return _TokenPairAbsCosine.apply(W_dec, pairs.idx_Bk, omega_Bkk.float(), dtype) / n


def token_kernel_penalty(W_dec: torch.Tensor, pairs: TokenPairs, weight_F: torch.Tensor, n: int, kernels) -> torch.Tensor:
    """(1/n) sum_{i != j} (w_i + w_j) n_ij s_ij (momentum's), token by token by the CPU token kernel: no table, and
    each occurrence's weight (w_i + w_j) / min(a_i, a_j) made inside it."""
    from workbench.cpu_kernels import token_pairs_abs_cosine

    kernel = functools.partial(token_pairs_abs_cosine, kernels, pairs.idx_Bk.contiguous(), pairs.active_Bk.contiguous(),
                               pairs.fires_F, weight_F.float().contiguous())
    return _KernelAbsCosine.apply(W_dec, kernel, torch.float32) / n


# With the CPU kernels, the token kernel (float32) costs ~0.5x the float32 pair kernel per occurrence (measured at the
# quickstart's size: 22-26 ms for 1M occurrences, against 13 ms for a table of 0.31M entries and 37 ms for 0.89M), and
# about what the bf16 pair kernel costs at 0.8-0.85 entries per occurrence (at 2048 and 16384 latents; notes.txt,
# session 21): momentum runs it unless the table has fewer entries than this share of the occurrences (co-firing
# pairs that recur over tokens, as in real codes: 0.31-0.39 on the quickstart's activations, 0.87 in bench_trainers'
# synthetic ones), by the dtype of the rows the pair kernel reads (pair_rows_dtype)
TABLE_SHARE_FOR_TOKENS = {torch.float32: 0.5, torch.bfloat16: 0.8}


def token_kernel_wanted(pairs: TokenPairs, row_ptr: torch.Tensor, rows_dtype: torch.dtype = torch.float32) -> bool:
    """The token kernel rather than the pair kernel (reading rows_dtype) on the table with rows row_ptr:
    TABLE_SHARE_FOR_TOKENS."""
    B, k = pairs.idx_Bk.shape
    return int(row_ptr[-1]) >= TABLE_SHARE_FOR_TOKENS[rows_dtype] * B * k * (k - 1)


def occurrence_penalty(W_dec: torch.Tensor, pairs: TokenPairs, omega_Bkk: torch.Tensor, n: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1/n) sum_{i != j} coef_ij s_ij given omega = coef_ij / C_ij at every occurrence (0 where not both), without
    the CPU kernels: on the dense table's Gram where gram_wanted, else per token."""
    B, k = pairs.idx_Bk.shape
    if gram_wanted(n, B, k):
        return table_penalty(W_dec, pairs.table(omega_Bkk), n, dtype)
    return token_pair_penalty(W_dec, pairs, omega_Bkk, n, dtype)


def table_penalty(W_dec: torch.Tensor, table: PairTable, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1/n) sum_{i != j} coef_ij s_ij for a symmetric table of coef >= 0 with a zero diagonal: by rows, the pair
    kernel over its nonzeros; dense, the full Gram in the matmul dtype (consumed: in float32 it overwrites the
    table with its signed copy)."""
    if table.row_ptr is not None:
        from workbench.cpu_kernels import pair_rows_abs_cosine

        kernel = functools.partial(pair_rows_abs_cosine, table.kernels, table.row_ptr, table.cols, table.values,
                                   weight_F=table.weight_F)
        return _KernelAbsCosine.apply(W_dec, kernel, pair_rows_dtype(dtype, table.kernels)) / n
    return _GramAbsCosine.apply(W_dec, table.values, dtype) / n


def competition_penalty(W_dec: torch.Tensor, pairs: CoFiring, coef_P: torch.Tensor, n: int):
    """(1/n) sum_{i != j} coef_ij s_ij = (2/n) sum_{i<j} coef_ij |d_i . d_j|, and the pairs' s_ij."""
    keep = coef_P > 0
    i, j, coef = pairs.i[keep], pairs.j[keep], coef_P[keep].to(W_dec.dtype)
    value = _WeightedAbsCosine.apply(W_dec, i, j, coef) * (2.0 / n)
    return value


@torch.no_grad()
def max_abs_cosine_F(W_dec: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
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
from workbench.sae_ops import Codes  # noqa: E402


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
    sparse_codes = True  # both bases' codes are selections (TopK's, ReLU's active entries)

    def __init__(self, cfg: CompetitionConfig, **kw):
        self.architecture = "topk" if cfg.base == "topk" else "standard"
        super().__init__(cfg, **kw)

    def base_loss(self, acts_BD: torch.Tensor, progress: float):
        """(parts, loss, the dense latents (None where codes hold them), x_hat, the codes or None)."""
        if self.cfg.base == "topk":
            parts, loss, codes, recon_BD = topk_loss_parts(self, acts_BD)
        else:
            parts, loss, codes, recon_BD = relu_loss_parts(self, acts_BD, progress)
        if isinstance(codes, Codes):
            return parts, loss, None, recon_BD, codes
        return parts, loss, codes, recon_BD, None

    def penalty(self, active: Callable[[], torch.Tensor], progress: float,
                codes: Codes | None = None) -> tuple[torch.Tensor, dict]:
        """The penalty and its statistics, from the pair list of active() (global_active's latents, made on the first
        call: the per-token paths never need the dense B x n matrix), or per token when `token_pairs` gives them."""
        raise NotImplementedError

    def token_pairs(self, codes: Codes | None) -> TokenPairs | None:
        """Per-token co-firing for TopK codes (one process; while B k^2 / 2 <= n^2 / 2), else None."""
        if codes is None or codes.per_row is None or distributed.ctx().data_parallel:
            return None
        (B, n), k = codes.shape, codes.per_row
        if B * k * k > n * n:
            return None
        return TokenPairs.from_codes(codes.idx_E.view(B, k), codes.vals_E.detach().view(B, k) > 0, n)

    def penalty_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.autocast else torch.float32

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        parts, base, latents_BF, recon_BD, codes = self.base_loss(acts_BD, progress)
        active = functools.cache(lambda: global_active((codes.latents_BF if latents_BF is None else latents_BF).detach()))
        penalty, stats = self.penalty(active, progress, codes)
        loss = base + penalty  # the penalty is the same on every rank under torchrun (global pairs)
        parts["competition"] = penalty.detach()
        total = distributed.all_mean(loss.detach())
        stats["penalty_share"] = (penalty.detach() / total).item() if total.item() != 0 else 0.0
        return StepOutput(loss, parts, acts_BD, recon_BD, latents_BF if codes is None else codes, stats)

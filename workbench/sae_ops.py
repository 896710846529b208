"""The SAE's math that trainers and evals share, free of any model class: the TopK and BatchTopK
activations, the decoder constraint, the default learning rate, and the decoder-geometry search.

Shapes: B batch, D d_in (d_model), F latents (d_sae). (Kept apart from workbench/sae.py so that the
trainers' module-level imports stay light: importing sae_lens, which that file builds on, takes ~7 s,
and config errors must come back before anything heavy loads.)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# torch marks CSR support as beta and warns once per process; the CSR ops used here and in the competition
# trainers are covered by tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def topk_relu(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of ReLU(pre) per row; zero the rest."""
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter_(-1, idx, vals.relu())


def batch_topk_relu(pre_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """Keep the k_total largest entries of ReLU(pre) over the whole batch, zero the rest; among entries
    equal to the smallest kept value, lower flat indices win (deterministic under bfloat16 ties)."""
    act_BF = pre_BF.relu()
    return torch.where(batch_topk_mask(act_BF, k_total), act_BF, 0.0)


def batch_topk_mask(act_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """Where batch_topk_relu keeps entries of act_BF (>= 0)."""
    k_total = min(k_total, act_BF.numel())
    kth = kth_largest(act_BF.detach(), k_total)
    flat = act_BF.detach().flatten()
    keep = flat >= kth
    if int(torch.count_nonzero(keep)) > k_total:  # more entries equal the cutoff than places left
        keep = flat > kth
        short = k_total - int(torch.count_nonzero(keep))
        ties = (flat == kth).nonzero().squeeze(1)[:short]  # lowest flat indices first
        keep.index_fill_(0, ties, True)
    return keep.view_as(act_BF)


def kth_largest(x_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """The k_total-th largest entry of x. Selected among each row's top r = 4 k_total / B entries when that
    provably holds it (every row's r-th largest is below the candidates' k-th, so no entry left out can
    reach it); else by a selection over the whole batch. 3.5x faster at B 2048 x n 4096, same value."""
    B, F = x_BF.shape
    r = min(F, 4 * -(-k_total // B))
    if r < F:
        row_top_Br = x_BF.topk(r, dim=1, sorted=False).values
        kth = row_top_Br.flatten().topk(k_total, sorted=False).values.min()
        if bool((row_top_Br.min(dim=1).values < kth).all()):
            return kth
    return x_BF.flatten().topk(k_total, sorted=False).values.min()


# ---------------------------------------------------------------- the sparse step (sparsify's idea)
# A TopK-family SAE's codes have k active latents per token out of F. The dense step multiplies the
# whole (B, F) code matrix three times: decoder forward, decoder backward, encoder backward. The sparse
# step keeps only the encoder forward dense and touches the selected latents elsewhere: the decoder is
# an embedding bag over the B*k entries, and the encoder's backward adds into the selected columns.
# JumpReLU's codes are a selection too (trainers/jumprelu.py: the active entries and its STE window).
# Same loss and gradients (tests/test_sparse_step.py); which is faster depends on size and dtype
# (bench/bench_trainers.py), so `sae.sparse_step = auto` picks by the measured rule in sparse_step_wanted.


def sparse_step_wanted(setting: str, d_sae: int, compute_dtype: str, matrix_engine: bool) -> bool:
    """auto: the sparse step except where the dense one measured faster: bf16 on a matrix engine
    (workbench.cpu_kernels.bf16_matrix_engine) below 8192 latents (AMX at the quickstart's 2048: 0.9x for sparse,
    measured while bf16 steps took torch's bag and topk; since session 22 the C kernels, which took the AVX512-BF16
    CPU's sparse step from 1.24x to ~2x its dense one there: to be measured again on AMX).
    Sparse measured faster in float32 (2.1x there, 2.6x at 2304 x 16384), in bf16 at 2304 x 16384 (1.65x AMX, 1.9x
    AVX512-BF16; 2.3x there in session 22) and in bf16 on AVX512-BF16 vector units at 2048 latents."""
    if setting != "auto":
        return setting == "on"
    return compute_dtype != "bfloat16" or d_sae >= 8192 or not matrix_engine


def bag_sum(rows_E: torch.Tensor, idx_E: torch.Tensor, vals_E: torch.Tensor, W_FD: torch.Tensor,
            n_rows: int, kernels=None) -> torch.Tensor:
    """out_b = sum over the entries e of row b of vals_e * W[idx_e]: an embedding bag (entries sorted by
    row), B*k*D work where the dense product is B*F*D. With the CPU kernels (float32 or bf16 on a CPU): _KernelBag."""
    if kernels is not None and _kernels_apply(W_FD, vals_E):
        return _KernelBag.apply(vals_E, W_FD, rows_E, idx_E, n_rows, kernels)
    offsets_B = torch.searchsorted(rows_E, torch.arange(n_rows, device=rows_E.device))
    return F.embedding_bag(idx_E, W_FD.to(vals_E.dtype), offsets_B, mode="sum", per_sample_weights=vals_E)


def _kernels_apply(*tensors: torch.Tensor) -> bool:
    """The CPU kernels take these: on a CPU, float32 or bf16 (autocast's codes; cast to float32 on the way in, exactly)."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)


class _KernelBag(torch.autograd.Function):
    """bag_sum by the CPU kernels (workbench/cpu_kernels.py): x_hat_b = sum over row b's entries of vals_e W[idx_e];
    backward d vals_e = g_{row e} . W[idx_e] and dW[i] = sum over latent i's entries of vals_e g_{row e}, each one pass
    where torch's embedding bag sorts the entries for its weight gradient (the three took 12.3 ms of a 67 ms TopK
    step at the quickstart's size in float32, notes.txt session 17; 10 ms of 35 in bf16, session 22). In float32
    throughout: bf16 codes (autocast's) are cast exactly, and W stays float32 where torch's bag would round it to
    bf16; the gradients go back in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, vals_E, W_FD, rows_E, idx_E, n_rows, kernels):
        from workbench.cpu_kernels import weighted_row_sums
        ctx.save_for_backward(vals_E, W_FD, rows_E, idx_E)
        ctx.kernels = kernels
        return weighted_row_sums(kernels, W_FD.float().contiguous(), idx_E.contiguous(), rows_E.contiguous(),
                                 vals_E.float().contiguous(), n_rows)

    @staticmethod
    def backward(ctx, g_BD):
        from workbench.cpu_kernels import row_dots, weighted_row_sums
        vals_E, W_FD, rows_E, idx_E = (t.contiguous() for t in ctx.saved_tensors)
        g_BD = g_BD.float().contiguous()
        W32_FD = W_FD.float()
        d_vals = d_W = None
        if ctx.needs_input_grad[0]:
            d_vals = row_dots(ctx.kernels, g_BD, rows_E, W32_FD, idx_E).to(vals_E.dtype)
        if ctx.needs_input_grad[1]:
            d_W = weighted_row_sums(ctx.kernels, g_BD, rows_E, idx_E, vals_E.float(), W_FD.shape[0]).to(W_FD.dtype)
        return d_vals, d_W, None, None, None, None


class _EncoderBias(torch.autograd.Function):
    """The encoder's bias b_enc, unchanged, in pre = (x - b_dec) W_enc + b_enc. Its backward also gives b_dec
    the gradient it gets through the encoder's input, -W_enc g with g = dL/db_enc (already summed over the
    batch): a matrix-vector product where autograd's would be the (B, F) x (F, D) input-gradient matmul.
    Valid because x itself needs no gradient (activations are data), so that matmul only fed b_dec."""

    @staticmethod
    def forward(ctx, b_enc_F, b_dec_D, W_enc_DF):
        ctx.save_for_backward(W_enc_DF)
        return b_enc_F.clone()

    @staticmethod
    def backward(ctx, g_F):
        (W_enc_DF,) = ctx.saved_tensors
        return g_F, -(W_enc_DF @ g_F.to(W_enc_DF.dtype)), None


def encoder_pre_acts(sae_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, b_dec_D: torch.Tensor,
                     grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre_BF, bias_F) for sae_in = x - b_dec given as a value (no graph): pre = sae_in W_enc + b_enc, with
    b_dec's gradient through the bias (_EncoderBias). grad=False: pre is computed without autograd (the sparse
    step differentiates at the selected entries only, through bias_F)."""
    bias_F = _EncoderBias.apply(b_enc_F, b_dec_D, W_enc_DF.detach())
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
        return torch.addmm(bias_F, sae_in_BD, W_enc_DF), bias_F


def csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from entries already sorted by row (and by column within a row where the op needs it):
    no sort, no coalesce."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def encoder_weight_grad(sae_in_BD: torch.Tensor, rows_E: torch.Tensor, idx_E: torch.Tensor, g_E: torch.Tensor, n: int,
                        by_rows: bool | None = None, kernels=None) -> torch.Tensor:
    """dW_enc (D, n) = sae_in^T G for G (B, n) nonzero only at the entries (rows_E sorted). With the CPU kernels
    (workbench/cpu_kernels.py; on a CPU, in float32): their by-latent sums, in W_enc's layout (8x dense @ CSR's speed at the
    quickstart's size, 2.5x at Gemma-2's). Else by_rows (the default on a CPU): dense @ CSR, which writes that
    layout directly; or the (n, D) product G^T sae_in, transposed, which autograd then copies into that layout: a
    transposing copy of the whole matrix, 120 ms of a 200 ms backward at 2304 x 16384 on a CPU (noise on a GPU,
    where dense @ CSR is not relied on)."""
    if kernels is not None and _kernels_apply(sae_in_BD, g_E):  # column i: the sum of g_e sae_in[row e] over i's entries
        from workbench.cpu_kernels import weighted_row_sums
        return weighted_row_sums(kernels, sae_in_BD.float().contiguous(), rows_E.contiguous(), idx_E.contiguous(),
                                 g_E.float().contiguous(), n, transposed=True)
    B = sae_in_BD.shape[0]
    if by_rows is None:
        by_rows = sae_in_BD.device.type == "cpu"
    if by_rows:
        return torch.mm(sae_in_BD.T, csr(rows_E, idx_E, g_E, (B, n)))
    G_FB = torch.sparse_coo_tensor(torch.stack([idx_E, rows_E]), g_E, (n, B), check_invariants=False)
    return torch.sparse.mm(G_FB, sae_in_BD).T


class _SelectedPreActs(torch.autograd.Function):
    """pre_e = sae_in_{row e} . W_enc[:, idx_e] + b_enc[idx_e] at the selected entries, its value taken
    from the dense (no-grad) encoder forward. Backward touches only the selected columns:
    dW_enc[:, i] = sum_{e: idx_e = i} g_e sae_in_{row e};  db_enc[i] = sum g_e. (sae_in is a value:
    b_dec's gradient through it comes from the bias, _EncoderBias.) kernels: the CPU kernels or None."""

    @staticmethod
    def forward(ctx, pre_E, sae_in_BD, W_enc_DF, b_enc_F, rows_E, idx_E, kernels):
        ctx.save_for_backward(sae_in_BD, rows_E, idx_E)
        ctx.n, ctx.kernels = W_enc_DF.shape[1], kernels
        return pre_E.clone()

    @staticmethod
    def backward(ctx, g_E):
        sae_in_BD, rows_E, idx_E = ctx.saved_tensors
        n = ctx.n
        g_E = g_E.float()
        grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_W = encoder_weight_grad(sae_in_BD.float(), rows_E, idx_E, g_E, n, kernels=ctx.kernels)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(n, dtype=torch.float32, device=g_E.device).index_add_(0, idx_E, g_E)
        return None, None, grad_W, grad_b, None, None, None


class _DensePreActs(torch.autograd.Function):
    """pre_BF whole, its value taken from the dense (no-grad) encoder forward: the sparse step's way back to the
    dense one when a step's codes are too dense for the sparse ops (ReLU early in training). Backward as autograd's
    through the encoder matmul: dW_enc = sae_in^T G (in G's dtype, autocast's bf16 as there), db_enc = sum_b G."""

    @staticmethod
    def forward(ctx, pre_BF, sae_in_BD, W_enc_DF, b_enc_F):
        ctx.save_for_backward(sae_in_BD)
        return pre_BF.clone()

    @staticmethod
    def backward(ctx, g_BF):
        (sae_in_BD,) = ctx.saved_tensors
        grad_W = (sae_in_BD.to(g_BF.dtype).T @ g_BF).float() if ctx.needs_input_grad[2] else None
        grad_b = g_BF.sum(0).float() if ctx.needs_input_grad[3] else None
        return None, None, grad_W, grad_b


class _ColumnPreActs(torch.autograd.Function):
    """pre[:, cols] for a few columns (AuxK's dead latents), its value taken from the dense (no-grad) encoder
    forward; backward: dW_enc[:, cols] = sae_in^T G (one small product in G's dtype, the bf16 of autocast where
    the dense step's would be bf16 too; a sparse tensor over those columns) and db_enc[cols] = sum_b G."""

    @staticmethod
    def forward(ctx, pre_BC, sae_in_BD, W_enc_DF, b_enc_F, cols_C):
        ctx.save_for_backward(sae_in_BD, cols_C)
        ctx.n = W_enc_DF.shape[1]
        return pre_BC.clone()

    @staticmethod
    def backward(ctx, g_BC):
        sae_in_BD, cols_C = ctx.saved_tensors
        grad_W = grad_b = None
        if ctx.needs_input_grad[2]:  # sparse: autograd adds it into the main path's dense gradient
            block_DC = (sae_in_BD.to(g_BC.dtype).T @ g_BC).float()
            D, C = block_DC.shape
            where_2E = torch.stack([torch.arange(D, device=cols_C.device).repeat_interleave(C), cols_C.repeat(D)])
            grad_W = torch.sparse_coo_tensor(where_2E, block_DC.flatten(), (D, ctx.n), is_coalesced=True,
                                             check_invariants=False)
        if ctx.needs_input_grad[3]:
            grad_b = g_BC.new_zeros(ctx.n, dtype=torch.float32).index_copy_(0, cols_C, g_BC.float().sum(0))
        return None, None, grad_W, grad_b, None


class Codes:
    """One batch's latents f = ReLU(pre) at selected entries (rows_E, idx_E: row-major order), zero elsewhere.
    latents_BF is the dense (B, F) matrix, differentiable and made on first use: the dense step's decode is
    a product with it, while the sparse step's decode is an embedding bag over the entries and never needs it.
    per_row: k where every row holds exactly k entries (TopK's codes, which the per-token paths view as (B, k)), else None.
    kernels: the CPU kernels for the decode's embedding bag (bag_sum), or None."""

    def __init__(self, rows_E: torch.Tensor, idx_E: torch.Tensor, vals_E: torch.Tensor, shape: tuple[int, int],
                 sparse: bool, per_row: int | None = None, kernels=None):
        self.rows_E, self.idx_E, self.vals_E, self.shape, self.sparse = rows_E, idx_E, vals_E, shape, sparse
        self.per_row, self.kernels = per_row, kernels
        self._latents_BF: torch.Tensor | None = None

    @property
    def latents_BF(self) -> torch.Tensor:
        if self._latents_BF is None:
            # in place into fresh zeros: the out-of-place index_put would copy the B x F matrix once more
            self._latents_BF = self.vals_E.new_zeros(self.shape).index_put_((self.rows_E, self.idx_E), self.vals_E)
        return self._latents_BF

    @torch.no_grad()
    def fired_F(self) -> torch.Tensor:
        """Which of all F latents are > 0 somewhere in the batch: B*k work where the dense matrix's is B*F."""
        fired = torch.zeros(self.shape[1], dtype=torch.bool, device=self.idx_E.device)
        return fired.index_fill_(0, self.idx_E[self.vals_E > 0], True)

    def decode(self, W_dec_FD: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """sum over latents lo..hi-1 of f_i d_i (no bias)."""
        if not self.sparse:
            return self.latents_BF[:, lo:hi] @ W_dec_FD[lo:hi]
        rows, idx, vals = self.rows_E, self.idx_E, self.vals_E
        if lo > 0 or hi is not None:
            keep = (idx >= lo) & (idx < (W_dec_FD.shape[0] if hi is None else hi))
            rows, idx, vals = rows[keep], idx[keep], vals[keep]
        return bag_sum(rows, idx, vals, W_dec_FD, self.shape[0], self.kernels)

    def decode_groups(self, W_dec_FD: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """(B, G, D): part g = sum over latents ends[g-1]..ends[g]-1 (from 0 for g = 0) of f_i d_i (no bias). With the
        CPU kernels one bag over all entries into B x G rows (each entry's row b G + its group), where a bag per group
        would pick each group's entries out of all of them first."""
        if self.sparse and self.kernels is not None and _kernels_apply(W_dec_FD, self.vals_E):
            B, G = self.shape[0], len(ends)
            group_E = torch.bucketize(self.idx_E, torch.tensor(ends, device=self.idx_E.device), right=True)
            return _KernelBag.apply(self.vals_E, W_dec_FD, self.rows_E * G + group_E, self.idx_E, B * G,
                                    self.kernels).view(B, G, -1)
        return torch.stack([self.decode(W_dec_FD, lo, hi) for lo, hi in zip([0] + ends[:-1], ends)], dim=1)


@dataclass
class Encoding:
    """The encoder's output for one batch: pre_BF (differentiable in the dense step; values only in the
    sparse step, where `codes` routes the gradient through _SelectedPreActs), the input x - b_dec (a value),
    and the bias node that carries b_enc's and b_dec's gradients (encoder_pre_acts); kernels: the CPU kernels for the
    sparse step's encoder weight gradient (encoder_weight_grad), or None."""
    pre_BF: torch.Tensor
    sae_in_BD: torch.Tensor
    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    sparse: bool
    kernels: object = None

    def selected_pre(self, rows_E: torch.Tensor, idx_E: torch.Tensor, pre_E: torch.Tensor | None = None) -> torch.Tensor:
        """pre at the given entries (sorted by row), differentiable in both steps; pre_E: its values there, where the
        selection already read them (sparse step only)."""
        if self.sparse:
            return _SelectedPreActs.apply(self.pre_BF[rows_E, idx_E] if pre_E is None else pre_E, self.sae_in_BD,
                                          self.W_enc_DF, self.b_enc_F, rows_E, idx_E, self.kernels)
        return self.pre_BF[rows_E, idx_E]

    def codes(self, rows_E: torch.Tensor, idx_E: torch.Tensor, per_row: int | None = None,
              pre_E: torch.Tensor | None = None) -> Codes:
        """f = ReLU(pre) kept at the given entries (sorted by row), zero elsewhere."""
        return Codes(rows_E, idx_E, self.selected_pre(rows_E, idx_E, pre_E).relu(), tuple(self.pre_BF.shape),
                     self.sparse, per_row, self.kernels)

    def dense_pre(self) -> torch.Tensor:
        """pre_BF, differentiable in both steps (the sparse step's fallback for codes it would not gain on)."""
        if not self.sparse:
            return self.pre_BF
        return _DensePreActs.apply(self.pre_BF, self.sae_in_BD, self.W_enc_DF, self.b_enc_F)

    def column_pre_acts(self, cols_C: torch.Tensor) -> torch.Tensor:
        """pre[:, cols] as a dense (B, C) block, differentiable in both steps (AuxK's dead latents)."""
        pre_BC = self.pre_BF.index_select(1, cols_C)
        if not self.sparse:
            return pre_BC
        return _ColumnPreActs.apply(pre_BC, self.sae_in_BD, self.W_enc_DF, self.b_enc_F, cols_C)

    def topk_codes(self, k: int, among: torch.Tensor | None = None) -> Codes:
        """Each row's k largest pre-activations (among the given latents: AuxK's dead ones), ReLU'd. With the CPU
        kernels, by their row top-k where it beats torch's (k at most 1/8 of the row: 3.5x at the quickstart's 1024 x
        2048, k 32; 3x at 16384 latents, k 64); the same set up to which of tied entries at the cutoff it takes."""
        pre = self.pre_BF.detach()
        if among is not None:
            pre = pre.index_select(1, among)
        if self.kernels is not None and 8 * k <= pre.shape[1] and _kernels_apply(pre):
            from workbench.cpu_kernels import row_topk
            idx_BK = row_topk(self.kernels, pre.contiguous(), k)
        else:
            idx_BK = pre.topk(k, dim=-1, sorted=False).indices
        if among is not None:
            idx_BK = among[idx_BK]
        rows_E = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return self.codes(rows_E, idx_BK.flatten(), per_row=k)

    def mask_codes(self, keep_BF: torch.Tensor) -> Codes:
        """f = ReLU(pre) where keep_BF (e.g. BatchTopK's selection)."""
        rows_E, idx_E = keep_BF.nonzero(as_tuple=True)
        return self.codes(rows_E, idx_E)

    def positive_codes(self, max_entries: int) -> Codes | None:
        """f = ReLU(pre) at the entries where pre > 0 (ReLU's codes), or None where more than max_entries are (a step
        the sparse ops would not gain on). With the CPU kernels one count pass and one fill pass that read pre's values
        on the way (positive_entries: 2.2 -> 0.4 ms at the quickstart's size); else torch's mask, count and nonzero."""
        pre = self.pre_BF.detach()
        if self.kernels is not None and _kernels_apply(pre):
            from workbench.cpu_kernels import positive_entries
            found = positive_entries(self.kernels, pre.contiguous(), max_entries)
            return None if found is None else self.codes(found[0], found[1], pre_E=found[2])
        active_BF = pre > 0
        return self.mask_codes(active_BF) if int(active_BF.count_nonzero()) <= max_entries else None


# ---------------------------------------------------------------- decoder constraint (TRAINERS.md)

@torch.no_grad()
def remove_parallel_grad_(W_dec: nn.Parameter) -> None:
    """Before the optimizer step: drop each row's gradient component along the (unit) row."""
    if W_dec.grad is not None:  # in place: one (F, D) temporary, not three
        W_dec.grad.addcmul_((W_dec.grad * W_dec).sum(dim=1, keepdim=True), W_dec, value=-1)


@torch.no_grad()
def normalize_rows_(W_dec: nn.Parameter) -> None:
    """After the optimizer step: put every decoder row back on the unit sphere."""
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling: 2e-4 / sqrt(n / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# ---------------------------------------------------------------- decoder geometry

@torch.no_grad()
def max_cosine(W_dec_FD: torch.Tensor, members: torch.Tensor | None = None, absolute: bool = False,
               block: int | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each latent i in `members` (default: all): (max over j in members, j != i, of d_i . d_j, that j),
    cosines of the unit decoder rows; |d_i . d_j| with absolute=True; among equal maxima the first j in
    `members`' order. The members go in blocks of `block` (default: a sixteenth of them, 512 to 2048), and each
    pair of blocks is multiplied once, its maxima taken along its rows and its columns (the Gram is symmetric):
    (b + 1) / 2b of the full product for b blocks, and memory block^2, nothing |members|^2. dtype: the matmul's
    (e.g. bfloat16 for a fast argmax search)."""
    unit_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx_K = torch.arange(unit_FD.shape[0], device=unit_FD.device) if members is None else members
    unit_KD = unit_FD[idx_K].to(dtype or unit_FD.dtype)
    K = len(idx_K)
    block = block or min(2048, max(512, -(-K // 16)))  # 2048 x 640: 512 -> 39 ms (one block: 53); 8192 x 2304: 1.6 s (3.2)
    values_K = torch.full((K,), float("-inf"), dtype=torch.float32, device=unit_FD.device)
    where_K = torch.zeros(K, dtype=torch.long, device=unit_FD.device)  # positions in members, then latents

    def offer(lo: int, top, offset: int) -> None:  # candidates for members lo.., at positions offset + top.indices
        at = slice(lo, lo + len(top.values))
        better = top.values.float() > values_K[at]  # strictly: an earlier j keeps a tie (j ascend over the blocks)
        values_K[at] = torch.where(better, top.values.float(), values_K[at])
        where_K[at] = torch.where(better, top.indices + offset, where_K[at])

    for s in range(0, K, block):
        for t in range(s, K, block):
            cos_ST = unit_KD[s:s + block] @ unit_KD[t:t + block].T
            if absolute:
                cos_ST.abs_()
            if s == t:
                cos_ST.fill_diagonal_(float("-inf"))  # j != i
            else:  # the columns' maxima: rows t.. against s.., whose j come before the ones offered below
                offer(t, cos_ST.max(dim=0), s)
            offer(s, cos_ST.max(dim=1), t)
    return values_K, idx_K[where_K]

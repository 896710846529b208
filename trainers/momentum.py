"""Per-Feature Momentum Tracking (seed 000), TRAINERS.md section 3.

    c_ij = n_ij                                          (this batch's overlap coefficient)
    m_i  <- beta * m_i + (1 - beta) * sum_{j != i} c_ij  (O(n) state; updated before the loss uses w)
    w_i  = 2 if m_i > tau else 1
    L    = L_base + lambda2 * (1/n) sum_{i != j} (w_i + w_j) * c_ij * s_ij

normalize (TRAINERS.md section 6): "none" is the literal form above. Summed over ~40 partners, m_i sits
far above the seeds' tau = 0.5, so w_i = 2 almost everywhere and the weighting is a uniform 2x on lambda2.
"mean": m_i tracks the mean of c_ij over the latent's co-firing partners in the batch (sum / partners;
a latent with no partner contributes 0), so m_i in [0, 1] and tau in (0, 1) selects on overlap strength.
"quantile": literal m_i, and w_i = 2 for latents whose m_i is above the tau-quantile of m (a fraction
1 - tau of latents, by construction).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from trainers.base import register
from trainers.competition import (CompetitionConfig, CompetitionTrainer, cofiring_pairs, competition_penalty,
                                  occurrence_penalty, pair_kernels, pair_rows_dtype, per_latent_sum, table_penalty,
                                  token_kernel_penalty, token_kernel_wanted)
from workbench.config import ConfigError, configclass, param


@configclass
class MomentumConfig(CompetitionConfig):
    base: Literal["topk", "relu"] = param("relu", "base SAE: relu (as in the seeds) or topk")
    beta: float = param(0.9, "momentum rate beta of m_i", ge=0, lt=1)
    tau: float = param(0.5, "competition threshold tau: w_i = 2 where m_i > tau")
    lambda2: float = param(0.1, "competition penalty weight lambda2", ge=0)
    normalize: Literal["none", "mean", "quantile"] = param(
        "none", "none (the seeds' literal sum) | mean (m from the mean overlap over co-firing partners) | quantile "
                "(w = 2 above the tau-quantile of m); TRAINERS.md section 6")

    def validate(self, run) -> None:
        super().validate(run)
        if self.normalize == "quantile" and not 0 <= self.tau <= 1:
            raise ConfigError("config key 'trainer.tau' is a quantile with normalize = quantile: must be in [0, 1]")


@register
class MomentumTrainer(CompetitionTrainer):
    name = "momentum"
    Config = MomentumConfig

    def __init__(self, cfg: MomentumConfig, **kw):
        super().__init__(cfg, **kw)
        self.momentum_F = torch.zeros(self.sae.d_sae, device=self.sae.W_dec.device)

    def penalty(self, active, progress, codes=None):
        cfg, n = self.cfg, self.sae.d_sae
        tokens = self.token_pairs(codes)
        dtype = self.penalty_dtype()
        kernels = pair_kernels(self.sae.W_dec, dtype, self.kernels) if tokens is not None else None
        with torch.no_grad():
            if kernels is not None:  # c_ij = n_ij of every co-firing pair: its table by rows, with row sums
                table, signal_F = tokens.overlap_table(kernels)
                if cfg.normalize == "mean":  # distinct partners: the row's entries
                    signal_F = signal_F / table.row_ptr.diff().clamp_min(1)
            elif tokens is not None:  # c_ij / C_ij per occurrence: its sums over occurrences are sums over pairs
                c_occ = tokens.overlap_share_Bkk()
                signal_F = tokens.per_latent_sum(c_occ)
                if cfg.normalize == "mean":  # distinct partners: 1 / C_ij per occurrence
                    signal_F = signal_F / tokens.per_latent_sum(1 / tokens.counts_Bkk()).round().clamp_min(1)
            else:
                pairs = cofiring_pairs(active())
                c_P = pairs.overlap
                signal_F = per_latent_sum(pairs, c_P, n)
                if cfg.normalize == "mean":
                    signal_F = signal_F / per_latent_sum(pairs, torch.ones_like(c_P), n).clamp_min(1)
            self.momentum_F.mul_(cfg.beta).add_((1 - cfg.beta) * signal_F)
            cut = self.momentum_F.float().quantile(cfg.tau) if cfg.normalize == "quantile" else cfg.tau
            w_F = 1.0 + (self.momentum_F > cut).float()
        if kernels is not None and token_kernel_wanted(tokens, table.row_ptr, pair_rows_dtype(dtype, kernels)):
            # each occurrence's weight inside the token kernel
            value = cfg.lambda2 * token_kernel_penalty(self.sae.W_dec, tokens, w_F, n, kernels)
        elif kernels is not None:  # coefficients (w_i + w_j) n_ij, scaled in the pair kernel
            value = cfg.lambda2 * table_penalty(self.sae.W_dec, dataclasses.replace(table, weight_F=w_F), n, dtype)
        elif tokens is not None:
            w_Bk = w_F[tokens.idx_Bk]
            omega = (w_Bk[:, :, None] + w_Bk[:, None, :]).mul_(c_occ)
            value = cfg.lambda2 * occurrence_penalty(self.sae.W_dec, tokens, omega, n, dtype)
        else:
            coef_P = (w_F[pairs.i] + w_F[pairs.j]) * c_P
            value = cfg.lambda2 * competition_penalty(self.sae.W_dec, pairs, coef_P, n)
        if kernels is not None:
            n_pairs = int(table.row_ptr[-1]) // 2  # both orders of each pair
        else:
            n_pairs = tokens.n_pairs if tokens is not None else pairs.n_pairs  # the tokens' only when logged (a dedup)
        m = self.momentum_F.clone()  # the rest read on logged steps only (a callable stat)
        stats = {"cofiring_pairs": n_pairs, "frac_w2": (w_F > 1).float().mean().item(),
                 "momentum_mean": lambda: m.mean().item(), "momentum_p99": lambda: m.quantile(0.99).item(),
                 "momentum_max": lambda: m.max().item()}
        return value, stats

    def extra_state(self) -> dict:
        return {**super().extra_state(), "momentum_F": self.momentum_F}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.momentum_F.copy_(state["momentum_F"])

    def artifacts(self) -> dict:
        return {"momentum_final": self.momentum_F.tolist(), "tau": self.cfg.tau}

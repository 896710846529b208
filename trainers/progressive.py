"""Progressive Sparsity-Guided Orthogonality (seed 001), TRAINERS.md section 4.

    threshold(p) = max(theta0 * (1 - p), 1e-3)
    c_ij(p)      = clamp((n_ij - threshold(p)) / threshold(p), 0, 1)
    lambda2(p)   = lambda2_max * (1 - p)^gamma
    L            = L_base + lambda2(p) * (1/n) sum_{i != j} c_ij(p) * s_ij
schedule = "static" keeps threshold = theta0 and lambda2 = lambda2_max (the seed's static comparison).
"""
from __future__ import annotations

from typing import Literal


import torch

from trainers.base import register
from trainers.competition import (CompetitionConfig, CompetitionTrainer, cofiring_pairs, competition_penalty,
                                  gram_wanted, max_abs_cosine_F, pair_dots, pair_kernels, table_penalty,
                                  token_pair_penalty)
from workbench.config import configclass, param

SNAPSHOTS = (0.25, 0.5, 0.75, 1.0)
HIST_BINS = 50


@configclass
class ProgressiveConfig(CompetitionConfig):
    base: Literal["topk"] = param("topk", "base SAE: topk (the progressive trainer's schedule is set for TopK codes)")
    theta0: float = param(0.5, "initial overlap threshold theta0", gt=0, le=1)
    lambda2_max: float = param(0.1, "initial (maximum) penalty weight", ge=0)
    gamma: float = param(2.0, "decay exponent of lambda2(p) (2 in the seed; 0.5 the reviewer's follow-up)", ge=0)
    schedule: Literal["progressive", "static"] = param(
        "progressive", "progressive | static (threshold and lambda2 held at their initial values)")


def schedule_at(cfg: ProgressiveConfig, p: float) -> tuple[float, float]:
    """(threshold(p), lambda2(p))."""
    if cfg.schedule == "static":
        return cfg.theta0, cfg.lambda2_max
    return max(cfg.theta0 * (1 - p), 1e-3), cfg.lambda2_max * (1 - p) ** cfg.gamma


@register
class ProgressiveTrainer(CompetitionTrainer):
    name = "progressive"
    Config = ProgressiveConfig

    def __init__(self, cfg: ProgressiveConfig, **kw):
        super().__init__(cfg, **kw)
        self.snapshots: list[dict] = []
        self._last_active = None  # the step's active() (a snapshot's co-firing pairs), kept until the step ends

    def penalty(self, active, progress, codes=None):
        thr, lam = schedule_at(self.cfg, progress)
        n = self.sae.d_sae
        self._last_active = active
        tokens = self.token_pairs(codes)
        dtype = self.penalty_dtype()
        kernels = pair_kernels(self.sae.W_dec, dtype, self.kernels)
        # c_ij on the table of n_ij: by rows with the CPU kernels (any n: the pair kernel skips the c_ij = 0), dense
        # where the Gram is wanted
        if tokens is not None and (kernels is not None or gram_wanted(n, *tokens.idx_Bk.shape)):
            with torch.no_grad():  # c_ij is not linear in n_ij: the table first, then c elementwise (0 where n_ij = 0)
                if kernels is not None:
                    table = tokens.overlap_table(kernels)[0]
                    n_pairs = table.cols.numel() // 2  # both orders of each pair
                else:
                    table = tokens.table(tokens.overlap_share_Bkk())
                    n_pairs = tokens.n_pairs  # logged steps only
                table.values.mul_(1 / thr).sub_(1).clamp_(0, 1)
            value = lam * table_penalty(self.sae.W_dec, table, n, dtype)
            # logged steps only; table_penalty may have signed a dense table in place, which keeps its zeros and |c|
            n_pos = lambda: int(torch.count_nonzero(table.values)) // 2  # noqa: E731
            mean_c = lambda: table.values.abs().sum().item() / 2 / max(n_pos(), 1)  # noqa: E731
        elif tokens is not None:  # c_ij at every occurrence; the sums over pairs weigh each by 1 / C_ij
            with torch.no_grad():
                per_pair = tokens.both_Bkk / tokens.counts_Bkk()
                c_occ = torch.where(tokens.both_Bkk, ((tokens.counts_Bkk() / tokens.min_fires_Bkk - thr) / thr).clamp(0, 1), 0.0)
            value = lam * token_pair_penalty(self.sae.W_dec, tokens, c_occ * per_pair, n, dtype)
            n_pairs = tokens.n_pairs  # these three only on logged steps (stats may be callables)
            n_pos = lambda: round(0.5 * (per_pair * (c_occ > 0)).sum().item())  # noqa: E731
            mean_c = lambda: 0.5 * (per_pair * c_occ).sum().item() / max(n_pos(), 1)  # noqa: E731
        else:
            pairs = cofiring_pairs(active())
            c_P = ((pairs.overlap - thr) / thr).clamp(0, 1)
            value = lam * competition_penalty(self.sae.W_dec, pairs, c_P, n)
            positive = c_P > 0
            n_pairs, n_pos = pairs.n_pairs, int(positive.sum())
            mean_c = c_P[positive].mean().item() if positive.any() else 0.0
        stats = {"lambda2": lam, "threshold": thr, "cofiring_pairs": n_pairs, "pairs_c_pos": n_pos, "mean_c": mean_c}
        return value, stats

    def step(self, acts_BD):
        out = super().step(acts_BD)
        done = len(self.snapshots)
        if done < len(SNAPSHOTS) and self.step_count >= round(SNAPSHOTS[done] * self.total_steps):
            self.snapshots.append(self.separation_snapshot(SNAPSHOTS[done]))
        self._last_active = None  # nor its batch's graph
        return out

    @torch.no_grad()
    def separation_snapshot(self, at: float) -> dict:
        """Histogram of s_ij over this batch's co-firing pairs, and mean over latents of max_j s_ij."""
        pairs = cofiring_pairs(self._last_active())
        s_P = pair_dots(self.sae.W_dec, pairs.i, pairs.j).abs().float().cpu()
        hist = torch.histc(s_P, bins=HIST_BINS, min=0.0, max=1.0)
        return {"progress": at, "step": self.step_count, "bin_edges": torch.linspace(0, 1, HIST_BINS + 1).tolist(),
                "counts": hist.tolist(), "n_pairs": pairs.n_pairs,
                "mean_max_abs_cosine": max_abs_cosine_F(self.sae.W_dec).mean().item()}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "snapshots": self.snapshots}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.snapshots = list(state["snapshots"])

    def artifacts(self) -> dict:
        return {"separation_progression": self.snapshots}

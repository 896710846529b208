"""Matryoshka BatchTopK SAE (Bussmann et al. 2025), TRAINERS.md section 5.

Latents 0..n-1 are cut into G consecutive groups (sizes from `group_fractions`); prefix g holds latents
0..m_g-1, so group 1 (latents 0..m_1-1) is the coarsest dictionary, reused by every larger prefix.

    f      = BatchTopK_k(ReLU(pre))  over all n latents (as batchtopk)
    x_hat_g = b_dec + sum_{i < m_g} f_i d_i
    L      = sum_g w_g * (1/B) sum_b ||x_b - x_hat_g,b||^2 + alpha * L_aux     (AuxK on x - x_hat_G)

Inference threshold, its EMA and the saved SAELens `jumprelu` SAE are batchtopk's. With one group the
loss is batchtopk's exactly.
"""
from __future__ import annotations


import torch

from trainers.base import reconstruction_loss, register
from trainers.batchtopk import BatchTopKConfig, BatchTopKTrainer
from workbench.config import ConfigError, configclass, param
from workbench.sae_ops import Codes


@configclass
class MatryoshkaConfig(BatchTopKConfig):
    group_fractions: list[float] = param([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32],
                                         "sizes of the nested groups as fractions of n, summing to 1 (SAEBench's "
                                         "default)", min_length=1)
    group_weights: list[float] = param([], "weight w_g of each prefix's reconstruction loss; [] = uniform 1/G")

    def validate(self, run) -> None:
        super().validate(run)
        fr = self.group_fractions
        if not all(f > 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ConfigError(f"config key 'trainer.group_fractions' must be positive fractions summing to 1, got {fr}")
        ends = group_ends(fr, run.sae.d_sae)
        if any(hi <= lo for lo, hi in zip([0] + ends[:-1], ends)):
            raise ConfigError(f"config key 'trainer.group_fractions' gives an empty group at sae.d_sae = {run.sae.d_sae}")
        if self.group_weights and (len(self.group_weights) != len(fr) or any(w < 0 for w in self.group_weights)):
            raise ConfigError("config key 'trainer.group_weights' must be [] or one weight >= 0 per group")


def group_ends(fractions: list, n: int) -> list[int]:
    """Prefix ends m_1 < ... < m_G = n from group fractions (cumulated, rounded)."""
    ends, total = [], 0.0
    for f in fractions:
        total += f
        ends.append(int(round(total * n)))
    ends[-1] = n
    return ends


@register
class MatryoshkaTrainer(BatchTopKTrainer):
    name = "matryoshka"
    Config = MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig, **kw):
        super().__init__(cfg, **kw)
        self.ends = group_ends(cfg.group_fractions, self.sae.d_sae)
        G = len(self.ends)
        weights = [float(w) for w in cfg.group_weights] if cfg.group_weights else [1.0 / G] * G
        self.weights_G = torch.tensor(weights, device=self.sae.W_dec.device)

    def reconstruction(self, acts_BD: torch.Tensor, codes: Codes):
        # x_hat_g = b_dec + sum over groups h <= g of group h's part: one pass over W_dec for all prefixes
        parts_BGD = codes.decode_groups(self.sae.W_dec, self.ends).to(self.sae.b_dec.dtype)
        # prefix g's x_hat is prefix g-1's plus group g's part: G (B, D) sums, where b_dec + a cumsum over the groups
        # made (B, G, D) ones along the middle dimension (16 -> 6 ms with the backward at the quickstart's size,
        # notes.txt session 22); with one group the ops are batchtopk's
        recon_BD, prefix_losses = self.sae.b_dec, []
        for part_BD in parts_BGD.unbind(dim=1):
            recon_BD = part_BD + recon_BD
            prefix_losses.append(reconstruction_loss(acts_BD, recon_BD))
        prefix_losses_G = torch.stack(prefix_losses)
        loss = (prefix_losses_G * self.weights_G).sum()
        parts = {"recon": prefix_losses_G[-1].detach(), "matryoshka": loss.detach()}
        parts.update({f"recon_prefix{g + 1}": v for g, v in enumerate(prefix_losses_G.detach()[:-1])})
        return loss, parts, recon_BD

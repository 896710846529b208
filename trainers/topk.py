"""TopK SAE (Gao et al. 2024), TRAINERS.md section 1.

    f = TopK_k(ReLU(pre))
    L = L_recon + alpha * L_aux
    L_aux = ||e - e_hat||^2 / ||e - mean(e)||^2     (batch sums; e = x - x_hat, held fixed)
    e_hat = TopK_{k_aux}(pre restricted to dead latents) @ W_dec   (no bias)
"""
from __future__ import annotations


import torch

from trainers.base import StepOutput, Trainer, TrainerConfig, reconstruction_loss, register
from workbench import distributed
from workbench.config import ConfigError, configclass, param
from workbench.sae_ops import Encoding, topk_relu


@configclass
class TopKConfig(TrainerConfig):
    k: int = param(320, "active latents per token (the seeds used 320 on gemma-2-2b)")
    auxk_alpha: float = param(1 / 32, "weight alpha of the AuxK loss", ge=0)
    k_aux: int = param(0, "dead latents used by AuxK; 0 = d_model / 2", ge=0)

    def validate(self, run) -> None:
        super().validate(run)
        if getattr(self, "base", "topk") in ("topk", "batchtopk") and not 0 < self.k <= run.sae.d_sae:
            raise ConfigError(f"config key 'trainer.k' must be in 1..sae.d_sae ({run.sae.d_sae}), got {self.k}")


def auxk_loss(residual_BD: torch.Tensor, enc: Encoding, dead_F: torch.Tensor, k_aux: int,
              W_dec_FD: torch.Tensor) -> torch.Tensor:
    """Normalized error of reconstructing the residual from the top-k_aux dead latents. Under torchrun the
    denominator (fixed: the residual is detached) is the global batch's, and the numerator is scaled by
    N so that the ranks' mean is the global ratio."""
    dead_A = dead_F.nonzero().squeeze(1)
    n_dead = len(dead_A)
    if n_dead == 0:
        return residual_BD.new_zeros(())
    # B x n_dead work where a masked B x F would cost it all
    if enc.sparse and k_aux < n_dead:  # the top k_aux dead latents per token, decoded by an embedding bag
        e_hat_BD = enc.topk_codes(k_aux, among=dead_A).decode(W_dec_FD)
    else:  # the dead latents' dense (B, n_dead) block: all of them (no selection) when k_aux >= n_dead
        pre_BA = enc.column_pre_acts(dead_A)
        act_BA = pre_BA.relu() if k_aux >= n_dead else topk_relu(pre_BA, k_aux)
        e_hat_BD = act_BA @ torch.nn.functional.embedding(dead_A, W_dec_FD, sparse=True)  # a sparse gradient: n_dead rows
    scale = distributed.batch_scale()
    mean_D = residual_BD.mean(0) if scale == 1 else distributed.all_mean(residual_BD.mean(0))
    denom = distributed.all_sum((residual_BD - mean_D).pow(2).sum())
    return scale * (residual_BD - e_hat_BD).pow(2).sum() / denom.clamp_min(1e-12)


def topk_loss_parts(trainer: Trainer, acts_BD: torch.Tensor):
    """The TopK objective's pieces; shared by trainers whose base SAE is TopK."""
    cfg = trainer.cfg
    enc = trainer.encode(acts_BD)
    codes = enc.topk_codes(cfg.k)
    recon_BD = trainer.decode(codes)
    l_recon = reconstruction_loss(acts_BD, recon_BD)
    k_aux = cfg.k_aux or acts_BD.shape[1] // 2
    l_aux = auxk_loss((acts_BD - recon_BD).detach(), enc, trainer.dead_mask_F, k_aux, trainer.sae.W_dec)
    parts = {"recon": l_recon, "auxk": l_aux}
    return parts, l_recon + cfg.auxk_alpha * l_aux, codes, recon_BD


@register
class TopKTrainer(Trainer):
    name = "topk"
    Config = TopKConfig
    architecture = "topk"
    sparse_codes = True

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        parts, loss, codes, recon_BD = topk_loss_parts(self, acts_BD)
        return StepOutput(loss, parts, acts_BD, recon_BD, codes)

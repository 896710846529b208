"""Standard ReLU SAE with an L1 penalty (the seeds' CustomTrainer), TRAINERS.md section 2.

    f = ReLU(pre)
    L = L_recon + lambda1(p) * (1/B) sum_b sum_i f_bi ||d_i||      lambda1 warmed up over l1_warmup_frac
"""
from __future__ import annotations


import torch

from trainers.base import StepOutput, Trainer, TrainerConfig, reconstruction_loss, register
from workbench.config import configclass, param


@configclass
class ReLUConfig(TrainerConfig):
    l1_coeff: float = param(0.5, "lambda1: weight of the decoder-norm-weighted L1 penalty, on normalized activations (E||x||^2 = d); 0.5 gives L0 ~75 on the quickstart", ge=0)
    l1_warmup_frac: float = param(0.05, "lambda1 rises linearly from 0 over this first fraction of training", ge=0, le=1)


def l1_coeff_at(cfg: ReLUConfig, progress: float) -> float:
    if cfg.l1_warmup_frac <= 0:
        return cfg.l1_coeff
    return cfg.l1_coeff * min(1.0, progress / cfg.l1_warmup_frac)


def relu_loss_parts(trainer: Trainer, acts_BD: torch.Tensor, progress: float):
    """The ReLU + L1 objective's pieces; shared by trainers whose base SAE is ReLU."""
    _, latents_BF, recon_BD = trainer.forward_parts(acts_BD)
    l_recon = reconstruction_loss(acts_BD, recon_BD)
    l_sparsity = (latents_BF * trainer.sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
    parts = {"recon": l_recon, "l1": l_sparsity}
    return parts, l_recon + l1_coeff_at(trainer.cfg, progress) * l_sparsity, latents_BF, recon_BD


@register
class ReLUTrainer(Trainer):
    name = "relu"
    Config = ReLUConfig
    architecture = "standard"

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        parts, loss, latents_BF, recon_BD = relu_loss_parts(self, acts_BD, progress)
        return StepOutput(loss, parts, acts_BD, recon_BD, latents_BF)

"""OrtSAE (Korznikov et al. 2025, arXiv 2509.22033), TRAINERS.md section 7.

    mu+_i  = max(0, max_{j in K(i), j != i} d_i . d_j)          within i's chunk K(i) (trainers/max_cosine.py)
    L_ort  = mean over chunks K of ( mean_{i in K} (mu+_i)^2 )
    L      = L_batchtopk + gamma * L_ort

Base: batchtopk (its threshold, AuxK and SAELens jumprelu save unchanged). gamma's default is the one
calibrated on the embedded default (notes.txt, session 4); the public reimplementation uses 0.25.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.base import register
from trainers.batchtopk import BatchTopKConfig, BatchTopKTrainer
from trainers.max_cosine import ChunkMax, MaxCosineFields, MaxCosinePenalty
from workbench.config import ConfigError, param


@dataclass
class OrtSAEConfig(BatchTopKConfig, MaxCosineFields):
    gamma: float = param(0.25, "weight gamma of the orthogonality penalty L_ort (0.25 in the public reimplementation)")

    def validate(self, run) -> None:
        super().validate(run)
        self.validate_max_cosine()
        if self.gamma < 0:
            raise ConfigError(f"config key 'trainer.gamma' must be >= 0, got {self.gamma}")


def ortho_loss(chunks: list[ChunkMax]) -> torch.Tensor:
    """L_ort = mean over chunks of the chunk's mean (mu+_i)^2."""
    return torch.stack([c.mu_K.clamp_min(0).pow(2).mean() for c in chunks]).mean()


@register
class OrtSAETrainer(MaxCosinePenalty, BatchTopKTrainer):
    name = "ortsae"
    Config = OrtSAEConfig

    def coefficient(self) -> float:
        return self.cfg.gamma

    def penalty(self, chunks: list[ChunkMax], latents_BF: torch.Tensor) -> torch.Tensor:
        return ortho_loss(chunks)

"""A control, not a method: a TopK SAE at its initialization, never trained.

    W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0, b_dec = mean activation   (topk's init)
    f = TopK_k(ReLU(pre))                                                                  (same L0 as topk)

Every step only logs the loss it would have. Its evaluations (absorption above all) are the floor that
this model, hook, width and L0 give by chance: a score a trained SAE does not beat says nothing about it.
"""
from __future__ import annotations

import torch

from trainers.base import StepOutput, register
from trainers.topk import TopKConfig, TopKTrainer
from workbench.config import configclass


@configclass
class NullConfig(TopKConfig):
    """topk's keys (k sets the L0; the optimizer keys are unused)."""


@register
class NullTrainer(TopKTrainer):
    name = "null"
    Config = NullConfig

    def step(self, acts_BD: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            out = self.loss(acts_BD, self.step_count / max(1, self.total_steps))
        self.count_step(out)
        return out

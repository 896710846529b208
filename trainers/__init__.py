"""Trainer registry: a trainer is one file that defines a Trainer subclass decorated with @register.

The config's `[trainer] name = "..."` picks one; its other keys are that trainer's Config fields.
"""
from __future__ import annotations

from trainers.base import TRAINERS, StepOutput, Trainer, TrainerConfig, register  # noqa: F401
from trainers import (batchtopk, c2r, jumprelu, matryoshka, momentum, null, ortsae, progressive,  # noqa: F401  (registers)
                      relu, topk)


def make_trainer(cfg: TrainerConfig, **kw) -> Trainer:
    return TRAINERS[cfg.name](cfg, **kw)

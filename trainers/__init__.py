"""Trainer registry: a trainer is one file that defines a Trainer subclass decorated with @register.

The config's `[trainer] name = "..."` picks one; its other keys are that trainer's Config fields.
"""
from __future__ import annotations

from trainers.base import TRAINERS, StepOutput, Trainer, TrainerConfig, register  # noqa: F401
from trainers import batchtopk, jumprelu, matryoshka, momentum, progressive, relu, topk  # noqa: F401  (registers)


def trainer_config_from_dict(tree: dict) -> TrainerConfig:
    from workbench.config import ConfigError, build_dataclass

    tree = dict(tree)
    name = tree.pop("name", None)
    if name is None:
        raise ConfigError(f"config key 'trainer.name' is missing; pick one of {sorted(TRAINERS)}")
    if name not in TRAINERS:
        raise ConfigError(f"config key 'trainer.name' = '{name}' is not a trainer; known: {sorted(TRAINERS)}")
    return build_dataclass(TRAINERS[name].Config, tree, "trainer")


def make_trainer(cfg: TrainerConfig, **kw) -> Trainer:
    return TRAINERS[cfg.name](cfg, **kw)

"""The training loop: one stream of normalized batches, one or more trainers stepping on each batch
(dictionary_learning's pattern), a JSONL log per trainer, a progress bar with tokens/s and ETA."""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from workbench import distributed
from workbench.runio import JsonlLog
from workbench.sae_ops import Codes

if TYPE_CHECKING:  # sae_lens is heavy to import; the loop only needs the type's name
    from workbench.sae import TrainableSAE


@dataclass
class StepOutput:
    """What one training step produced: the loss, its named parts, and the batch it saw."""
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    acts_BD: torch.Tensor
    recon_BD: torch.Tensor
    latents: torch.Tensor | Codes  # the (B, F) latents, or the TopK family's codes (the matrix made on demand)
    stats: dict = field(default_factory=dict)  # trainer-specific statistics for the log (a number, or a
    # callable giving one: evaluated only on logged steps)

    @property
    def latents_BF(self) -> torch.Tensor:
        return self.latents.latents_BF if isinstance(self.latents, Codes) else self.latents

    def fired_F(self) -> torch.Tensor:
        """Which latents are > 0 somewhere in the batch (the dead-latent counters read it every step). Dense latents:
        their column maxima > 0, one reduction (0.2 ms at 1024 x 2048 bf16, where (latents > 0).any(0) makes a mask
        and reduces it: 2.0 ms); the same answer but for a column holding a NaN, which the loss check stops anyway."""
        if isinstance(self.latents, Codes):
            return self.latents.fired_F()
        return self.latents.detach().amax(dim=0) > 0

    def l0(self) -> torch.Tensor:
        """The mean number of latents > 0 per token; codes count their entries, never making the (B, F) matrix."""
        if isinstance(self.latents, Codes):
            return (self.latents.vals_E > 0).sum() / self.latents.shape[0]
        return (self.latents > 0).sum(-1).float().mean()


class Trainer(Protocol):
    """What the loop needs of a trainer (trainers/base.py implements it; the loop never imports trainers/)."""
    name: str
    sae: TrainableSAE
    optimizer: torch.optim.Optimizer
    dead_mask_F: torch.Tensor

    def step(self, acts_BD: torch.Tensor) -> StepOutput: ...


# Fault injection for the resume tests: the process SIGKILLs itself right after this step completes.
KILL_AT_STEP = int(os.environ.get("SAE_WB_KILL_AT_STEP", "-1"))
KILL_RANK = os.environ.get("SAE_WB_KILL_RANK")  # under torchrun: only this rank dies (unset: every rank)


class TrainingDiverged(RuntimeError):
    """Loss or weights became NaN / inf."""


@torch.no_grad()
def step_record(trainer: Trainer, out: StepOutput, step: int, tokens: int) -> dict:
    """The numbers logged for one step (TRAINERS.md: loss parts, L0, FVU, dead fraction, lr), over the
    global batch under torchrun (every rank calls this at the same steps: it all-reduces)."""
    x, x_hat = out.acts_BD, out.recon_BD
    mean_D = distributed.all_mean(x.mean(0))
    fvu = distributed.all_sum((x - x_hat).pow(2).sum()) / distributed.all_sum((x - mean_D).pow(2).sum()).clamp_min(1e-12)
    rec = {"step": step, "tokens": tokens, "loss": distributed.all_mean(out.loss.detach()).item(),
           **{f"loss_{k}": distributed.all_mean(v.detach()).item() for k, v in out.parts.items()},
           "l0": distributed.all_mean(out.l0()).item(), "fvu": fvu.item(),
           "dead_frac": trainer.dead_mask_F.float().mean().item(),
           "lr": trainer.optimizer.param_groups[0]["lr"]}
    rec.update({k: v() if callable(v) else v for k, v in out.stats.items()})  # a callable: costly, logged steps only
    return rec


def check_finite(trainer: Trainer, out: StepOutput, step: int) -> None:
    loss = distributed.all_mean(out.loss.detach()).item()  # every rank decides alike under torchrun
    if not math.isfinite(loss):
        raise TrainingDiverged(f"trainer '{trainer.name}': loss is {loss} at step {step}; "
                               f"lower trainer.lr or check the activations (normalization scale)")
    if not all(torch.isfinite(p).all() for p in trainer.sae.parameters()):
        raise TrainingDiverged(f"trainer '{trainer.name}': SAE weights became non-finite at step {step}; lower trainer.lr")


def train(trainers: Sequence[Trainer], batches: Iterable[torch.Tensor], total_steps: int, batch_size: int,
          logs: Sequence[JsonlLog | None], every_steps: int, progress: bool = True, wandb_run=None,
          resume: dict | None = None, checkpoint=None, checkpoint_every: int = 0,
          owned: Sequence[bool] | None = None) -> dict:
    """Step every trainer on every batch. Returns throughput numbers for the run's provenance.

    checkpoint(loop_state) is called after every checkpoint_every-th step; resume is such a loop_state.
    Under torchrun each batch is the global one and every trainer steps on this rank's rows of it; with
    sweep_over_ranks a trainer steps (on the whole batch) only where `owned`, and logs where it steps."""
    owned = list(owned) if owned is not None else [True] * len(trainers)
    resume = resume or {}
    step = resume.get("next_step", 0)
    bar = tqdm(total=total_steps * batch_size, initial=step * batch_size, unit="tok", unit_scale=True,
               desc="train", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter() - resume.get("elapsed_s", 0.0)
    last_loss = list(resume.get("last_loss", [math.nan] * len(trainers)))
    last_l0 = list(resume.get("last_l0", [math.nan] * len(trainers)))  # training L0 (batchtopk: k by design)
    step_s = list(resume.get("step_s", [0.0] * len(trainers)))  # time in each trainer's steps: a sweep entry's cost
    for batch_BD in batches:
        if step >= total_steps:
            break
        batch_BD = distributed.local_rows(batch_BD)
        for i, (trainer, log) in enumerate(zip(trainers, logs)):
            if not owned[i]:
                continue
            t_step = time.perf_counter()
            out = trainer.step(batch_BD)
            step_s[i] += time.perf_counter() - t_step
            log_step = step % every_steps == 0 or step == total_steps - 1
            # every logged step; every step under torchrun (the ranks must stop together) or on a bad loss
            if log_step or distributed.ctx().data_parallel or not math.isfinite(out.loss.item()):
                check_finite(trainer, out, step)
            if log_step:
                rec = step_record(trainer, out, step, (step + 1) * batch_size)
                if log is not None:
                    log.write(rec)
                last_loss[i], last_l0[i] = rec["loss"], rec["l0"]
                if wandb_run is not None:
                    wandb_run.log({f"{trainer.name}_{i}/{k}": v for k, v in rec.items()}, step=step)
        step += 1
        bar.update(batch_size)
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
            checkpoint({"next_step": step, "elapsed_s": time.perf_counter() - start, "last_loss": last_loss,
                        "last_l0": last_l0, "step_s": step_s})
        if step == KILL_AT_STEP and KILL_RANK in (None, str(distributed.ctx().rank)):
            os.kill(os.getpid(), signal.SIGKILL)
        if step % every_steps == 0:
            bar.set_postfix(loss=f"{last_loss[0]:.4g}")
    bar.close()
    wall = time.perf_counter() - start
    return {"steps": step, "tokens": step * batch_size, "wall_s": wall,
            "tokens_per_s": step * batch_size / wall if wall > 0 else None, "final_loss": last_loss,
            "final_l0": last_l0,
            "trainer_step_s": step_s}

"""What every trainer shares: config fields, init, the optimizer step with the decoder constraint,
the lr schedule, dead-latent counting, and state for checkpoints. A trainer adds only its loss."""
from __future__ import annotations

from typing import ClassVar

import torch

from workbench import distributed
from workbench.config import TRAINER_CONFIGS, configclass, param
from workbench.cpu_kernels import bf16_matrix_engine
from workbench.sae_ops import (Codes, Encoding, default_lr, encoder_pre_acts, normalize_rows_, remove_parallel_grad_,
                                sparse_step_wanted)
from workbench.training import StepOutput  # noqa: F401  (what a trainer's step returns; the loop reads it)

TRAINERS: dict[str, type["Trainer"]] = {}


def register(cls: type["Trainer"]) -> type["Trainer"]:
    TRAINERS[cls.name] = cls
    cls.Config.name = cls.name
    TRAINER_CONFIGS[cls.name] = cls.Config  # handed to the config loader, which never imports trainers/
    return cls


@configclass
class TrainerConfig:
    lr: float = param(0.0, "Adam learning rate; 0 = 2e-4 / sqrt(d_sae / 2^14) (Gao et al.)", ge=0)
    warmup_steps: int = param(1000, "linear lr warmup steps, capped at warmup_max_frac of all steps", ge=0)
    warmup_max_frac: float = param(0.05, "cap on warmup as a fraction of all steps", ge=0, le=1)
    decay_frac: float = param(0.2, "lr decays linearly to 0 over this last fraction of steps", ge=0, le=1)
    grad_clip: float = param(1.0, "gradient-norm clip (0 = off)", ge=0)
    adam_beta1: float = param(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = param(0.999, "Adam beta2", ge=0, lt=1)
    dead_after_tokens: int = param(0, "a latent is dead after this many tokens without firing; 0 = min(10M, "
                                      "train_tokens/10)", ge=0)
    name: ClassVar[str] = ""

    def validate(self, run) -> None:
        """Checks that relate this trainer's keys to the run's (single-key bounds are pydantic's)."""


def lr_factor(step: int, total_steps: int, warmup: int, decay_frac: float) -> float:
    """Linear warmup over `warmup` steps, flat, then linear decay to 0 over the last decay_frac."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps * (1 - decay_frac)
    if decay_frac > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / (total_steps - decay_start))
    return 1.0


class Trainer:
    name: ClassVar[str]
    Config: ClassVar[type[TrainerConfig]]
    architecture: ClassVar[str]  # SAELens architecture of the SAE this trainer produces
    sparse_codes: ClassVar[bool] = False  # its codes are a selection of entries (TopK family, ReLU, JumpReLU): sparse step possible

    def __init__(self, cfg: TrainerConfig, d_in: int, d_sae: int, total_steps: int, total_tokens: int,
                 init_acts_BD: torch.Tensor, seed: int, device: str | torch.device = "cpu",
                 compute_dtype: str = "float32", sparse_step: str = "off", kernels=None):
        self.cfg, self.total_steps = cfg, total_steps
        # workbench.cpu_kernels' library (CPU runs), or a function that loads it when a step first asks (so runs whose
        # trainers never use it never build it), or None: torch's ops
        self._kernels = kernels
        if compute_dtype not in ("float32", "bfloat16"):  # auto is resolved per device first (workbench.lm)
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
        # bfloat16: the forward (and so its backward) runs under autocast; weights, Adam state, the loss
        # sums and the decoder constraint stay float32
        self.autocast = compute_dtype == "bfloat16"
        # trainers whose codes are a selection (those that set sparse_codes) may take the sparse step (workbench/sae_ops.py)
        self.device_type = torch.device(device).type
        self.sparse_step = self.sparse_codes and sparse_step_wanted(sparse_step, d_sae, compute_dtype,
                                                                    bf16_matrix_engine(self.device_type))
        from workbench.sae import make_sae  # sae_lens: imported when a trainer is made, not with the CLI

        gen = torch.Generator().manual_seed(seed)
        self.sae = make_sae(d_in, d_sae, self.architecture, getattr(cfg, "k", None)).init_tied_(
            gen, b_dec=init_acts_BD.float().mean(0).cpu()).to(device)
        self.lr = cfg.lr or default_lr(d_sae)
        # the SAE's parameters first (their order fixes Adam's state layout), then any the trainer adds
        self.params = [*self.sae.parameters(), *self.extra_parameters(init_acts_BD.to(device))]
        # fused: one kernel per parameter instead of ~10 elementwise passes (CPU and CUDA; same update)
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
        warmup = min(cfg.warmup_steps, int(cfg.warmup_max_frac * total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.decay_frac))
        self.dead_after_tokens = cfg.dead_after_tokens or min(10_000_000, total_tokens // 10)
        self.tokens_since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.step_count = 0

    # ------------------------------------------------------------ what a trainer defines
    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        raise NotImplementedError

    def extra_parameters(self, init_acts_BD: torch.Tensor) -> list[torch.nn.Parameter]:
        """Trained parameters beyond the SAE's (e.g. jumprelu's log-thresholds); made once, at init."""
        return []

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """State updates after the optimizer step (e.g. batchtopk's threshold EMA)."""

    def summary(self) -> dict:
        """Trainer-specific numbers for final_info.json (e.g. the inference threshold)."""
        return {}

    # ------------------------------------------------------------ shared step
    @property
    def dead_mask_F(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.dead_after_tokens

    @property
    def kernels(self):
        """The CPU kernels for this trainer's steps, or None (loaded on first use where given as a function)."""
        if callable(self._kernels):
            self._kernels = self._kernels()
        return self._kernels

    def step(self, acts_BD: torch.Tensor) -> StepOutput:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.loss(acts_BD, self.step_count / max(1, self.total_steps))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        distributed.average_gradients(self.params)  # torchrun: every rank then takes the same step
        remove_parallel_grad_(self.sae.W_dec)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        normalize_rows_(self.sae.W_dec)
        self.after_step(out)
        self.count_step(out)
        return out

    @torch.no_grad()
    def count_step(self, out: StepOutput) -> None:
        """Dead-latent counters and the step count, after every step (over the global batch)."""
        fired_F = distributed.all_max(out.fired_F().to(torch.uint8)).bool()
        self.tokens_since_fired_F += out.acts_BD.shape[0] * distributed.batch_scale()
        self.tokens_since_fired_F[fired_F] = 0
        self.step_count += 1

    def encode(self, acts_BD: torch.Tensor) -> Encoding:
        """The encoder forward, dense always; in the sparse step without autograd (Encoding.codes puts the
        gradient on the selected entries only). b_dec's gradient through the input x - b_dec comes from the
        bias (encoder_pre_acts), so no step pays for the input-gradient matmul."""
        sae = self.sae
        with torch.no_grad():
            sae_in_BD = sae.process_sae_in(acts_BD)  # x - b_dec: sae_lens's input processing (make_sae's cfg)
        pre_BF, bias_F = encoder_pre_acts(sae_in_BD, sae.W_enc, sae.b_enc, sae.b_dec, grad=not self.sparse_step)
        kernels = self.kernels if self.sparse_step and self.device_type == "cpu" else None
        return Encoding(sae.hook_sae_acts_pre(pre_BF), sae_in_BD, sae.W_enc, bias_F, self.sparse_step, kernels)

    def decode(self, codes: Codes) -> torch.Tensor:
        """x_hat = b_dec + sum_i f_i d_i: SAELens's dense decode, or the sparse step's embedding bag."""
        if not codes.sparse:
            return self.sae.decode(codes.latents_BF)
        return codes.decode(self.sae.W_dec).to(self.sae.b_dec.dtype) + self.sae.b_dec

    def artifacts(self) -> dict:
        """Trainer outputs saved with the run for plot.py (e.g. the final momentum vector)."""
        return {}

    # ------------------------------------------------------------ checkpoint state
    def extra_state(self) -> dict:
        """Trainer state beyond SAE/optimizer/scheduler (subclasses extend)."""
        return {"tokens_since_fired_F": self.tokens_since_fired_F, "step_count": self.step_count}

    def load_extra_state(self, state: dict) -> None:
        self.tokens_since_fired_F.copy_(state["tokens_since_fired_F"])
        self.step_count = int(state["step_count"])

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state["extra"])


def reconstruction_loss(acts_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    """L_recon = (1/B) sum_b ||x_b - x_hat_b||^2."""
    return (acts_BD - recon_BD).pow(2).sum(dim=-1).mean()

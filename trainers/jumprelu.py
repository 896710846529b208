"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope), TRAINERS.md section 5.

    f_i  = pre_i * H(pre_i - theta_i),   theta_i = exp(log_theta_i)   (learned, one per latent)
    L    = L_recon + lambda0(p) * (1/B) sum_b sum_i H(pre_bi - theta_i)          lambda0 warmed up
Straight-through gradients, rectangle kernel K(u) = [|u| < 1/2], bandwidth eps:
    d/dtheta_i H(pre_i - theta_i)          := -(1/eps)       K((pre_i - theta_i) / eps)
    d/dtheta_i [pre_i H(pre_i - theta_i)]  := -(theta_i/eps) K((pre_i - theta_i) / eps)
    d/dpre_i   [pre_i H(pre_i - theta_i)]   = H(pre_i - theta_i);   the L0 term sends pre no gradient.

Scale: activations are normalized to E||x||^2 = d, so pre-activations are O(1) (the paper's E||x||^2 = 1
makes them O(1/sqrt(d))): the paper's bandwidth 0.001 corresponds to ~0.001 * sqrt(d) here (0.025 at
d = 640), and the default 0.05 is SAELens's. theta starts data-driven (init_threshold = 0): each latent's
(1 - init_l0 / n) quantile of its pre-activations on the run's first activations, so a short run starts
near the target L0 instead of having to climb there at Adam's ~lr per step in log theta.
Saved as a SAELens `jumprelu` SAE (threshold = theta).

Sparse step (sae.sparse_step, as the TopK family's): the codes are the entries with pre > theta - eps/2, the
active ones and those inside the kernel's window below theta (f = 0 there, but dL/df reaches theta through the
STE), so the decoder is an embedding bag and the encoder's backward touches those entries only; the same loss
and gradients as the dense step (tests/test_sparse_step.py).
"""
from __future__ import annotations


import torch

from trainers.base import StepOutput, Trainer, TrainerConfig, reconstruction_loss, register
from workbench.config import configclass, param
from workbench.sae_ops import Codes, Encoding


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """pre * H(pre - theta) with the straight-through threshold gradient above. theta is theta_F (broadcast over the
    batch: its gradient sums over it) or one value per entry (the sparse step's theta[idx_E])."""

    @staticmethod
    def forward(ctx, pre_BF, theta_F, eps):
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, theta_F = ctx.saved_tensors
        g = grad_BF.float()
        d_pre = (grad_BF * (pre_BF > theta_F)).to(pre_BF.dtype)
        kernel = rectangle((pre_BF.float() - theta_F) / ctx.eps)
        d_theta = -(theta_F / ctx.eps) * (kernel * g).sum_to_size(theta_F.shape)
        return d_pre, d_theta.to(theta_F.dtype), None


class StepFn(torch.autograd.Function):
    """H(pre - theta): the threshold gets -(1/eps) K(.), pre gets nothing."""

    @staticmethod
    def forward(ctx, pre_BF, theta_F, eps):
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return (pre_BF > theta_F).float()  # float32 even under autocast: the L0 sum must stay exact

    @staticmethod
    def backward(ctx, grad_BF):
        pre_BF, theta_F = ctx.saved_tensors
        kernel = rectangle((pre_BF.float() - theta_F) / ctx.eps)
        d_theta = -(1.0 / ctx.eps) * (kernel * grad_BF.float()).sum_to_size(theta_F.shape)
        return None, d_theta.to(theta_F.dtype), None


def window_codes(enc: Encoding, theta_F: torch.Tensor, eps: float) -> tuple[Codes, torch.Tensor]:
    """The sparse step's codes and L0 term: JumpReLUFn and StepFn at the entries with pre > theta - eps/2 only (the
    active ones, and the window below theta where the STE kernel is nonzero): elsewhere f = 0 and the kernel is 0,
    so every other entry sends no gradient in the dense step either. The window's test is the kernel's own."""
    pre_BF, theta = enc.pre_BF, theta_F.detach()
    rows_E, idx_E = ((pre_BF > theta) | (rectangle((pre_BF.float() - theta) / eps) > 0)).nonzero(as_tuple=True)
    # index_select, not []: one summation order in the backward (relu_loss_parts says why)
    pre_E, theta_E = enc.selected_pre(rows_E, idx_E), theta_F.index_select(0, idx_E)
    l_l0 = StepFn.apply(pre_E.detach(), theta_E, eps).sum() / pre_BF.shape[0]
    return Codes(rows_E, idx_E, JumpReLUFn.apply(pre_E, theta_E, eps), tuple(pre_BF.shape), True, kernels=enc.kernels), l_l0


@configclass
class JumpReLUConfig(TrainerConfig):
    l0_coeff: float = param(0.1, "lambda0: weight of the L0 penalty on normalized activations; with init_l0 128, "
                                 "0.1 gives L0 ~32 on the quickstart (0.3 -> 23; see quickstart_jumprelu.toml)", ge=0)
    l0_warmup_frac: float = param(0.05, "lambda0 rises linearly from 0 over this first fraction of training", ge=0, le=1)
    bandwidth: float = param(0.05, "STE kernel bandwidth eps (SAELens's default; the paper's 0.001 is for E||x||^2 = 1)",
                             gt=0)
    init_threshold: float = param(0.0, "initial theta for every latent; 0 = data-driven (see init_l0)", ge=0)
    init_l0: float = param(128.0, "data-driven init: theta_i starts at latent i's (1 - init_l0/n) pre-activation "
                                  "quantile; above the target L0, so the penalty sparsifies from denser codes", gt=0)


@register
class JumpReLUTrainer(Trainer):
    name = "jumprelu"
    Config = JumpReLUConfig
    architecture = "jumprelu"
    sparse_codes = True  # the active entries (and the STE window's) are a selection: the sparse step applies

    def extra_parameters(self, init_acts_BD: torch.Tensor) -> list[torch.nn.Parameter]:
        cfg = self.cfg
        if cfg.init_threshold > 0:
            theta_F = torch.full((self.sae.d_sae,), cfg.init_threshold, device=init_acts_BD.device)
        else:
            with torch.no_grad():
                pre_BF = self.sae.pre_acts(init_acts_BD[:4096].float())
                rank = max(1, round((1 - min(1.0, cfg.init_l0 / self.sae.d_sae)) * pre_BF.shape[0]))
                theta_F = pre_BF.kthvalue(rank, dim=0).values.clamp_min(1e-3)  # exp(log theta) stays positive
        self.log_threshold_F = torch.nn.Parameter(theta_F.log())
        self.sae.threshold.copy_(theta_F)
        return [self.log_threshold_F]

    def l0_coeff_at(self, progress: float) -> float:
        cfg = self.cfg
        return cfg.l0_coeff * (min(1.0, progress / cfg.l0_warmup_frac) if cfg.l0_warmup_frac > 0 else 1.0)

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        eps = self.cfg.bandwidth
        theta_F = self.log_threshold_F.exp()
        enc = self.encode(acts_BD)
        if enc.sparse:
            latents, l_l0 = window_codes(enc, theta_F, eps)
            recon_BD = self.decode(latents)
        else:
            latents = JumpReLUFn.apply(enc.pre_BF, theta_F, eps)
            recon_BD = self.sae.decode(latents)
            l_l0 = StepFn.apply(enc.pre_BF, theta_F, eps).sum(dim=-1).mean()
        l_recon = reconstruction_loss(acts_BD, recon_BD)
        loss = l_recon + self.l0_coeff_at(progress) * l_l0
        return StepOutput(loss, {"recon": l_recon, "l0_penalty": l_l0}, acts_BD, recon_BD, latents,
                          {"threshold_mean": theta_F.mean().item()})

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        self.sae.threshold.copy_(self.log_threshold_F.exp())  # the SAE evaluated and saved uses theta

    def summary(self) -> dict:
        th = self.sae.threshold
        return {"threshold_mean": th.mean().item(), "threshold_median": th.median().item()}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "log_threshold_F": self.log_threshold_F.detach().clone()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        with torch.no_grad():
            self.log_threshold_F.copy_(state["log_threshold_F"])
            self.sae.threshold.copy_(self.log_threshold_F.exp())

"""BatchTopK SAE (Bussmann et al. 2024), TRAINERS.md section 5.

    pre   = ReLU((x - b_dec) W_enc + b_enc)
    f     = pre * [pre is among the k*B largest entries of the batch]      (ties: lower flat index first)
    L     = L_recon + alpha * L_aux                                          (AuxK exactly as topk)
    theta <- beta_theta * theta + (1 - beta_theta) * min{f_bi : f_bi > 0}   every step from threshold_start_step
             (the first update sets theta to that minimum; dictionary_learning's rule)
    beta_theta = min(threshold_beta, 1 - 4 / updates_in_run): the EMA's memory is capped at a quarter of
             the run's updates. dictionary_learning's 0.999 assumes 10k+ steps; on a 390-step run it would
             keep 69% of its weight on the first batches' cutoff (measured here: theta 0.54 where the late
             cutoff is lower, inference L0 16 instead of 32).
    inference: f = pre * [pre > theta]

The SAE is saved as a SAELens `jumprelu` SAE whose threshold is theta for every latent, so sae_lens and
sae_bench load it unchanged. The normalization fold leaves pre-activations, hence theta, unchanged; the
per-latent rescale that hands SAEBench unit decoder rows scales theta with them (evals/sae_bench_bridge).
Training L0 is k by construction; the inference L0 (core eval) shows how well theta stands in for it.
"""
from __future__ import annotations

import torch

from trainers.base import StepOutput, Trainer, reconstruction_loss, register
from trainers.topk import TopKConfig, auxk_loss
from workbench import distributed
from workbench.config import configclass, param
from workbench.sae_ops import Codes, Encoding, batch_topk_mask


def global_batch_topk_mask(act_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """batch_topk_mask over the global batch when torchrun splits it: the k_total-th largest of all
    ranks' entries (it is among the union of each rank's k_total largest), and ties at the cutoff given
    to the lowest global flat indices (rank by rank, as the global batch is laid out)."""
    ctx = distributed.ctx()
    if not ctx.data_parallel:
        return batch_topk_mask(act_BF, k_total)
    flat = act_BF.detach().flatten()
    k_total = min(k_total, flat.numel() * ctx.world)
    candidates = distributed.gather_rows(flat.topk(min(k_total, flat.numel()), sorted=False).values)
    kth = candidates.topk(k_total, sorted=False).values.min()
    keep = flat >= kth
    if int(distributed.all_sum(keep.sum())) > k_total:  # more entries equal the cutoff than places left
        keep = flat > kth
        short = k_total - int(distributed.all_sum(keep.sum()))
        ties = (flat == kth).nonzero().squeeze(1)
        ties_per_rank = distributed.gather_rows(torch.tensor([ties.numel()], device=flat.device))
        take = min(max(0, short - int(ties_per_rank[:ctx.rank].sum())), ties.numel())
        keep.index_fill_(0, ties[:take], True)
    return keep.view_as(act_BF)


def batch_topk_entries(enc: Encoding, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of the entries BatchTopK keeps, row-major: by the CPU kernels in one process (a radix select
    on float32 or bf16 pre-activations; no B x F mask or ReLU'd copy: 3x faster at the quickstart's size, notes.txt
    session 17), else global_batch_topk_mask's."""
    pre_BF = enc.pre_BF.detach()
    if enc.kernels is not None and not distributed.ctx().data_parallel and pre_BF.dtype in (torch.float32, torch.bfloat16):
        from workbench.cpu_kernels import batch_topk_entries as by_kernel
        return by_kernel(enc.kernels, pre_BF.contiguous(), k_total)
    return global_batch_topk_mask(pre_BF.relu(), k_total).nonzero(as_tuple=True)


@configclass
class BatchTopKConfig(TopKConfig):
    k: int = param(32, "mean active latents per token: the batch keeps its k*B largest pre-activations")
    threshold_beta: float = param(0.999, "EMA rate of the inference threshold theta (dictionary_learning's default), "
                                         "capped at 1 - 4/updates so a short run's theta forgets its first batches",
                                  ge=0, lt=1)
    threshold_start_step: int = param(1000, "first step that updates theta, capped at 5% of all steps "
                                            "(dictionary_learning's default 1000)", ge=0)


@register
class BatchTopKTrainer(Trainer):
    name = "batchtopk"
    Config = BatchTopKConfig
    architecture = "jumprelu"
    sparse_codes = True

    def __init__(self, cfg: BatchTopKConfig, **kw):
        super().__init__(cfg, **kw)
        self.threshold_start = min(cfg.threshold_start_step, int(0.05 * self.total_steps))
        self.threshold_updates = 0
        self.threshold_beta = min(cfg.threshold_beta, 1 - 4 / max(8, self.total_steps - self.threshold_start))

    def reconstruction(self, acts_BD: torch.Tensor, codes: Codes):
        """(loss term, its named parts, x_hat): L_recon here; matryoshka sums it over nested prefixes."""
        recon_BD = self.decode(codes)
        l_recon = reconstruction_loss(acts_BD, recon_BD)
        return l_recon, {"recon": l_recon}, recon_BD

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        cfg = self.cfg
        enc = self.encode(acts_BD)
        codes = enc.codes(*batch_topk_entries(enc, cfg.k * acts_BD.shape[0] * distributed.batch_scale()))
        l_recon, parts, recon_BD = self.reconstruction(acts_BD, codes)
        k_aux = cfg.k_aux or acts_BD.shape[1] // 2
        l_aux = auxk_loss((acts_BD - recon_BD).detach(), enc, self.dead_mask_F, k_aux, self.sae.W_dec)
        parts["auxk"] = l_aux
        stats = {"threshold": float(self.sae.threshold[0])}
        return StepOutput(l_recon + cfg.auxk_alpha * l_aux, parts, acts_BD, recon_BD, codes, stats)

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        if self.step_count < self.threshold_start:
            return
        vals_E = out.latents.vals_E.detach()  # the selected entries' values (ReLU'd: 0 where pre <= 0)
        kept = vals_E[vals_E > 0]
        local_min = kept.min().float() if kept.numel() else torch.tensor(float("inf"), device=kept.device)
        smallest = distributed.all_min(local_min)  # over the global batch
        if not torch.isfinite(smallest):
            return
        theta = self.sae.threshold
        if self.threshold_updates == 0:
            theta.fill_(smallest)
        else:
            theta.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * smallest)
        self.threshold_updates += 1

    def summary(self) -> dict:
        return {"inference_threshold": float(self.sae.threshold[0]), "threshold_updates": self.threshold_updates,
                "threshold_beta_used": self.threshold_beta}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "threshold_updates": self.threshold_updates}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.threshold_updates = int(state["threshold_updates"])

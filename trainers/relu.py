"""Standard ReLU SAE with an L1 penalty (the seeds' CustomTrainer), TRAINERS.md section 2.

    f = ReLU(pre)
    L = L_recon + lambda1(p) * (1/B) sum_b sum_i f_bi ||d_i||      lambda1 warmed up over l1_warmup_frac

Sparse step (sae.sparse_step, as the TopK family's): the codes are the active entries (pre > 0; ReLU sends no
gradient elsewhere), so the decoder is an embedding bag and the encoder's backward touches those entries only.
A step whose codes are denser than SPARSE_MAX_DENSITY of its compute dtype (the first steps: half the entries fire
at init) takes the dense step's products instead. Same loss and gradients either way (tests/test_sparse_step.py).
"""
from __future__ import annotations


import torch

from trainers.base import StepOutput, Trainer, TrainerConfig, reconstruction_loss, register
from workbench.config import configclass, param
from workbench.sae_ops import Codes, Encoding

# The share of active entries above which a step's dense products beat the sparse ops, which pay per entry what
# the dense ones pay per latent, by the step's compute dtype and width (at least WIDE_LATENTS latents or not): in
# float32 sparse / dense 0.95x at 10% at the quickstart's size, 1.02x at 8% at Gemma-2's (AVX2; notes.txt, session
# 17); in bf16 (AVX512-BF16, the encoder bias set for each density; session 22, the bag on the CPU kernels)
# 1.16x at 4.2%, 1.09x at 5.6%, 0.95x at 7.0% at the quickstart's 2048 latents, and 1.31x at 1.7%, 0.93x at 2.9% at
# Gemma-2's 16384, whose decoder's rows the sparse ops gather from memory rather than cache
SPARSE_MAX_DENSITY = {("float32", False): 0.08, ("float32", True): 0.08,
                      ("bfloat16", False): 0.05, ("bfloat16", True): 0.025}
WIDE_LATENTS = 8192


def sparse_max_density(compute_dtype: str, d_sae: int) -> float:
    return SPARSE_MAX_DENSITY[(compute_dtype, d_sae >= WIDE_LATENTS)]


@configclass
class ReLUConfig(TrainerConfig):
    l1_coeff: float = param(0.5, "lambda1: weight of the decoder-norm-weighted L1 penalty, on normalized activations (E||x||^2 = d); 0.5 gives L0 ~75 on the quickstart", ge=0)
    l1_warmup_frac: float = param(0.05, "lambda1 rises linearly from 0 over this first fraction of training", ge=0, le=1)


def l1_coeff_at(cfg: ReLUConfig, progress: float) -> float:
    if cfg.l1_warmup_frac <= 0:
        return cfg.l1_coeff
    return cfg.l1_coeff * min(1.0, progress / cfg.l1_warmup_frac)


def relu_latents(trainer: Trainer, enc: Encoding) -> Codes | torch.Tensor:
    """f = ReLU(pre): the active entries as codes in a sparse step while they are few enough to gain, else the dense
    (B, F) latents."""
    if enc.sparse:
        B, F = enc.pre_BF.shape
        codes = enc.positive_codes(int(sparse_max_density("bfloat16" if trainer.autocast else "float32", F) * B * F))
        if codes is not None:
            return codes
    return trainer.sae.activate(enc.dense_pre())


def relu_loss_parts(trainer: Trainer, acts_BD: torch.Tensor, progress: float):
    """The ReLU + L1 objective's pieces (latents: codes or the dense matrix, as relu_latents gives them); shared by
    trainers whose base SAE is ReLU."""
    latents = relu_latents(trainer, trainer.encode(acts_BD))
    norms_F = trainer.sae.W_dec.norm(dim=1)
    if isinstance(latents, Codes):
        recon_BD = trainer.decode(latents)
        # index_select, not []: its backward (an index_add) sums a latent's entries in one order, where []'s accumulating
        # index_put sums them in a different order each run on a CPU once they pass torch's parallel grain (a run would
        # not reproduce its own weights; tests/test_sparse_step.py)
        l_sparsity = (latents.vals_E * norms_F.index_select(0, latents.idx_E)).sum() / acts_BD.shape[0]
    else:
        recon_BD = trainer.sae.decode(latents)
        # sum_b sum_i f_bi ||d_i|| summed by latents first: one pass over the (B, F) latents (column sums, float32) and
        # a dot, where (latents * norms_F) made a float32 (B, F) product forward and two (B, F) products backward: the
        # quickstart's dense bf16 forward + backward 28.8 -> 26.7 ms (interleaved medians); d/df is n_i / B broadcast.
        # A mul and a sum, not a matmul: autocast would take a matmul to bf16
        l_sparsity = (latents.sum(dim=0, dtype=torch.float32) * norms_F).sum() / acts_BD.shape[0]
    l_recon = reconstruction_loss(acts_BD, recon_BD)
    parts = {"recon": l_recon, "l1": l_sparsity}
    return parts, l_recon + l1_coeff_at(trainer.cfg, progress) * l_sparsity, latents, recon_BD


@register
class ReLUTrainer(Trainer):
    name = "relu"
    Config = ReLUConfig
    architecture = "standard"
    sparse_codes = True  # the active entries are a selection (relu_latents)

    def loss(self, acts_BD: torch.Tensor, progress: float) -> StepOutput:
        parts, loss, latents, recon_BD = relu_loss_parts(self, acts_BD, progress)
        return StepOutput(loss, parts, acts_BD, recon_BD, latents)

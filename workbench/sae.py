"""The SAE model: weights, activation functions, the decoder constraint, and SAELens-format save/load.

Shapes: B batch, D d_in (d_model), F latents (d_sae).
    pre_BF   = (x_BD - b_dec) @ W_enc + b_enc
    f_BF     = act(pre_BF)                      act = ReLU, TopK_k(ReLU(.)), or JumpReLU_theta
    x_hat_BD = f_BF @ W_dec + b_dec
JumpReLU (SAELens "jumprelu"): f_i = ReLU(pre_i) * [pre_i > theta_i]; theta is a per-latent buffer (the
batchtopk/matryoshka inference threshold, or the jumprelu trainer's learned threshold).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SAE_LENS_FORMAT_VERSION = "6.0.0"  # the SAELens on-disk cfg layout this file follows

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
ARCHITECTURES = ("standard", "topk", "jumprelu")  # SAELens names: ReLU SAE = "standard"


def topk_relu(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of ReLU(pre) per row; zero the rest."""
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter_(-1, idx, vals.relu())


def batch_topk_relu(pre_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """Keep the k_total largest entries of ReLU(pre) over the whole batch, zero the rest; among entries
    equal to the smallest kept value, lower flat indices win (deterministic under bfloat16 ties)."""
    act_BF = pre_BF.relu()
    k_total = min(k_total, act_BF.numel())
    kth = kth_largest(act_BF.detach(), k_total)
    flat = act_BF.detach().flatten()
    keep = flat >= kth
    if int(torch.count_nonzero(keep)) > k_total:  # more entries equal the cutoff than places left
        keep = flat > kth
        short = k_total - int(torch.count_nonzero(keep))
        ties = (flat == kth).nonzero().squeeze(1)[:short]  # lowest flat indices first
        keep.index_fill_(0, ties, True)
    return torch.where(keep.view_as(act_BF), act_BF, 0.0)


def kth_largest(x_BF: torch.Tensor, k_total: int) -> torch.Tensor:
    """The k_total-th largest entry of x. Selected among each row's top r = 4 k_total / B entries when that
    provably holds it (every row's r-th largest is below the candidates' k-th, so no entry left out can
    reach it); else by a selection over the whole batch. 3.5x faster at B 2048 x n 4096, same value."""
    B, F = x_BF.shape
    r = min(F, 4 * -(-k_total // B))
    if r < F:
        row_top_Br = x_BF.topk(r, dim=1, sorted=False).values
        kth = row_top_Br.flatten().topk(k_total, sorted=False).values.min()
        if bool((row_top_Br.min(dim=1).values < kth).all()):
            return kth
    return x_BF.flatten().topk(k_total, sorted=False).values.min()


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture '{architecture}'; known: {ARCHITECTURES}")
        if architecture == "topk" and not (k and 0 < k <= d_sae):
            raise ValueError(f"topk SAE needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if architecture == "jumprelu":  # a buffer: trainers set it (EMA or exp of a learned log-threshold)
            self.register_buffer("threshold", torch.zeros(d_sae, **kw))

    @torch.no_grad()
    def init_tied_(self, generator: torch.Generator, b_dec: torch.Tensor | None = None) -> "SAE":
        """W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0, b_dec = given (data mean)."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(self.d_in))
        return self

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return (x_BD - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            return topk_relu(pre_BF, self.k)
        if self.architecture == "jumprelu":
            return pre_BF.relu() * (pre_BF > self.threshold)
        return pre_BF.relu()

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x_BD))

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_BD))

    # ------------------------------------------------------------ normalization fold
    @torch.no_grad()
    def folded(self, scale: float) -> "SAE":
        """An SAE on raw activations equal to this one on scale * x, mapped back by 1 / scale.

        (s x - b) W_enc = (x - b/s)(s W_enc), and x_hat_raw = (f W_dec + b) / s.
        """
        out = SAE(self.d_in, self.d_sae, self.architecture, self.k, self.W_enc.dtype, self.W_enc.device)
        out.W_enc.copy_(self.W_enc * scale)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / scale)
        out.b_dec.copy_(self.b_dec / scale)
        if self.architecture == "jumprelu":
            out.threshold.copy_(self.threshold)  # pre is unchanged by the fold, so is theta
        return out

    # ------------------------------------------------------------ SAELens on-disk format
    def save(self, path: str | Path, metadata: dict) -> Path:
        """cfg.json + sae_weights.safetensors, loadable by sae_lens.SAE.load_from_disk as is."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().to(torch.float32).contiguous().cpu() for n, p in self.state_dict().items()}
        save_file(tensors, str(path / SAE_WEIGHTS))
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none",
               # sae_lens reads a cfg without sae_lens_version as pre-6.0 and drops the metadata
               "metadata": {"sae_lens_version": SAE_LENS_FORMAT_VERSION, **metadata}}
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        (path / SAE_CFG).write_text(json.dumps(cfg, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "SAE":
        path = Path(path)
        if not (path / SAE_CFG).is_file() or not (path / SAE_WEIGHTS).is_file():
            raise FileNotFoundError(f"no SAE at '{path}': expected {SAE_CFG} and {SAE_WEIGHTS} (a run's sae/ folder)")
        cfg = json.loads((path / SAE_CFG).read_text())
        sae = cls(cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg.get("k"), device=device)
        sae.load_state_dict({k: v.to(device) for k, v in load_file(str(path / SAE_WEIGHTS)).items()})
        return sae


# ---------------------------------------------------------------- decoder constraint (TRAINERS.md)

@torch.no_grad()
def remove_parallel_grad_(W_dec: nn.Parameter) -> None:
    """Before the optimizer step: drop each row's gradient component along the (unit) row."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec


@torch.no_grad()
def normalize_rows_(W_dec: nn.Parameter) -> None:
    """After the optimizer step: put every decoder row back on the unit sphere."""
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling: 2e-4 / sqrt(n / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# ---------------------------------------------------------------- decoder geometry

@torch.no_grad()
def max_cosine(W_dec_FD: torch.Tensor, members: torch.Tensor | None = None, absolute: bool = False,
               block: int = 2048, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each latent i in `members` (default: all): (max over j in members, j != i, of d_i . d_j, that j),
    cosines of the unit decoder rows; |d_i . d_j| with absolute=True. Row blocks of `block` keep memory at
    block x |members|: no n x n tensor. dtype: the matmul's (e.g. bfloat16 for a fast argmax search)."""
    unit_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx_K = torch.arange(unit_FD.shape[0], device=unit_FD.device) if members is None else members
    unit_KD = unit_FD[idx_K].to(dtype or unit_FD.dtype)
    values_K = torch.empty(len(idx_K), dtype=torch.float32, device=unit_FD.device)
    where_K = torch.empty(len(idx_K), dtype=torch.long, device=unit_FD.device)
    for s in range(0, len(idx_K), block):
        cos_RK = unit_KD[s:s + block] @ unit_KD.T
        if absolute:
            cos_RK.abs_()
        rows = torch.arange(cos_RK.shape[0], device=cos_RK.device)
        cos_RK[rows, rows + s] = float("-inf")  # j != i
        top = cos_RK.max(dim=1)
        values_K[s:s + block], where_K[s:s + block] = top.values.float(), idx_K[top.indices]
    return values_K, where_K

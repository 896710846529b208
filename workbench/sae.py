"""The SAE model: sae_lens's own SAE classes, with what training adds (a deterministic tied init,
pre-activations, the activation applied to given pre-activations, the normalization fold).

Shapes: B batch, D d_in (d_model), F latents (d_sae).
    pre_BF   = (x_BD - b_dec) @ W_enc + b_enc
    f_BF     = act(pre_BF)                      act = ReLU, TopK_k(ReLU(.)), or JumpReLU_theta
    x_hat_BD = f_BF @ W_dec + b_dec
Architectures use SAELens's names: "standard" (ReLU), "topk", "jumprelu" (f_i = ReLU(pre_i) [pre_i >
theta_i]; theta is the batchtopk / matryoshka inference threshold or the jumprelu trainer's learned one).
sae_lens writes cfg.json (save_model) and reads it back (SAE.load_from_disk), so the on-disk format
follows the installed sae_lens, and sae_bench takes these objects as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import SAE as LensSAE
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import nn

from workbench.sae_ops import topk_relu

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"


class TrainableSAE:
    """Mixed in before a sae_lens SAE class. Parameters start at zero, made in the order W_enc, b_enc,
    W_dec, b_dec (the optimizer's and the gradient clip's order, so weights stay bit-identical to the
    workbench's own module before it), and without drawing from the global RNG as sae_lens's
    kaiming init would; init_tied_ then sets them from a seeded generator."""

    cfg: TopKSAEConfig | StandardSAEConfig | JumpReLUSAEConfig

    def initialize_weights(self) -> None:
        kw = dict(dtype=self.dtype, device=self.device)
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    @property
    def architecture(self) -> str:
        return self.cfg.architecture()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | None:
        return getattr(self.cfg, "k", None)

    @torch.no_grad()
    def init_tied_(self, generator: torch.Generator, b_dec: torch.Tensor | None = None) -> "TrainableSAE":
        """W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0, b_dec = given (data mean)."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(self.d_in))
        return self

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The encoder's affine map, through sae_lens's input processing and hook (as its encode)."""
        return self.hook_sae_acts_pre(self.process_sae_in(x_BD) @ self.W_enc + self.b_enc)

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ normalization fold
    @torch.no_grad()
    def folded(self, scale: float, metadata: dict | None = None) -> "TrainableSAE":
        """An SAE on raw activations equal to this one on scale * x, mapped back by 1 / scale.

        (s x - b) W_enc = (x - b/s)(s W_enc), and x_hat_raw = (f W_dec + b) / s. Pre-activations are
        unchanged by the fold, so is a JumpReLU threshold.
        """
        out = make_sae(self.d_in, self.d_sae, self.architecture, self.k, self.W_enc.dtype, self.W_enc.device,
                       metadata if metadata is not None else self.cfg.metadata.to_dict())
        out.load_state_dict({**self.state_dict(), "W_enc": self.W_enc * scale, "W_dec": self.W_dec / scale,
                             "b_dec": self.b_dec / scale})
        return out

    # ------------------------------------------------------------ SAELens on-disk format
    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """cfg.json and sae_weights.safetensors, written by sae_lens's save_model (from a CPU copy);
        metadata, if given, is added to the cfg's."""
        path = Path(path)
        out = self
        if metadata or self.W_enc.device.type != "cpu":
            out = self.folded(1.0, {**self.cfg.metadata.to_dict(), **(metadata or {})}).to("cpu")
        out.save_model(path)
        return path


class TrainableStandardSAE(TrainableSAE, StandardSAE):
    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return pre_BF.relu()


class TrainableTopKSAE(TrainableSAE, TopKSAE):
    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return topk_relu(pre_BF, self.cfg.k)


class TrainableJumpReLUSAE(TrainableSAE, JumpReLUSAE):
    def initialize_weights(self) -> None:
        super().initialize_weights()
        # a buffer, not a parameter: trainers set it (EMA or exp of a learned log-threshold)
        self.register_buffer("threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return pre_BF.relu() * (pre_BF > self.threshold)


ARCHITECTURES = {"standard": (TrainableStandardSAE, StandardSAEConfig), "topk": (TrainableTopKSAE, TopKSAEConfig),
                 "jumprelu": (TrainableJumpReLUSAE, JumpReLUSAEConfig)}


def make_sae(d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             metadata: dict | None = None) -> TrainableSAE:
    """A zero-initialized SAE of a SAELens architecture; metadata goes into its cfg (and cfg.json)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture '{architecture}'; known: {tuple(ARCHITECTURES)}")
    if architecture == "topk" and not (k and 0 < k <= d_sae):
        raise ValueError(f"topk SAE needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
    cls, cfg_cls = ARCHITECTURES[architecture]
    extra = {"k": k, "rescale_acts_by_decoder_norm": False} if architecture == "topk" else {}
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, dtype=str(dtype).removeprefix("torch."), device=str(device),
                  apply_b_dec_to_input=True, normalize_activations="none", reshape_activations="none",
                  metadata=SAEMetadata(**(metadata or {})), **extra)
    return cls(cfg)


def load_sae(path: str | Path, device: str = "cpu") -> TrainableSAE:
    """A run's sae/ folder, read by sae_lens, as a TrainableSAE (same weights, metadata and cfg)."""
    path = Path(path)
    if not (path / SAE_CFG).is_file() or not (path / SAE_WEIGHTS).is_file():
        raise FileNotFoundError(f"no SAE at '{path}': expected {SAE_CFG} and {SAE_WEIGHTS} (a run's sae/ folder)")
    lens = LensSAE.load_from_disk(path, device=device)
    sae = make_sae(lens.cfg.d_in, lens.cfg.d_sae, lens.cfg.architecture(), getattr(lens.cfg, "k", None),
                   device=device, metadata=lens.cfg.metadata.to_dict())
    sae.load_state_dict(lens.state_dict())
    return sae

"""From context windows to shuffled, normalized SAE batches.

- `harvest`: LM forward (stopped at the hook's layer) over batches of contexts; yields the hook's
  activations at non-special positions as float32 (N, D) chunks.
- `mixing_buffer`: shuffles tokens across many contexts before they form SAE batches.
- `ActivationScaler`: the one scalar s with E||s x||^2 = d (TRAINERS.md), estimated once per run.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


def special_mask(tokens_BT: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True where the token is BOS / EOS / pad."""
    return torch.isin(tokens_BT, torch.tensor(special_ids, device=tokens_BT.device))


@torch.no_grad()
def hook_activations(model, tokens_BT: torch.Tensor, hook: str, layer: int) -> torch.Tensor:
    """The hook's activations (B, T, D), running the LM only up to the hook's layer."""
    captured = {}

    def grab(act, hook):  # noqa: ARG001 (TransformerLens hook signature)
        captured["act"] = act
        return act

    model.run_with_hooks(tokens_BT.to(model.cfg.device), stop_at_layer=layer + 1, fwd_hooks=[(hook, grab)])
    return captured["act"]


def harvest(model, contexts: Iterable[torch.Tensor], hook: str, layer: int, llm_batch_size: int,
            special_ids: list[int], out_device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    it = iter(contexts)
    while batch := list(itertools.islice(it, llm_batch_size)):
        tokens_BT = torch.stack(batch)
        acts_BTD = hook_activations(model, tokens_BT, hook, layer)
        keep_BT = ~special_mask(tokens_BT, special_ids).to(acts_BTD.device)
        yield acts_BTD[keep_BT].to(device=out_device, dtype=torch.float32)


def mixing_buffer(chunks: Iterable[torch.Tensor], buffer_tokens: int, batch_size: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield shuffled (batch_size, D) batches. The buffer fills to buffer_tokens, is shuffled, and its
    first half is emitted while the second half stays to mix with fresh tokens (SAELens's scheme).
    Every input token is emitted exactly once; a final remainder smaller than a batch is dropped."""
    buf: torch.Tensor | None = None
    pending: list[torch.Tensor] = []
    n_pending = 0

    def shuffled(x: torch.Tensor) -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=generator).to(x.device)]

    for chunk in chunks:
        pending.append(chunk)
        n_pending += chunk.shape[0]
        have = n_pending + (0 if buf is None else buf.shape[0])
        if have < buffer_tokens:
            continue
        buf = shuffled(torch.cat(([buf] if buf is not None else []) + pending))
        pending, n_pending = [], 0
        n_out = (buf.shape[0] // 2) // batch_size * batch_size or buf.shape[0] // batch_size * batch_size
        for i in range(0, n_out, batch_size):
            yield buf[i:i + batch_size]
        buf = buf[n_out:]
    rest = torch.cat(([buf] if buf is not None else []) + pending) if (buf is not None or pending) else None
    if rest is not None and rest.shape[0] >= batch_size:
        rest = shuffled(rest)
        for i in range(0, rest.shape[0] // batch_size * batch_size, batch_size):
            yield rest[i:i + batch_size]


@dataclass
class ActivationScaler:
    """x -> s * x with E||s x||^2 = d_in, so one set of hyperparameters fits every model and layer."""
    scale: float = 1.0

    @classmethod
    def estimate(cls, acts_ND: torch.Tensor) -> "ActivationScaler":
        mean_sq_norm = acts_ND.double().pow(2).sum(dim=-1).mean().item()
        return cls(scale=(acts_ND.shape[-1] / mean_sq_norm) ** 0.5)

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        return acts * self.scale

"""The run's activation stream: text -> LM hook -> chunks in the LM's dtype, or the same chunks from the cache.

`LazyLM` loads the model on first use (a warm-cache run without LM-based evals never loads it);
`ActivationStream` yields the chunks in harvest order, read ahead in a background thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import torch
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.util import str_to_dtype

from workbench import distributed
from workbench.config import RunConfig


def train_texts(cfg: RunConfig, epochs: list[int]):
    """Training documents, cycled (reshuffled each pass) if train_tokens outlasts the corpus."""
    from workbench.text import DataError, documents

    while True:
        n = 0
        for text in documents(cfg.data, held_out=False, seed=cfg.seed + epochs[0]):
            n += 1
            yield text
        if n == 0:
            raise DataError(f"dataset '{cfg.data.dataset}' gave no training documents")
        epochs[0] += 1


class LazyLM:
    """Loads the LM on first use, timed as the "model load" phase (on `device`: this rank's under torchrun):
    `get()` the TransformerLens model (evals), `hook_forward()` the training harvest's forward, which may
    be the HuggingFace model cut after the hook's layer (workbench/lm.py, model.harvest)."""

    def __init__(self, cfg: RunConfig, phases, device: torch.device | None = None):
        self.cfg, self.model, self.load_s, self.phases, self.device = cfg, None, 0.0, phases, device
        self.model_cfg = cfg.model if device is None else dataclasses.replace(cfg.model, device=str(device))
        self._hook_forward = None

    def _timed_load(self, load):
        start = time.perf_counter()
        with self.phases("model load"):
            loaded = load(self.model_cfg)
        self.load_s += time.perf_counter() - start
        return loaded

    def get(self):
        if self.model is None:
            from workbench.lm import load_lm
            self.model = self._timed_load(load_lm)
        return self.model

    def hook_forward(self):
        if self._hook_forward is None:
            from workbench.lm import harvest_path, load_hook_forward
            tl = self.get() if harvest_path(self.model_cfg) == "transformer_lens" else None
            self._hook_forward = self._timed_load(lambda c: load_hook_forward(c, tl))
        return self._hook_forward

    def drop_hook_forward(self) -> None:
        """After training: free a separate harvest model (the evals load TransformerLens's)."""
        self._hook_forward = None


def stream_tokens(cfg: RunConfig) -> int:
    """Tokens a run can pull from the stream: training, plus what the mixing buffer holds, plus a margin."""
    d = cfg.data
    return (cfg.total_steps + d.buffer_batches) * cfg.sae.batch_size + 2 * d.llm_batch_size * d.context_size


def stream_description(cfg: RunConfig, device: torch.device) -> dict:
    """Everything that changes the stream's activations: the cache key is its hash."""
    from workbench.lm import harvest_label

    d = cfg.data
    return {"model": cfg.model.name, "hook": cfg.model.hook, "llm_dtype": cfg.model.dtype,
            "harvest": harvest_label(cfg.model, device),
            "device_type": device.type, "dataset": d.dataset, "split": d.split, "text_field": d.text_field,
            "embedded_sources": d.embedded_sources, "eval_fraction": d.eval_fraction,
            "context_size": d.context_size, "llm_batch_size": d.llm_batch_size, "seed": cfg.seed,
            "tokens": stream_tokens(cfg)}


def read_ahead_depth(prefetch_chunks: int | str, device: torch.device) -> int:
    """data.prefetch_chunks resolved: auto reads 2 chunks ahead on a GPU (the CPU is free to feed it while
    the kernels run) and none on a CPU, where the reader's threads would take the cores the SAE step uses."""
    if prefetch_chunks == "auto":
        return 2 if device.type == "cuda" else 0
    return prefetch_chunks


class ActivationStream:
    """The run's activation chunks (in the LM's dtype, harvest order): read from the cache when a complete entry
    exists for this key, else produced by the LM (and stored when caching is on). skip_chunks drops the
    chunks a resumed run already consumed (from the LM: without running it on them).

    Under torchrun every rank gets the same chunks: from the cache, each reads the entry (rank 0 checks
    it); from the LM, each harvests its share of the LM batches (read ahead in a thread, no collectives
    there) and the shares are all-gathered in order in the consuming thread; rank 0 stores the entry."""

    def __init__(self, cfg: RunConfig, lm: LazyLM, device: torch.device, skip_chunks: int = 0):
        from workbench.activations import harvest
        from workbench.cache import ActivationCache, cache_key
        from workbench.lm import cache_root, special_token_ids
        from workbench.text import context_windows

        d = cfg.data
        self.n_tokens = stream_tokens(cfg)
        describe = stream_description(cfg, device)
        self.key = cache_key(describe)
        root = Path(cfg.cache.dir) if cfg.cache.dir else cache_root(cfg.model) / "activations"
        self.cache = ActivationCache(root, int(cfg.cache.max_gb * 2**30))
        self.writer = self.prefetch = None
        self.read_ahead = read_ahead_depth(d.prefetch_chunks, device)
        dist_ctx = distributed.ctx()
        meta = None
        if cfg.cache.enabled:  # one rank checks (and clears a broken entry); every rank reads a good one
            meta = distributed.broadcast_object(self.cache.load_meta(self.key) if dist_ctx.main else None)
        if meta is not None:
            self.source = f"cache:{self.key}"
            self.chunks = itertools.islice(self.cache.read(self.key, meta, device), skip_chunks, None)
            self._read_ahead(self.read_ahead)
            return
        self.source = "lm"
        self.epochs = [0]
        if dist_ctx.distributed and not dist_ctx.main:
            distributed.barrier()  # rank 0 loads first: a first run converts the embedded weights once, not N times
        hook_forward = lm.hook_forward()
        if dist_ctx.distributed and dist_ctx.main:
            distributed.barrier()
        special = special_token_ids(hook_forward.tokenizer)
        contexts = context_windows(train_texts(cfg, self.epochs), hook_forward.tokenizer, d.context_size)
        contexts = itertools.islice(contexts, skip_chunks * d.llm_batch_size, None)
        if dist_ctx.distributed:  # LM batch g is harvested by rank g % N
            every = contexts
            per_batch = iter(lambda: list(itertools.islice(every, d.llm_batch_size)), [])
            contexts = itertools.chain.from_iterable(distributed.sharded_batches(per_batch, skip_chunks))
        self._raw = harvest(hook_forward, contexts, d.llm_batch_size, special, out_device=device)
        self.chunks = self._raw
        if dist_ctx.distributed:
            self._read_ahead(self.read_ahead)  # this rank's LM work, ahead; the gathers stay in this thread
            self._raw = self.chunks = distributed.gathered_chunks(
                self.chunks, skip_chunks, hook_forward.d_model,
                torch.empty(0, device=device, dtype=str_to_dtype(cfg.model.dtype)))
        bytes_needed = self.n_tokens * hook_forward.d_model * (2 if cfg.model.dtype != "float32" else 4)
        if cfg.cache.enabled and skip_chunks == 0 and bytes_needed <= self.cache.max_bytes:
            store = str_to_dtype(cfg.model.dtype)  # the chunks' own dtype
            # under torchrun only rank 0 stores; the others count the same tokens, so all stop together
            self.writer = self.cache.writer(self.key, self.n_tokens, describe, store, dry=not dist_ctx.main)
            self.chunks = self.writer.wrap(self._raw)
        if not dist_ctx.distributed:
            self._read_ahead(self.read_ahead)

    def _read_ahead(self, depth: int) -> None:
        """Produce the next chunks in a background thread while the trainers step (same order): the LM
        forward (or the cache read) for the next chunks overlaps the SAE steps on the current ones; torch
        releases the GIL in its kernels."""
        if depth > 0:
            self.prefetch = self.chunks = PrefetchingIterator(self.chunks, prefetch=depth)

    def close(self) -> None:
        """Stop reading ahead (the thread exits; fetched-ahead chunks are dropped, and they are already
        in the cache entry being written) and abandon an unfinished cache entry. Safe to call twice."""
        if self.prefetch is not None:
            self.prefetch.close()
        if self.writer is not None:
            self.writer.abandon()

    def finish(self) -> None:
        """After training: complete and publish the cache entry (a few more LM batches at most). Under
        torchrun the read-ahead (before the gathers) runs until the entry is complete, then stops."""
        if self.prefetch is not None and not distributed.ctx().distributed:
            self.prefetch.close()
        if self.writer is not None and self.writer.finish(self._raw) and distributed.ctx().main:
            self.source = f"lm (stored as cache:{self.key})"
        if self.prefetch is not None:
            self.prefetch.close()

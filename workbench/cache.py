"""Activation cache: the first run writes the hook's activations (in harvest order) as raw shards; a
later run with the same key memory-maps them instead of running the LM.

Layout: <root>/<key>/shard_00000.bin ... + meta.json. meta.json is written last (atomically) and names
every shard with its byte size and xxh3-128 digest (non-cryptographic: it guards against torn or
corrupt files, not tampering, and runs at memory speed so a warm load of a large entry stays cheap): an
entry without it, whose shards do not match it, or whose digests were written by an older version
(blake2b), is partial, corrupt or old and is rebuilt, never used. Activations are stored in the LM's dtype
(bfloat16 stays bfloat16: lossless, half the bytes), so a warm run sees bit-identical inputs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import xxhash
from sae_lens.util import dtype_to_str, str_to_dtype

from workbench.runio import atomic_write_json

FORMAT_VERSION = 1  # of the key's contents; bumping it orphans every entry (left to eviction)
DIGEST = "xxh3_128"  # meta.json names it; an entry with another (or none) is rebuilt
SHARD_TOKENS = 65_536
_NP_VIEW = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


def cache_key(parts: dict) -> str:
    """Hash of everything that changes the activations (model, hook, dtype, text, split, windows, budget)."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class ActivationCache:
    def __init__(self, root: str | Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def entry(self, key: str) -> Path:
        return self.root / key

    # ------------------------------------------------------------ reading
    def load_meta(self, key: str, verify: bool = True) -> dict | None:
        """meta.json of a complete, intact entry; None (after removing the debris) otherwise."""
        d = self.entry(key)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)  # partial: a writer died before finishing
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("digest_algorithm") != DIGEST:
                raise ValueError(f"written by an older version (digests not {DIGEST})")
            for s in meta["shards"]:
                p = d / s["file"]
                if not p.is_file() or p.stat().st_size != s["bytes"] or (verify and _digest(p) != s["digest"]):
                    raise ValueError(f"shard {s['file']} does not match meta.json")
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"activation cache {d.name}: not usable ({e}); rebuilding")
            shutil.rmtree(d, ignore_errors=True)
            return None
        meta_path.touch()  # recency for eviction
        return meta

    def read(self, key: str, meta: dict, device="cpu") -> Iterator[torch.Tensor]:
        """Chunks (n, d) in the stored dtype (the LM's), with the same boundaries and order as when written."""
        dtype = str_to_dtype(meta["dtype"])
        arrays = [np.memmap(self.entry(key) / s["file"], dtype=_NP_VIEW[dtype], mode="r", shape=(s["tokens"], meta["d"]))
                  for s in meta["shards"]]
        shard, offset = 0, 0
        for size in meta["chunk_sizes"]:
            pieces = []
            while size > 0:
                take = min(size, arrays[shard].shape[0] - offset)
                pieces.append(torch.from_numpy(np.array(arrays[shard][offset:offset + take])))  # copy out of the read-only map
                size, offset = size - take, offset + take
                if offset == arrays[shard].shape[0]:
                    shard, offset = shard + 1, 0
            yield torch.cat(pieces).view(dtype).to(device=device)

    # ------------------------------------------------------------ writing
    def writer(self, key: str, n_tokens: int, describe: dict, store_dtype: torch.dtype,
               dry: bool = False) -> "CacheWriter":
        return CacheWriter(self, key, n_tokens, describe, store_dtype, dry)

    def _publish(self, key: str, tmp: Path, meta: dict) -> None:
        atomic_write_json(tmp / "meta.json", meta)
        target = self.entry(key)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        self.evict(keep=key)

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries until the cache fits max_bytes."""
        if not self.max_bytes:
            return
        entries = []
        for d in self.root.iterdir():
            meta = d / "meta.json"
            if d.is_dir() and meta.is_file():
                size = sum(f.stat().st_size for f in d.iterdir())
                entries.append((meta.stat().st_mtime, d, size))
        total = sum(s for _, _, s in entries)
        for _, d, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if d.name != keep:
                shutil.rmtree(d, ignore_errors=True)
                total -= size


class CacheWriter:
    """Pass chunks through unchanged while storing the first n_tokens; `finish(rest)` drains the source
    until the entry is complete and publishes it (atomic rename). Abandoned entries leave nothing.
    dry: count the same tokens and stop at the same point, writing nothing (torchrun ranks other than 0)."""

    def __init__(self, cache: ActivationCache, key: str, n_tokens: int, describe: dict, store_dtype: torch.dtype,
                 dry: bool = False):
        self.cache, self.key, self.n_tokens, self.describe, self.dtype = cache, key, n_tokens, describe, store_dtype
        self.dry = dry
        if not dry:
            cache.root.mkdir(parents=True, exist_ok=True)
        self.tmp = None if dry else Path(tempfile.mkdtemp(dir=cache.root, prefix=f".{key}-"))
        self.shards, self.buf, self.buf_n, self.stored, self.sizes, self.d = [], [], 0, 0, [], None
        self.published = False

    def _flush(self) -> None:
        block = torch.cat(self.buf).to(self.dtype).cpu().contiguous()
        name = f"shard_{len(self.shards):05d}.bin"
        raw = block.view(torch.uint8) if self.dtype != torch.float32 else block
        raw.numpy().tofile(self.tmp / name)
        self.shards.append({"file": name, "tokens": block.shape[0], "bytes": (self.tmp / name).stat().st_size,
                            "digest": _digest(self.tmp / name)})
        self.buf, self.buf_n = [], 0

    def add(self, chunk: torch.Tensor) -> None:
        take = chunk[: self.n_tokens - self.stored]
        if self.published or take.shape[0] == 0:
            return
        self.d = take.shape[1]
        if self.dry:
            self.stored += take.shape[0]
            self.published = self.stored >= self.n_tokens
            return
        self.buf.append(take)
        self.sizes.append(take.shape[0])
        self.buf_n += take.shape[0]
        self.stored += take.shape[0]
        if self.buf_n >= SHARD_TOKENS or self.stored >= self.n_tokens:
            self._flush()
        if self.stored >= self.n_tokens:
            self.cache._publish(self.key, self.tmp, {
                "key": self.key, "describe": self.describe, "dtype": dtype_to_str(self.dtype), "d": self.d,
                "tokens": self.stored, "chunk_sizes": self.sizes, "shards": self.shards, "created": time.time(),
                "digest_algorithm": DIGEST})
            self.published = True

    def wrap(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for chunk in chunks:
            self.add(chunk)
            yield chunk

    def finish(self, rest: Iterator[torch.Tensor]) -> bool:
        """Consume the rest of the source until the entry is complete. False if the source ran dry."""
        for chunk in rest:
            if self.published:
                break
            self.add(chunk)
        self.abandon()
        return self.published

    def abandon(self) -> None:
        if not self.published and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

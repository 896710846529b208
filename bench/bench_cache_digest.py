"""Warm-load cost of verifying an activation-cache entry: the shard digests of the old code (blake2b)
against the current one (xxh3-128), on one entry of --gb gigabytes written like a real one (shards of
SHARD_TOKENS tokens), read from the page cache as a warm run would. Prints both and their ratio.

    python bench/bench_cache_digest.py --gb 1.5
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workbench.cache import SHARD_TOKENS, ActivationCache, _digest  # noqa: E402


def blake2b_digest(path: Path) -> str:  # the digest before xxh3 (workbench/cache.py until session 5)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5, help="entry size in GB")
    ap.add_argument("--d", type=int, default=2304, help="d_model (2304 = gemma-2-2b)")
    args = ap.parse_args()
    n_tokens = int(args.gb * 1e9 / (2 * args.d))  # bfloat16 activations
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        cache = ActivationCache(tmp)
        w = cache.writer("bench", n_tokens, {}, torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        chunk = torch.randn(SHARD_TOKENS, args.d, generator=gen)
        t = time.perf_counter()
        while not w.published:
            w.add(chunk)
        print(f"wrote {n_tokens:,} tokens x {args.d} bf16 in {time.perf_counter() - t:.1f} s")
        files = sorted((Path(tmp) / "bench").glob("shard_*.bin"))
        size = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache, as a run that just wrote or read the entry has
            f.read_bytes()
        rows = []
        for name, fn in [("blake2b (before)", blake2b_digest), ("xxh3_128 (now)", _digest)]:
            t = time.perf_counter()
            for f in files:
                fn(f)
            rows.append((name, time.perf_counter() - t))
        t = time.perf_counter()
        assert cache.load_meta("bench") is not None
        full = time.perf_counter() - t
        print(f"entry: {size / 1e9:.2f} GB in {len(files)} shards")
        for name, sec in rows:
            print(f"  {name:18s} {sec:6.2f} s  {size / 1e9 / sec:5.2f} GB/s")
        print(f"  ratio before/now   {rows[0][1] / rows[1][1]:.1f}x;  load_meta (verify) {full:.2f} s")


if __name__ == "__main__":
    main()

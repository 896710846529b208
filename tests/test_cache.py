"""Activation cache: exact round trip with chunk boundaries, corrupt and partial entries rebuilt, eviction."""
import json

import pytest
import torch

from workbench.cache import ActivationCache, cache_key


def chunks(seed=0, sizes=(700, 1300, 90, 2500), d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, d, generator=g).bfloat16().float() for s in sizes]  # bf16-representable, like a bf16 LM


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float32])
def test_round_trip_keeps_values_and_chunk_boundaries(tmp_path, monkeypatch, store):
    import workbench.cache as wc
    monkeypatch.setattr(wc, "SHARD_TOKENS", 1000)  # several shards (a shard holds whole chunks)
    cache = ActivationCache(tmp_path)
    src = chunks()
    w = cache.writer("k1", 3000, {"what": "test"}, store)
    passed = list(w.wrap(iter(src[:2])))
    assert all(a is b for a, b in zip(passed, src[:2]))  # pass-through is unchanged
    assert w.finish(iter(src[2:]))
    meta = cache.load_meta("k1")
    assert meta["tokens"] == 3000 and meta["chunk_sizes"] == [700, 1300, 90, 910] and [s["tokens"] for s in meta["shards"]] == [2000, 1000]
    got = list(cache.read("k1", meta))
    assert [g.shape[0] for g in got] == [700, 1300, 90, 910] and all(g.dtype == store for g in got)
    torch.testing.assert_close(torch.cat(got).float(), torch.cat(src)[:3000], rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_corrupt_and_partial_entries_are_rebuilt_not_used(tmp_path):
    cache = ActivationCache(tmp_path)
    w = cache.writer("k", 1000, {}, torch.bfloat16)
    w.finish(iter(chunks()))
    shard = tmp_path / "k" / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert cache.load_meta("k") is None and not (tmp_path / "k").exists()
    w = cache.writer("k", 1000, {}, torch.bfloat16)
    w.finish(iter(chunks()))
    (tmp_path / "k" / "shard_00000.bin").write_bytes(b"short")  # truncated
    assert cache.load_meta("k") is None
    (tmp_path / "p").mkdir()  # a writer that died before meta.json
    (tmp_path / "p" / "shard_00000.bin").write_bytes(b"x")
    assert cache.load_meta("p") is None and not (tmp_path / "p").exists()


def test_entry_with_old_blake2b_digests_is_rebuilt_not_misread(tmp_path, capsys):
    """An entry written before the xxh3 digests (meta.json with blake2b digests, no algorithm named) is
    intact but unverifiable by the new code: it is reported and removed, and the run rebuilds it."""
    import hashlib
    cache = ActivationCache(tmp_path)
    cache.writer("k", 1000, {}, torch.bfloat16).finish(iter(chunks()))
    meta_path = tmp_path / "k" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["digest_algorithm"] == "xxh3_128"
    for s in meta["shards"]:  # rewrite it as the old version did
        s["digest"] = hashlib.blake2b((tmp_path / "k" / s["file"]).read_bytes(), digest_size=16).hexdigest()
    del meta["digest_algorithm"]
    meta_path.write_text(json.dumps(meta))
    assert cache.load_meta("k") is None and not (tmp_path / "k").exists()
    assert "older version" in capsys.readouterr().out


def test_source_running_dry_publishes_nothing(tmp_path):
    cache = ActivationCache(tmp_path)
    w = cache.writer("k", 10_000, {}, torch.bfloat16)
    assert not w.finish(iter(chunks()))
    assert cache.load_meta("k") is None and list(tmp_path.iterdir()) == []


def test_eviction_keeps_newest_within_limit(tmp_path):
    import os
    import time
    per_entry = 1000 * 8 * 2
    cache = ActivationCache(tmp_path, max_bytes=int(2.5 * per_entry) + 3000)
    for i, key in enumerate(["a", "b", "c"]):
        cache.writer(key, 1000, {}, torch.bfloat16).finish(iter(chunks(i)))
        os.utime(tmp_path / key / "meta.json", (time.time() + i, time.time() + i))
    cache.evict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_key_covers_every_part():
    base = {"model": "m", "hook": "h", "llm_dtype": "bfloat16", "dataset": "embedded", "context_size": 128, "tokens": 10}
    keys = {cache_key(base)}
    for k, v in [("model", "m2"), ("hook", "h2"), ("llm_dtype", "float32"), ("dataset", "x"),
                 ("context_size", 64), ("tokens", 11)]:
        keys.add(cache_key({**base, k: v}))
    assert len(keys) == 7
    assert cache_key(dict(reversed(list(base.items())))) == cache_key(base)


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    import os

    from workbench.runio import atomic_write_json
    target = tmp_path / "final_info.json"
    atomic_write_json(target, {"a": 1})

    def broken_replace(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2, "b": float("inf")})
    assert json.loads(target.read_text()) == {"a": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["final_info.json"]  # no temp debris

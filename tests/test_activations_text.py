"""Mixing buffer, special-token masking, context packing and the held-out split."""
import pytest
import torch

from workbench.activations import harvest, mixing_buffer, special_mask
from workbench.config import ModelConfig
from workbench.lm import TLHookForward
from workbench.text import context_windows, documents, is_held_out, split_embedded
from workbench.config import DataConfig


def test_mixing_buffer_emits_every_token_once_and_mixes():
    n, bs = 1000, 32
    data = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    chunks = list(data.split(50))  # chunk = one "context's" tokens, in order
    out = torch.cat(list(mixing_buffer(chunks, buffer_tokens=256, batch_size=bs, generator=torch.Generator().manual_seed(0))))
    ids = out[:, 0].long()
    assert out.shape[0] == n // bs * bs
    assert len(set(ids.tolist())) == out.shape[0]  # no token twice
    first = ids[:bs]
    assert len(set((first // 50).tolist())) >= 4  # the first batch mixes several contexts


def test_special_mask():
    t = torch.tensor([[2, 5, 1, 7], [2, 0, 9, 9]])
    assert special_mask(t, [0, 1, 2]).tolist() == [[True, False, True, False], [True, True, False, False]]


class CharTok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_context_windows_pack_with_bos_and_eos():
    wins = list(context_windows(["abcdef", "xyz"], CharTok(), context_size=4))
    assert all(w[0].item() == 1 and w.shape == (4,) for w in wins)
    flat = [x for w in wins for x in w[1:].tolist()]
    assert flat == [ord(c) for c in "abcdef"] + [2] + [ord(c) for c in "xy"]  # last partial window dropped


def test_harvest_drops_special_positions():
    from tests.helpers import tiny_lm
    model = tiny_lm()
    ctx = [torch.tensor([1, 5, 6, 2, 7]), torch.tensor([1, 8, 9, 10, 11])]
    hook_forward = TLHookForward(model, ModelConfig(name="tiny", hook="blocks.0.hook_resid_post"))
    acts = torch.cat(list(harvest(hook_forward, ctx, 2, [0, 1, 2])))
    assert acts.shape == (7, 16)
    _, cache = model.run_with_cache(torch.stack(ctx))
    ref = cache["blocks.0.hook_resid_post"]
    torch.testing.assert_close(acts[:3], ref[0, [1, 2, 4]])


def test_held_out_split_is_stable_disjoint_and_sized():
    ids = [f"wiki:{i}" for i in range(4000)]
    held = [i for i in ids if is_held_out(i, 0.05)]
    assert held == [i for i in ids if is_held_out(i, 0.05)]
    assert 150 < len(held) < 250
    cfg = DataConfig(dataset="embedded", embedded_sources=["tiny"], eval_fraction=0.1)
    train, test = set(documents(cfg, False, seed=0)), set(documents(cfg, True, seed=0))
    assert train and test and not train & test


def test_split_embedded_formats():
    assert split_embedded("wiki", '<doc id="1">A\nB</doc>\n<doc id="2"> C </doc>') == ["A\nB", "C"]
    assert split_embedded("tiny", "one<|endoftext|>\ntwo\n<|endoftext|>") == ["one", "two"]
    assert split_embedded("c4", "a\n\nb\n") == ["a", "b"]


def test_mixing_buffer_state_round_trip_resumes_exactly():
    import copy

    from workbench.activations import MixingBuffer
    chunks = list(torch.randn(2000, 4).split(70))
    whole = list(MixingBuffer(300, 32, torch.Generator().manual_seed(1)).batches(iter(chunks)))
    for stop in (1, 5, 17, 40):
        mb = MixingBuffer(300, 32, torch.Generator().manual_seed(1))
        it = mb.batches(iter(chunks))
        head = [next(it) for _ in range(stop)]
        state = copy.deepcopy(mb.state_dict())
        fresh = MixingBuffer(300, 32, torch.Generator())
        fresh.load_state_dict(state)
        tail = list(fresh.batches(iter(chunks[state["chunks_consumed"]:])))
        assert len(head) + len(tail) == len(whole)
        for a, b in zip(head + tail, whole):
            assert torch.equal(a, b)


def test_read_ahead_keeps_order_and_loses_nothing_on_close_and_reraises():
    """The stream reads ahead with sae_lens's PrefetchingIterator over the cache writer's pass-through:
    items come in source order; after close() every item the thread pulled has been seen by the writer
    (so the cache entry misses nothing) and the rest of the source is untouched; a source error reaches
    the consumer."""
    import time

    from sae_lens.training.prefetch import PrefetchingIterator

    src, seen = iter(range(10)), []

    def writer_wrap(it):  # what CacheWriter.wrap does: record, then pass on
        for x in it:
            seen.append(x)
            yield x

    p = PrefetchingIterator(writer_wrap(src), prefetch=2)
    got = [next(p), next(p)]
    deadline = time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < deadline:  # let it fill its queue (polled: CI machines are slow)
        time.sleep(0.01)
    p.close()
    assert not p._thread.is_alive()
    assert got == [0, 1] and len(seen) >= 4 and seen + list(src) == list(range(10))  # nothing lost or repeated
    assert list(PrefetchingIterator(iter(range(7)), prefetch=3)) == list(range(7))

    def broken():
        yield 1
        raise ValueError("disk gone")

    p = PrefetchingIterator(broken())
    assert next(p) == 1
    with pytest.raises(ValueError, match="disk gone"):
        next(p)


def test_read_ahead_close_after_the_source_ran_out_with_a_full_queue():
    """The producer finishing while nobody reads (training done, queue full) must not hang close()."""
    import threading
    import time

    from sae_lens.training.prefetch import PrefetchingIterator

    src = iter(range(2))
    p = PrefetchingIterator(src, prefetch=2)
    deadline = time.monotonic() + 10
    while p._queue.qsize() < 2 and time.monotonic() < deadline:  # the source is exhausted; the queue is full;
        time.sleep(0.01)                                         # the end marker waits
    done = threading.Event()
    threading.Thread(target=lambda: (p.close(), done.set()), daemon=True).start()
    assert done.wait(5), "close() hung"
    assert list(src) == [] and not p._thread.is_alive()

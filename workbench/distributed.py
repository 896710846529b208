"""Data parallelism over torch.distributed, launched by torchrun (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node=N experiment.py --out_dir=run_1 --config ...

Every rank runs the same program. The LM harvest is split (rank r runs LM batches r, r+N, ...) and the
chunks are all-gathered in harvest order, so every rank holds the same mixing buffer and draws the same
global batch; each rank then trains on its own rows of it (sae.batch_size is the global batch). The
loss of rank r is written so that the mean over ranks of the per-rank losses is the single-process loss
on the global batch, and the gradients are averaged: per-token means need nothing; statistics of the
whole batch (AuxK's denominator, BatchTopK's threshold, co-firing pairs, C2R's activation mass) come
from the collectives below. With one process (no torchrun) every helper here is the identity, so a
single-process run is bit-for-bit what it was.

`sweep_over_ranks`: each rank steps its own share of a sweep's trainers on the whole global batch (no
gradient averaging; trainer i lives on rank i % N), and rank 0 collects their states at checkpoints and
at the end.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    data_parallel: bool = False  # trainers split each batch across ranks (False: one process, or sweep_over_ranks)
    data_group: object = None    # a second group for the harvest's gathers
    device: str = ""             # this rank's device spec under torchrun ('' = the config's)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_CTX = Context()


def ctx() -> Context:
    return _CTX


def launched() -> bool:
    """True under torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_spec: str, sweep_over_ranks: bool) -> tuple[Context, str]:
    """Join the process group torchrun set up; returns the context and this rank's device spec
    (cuda:LOCAL_RANK on a GPU node). NCCL for CUDA devices, gloo for CPU."""
    global _CTX, _reporting
    _reporting = False
    if not launched():
        _CTX = Context()
        return _CTX, device_spec
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if device_spec not in ("auto", "cuda"):
            raise ValueError(f"config key 'model.device' = '{device_spec}' pins one GPU, but torchrun places "
                             f"rank r on cuda:LOCAL_RANK; use model.device=auto or cuda")
        torch.cuda.set_device(local_rank)
        device_spec = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    import signal
    signal.signal(signal.SIGTERM, _stopped)  # a one-line error and failed.txt, not a silent death
    _CTX = Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                   data_parallel=not sweep_over_ranks, data_group=dist.new_group(), device=device_spec)
    return _CTX, device_spec


class Stopped(Exception):
    """torchrun stopped this rank (SIGTERM), as it does to every rank once one has failed."""


_reporting = False  # set once this rank is reporting an error: a SIGTERM then must not cut the report short


def reporting() -> None:
    """This rank is on its way out with an error; from here a SIGTERM is ignored (the report takes ms)."""
    global _reporting
    _reporting = True


def _stopped(signum, frame):  # noqa: ARG001
    # torchrun's SIGTERM often lands while this rank is already handling the collective error that the
    # dead peer caused (gloo's "Connection reset by peer"); a Stopped raised there would replace the
    # report with a traceback. Handled exceptions are visible here, so that window is closed too.
    handled = sys.exc_info()[1]
    if _reporting or (handled is not None and from_collective(handled)):
        return
    reporting()
    raise Stopped("torchrun stopped this rank after another one failed")


def from_collective(error: BaseException) -> bool:
    """Whether an error was raised inside a torch.distributed call (a peer rank died, or the network)."""
    if not _CTX.distributed:
        return False
    import traceback
    return isinstance(error, (dist.DistError, Stopped)) or any(
        "torch/distributed/" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def let_rank0_report(seconds: float = 30.0) -> None:
    """On a non-zero rank that is about to exit on an error: wait, so that rank 0 prints the error and
    marks the run failed first. torchrun stops every rank as soon as one exits, and a rank that meets
    the same error a moment sooner would otherwise end rank 0 mid-report. torchrun ends this wait as
    soon as rank 0 exits; the bound only matters when rank 0 did not fail."""
    if launched() and os.environ.get("RANK", "0") != "0":
        time.sleep(seconds)


def shutdown() -> None:
    global _CTX
    if dist.is_initialized():
        dist.destroy_process_group()
    _CTX = Context()


# ---------------------------------------------------------------- collectives over the training ranks
# Identity unless trainers split the batch across ranks (data_parallel).

def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """op over ranks, into a new tensor (no gradient); the identity unless data-parallel."""
    if not _CTX.data_parallel:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=op)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_mean(t: torch.Tensor) -> torch.Tensor:
    return all_sum(t) / _CTX.world if _CTX.data_parallel else t


def all_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_min(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MIN)


def all_sum_differentiable(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward sums the ranks' gradients: a term computed from it identically on
    every rank (replicated) gets, after gradient averaging, the single-process gradient."""
    if not _CTX.data_parallel:
        return t
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows and every other's, concatenated in rank order: the global batch's rows."""
    if not _CTX.data_parallel:
        return t
    parts = [torch.empty_like(t) for _ in range(_CTX.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def batch_scale() -> int:
    """Global batch rows per local row: N when data-parallel, else 1."""
    return _CTX.world if _CTX.data_parallel else 1


def local_rows(batch_BD: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the global batch."""
    if not _CTX.data_parallel:
        return batch_BD
    b = batch_BD.shape[0] // _CTX.world
    return batch_BD[_CTX.rank * b:(_CTX.rank + 1) * b]


def average_gradients(params: list[torch.Tensor]) -> None:
    """Mean of every rank's gradients, in one flat all-reduce."""
    if not _CTX.data_parallel:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= _CTX.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# ---------------------------------------------------------------- the sharded harvest

def _gather_variable(chunk: torch.Tensor | None, d: int, like: torch.Tensor, group) -> list[torch.Tensor | None]:
    """Every rank's chunk (None where a rank has none left), in rank order."""
    n = torch.tensor([-1 if chunk is None else chunk.shape[0]], device=like.device)
    sizes = [torch.empty_like(n) for _ in range(_CTX.world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    rows = max(max(sizes), 1)
    mine = torch.zeros(rows, d, dtype=like.dtype, device=like.device)
    if chunk is not None:
        mine[:chunk.shape[0]] = chunk
    parts = [torch.empty_like(mine) for _ in range(_CTX.world)]
    dist.all_gather(parts, mine, group=group)
    return [None if s < 0 else p[:s] for p, s in zip(parts, sizes)]


def sharded_batches(batches: Iterator, first: int) -> Iterator:
    """This rank's share of a stream of LM batches: global batch g (counting from `first`, the batches a
    resumed run already consumed) is run by rank g % N."""
    if not _CTX.distributed:
        yield from batches
        return
    for g, batch in enumerate(batches, start=first):
        if g % _CTX.world == _CTX.rank:
            yield batch


def gathered_chunks(own: Iterator[torch.Tensor], first: int, d: int, like: torch.Tensor) -> Iterator[torch.Tensor]:
    """All ranks' harvested chunks in global order (the chunk of LM batch g comes from rank g % N), the
    same sequence on every rank and the same as one process harvesting everything."""
    if not _CTX.distributed:
        yield from own
        return
    while True:
        got = _gather_variable(next(own, None), d, like, _CTX.data_group)
        # slot j of this round is global batch first + t*N + j, harvested by rank (first + j) % N
        ordered = [got[(first + j) % _CTX.world] for j in range(_CTX.world)]
        for chunk in ordered:
            if chunk is None:
                return
            yield chunk


def barrier() -> None:
    if _CTX.distributed:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's obj on every rank (the identity with one process)."""
    if not _CTX.distributed:
        return obj
    box = [obj if _CTX.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_keyed(mine: dict) -> dict | None:
    """The union on rank 0 of every rank's {key: value} (None on the others): e.g. each trainer's state
    from the rank that steps it."""
    if not _CTX.distributed:
        return dict(mine)
    parts = [None] * _CTX.world if _CTX.main else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if _CTX.main else None

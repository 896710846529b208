"""One run, start to end: activations -> trainers on one shared stream -> SAE files -> evals -> final_info.json.

Data flows one way through the pieces named below; the trainers and evals come in as arguments
(`make_trainer`, `evaluate`) from the layer above, so nothing here imports trainers/ or evals/.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from transformers import set_seed

from workbench.activations import ActivationScaler, MixingBuffer
from workbench import distributed
from workbench.config import RunConfig, config_to_dict, sweep_runs, to_toml
from workbench.lm import (bf16_native, cache_root, cpu_kernels_for, harvest_label, machine_name, resolve_auto_dtypes,
                          resolve_device)
from workbench.phases import Phases
from workbench.record import absorption_null_control, final_info
from workbench.rundir import CHECKPOINT, FINAL_INFO, save_checkpoint, trim_log
from workbench.runio import JsonlLog, atomic_write_json, atomic_write_text
from workbench.stream import ActivationStream, LazyLM
from workbench.training import train

# make_trainer(trainer_cfg, d_in=, d_sae=, total_steps=, total_tokens=, init_acts_BD=, seed=, device=, compute_dtype=,
#              sparse_step=, kernels=)
MakeTrainer = Callable[..., object]
# evaluate(cfg, model, saes, artifacts_dir, phases) -> (per SAE {final_info key: result}, skipped {name: reason})
Evaluate = Callable[..., tuple[list[dict], dict]]


def first_batches(stream: ActivationStream, cfg: RunConfig, mixbuf: MixingBuffer):
    """A fresh run: the scale is estimated on the first norm_tokens, which then train too.
    Returns (d_in, scaler, normalized first tokens for data-driven inits, normalized batches)."""
    first, n_first = [], 0
    while n_first < cfg.data.norm_tokens:
        first.append(next(stream.chunks))
        n_first += first[-1].shape[0]
    first_ND = torch.cat(first)
    scaler = ActivationScaler.estimate(first_ND)
    batches = (scaler(b) for b in mixbuf.batches(itertools.chain(first, stream.chunks)))
    return first_ND.shape[1], scaler, scaler(first_ND), batches


def run(cfg: RunConfig, out_dir: Path, overwrite: bool, command: list[str], make_trainer: MakeTrainer,
        evaluate: Evaluate, ckpt: dict | None = None) -> list[tuple[Path, dict]]:
    """Train the config's trainer (and its sweep entries) on one activation stream; evaluate; write
    one run directory per trainer. Returns [(run_dir, final_info)]. With ckpt, continue that run.

    Under torchrun (workbench/distributed.py) every rank runs this; rank 0 alone writes files, shows
    progress and evaluates; the other ranks return [] once training and the cache entry are done."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    set_seed(cfg.seed)  # python, numpy, torch and CUDA generators: code we do not own draws from them
    dctx = distributed.ctx()
    device = resolve_device(dctx.device or cfg.model.device)
    dtype_auto = dtype_choice(cfg, device)
    cfg = resolve_auto_dtypes(cfg, device)  # from here on (config.toml, cache keys, trainers) concrete dtypes
    phases = Phases(["model load", "training", *cfg.eval.types],
                    cache_root(cfg.model) / "phase_times.json" if dctx.main else None,  # rank 0 alone writes
                    setup_key=json.dumps([cfg.model.name, cfg.model.hook, cfg.model.dtype, device.type,
                                          cfg.data.train_tokens, cfg.sae.d_sae, len(cfg.sweep) + 1, dctx.world]),
                    enabled=cfg.log.progress and dctx.main)
    lm = LazyLM(cfg, phases, device)
    mixbuf = MixingBuffer(cfg.data.buffer_batches * cfg.sae.batch_size, cfg.sae.batch_size,
                          torch.Generator().manual_seed(cfg.seed))
    runs = sweep_runs(cfg, out_dir)

    # ---- activations: from the cache when a previous run stored this stream, else from the LM
    if ckpt is None:
        stream = ActivationStream(cfg, lm, device)
        d_in, scaler, init_acts, batches = first_batches(stream, cfg, mixbuf)
        for run_dir, run_cfg in runs if dctx.main else []:  # created once the model and data are known to work
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.toml", to_toml(config_to_dict(run_cfg)))
    else:
        mixbuf.load_state_dict(ckpt["buffer"])
        stream = ActivationStream(cfg, lm, device, skip_chunks=mixbuf.chunks_consumed)
        d_in, scaler = ckpt["d_in"], ActivationScaler(ckpt["scale"])
        init_acts = torch.zeros(1, d_in)  # overwritten by the checkpoint's weights
        batches = (scaler(b) for b in mixbuf.batches(stream.chunks))
        for run_dir, _ in runs if dctx.main else []:
            trim_log(run_dir / "train_log.jsonl", ckpt["loop"]["next_step"])

    # ---- trainers: all step on each batch (sweep_over_ranks: trainer i steps on rank i % N)
    owned = [dctx.data_parallel or i % dctx.world == dctx.rank for i in range(len(runs))]
    trainers = [make_trainer(run_cfg.trainer, d_in=d_in, d_sae=cfg.sae.d_sae, total_steps=cfg.total_steps,
                             total_tokens=cfg.total_steps * cfg.sae.batch_size, init_acts_BD=init_acts,
                             seed=cfg.seed, device=device, compute_dtype=cfg.sae.compute_dtype,
                             sparse_step=cfg.sae.sparse_step, kernels=lambda: cpu_kernels_for(cfg.model, device))
                for _, run_cfg in runs]
    if ckpt is not None:
        for trainer, state in zip(trainers, ckpt["trainers"]):
            trainer.load_state_dict(state)
    del init_acts

    # rank 0 writes every log; a sweep_over_ranks trainer stepping elsewhere logs into a buffer that
    # reaches rank 0 at each checkpoint and at the end
    sweep_over_ranks = dctx.distributed and not dctx.data_parallel
    logs = [JsonlLog(run_dir / "train_log.jsonl") if dctx.main else RecordBuffer() if own and sweep_over_ranks
            else None for (run_dir, _), own in zip(runs, owned)]

    def checkpoint(loop_state: dict) -> None:
        """Everything a resumed run needs to continue bit for bit (sweep_over_ranks: the states and log
        lines of trainers on other ranks are collected first; every rank takes part)."""
        states = collect_states(trainers, owned, logs)
        if dctx.main:
            save_checkpoint(out_dir, {"cfg": cfg, "d_in": d_in, "scale": scaler.scale, "loop": loop_state,
                                      "buffer": mixbuf.state_dict(), "trainers": states, "world_size": dctx.world})

    wandb_run = None
    if cfg.log.wandb and dctx.main:
        import wandb
        wandb_run = wandb.init(project=cfg.log.wandb_project, name=out_dir.name, config=config_to_dict(cfg))
    try:
        with phases("training"):
            stats = train(trainers, batches, cfg.total_steps, cfg.sae.batch_size, logs, cfg.log.every_steps,
                          progress=cfg.log.progress and dctx.main, wandb_run=wandb_run,
                          resume=ckpt["loop"] if ckpt else None, checkpoint=checkpoint,
                          checkpoint_every=cfg.log.checkpoint_every, owned=owned)
        if sweep_over_ranks:  # every trainer's final state and numbers on rank 0
            states = collect_states(trainers, owned, logs)
            for trainer, state, own in zip(trainers, states or [], owned):
                if not own:
                    trainer.load_state_dict(state)
            stats = merge_sweep_stats(stats, owned)
    except BaseException:
        stream.close()  # the read-ahead thread and the LM it holds go now, not at exit
        raise
    finally:
        for log in logs:
            if log is not None:
                log.close()
    stream.finish()
    lm.drop_hook_forward()
    if not dctx.main:
        return []
    train_s = time.perf_counter() - t0 - lm.load_s

    # ---- SAE files on raw activations (normalization folded in), then all SAEs evaluated together
    saes = [save_sae(trainer, run_dir, run_cfg, scaler.scale) for (run_dir, run_cfg), trainer in zip(runs, trainers)]
    results, skipped = [{} for _ in runs], {}
    if cfg.eval.types:
        results, skipped = evaluate(cfg, lm.get(), saes, out_dir / "eval_artifacts", phases)
    wall = time.perf_counter() - t0

    # ---- the record: final_info.json last (its presence means the run finished)
    provenance = {
        "model": cfg.model.name, "hook": cfg.model.hook, "llm_dtype": cfg.model.dtype,
        "sae_compute_dtype": cfg.sae.compute_dtype, "dtype_auto": dtype_auto, "device": str(device),
        "machine": machine_name(device),
        "harvest_forward": harvest_label(cfg.model, device), "dataset": cfg.data.dataset,
        "embedded_sources": cfg.data.embedded_sources if cfg.data.dataset == "embedded" else None,
        "context_size": cfg.data.context_size, "train_tokens": stats["tokens"], "seed": cfg.seed,
        "normalization_scale": scaler.scale, "activation_source": stream.source,
        "read_ahead_chunks": stream.read_ahead, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
        "resumed_from_step": ckpt["loop"]["next_step"] if ckpt else None,
        "wall_time_s": wall, "model_load_s": lm.load_s, "train_wall_s": train_s,
        "train_tokens_per_s": stats["tokens_per_s"], "eval_wall_s": wall - lm.load_s - train_s,
        "trainers_on_stream": [str(r.name) for r, _ in runs], "started_utc": started,
        "command": " ".join(["python", "experiment.py", *command])}
    control = absorption_null_control([r for r, _ in runs], [c.trainer.name for _, c in runs], results)
    out = []
    for i, ((run_dir, run_cfg), trainer) in enumerate(zip(runs, trainers)):
        final = final_info(run_cfg, trainer, i, stats, results[i], skipped, provenance, control)
        atomic_write_json(run_dir / FINAL_INFO, final)
        out.append((run_dir, final))
    (out_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: final_info.json and sae/ are the result
    return out


def dtype_choice(cfg: RunConfig, device: torch.device) -> str | None:
    """What dtype = auto chose and why (None where no dtype key is auto), said once on stderr with the progress
    output (an error stays the only line a run without it prints)."""
    auto = [key for key, value in (("model.dtype", cfg.model.dtype), ("sae.compute_dtype", cfg.sae.compute_dtype))
            if value == "auto"]
    if not auto:
        return None
    native, why = bf16_native(device)
    choice = f"{' and '.join(auto)} = auto -> {'bfloat16' if native else 'float32'} ({why})"
    if cfg.log.progress and distributed.ctx().main:
        print(choice, file=sys.stderr)
    return choice


class RecordBuffer:
    """A log for a trainer stepping on a rank other than 0 (sweep_over_ranks): its records wait here
    until collect_states hands them to rank 0's log."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    def close(self) -> None:
        pass


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def collect_states(trainers: list, owned: list[bool], logs: list) -> list | None:
    """Every trainer's state on rank 0 (None elsewhere). With sweep_over_ranks each trainer's state (and
    the log lines it wrote since the last call) comes from the rank that steps it; every rank calls this."""
    dctx = distributed.ctx()
    if not dctx.distributed or dctx.data_parallel:
        return [t.state_dict() for t in trainers] if dctx.main else None
    mine = {i: (_to_cpu(t.state_dict()), logs[i].drain() if isinstance(logs[i], RecordBuffer) else [])
            for i, t in enumerate(trainers) if owned[i]}
    merged = distributed.gather_keyed(mine)
    if merged is None:
        return None
    for i, (_, records) in merged.items():
        for record in records:
            logs[i].write(record)
    return [merged[i][0] for i in range(len(trainers))]


def merge_sweep_stats(stats: dict, owned: list[bool]) -> dict:
    """sweep_over_ranks: each trainer's last loss, L0 and step time from the rank that stepped it."""
    keys = ("final_loss", "final_l0", "trainer_step_s")
    merged = distributed.gather_keyed({i: [stats[k][i] for k in keys] for i, own in enumerate(owned) if own})
    if merged is None:
        return stats
    return {**stats, **{k: [merged[i][j] for i in range(len(owned))] for j, k in enumerate(keys)}}


def save_sae(trainer, run_dir: Path, run_cfg: RunConfig, scale: float):
    """The trained SAE in SAELens format, taking raw activations; trainer artifacts beside it."""
    sae = trainer.sae.folded(scale, {"model_name": run_cfg.model.name, "hook_name": run_cfg.model.hook,
                                     "hook_head_index": None, "prepend_bos": True,
                                     "context_size": run_cfg.data.context_size, "dataset_path": run_cfg.data.dataset,
                                     "trainer": run_cfg.trainer.name, "normalization_scale_folded": scale,
                                     "exclude_special_tokens": True}).eval()
    sae.save(run_dir / "sae")
    if artifacts := trainer.artifacts():
        atomic_write_json(run_dir / "trainer_artifacts.json", {"trainer": run_cfg.trainer.name, **artifacts})
    return sae

"""One run, start to end: activations -> trainers on one shared stream -> SAE files -> evals -> final_info.json.

Data flows one way through the pieces named below; the trainers and evals come in as arguments
(`make_trainer`, `evaluate`) from the layer above, so nothing here imports trainers/ or evals/.
"""
from __future__ import annotations

import itertools
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from transformers import set_seed

from workbench.activations import ActivationScaler, MixingBuffer
from workbench.config import RunConfig, config_to_dict, sweep_runs, to_toml
from workbench.lm import cache_root, resolve_device
from workbench.phases import Phases
from workbench.record import absorption_null_control, final_info
from workbench.rundir import CHECKPOINT, FINAL_INFO, save_checkpoint, trim_log
from workbench.runio import JsonlLog, atomic_write_json, atomic_write_text
from workbench.stream import ActivationStream, LazyLM
from workbench.training import train

# make_trainer(trainer_cfg, d_in=, d_sae=, total_steps=, total_tokens=, init_acts_BD=, seed=, device=, compute_dtype=)
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
    one run directory per trainer. Returns [(run_dir, final_info)]. With ckpt, continue that run."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    set_seed(cfg.seed)  # python, numpy, torch and CUDA generators: code we do not own draws from them
    device = resolve_device(cfg.model.device)
    phases = Phases(["model load", "training", *cfg.eval.types], cache_root(cfg.model) / "phase_times.json",
                    setup_key=json.dumps([cfg.model.name, cfg.model.hook, cfg.model.dtype, device.type,
                                          cfg.data.train_tokens, cfg.sae.d_sae, len(cfg.sweep) + 1]),
                    enabled=cfg.log.progress)
    lm = LazyLM(cfg, phases)
    mixbuf = MixingBuffer(cfg.data.buffer_batches * cfg.sae.batch_size, cfg.sae.batch_size,
                          torch.Generator().manual_seed(cfg.seed))
    runs = sweep_runs(cfg, out_dir)

    # ---- activations: from the cache when a previous run stored this stream, else from the LM
    if ckpt is None:
        stream = ActivationStream(cfg, lm, device)
        d_in, scaler, init_acts, batches = first_batches(stream, cfg, mixbuf)
        for run_dir, run_cfg in runs:  # created only once the model and data are known to work
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
        for run_dir, _ in runs:
            trim_log(run_dir / "train_log.jsonl", ckpt["loop"]["next_step"])

    # ---- trainers: all step on each batch
    trainers = [make_trainer(run_cfg.trainer, d_in=d_in, d_sae=cfg.sae.d_sae, total_steps=cfg.total_steps,
                             total_tokens=cfg.total_steps * cfg.sae.batch_size, init_acts_BD=init_acts,
                             seed=cfg.seed, device=device, compute_dtype=cfg.sae.compute_dtype) for _, run_cfg in runs]
    if ckpt is not None:
        for trainer, state in zip(trainers, ckpt["trainers"]):
            trainer.load_state_dict(state)
    del init_acts

    def checkpoint(loop_state: dict) -> None:
        """Everything a resumed run needs to continue bit for bit."""
        save_checkpoint(out_dir, {"cfg": cfg, "d_in": d_in, "scale": scaler.scale, "loop": loop_state,
                                  "buffer": mixbuf.state_dict(), "trainers": [t.state_dict() for t in trainers]})

    wandb_run = None
    if cfg.log.wandb:
        import wandb
        wandb_run = wandb.init(project=cfg.log.wandb_project, name=out_dir.name, config=config_to_dict(cfg))
    logs = [JsonlLog(run_dir / "train_log.jsonl") for run_dir, _ in runs]
    try:
        with phases("training"):
            stats = train(trainers, batches, cfg.total_steps, cfg.sae.batch_size, logs, cfg.log.every_steps,
                          progress=cfg.log.progress, wandb_run=wandb_run, resume=ckpt["loop"] if ckpt else None,
                          checkpoint=checkpoint, checkpoint_every=cfg.log.checkpoint_every)
    except BaseException:
        stream.close()  # the read-ahead thread and the LM it holds go now, not at exit
        raise
    finally:
        for log in logs:
            log.close()
    stream.finish()
    train_s = time.perf_counter() - t0 - lm.load_s

    # ---- SAE files on raw activations (normalization folded in), then all SAEs evaluated together
    saes = [save_sae(trainer, run_dir, run_cfg, scaler.scale) for (run_dir, run_cfg), trainer in zip(runs, trainers)]
    results, skipped = [{} for _ in runs], {}
    if cfg.eval.types:
        results, skipped = evaluate(cfg, lm.get(), saes, out_dir / "eval_artifacts", phases)
    wall = time.perf_counter() - t0

    # ---- the record: final_info.json last (its presence means the run finished)
    provenance = {
        "model": cfg.model.name, "hook": cfg.model.hook, "llm_dtype": cfg.model.dtype, "device": str(device),
        "dataset": cfg.data.dataset,
        "embedded_sources": cfg.data.embedded_sources if cfg.data.dataset == "embedded" else None,
        "context_size": cfg.data.context_size, "train_tokens": stats["tokens"], "seed": cfg.seed,
        "normalization_scale": scaler.scale, "activation_source": stream.source,
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

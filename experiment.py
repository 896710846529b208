"""One run: LM -> activations at the hook -> train an SAE -> evaluate -> out_dir.

    python experiment.py --out_dir=run_1 [--config run_configs/quickstart.toml] [--set trainer.k=64 ...]

out_dir receives: config.toml (resolved), train_log.jsonl, sae/ (SAELens format, takes raw activations),
final_info.json (written last and atomically: its presence means the run finished).
Exit codes: 0 done; 2 bad input (config, out_dir), nothing written; 1 the run failed (reason on stderr).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from workbench.config import ConfigError, RunConfig, absolute_path, config_to_dict, load_config, to_toml

FINAL_INFO = "final_info.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="run directory to create (e.g. run_1)")
    p.add_argument("--config", default=None, help="TOML config (default run_configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.k=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in out_dir")
    return p.parse_args(argv)


CHECKPOINT = "checkpoint.pt"


def resumable(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT).is_file() and not (out_dir / FINAL_INFO).exists()


def load_checkpoint(out_dir: Path) -> dict:
    try:
        return torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say so, never guess
        raise ConfigError(f"--out_dir '{out_dir}' has an unreadable {CHECKPOINT} ({type(e).__name__}); "
                          f"pass --overwrite to start the run over") from None


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber a run; runs before any work so a bad call changes nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir '{out_dir}' exists and is not a directory; pick another name")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        what = "a finished run" if (out_dir / FINAL_INFO).exists() else "files (an unfinished run?)"
        raise ConfigError(f"--out_dir '{out_dir}' already holds {what}; pick a new run directory or pass --overwrite")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"--out_dir parent '{parent}' does not exist; create it first")


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
    """Loads the LM on first use: a warm-cache run without LM-based evals never loads it."""

    def __init__(self, cfg: RunConfig, phases):
        self.cfg, self.model, self.load_s, self.phases = cfg, None, 0.0, phases

    def get(self):
        if self.model is None:
            from workbench.lm import load_lm
            start = time.perf_counter()
            with self.phases("model load"):
                self.model = load_lm(self.cfg.model)
            self.load_s = time.perf_counter() - start
        return self.model


class ActivationStream:
    """The run's activation chunks (float32, harvest order): read from the cache when a complete entry
    exists for this key, else produced by the LM (and stored when caching is on)."""

    def __init__(self, cfg: RunConfig, lm: LazyLM, device, skip_chunks: int = 0):
        from workbench.activations import harvest
        from workbench.cache import ActivationCache, cache_key
        from workbench.lm import cache_root, special_token_ids
        from workbench.text import context_windows

        d = cfg.data
        # tokens a run can pull from the stream: training, plus what the mixing buffer holds, plus a margin
        self.n_tokens = (cfg.total_steps + d.buffer_batches) * cfg.sae.batch_size + 2 * d.llm_batch_size * d.context_size
        describe = {"model": cfg.model.name, "hook": cfg.model.hook, "llm_dtype": cfg.model.dtype,
                    "device_type": device.type, "dataset": d.dataset, "split": d.split, "text_field": d.text_field,
                    "embedded_sources": d.embedded_sources, "eval_fraction": d.eval_fraction,
                    "context_size": d.context_size, "llm_batch_size": d.llm_batch_size, "seed": cfg.seed,
                    "tokens": self.n_tokens}
        self.key = cache_key(describe)
        root = Path(cfg.cache.dir) if cfg.cache.dir else cache_root(cfg.model) / "activations"
        self.cache = ActivationCache(root, int(cfg.cache.max_gb * 2**30))
        self.writer = None
        meta = self.cache.load_meta(self.key) if cfg.cache.enabled else None
        depth = d.prefetch_chunks
        self.prefetch = None
        if meta is not None:
            self.source = f"cache:{self.key}"
            self.chunks = itertools.islice(self.cache.read(self.key, meta, device), skip_chunks, None)
            self._read_ahead(depth)
            return
        self.source = "lm"
        self.epochs = [0]
        model = lm.get()
        special = special_token_ids(model.tokenizer)
        contexts = context_windows(train_texts(cfg, self.epochs), model.tokenizer, d.context_size)
        # a resumed run skips the contexts behind the chunks it already consumed, without running the LM
        contexts = itertools.islice(contexts, skip_chunks * d.llm_batch_size, None)
        self._raw = harvest(model, contexts, cfg.model.hook, cfg.model.layer, d.llm_batch_size, special, out_device=device)
        self.chunks = self._raw
        bytes_needed = self.n_tokens * model.cfg.d_model * (2 if cfg.model.dtype != "float32" else 4)
        if cfg.cache.enabled and skip_chunks == 0 and bytes_needed <= self.cache.max_bytes:
            store = torch.float32 if cfg.model.dtype == "float32" else getattr(torch, cfg.model.dtype)
            self.writer = self.cache.writer(self.key, self.n_tokens, describe, store)
            self.chunks = self.writer.wrap(self._raw)
        self._read_ahead(depth)

    def _read_ahead(self, depth: int) -> None:
        """Produce the next chunks in a background thread while the trainers step (same order)."""
        if depth > 0:
            from workbench.activations import Prefetcher
            self.prefetch = self.chunks = Prefetcher(self.chunks, depth)

    def finish(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()  # fetched-ahead chunks are already in the cache entry being written
        if self.writer is not None and self.writer.finish(self._raw):
            self.source = f"lm (stored as cache:{self.key})"


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformer-lens", "transformers", "sae-lens", "sae-bench"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(cfg: RunConfig, out_dir: Path, overwrite: bool, argv: list[str], ckpt: dict | None = None
        ) -> list[tuple[Path, dict]]:
    """Train the config's trainer (and its sweep entries) on one activation stream; evaluate; write
    one run directory per trainer. Returns [(run_dir, final_info)]. With ckpt, continue that run."""
    from evals import build_context, run_evals
    from trainers import make_trainer
    from workbench.activations import ActivationScaler, MixingBuffer
    from workbench.config import sweep_runs
    from workbench.lm import cache_root, resolve_device
    from workbench.phases import Phases
    from workbench.runio import JsonlLog, atomic_write_json, atomic_write_text, code_version
    from workbench.training import train

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    layer, hook = cfg.model.layer, cfg.model.hook
    phases = Phases(["model load", "training", *cfg.eval.types], cache_root(cfg.model) / "phase_times.json",
                    setup_key=json.dumps([cfg.model.name, hook, cfg.model.dtype, device.type, cfg.data.train_tokens,
                                          cfg.sae.d_sae, len(cfg.sweep) + 1]), enabled=cfg.log.progress)
    lm = LazyLM(cfg, phases)

    # ---- activations: from the cache when a previous run stored this stream, else from the LM
    mixbuf = MixingBuffer(cfg.data.buffer_batches * cfg.sae.batch_size, cfg.sae.batch_size,
                          torch.Generator().manual_seed(cfg.seed))
    runs = sweep_runs(cfg, out_dir)
    if ckpt is None:
        stream = ActivationStream(cfg, lm, device)
        chunks = stream.chunks
        first, n_first = [], 0
        while n_first < cfg.data.norm_tokens:  # the scale is estimated on the first tokens, which then train too
            first.append(next(chunks))
            n_first += first[-1].shape[0]
        first_ND = torch.cat(first)
        d_in, scaler = first_ND.shape[1], ActivationScaler.estimate(first_ND)
        init_acts = scaler(first_ND)
        batches = (scaler(b) for b in mixbuf.batches(itertools.chain(first, chunks)))
        # ---- run directories: created only once the model and data are known to work
        for run_dir, run_cfg in runs:
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
        for run_dir, _ in runs:  # drop log lines written after the checkpoint
            log_path = run_dir / "train_log.jsonl"
            if log_path.is_file():
                kept = [line for line in log_path.read_text().splitlines()
                        if line.strip() and _step_of(line) < ckpt["loop"]["next_step"]]
                atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    trainers = [make_trainer(run_cfg.trainer, d_in=d_in, d_sae=cfg.sae.d_sae, total_steps=cfg.total_steps,
                             total_tokens=cfg.total_steps * cfg.sae.batch_size, init_acts_BD=init_acts,
                             seed=cfg.seed, device=device, compute_dtype=cfg.sae.compute_dtype) for _, run_cfg in runs]
    if ckpt is not None:
        for trainer, state in zip(trainers, ckpt["trainers"]):
            trainer.load_state_dict(state)
    del init_acts

    def save_checkpoint(loop_state: dict) -> None:
        """Everything a resumed run needs to continue bit for bit; written atomically."""
        state = {"version": 1, "cfg": cfg, "d_in": d_in, "scale": scaler.scale, "loop": loop_state,
                 "buffer": mixbuf.state_dict(), "trainers": [t.state_dict() for t in trainers]}
        tmp = out_dir / f".{CHECKPOINT}.tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the last good checkpoint
        os.replace(tmp, out_dir / CHECKPOINT)

    wandb_run = None
    if cfg.log.wandb:
        import wandb
        wandb_run = wandb.init(project=cfg.log.wandb_project, name=out_dir.name, config=config_to_dict(cfg))
    logs = [JsonlLog(run_dir / "train_log.jsonl") for run_dir, _ in runs]
    try:
        with phases("training"):
            stats = train(trainers, batches, cfg.total_steps, cfg.sae.batch_size, logs, cfg.log.every_steps,
                          progress=cfg.log.progress, wandb_run=wandb_run, resume=ckpt["loop"] if ckpt else None,
                          checkpoint=save_checkpoint, checkpoint_every=cfg.log.checkpoint_every)
    finally:
        for log in logs:
            log.close()
    stream.finish()  # complete and publish the cache entry (a few more LM batches at most)
    train_s = time.perf_counter() - t0 - lm.load_s

    # ---- save each SAE on raw activations (normalization folded in), then evaluate all together
    saes = []
    for (run_dir, run_cfg), trainer in zip(runs, trainers):
        sae = trainer.sae.folded(scaler.scale).eval()
        sae.save(run_dir / "sae", {"model_name": cfg.model.name, "hook_name": hook, "hook_head_index": None,
                                   "prepend_bos": True, "context_size": cfg.data.context_size,
                                   "dataset_path": cfg.data.dataset, "trainer": run_cfg.trainer.name,
                                   "normalization_scale_folded": scaler.scale, "exclude_special_tokens": True})
        if artifacts := trainer.artifacts():
            atomic_write_json(run_dir / "trainer_artifacts.json", {"trainer": run_cfg.trainer.name, **artifacts})
        saes.append(sae)
    results, skipped = [{} for _ in runs], {}
    if cfg.eval.types:
        model = lm.get()
        eval_ctx = build_context(cfg, model, saes, out_dir / "eval_artifacts")
        results, skipped = run_evals(cfg.eval.types, eval_ctx, phases)
    wall = time.perf_counter() - t0

    out = []
    for i, ((run_dir, run_cfg), trainer) in enumerate(zip(runs, trainers)):
        cfg_dict = config_to_dict(run_cfg)
        tcfg = {k: v for k, v in cfg_dict["trainer"].items() if k != "name"}
        final = {
            f"training results for layer {layer}": {
                "config": {"trainer_class": type(trainer).__name__, "dict_class": f"SAE[{trainer.architecture}]",
                           **tcfg, "lr": trainer.lr, "steps": cfg.total_steps, "seed": cfg.seed,
                           "activation_dim": d_in, "dict_size": cfg.sae.d_sae, "device": str(device), "layer": layer,
                           "lm_name": cfg.model.name, "submodule_name": hook, "sae_batch_size": cfg.sae.batch_size},
                "final_info": {"training_steps": stats["steps"], "final_loss": stats["final_loss"][i], "layer": layer,
                               "dict_size": cfg.sae.d_sae, "learning_rate": trainer.lr,
                               "sparsity_penalty": sparsity_penalty(run_cfg.trainer),
                               "k": getattr(run_cfg.trainer, "k", None) if trainer.architecture != "standard" else None,
                               # last logged training L0; the core eval's L0 is the saved SAE's (inference)
                               "l0_train": stats["final_l0"][i], **trainer.summary()},
                "provenance": {
                    "model": cfg.model.name, "hook": hook, "llm_dtype": cfg.model.dtype, "device": str(device),
                    "dataset": cfg.data.dataset,
                    "embedded_sources": cfg.data.embedded_sources if cfg.data.dataset == "embedded" else None,
                    "context_size": cfg.data.context_size, "train_tokens": stats["tokens"],
                    "seed": cfg.seed, "code_version": code_version(), "normalization_scale": scaler.scale,
                    "activation_source": stream.source, "resumed_from_step": ckpt["loop"]["next_step"] if ckpt else None,
                    "wall_time_s": wall, "model_load_s": lm.load_s,
                    "train_wall_s": train_s, "train_tokens_per_s": stats["tokens_per_s"],
                    "trainer_step_s": stats["trainer_step_s"][i], "eval_wall_s": wall - lm.load_s - train_s,
                    "trainers_on_stream": [str(r.name) for r, _ in runs],
                    "started_utc": started, "command": " ".join(["python", "experiment.py", *argv]),
                    "versions": versions()},
            },
            **results[i],
            "skipped evaluations": skipped,
            "run config": cfg_dict,
        }
        atomic_write_json(run_dir / FINAL_INFO, final)
        out.append((run_dir, final))
    (out_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: final_info.json and sae/ are the result
    return out


def sparsity_penalty(tcfg) -> float | None:
    """The L1 (relu, relu-based research trainers) or L0 (jumprelu) coefficient; None for k-sparse SAEs."""
    if getattr(tcfg, "base", tcfg.name) == "relu":
        return tcfg.l1_coeff
    return getattr(tcfg, "l0_coeff", None)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped


def notes_line(run_dir: Path, final: dict) -> str:
    """The run's headline for notes.txt: trainer, hyperparameters that differ from the trainer's
    defaults, and the key metrics (n/a where an eval did not run)."""
    import dataclasses

    from trainers import TRAINERS
    tcfg = final["run config"]["trainer"]
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(TRAINERS[tcfg["name"]].Config)}
    hp = " ".join(f"{k}={v}" for k, v in tcfg.items() if k != "name" and defaults.get(k, object()) != v)

    def get(*path):
        node = final
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return f"{node:.4g}" if isinstance(node, (int, float)) else "n/a"

    core = ("core evaluation results", "metrics")
    probe = get("sparse probing evaluation results", "eval_result_metrics", "sae", "sae_top_1_test_accuracy")
    if probe == "n/a":
        probe = get("sae_probes evaluation results", "eval_result_metrics", "sae", "sae_top_1_test_accuracy")
    return (f"[{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}] {run_dir.name}: {tcfg['name']} {hp} | "
            f"L0 {get(*core, 'sparsity', 'l0')} EV {get(*core, 'reconstruction_quality', 'explained_variance')} "
            f"CE {get(*core, 'model_performance_preservation', 'ce_loss_score')} "
            f"absorption {get('absorption evaluation results', 'eval_result_metrics', 'mean', 'mean_absorption_fraction_score')} "
            f"probe-top1 {probe}")


def append_notes(notes: Path, lines: list[str]) -> None:
    """Append only: the researcher's own text in notes.txt is never rewritten."""
    with open(notes, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def headline(final: dict) -> str:
    tr = next(v for k, v in final.items() if k.startswith("training results"))
    core = final.get("core evaluation results", {}).get("metrics", {})
    rq, mp = core.get("reconstruction_quality", {}), core.get("model_performance_preservation", {})
    parts = [f"trainer={tr['config']['trainer_class']}", f"tokens={tr['provenance']['train_tokens']}",
             f"wall={tr['provenance']['wall_time_s']:.0f}s", f"train_tok/s={tr['provenance']['train_tokens_per_s']:.0f}"]
    if core and core.get("reconstruction_quality"):
        parts += [f"EV={rq.get('explained_variance'):.4f}", f"CE_score={mp.get('ce_loss_score'):.4f}",
                  f"L0={core['sparsity']['l0']:.1f}", f"alive={core['misc']['frac_alive']:.3f}"]
    return " ".join(parts)


def fail(message: str, cfg: RunConfig, out_dir: Path) -> int:
    """One line on stderr; run directories already created get failed.txt (never a final_info.json)."""
    print(f"error: {message}", file=sys.stderr)
    from workbench.config import sweep_runs
    for run_dir, _ in sweep_runs(cfg, out_dir):
        if run_dir.is_dir() and not (run_dir / FINAL_INFO).exists():
            try:
                (run_dir / "failed.txt").write_text(message + "\n")
            except OSError:
                pass  # the disk may be what failed
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out_dir = absolute_path(args.out_dir)  # resolved once: nothing below depends on the working directory
    ckpt = None
    try:
        if resumable(out_dir) and not args.overwrite:
            ckpt = load_checkpoint(out_dir)
            cfg = ckpt["cfg"]
            if args.config or args.set:
                asked = load_config(args.config, args.set)
                if config_to_dict(asked) != config_to_dict(cfg) or asked.sweep != cfg.sweep:
                    raise ConfigError(f"--out_dir '{out_dir}' holds an unfinished run with another config; "
                                      f"run without --config/--set to resume it, or pass --overwrite to start over")
            print(f"resuming {out_dir} from step {ckpt['loop']['next_step']} of {cfg.total_steps}", file=sys.stderr)
        else:
            cfg = load_config(args.config, args.set)
            from workbench.config import preflight, sweep_runs
            for run_dir, _ in sweep_runs(cfg, out_dir):
                check_out_dir(run_dir, args.overwrite)
            preflight(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from workbench.lm import ModelLoadError
    from workbench.text import DataError
    from workbench.training import TrainingDiverged
    try:
        finals = run(cfg, out_dir, args.overwrite, argv, ckpt)
    except (ModelLoadError, DataError, TrainingDiverged) as e:
        return fail(str(e), cfg, out_dir)
    except OSError as e:
        return fail(f"cannot write the run ({e.strerror or e}: {e.filename or out_dir}); "
                    f"free disk space or pick a writable --out_dir", cfg, out_dir)
    except Exception as e:  # noqa: BLE001 (a bug: the traceback for us, failed.txt for the run directory)
        traceback.print_exc()
        return fail(f"unexpected {type(e).__name__}: {e} (a bug; the traceback is above; the run can be resumed "
                    f"from its last checkpoint)", cfg, out_dir)
    for run_dir, final in finals:
        print(f"done: {run_dir} {headline(final)}")
    try:
        append_notes(out_dir.resolve().parent / "notes.txt", [notes_line(d, f) for d, f in finals])
    except OSError as e:  # the run itself is complete; only the log line is lost
        print(f"warning: could not append to notes.txt ({e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

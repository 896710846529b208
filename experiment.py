"""One run: LM -> activations at the hook -> train an SAE -> evaluate -> out_dir.

    python experiment.py --out_dir=run_1 [--config run_configs/quickstart.toml] [--set trainer.k=64 ...]

out_dir receives: config.toml (resolved), train_log.jsonl, sae/ (SAELens format, takes raw activations),
final_info.json (written last and atomically: its presence means the run finished).
Exit codes: 0 done; 2 bad input (config, out_dir), nothing written; 1 the run failed (reason on stderr).
The run itself is workbench/pipeline.py; this file is the command line over it.

On several GPUs (or CPU processes): torchrun --nproc_per_node=N experiment.py --out_dir=run_1 ...
(workbench/distributed.py). Rank 0 prints, writes and evaluates; a rerun of the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # before torch loads: libgomp reads its wait policy once
    from workbench.cpu_share import wait_passively_if_shared
    wait_passively_if_shared()  # a second run on the same CPU waits passively instead of spinning

import evals
import trainers
from workbench import cpu_memory, distributed
from workbench.config import (ConfigError, RunConfig, absolute_path, config_reference, config_to_dict, load_config,
                              preflight, sweep_runs)
from workbench.record import append_notes, headline, notes_line  # noqa: F401  (notes_line: part of the CLI's API)
from workbench.rundir import check_out_dir, load_checkpoint, mark_failed, resumable


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="run directory to create (e.g. run_1)")
    p.add_argument("--config", default=None, help="TOML config (default run_configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.k=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in out_dir")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    args = p.parse_args(argv)
    if not args.help_config and not args.out_dir:
        p.error("the following arguments are required: --out_dir")
    return args


def resolve_run(args, out_dir: Path) -> tuple[RunConfig, dict | None]:
    """(config, checkpoint): an unfinished run in out_dir resumes with its own config; else a new run
    whose config and run directories are checked before anything loads or is written."""
    if resumable(out_dir) and not args.overwrite:
        ckpt = load_checkpoint(out_dir)
        cfg = ckpt["cfg"]
        if args.config or args.set:
            from workbench.lm import resolve_auto_dtypes  # the checkpoint's config holds what auto chose

            asked = resolve_auto_dtypes(load_config(args.config, args.set))
            if config_to_dict(asked) != config_to_dict(cfg) or asked.sweep != cfg.sweep:
                raise ConfigError(f"--out_dir '{out_dir}' holds an unfinished run with another config; "
                                  f"run without --config/--set to resume it, or pass --overwrite to start over")
        print(f"resuming {out_dir} from step {ckpt['loop']['next_step']} of {cfg.total_steps}", file=sys.stderr)
        return cfg, ckpt
    cfg = load_config(args.config, args.set)
    for run_dir, _ in sweep_runs(cfg, out_dir):
        check_out_dir(run_dir, args.overwrite)
    preflight(cfg)
    return cfg, None


def run(cfg: RunConfig, out_dir: Path, overwrite: bool, argv: list[str], ckpt: dict | None = None):
    """The pipeline with this workbench's trainers and evals plugged in."""
    from workbench.pipeline import run as run_pipeline
    return run_pipeline(cfg, out_dir, overwrite, argv, make_trainer=trainers.make_trainer,
                        evaluate=evals.evaluate, ckpt=ckpt)


def fail(message: str, cfg: RunConfig, out_dir: Path) -> int:
    """One line on stderr; run directories already created get failed.txt (from rank 0)."""
    distributed.reporting()
    print(f"error: {message}", file=sys.stderr)
    if distributed.ctx().main:
        mark_failed([run_dir for run_dir, _ in sweep_runs(cfg, out_dir)], message)
    else:
        distributed.let_rank0_report()
    return 1


def join_ranks(cfg: RunConfig, ckpt: dict | None) -> None:
    """Under torchrun: join the process group, and refuse what the ranks cannot share (a world size
    that does not divide the batch; a checkpoint written by another number of ranks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ckpt is not None and ckpt.get("world_size", 1) != world:
        was = ckpt.get("world_size", 1)
        how = f"torchrun --nproc_per_node={was} experiment.py" if was > 1 else "python experiment.py"
        raise ConfigError(f"the checkpoint in --out_dir was written by {was} rank(s), this is {world}; resume it "
                          f"with `{how} --out_dir=...`, or pass --overwrite")
    if not distributed.launched():
        return
    if not cfg.dist.sweep_over_ranks and cfg.sae.batch_size % world:
        raise ConfigError(f"config key 'sae.batch_size' ({cfg.sae.batch_size}) is the global batch and must be a "
                          f"multiple of the {world} ranks; change it or --nproc_per_node")
    try:
        distributed.init(cfg.model.device, cfg.dist.sweep_over_ranks)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.help_config:
        print(config_reference(), end="")
        return 0
    out_dir = absolute_path(args.out_dir)  # resolved once: nothing below depends on the working directory
    cpu_memory.keep_freed_memory()  # large step temporaries reused, not page-faulted in anew each step
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank parses alike; one reports
    try:
        cfg, ckpt = resolve_run(args, out_dir)
        join_ranks(cfg, ckpt)
    except ConfigError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        distributed.let_rank0_report()
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
        if not distributed.from_collective(e):
            traceback.print_exc()
            return fail(f"unexpected {type(e).__name__}: {e} (a bug; the traceback is above; the run can be resumed "
                        f"from its last checkpoint)", cfg, out_dir)
        # another rank died, or the network between them: this rank's collective failed
        reason = re.sub(r"^\[[^\]]*\] ", "", str(e).splitlines()[0]).split(". ")[0][:120]  # gloo: "[file:line] why. ..."
        if isinstance(e, distributed.Stopped):
            reason = str(e)
        return fail(f"rank {distributed.ctx().rank}: a peer rank stopped ({reason}); rerun the "
                    f"same torchrun command to resume from the last checkpoint", cfg, out_dir)
    if not distributed.ctx().main:
        distributed.shutdown()
        return 0
    distributed.shutdown()
    for run_dir, final in finals:
        print(f"done: {run_dir} {headline(final)}")
    try:
        append_notes(out_dir.resolve().parent / "notes.txt", [notes_line(d, f) for d, f in finals])
    except OSError as e:  # the run itself is complete; only the log line is lost
        print(f"warning: could not append to notes.txt ({e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

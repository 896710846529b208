"""A run directory's life: refuse to clobber one, checkpoint it, resume it, mark it failed.

A finished run has final_info.json (written last, atomically); an unfinished one has checkpoint.pt
(every `log.checkpoint_every` steps) that `experiment.py --out_dir=<it>` resumes bit for bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from workbench.config import ConfigError
from workbench.runio import atomic_write_text

FINAL_INFO = "final_info.json"
CHECKPOINT = "checkpoint.pt"
# 2: the config tables are pydantic dataclasses and the SAE is a sae_lens class (session 5); a checkpoint
# of another format is refused rather than resumed into objects that no longer match it
CHECKPOINT_VERSION = 2


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


def resumable(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT).is_file() and not (out_dir / FINAL_INFO).exists()


def load_checkpoint(out_dir: Path) -> dict:
    try:
        ckpt = torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say so, never guess
        raise ConfigError(f"--out_dir '{out_dir}' has an unreadable {CHECKPOINT} ({type(e).__name__}); "
                          f"pass --overwrite to start the run over") from None
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ConfigError(f"--out_dir '{out_dir}' has a {CHECKPOINT} of format {version}, written by an older "
                          f"workbench (this one reads format {CHECKPOINT_VERSION}); pass --overwrite to start the "
                          f"run over, or finish it with the workbench commit that wrote it")
    return ckpt


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Written to a temporary file, fsynced, then swapped in: a kill never leaves a torn checkpoint."""
    tmp = out_dir / f".{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save({**state, "version": CHECKPOINT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it replaces the last good checkpoint
    os.replace(tmp, out_dir / CHECKPOINT)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped


def trim_log(log_path: Path, next_step: int) -> None:
    """Drop the log lines a killed run wrote after its checkpoint (the resumed run writes them again)."""
    if log_path.is_file():
        kept = [line for line in log_path.read_text().splitlines() if line.strip() and _step_of(line) < next_step]
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def mark_failed(run_dirs: list[Path], message: str) -> None:
    """failed.txt in each run directory already created (never a final_info.json)."""
    for run_dir in run_dirs:
        if run_dir.is_dir() and not (run_dir / FINAL_INFO).exists():
            try:
                (run_dir / "failed.txt").write_text(message + "\n")
            except OSError:
                pass  # the disk may be what failed

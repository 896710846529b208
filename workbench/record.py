"""What a finished run reports: final_info.json (the seeds' keys plus provenance), the notes.txt line and
the headline printed at the end."""
from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from pathlib import Path

from workbench.config import TRAINER_CONFIGS, RunConfig, config_to_dict
from workbench.runio import code_version
from workbench.sae_ops import max_cosine


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformer-lens", "transformers", "sae-lens", "sae-bench"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def sparsity_penalty(tcfg) -> float | None:
    """The L1 (relu, relu-based research trainers) or L0 (jumprelu) coefficient; None for k-sparse SAEs."""
    if getattr(tcfg, "base", tcfg.name) == "relu":
        return tcfg.l1_coeff
    return getattr(tcfg, "l0_coeff", None)


ABSORPTION_KEY = "absorption evaluation results"
NULL_CONTROL_KEY = "absorption null control"


def absorption_null_control(run_dirs: list[Path], trainer_names: list[str], results: list[dict]) -> dict | None:
    """The absorption of a null SAE (trainer null: TopK at initialization) trained on the same stream, if
    the sweep has one: recorded beside every other run's SAEBench numbers as the floor chance gives."""
    for run_dir, name, result in zip(run_dirs, trainer_names, results):
        mean = result.get(ABSORPTION_KEY, {}).get("eval_result_metrics", {}).get("mean")
        if name == "null" and mean:
            return {"run": run_dir.name, **{k: mean.get(k) for k in (
                "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")}}
    return None


def final_info(run_cfg: RunConfig, trainer, i: int, stats: dict, evals: dict, skipped: dict,
               provenance: dict, null_control: dict | None = None) -> dict:
    """One run's final_info.json: training results (config, final numbers, provenance), the eval
    results under their SAEBench keys (and the null SAE's absorption beside them, when the sweep has
    one), what was skipped and why, and the resolved config.
    i: the trainer's index on the stream (stats hold one entry per trainer)."""
    cfg_dict = config_to_dict(run_cfg)
    layer, tcfg = run_cfg.model.layer, {k: v for k, v in cfg_dict["trainer"].items() if k != "name"}
    return {
        f"training results for layer {layer}": {
            "config": {"trainer_class": type(trainer).__name__, "dict_class": f"SAE[{trainer.architecture}]",
                       **tcfg, "lr": trainer.lr, "steps": run_cfg.total_steps, "seed": run_cfg.seed,
                       "activation_dim": trainer.sae.d_in, "dict_size": run_cfg.sae.d_sae,
                       "device": provenance["device"], "layer": layer, "lm_name": run_cfg.model.name,
                       "submodule_name": run_cfg.model.hook, "sae_batch_size": run_cfg.sae.batch_size},
            "final_info": {"training_steps": stats["steps"], "final_loss": stats["final_loss"][i], "layer": layer,
                           "dict_size": run_cfg.sae.d_sae, "learning_rate": trainer.lr,
                           "sparsity_penalty": sparsity_penalty(run_cfg.trainer),
                           "k": getattr(run_cfg.trainer, "k", None) if trainer.architecture != "standard" else None,
                           # last logged training L0; the core eval's L0 is the saved SAE's (inference)
                           "l0_train": stats["final_l0"][i],
                           # mean over latents of max(0, max_j cos(d_i, d_j)), all pairs: what ortsae and c2r
                           # penalize (within chunks), measured the same way for every trainer
                           "mean_max_decoder_cosine": max_cosine(trainer.sae.W_dec)[0].clamp_min(0).mean().item(),
                           **trainer.summary()},
            "provenance": {**provenance, "trainer_step_s": stats["trainer_step_s"][i],
                           "code_version": code_version(), "versions": versions()},
        },
        **evals,
        **({NULL_CONTROL_KEY: null_control} if null_control and trainer.name != "null" else {}),
        "skipped evaluations": skipped,
        "run config": cfg_dict,
    }


def notes_line(run_dir: Path, final: dict) -> str:
    """The run's headline for notes.txt: trainer, hyperparameters that differ from the trainer's
    defaults, and the key metrics (n/a where an eval did not run)."""
    tcfg = final["run config"]["trainer"]
    defaults = dataclasses.asdict(TRAINER_CONFIGS[tcfg["name"]]())
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

"""Figures and a summary table from many runs.

    python plot.py [RUN_DIR ...] [--out DIR] [--label RUN=TEXT ...]

Reads every run_*/final_info.json under the working directory (or the run directories given). Runs on
different models or hooks are never drawn on one axis: each (model, hook) group gets its own files,
suffixed with the group's name when there is more than one group. A run that cannot be read is named
on screen with the reason; a missing metric leaves a gap, never a zero. Labels are the trainer plus
the hyperparameters that differ between the runs plotted (`--label` or labels.json override them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

TRAINING_KEY = re.compile(r"^training results for layer \d+$")
NAN = float("nan")


@dataclass
class Run:
    name: str
    path: Path
    info: dict
    config: dict
    log: list = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    label: str = ""
    setting: str = ""  # the label before runs of one setting are told apart: what seeds are pooled over

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def training(self) -> dict:
        return next(v for k, v in self.info.items() if TRAINING_KEY.match(k))

    @property
    def group(self) -> tuple[str, str]:
        prov = self.training.get("provenance", {})
        return prov.get("model", "?"), prov.get("hook", "?")

    @property
    def trainer(self) -> str:
        return self.config.get("trainer", {}).get("name", "?")

    def metric(self, *path: str) -> float:
        """A number from final_info.json by key path, NaN when absent (a gap in the figure). A path that
        starts with TRAINING reads the "training results for layer L" block, whatever L is."""
        node = self.info
        if path and path[0] == TRAINING:
            node, path = self.training, path[1:]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return NAN
            node = node[key]
        return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else NAN


def load_run(path: Path) -> tuple[Run | None, str | None]:
    """(run, None) or (None, reason)."""
    f = path / "final_info.json"
    if not f.is_file():
        failed = path / "failed.txt"
        why = f"failed: {failed.read_text().strip()}" if failed.is_file() else "unfinished (no final_info.json)"
        return None, why
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        return None, f"final_info.json is not valid JSON ({e.msg} at line {e.lineno})"
    if not isinstance(info, dict) or not any(TRAINING_KEY.match(k) for k in info):
        return None, "final_info.json has no 'training results for layer L' entry"
    config = info.get("run config")
    if not isinstance(config, dict):
        return None, "final_info.json has no 'run config' (written by an older or other tool)"
    run = Run(path.name, path, info, config)
    log_path = path / "train_log.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                run.log.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a truncated last line of a killed run
    art = path / "trainer_artifacts.json"
    if art.is_file():
        try:
            run.artifacts = json.loads(art.read_text())
        except json.JSONDecodeError:
            return None, "trainer_artifacts.json is not valid JSON"
    return run, None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def auto_labels(runs: list[Run]) -> None:
    """trainer + the hyperparameters whose values differ between these runs."""
    flat = [flatten({k: r.config.get(k, {}) for k in ("trainer", "sae", "data", "model")}) for r in runs]
    keys = sorted({k for f in flat for k in f})
    # a key is shown when the runs that have it disagree on it (a topk run has no lambda2 to show)
    differing = [k for k in keys if k != "trainer.name" and len({str(f[k]) for f in flat if k in f}) > 1]
    for run, f in zip(runs, flat):
        # only keys that the run's own trainer has (a topk run has no lambda2) are shown
        parts = [f"{k.split('.', 1)[1]}={f[k]}" for k in differing if k in f]
        run.label = run.setting = " ".join([run.trainer] + parts) if parts else run.trainer
    seen: dict[str, int] = {}
    for run in runs:  # identical labels (e.g. two seeds of one setting collapsed): add the run name
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.name})"


# ---------------------------------------------------------------- figures

def _bars(ax, runs, values, title):
    xs = range(len(runs))
    ax.bar(xs, [0 if math.isnan(v) else v for v in values], color=["C0" if not math.isnan(v) else "none" for v in values])
    for x, v in zip(xs, values):
        ax.annotate("n/a" if math.isnan(v) else f"{v:.3g}", (x, 0 if math.isnan(v) else v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r.label for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_title(title)


def bar_figure(plt, runs, panels, title):
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, path) in zip(axes[0], panels):
        _bars(ax, runs, [r.metric(*path) for r in runs], name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


CORE = "core evaluation results"
TRAINING = "training results"  # stands for "training results for layer L" in a metric path
ABS = "absorption evaluation results"
PANELS = {
    "absorption_comparison": [
        ("mean absorption fraction", (ABS, "eval_result_metrics", "mean", "mean_absorption_fraction_score")),
        ("mean full absorption", (ABS, "eval_result_metrics", "mean", "mean_full_absorption_score")),
        ("mean split features", (ABS, "eval_result_metrics", "mean", "mean_num_split_features"))],
    "reconstruction_quality": [
        ("explained variance", (CORE, "metrics", "reconstruction_quality", "explained_variance")),
        ("MSE", (CORE, "metrics", "reconstruction_quality", "mse")),
        ("CE-loss score", (CORE, "metrics", "model_performance_preservation", "ce_loss_score"))],
    "sparsity_metrics": [
        ("L0", (CORE, "metrics", "sparsity", "l0")),
        ("L1", (CORE, "metrics", "sparsity", "l1")),
        ("alive fraction", (CORE, "metrics", "misc", "frac_alive"))],
}


def probing_value(run: Run, which: str) -> float:
    """Top-1 / full SAE probing accuracy from classic sparse probing, else from sae_probes."""
    for key in ("sparse probing evaluation results", "sae_probes evaluation results"):
        v = run.metric(key, "eval_result_metrics", "sae", which)
        if not math.isnan(v):
            return v
    return NAN


def probing_figure(plt, runs, title):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(axes[0], runs, [probing_value(r, "sae_top_1_test_accuracy") for r in runs], "SAE top-1 probing accuracy")
    _bars(axes[1], runs, [probing_value(r, "sae_test_accuracy") for r in runs], "SAE probing accuracy (all latents)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto_figure(plt, runs, title):
    """L0 vs explained variance and L0 vs CE-loss score, one marker (and colour) per trainer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    trainers = sorted({r.trainer for r in runs})
    markers = dict(zip(trainers, "osD^vP*Xh<>p"))
    for ax, (name, path) in zip(axes, [("explained variance", ("reconstruction_quality", "explained_variance")),
                                       ("CE-loss score", ("model_performance_preservation", "ce_loss_score"))]):
        for t in trainers:
            pts = [(r.metric(CORE, "metrics", "sparsity", "l0"), r.metric(CORE, "metrics", *path), r)
                   for r in runs if r.trainer == t]
            pts = [(x, y, r) for x, y, r in pts if not (math.isnan(x) or math.isnan(y))]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[t], label=t, s=50)
            for x, y, r in pts:
                ax.annotate(r.label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        log_l0_axis(ax)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.collections:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_l0_axis(ax) -> None:
    """L0 on a log axis with plain numbers: runs at L0 29-32 fall inside one decade, where matplotlib's
    default minor labels (2.9x10^1, ...) overprint each other."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_xlim()
    if hi / lo < 10:  # within a decade: a few plain ticks instead of the empty major grid
        import numpy as np
        ax.set_xticks([float(f"{t:.3g}") for t in np.geomspace(lo, hi, 5)[1:-1]])
    ax.set_xlabel("L0")


def absorption_vs_l0_figure(plt, runs, title):
    """One point per setting: the mean over its seeds with ± sample-std bars (one seed: no bars). A null SAE
    (trainer null) is a dashed line: the absorption this model, width and L0 give by chance."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    abs_path = (ABS, "eval_result_metrics", "mean", "mean_absorption_fraction_score")
    for name, members in by_setting(runs).items():
        (x, xe), (y, ye) = (_mean_std([r.metric(*path) for r in members.values()])
                            for path in ((CORE, "metrics", "sparsity", "l0"), abs_path))
        if math.isnan(y):
            continue
        seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
        if next(iter(members.values())).trainer == "null":
            ax.axhline(y, ls="--", color="gray", label=f"{name}: chance floor{seeds}")
            if ye:
                ax.axhspan(y - ye, y + ye, color="gray", alpha=0.15)
        elif not math.isnan(x):
            bars = {"xerr": [xe], "yerr": [ye]} if len(members) > 1 else {}
            ax.errorbar([x], [y], fmt="o", capsize=3, label=name + seeds, **bars)
    if ax.lines or ax.collections:
        log_l0_axis(ax)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has both L0 and absorption results", ha="center", transform=ax.transAxes)
    ax.set_ylabel("mean absorption fraction")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def absorption_letters_figure(plt, runs, title):
    """Per first letter: the ground-truth probe's F1 (letters at or below 0.6 are not scored) and each run's
    absorption fraction on the scored letters: what the mean absorption is made of."""
    runs = [r for r in runs if isinstance(r.info.get(ABS, {}).get("eval_result_unstructured", {}).get("per_letter"), dict)]
    letters = sorted({k for r in runs for k in r.info[ABS]["eval_result_unstructured"]["per_letter"]})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.4 * len(letters) + 3), 7), sharex=True)
    first = runs[0].info[ABS]["eval_result_unstructured"]["per_letter"]  # the probe is the model's, not the SAE's
    top.bar(range(len(letters)), [first.get(c, {}).get("probe_f1") or 0 for c in letters], color="C7")
    top.axhline(0.6, ls="--", color="k", lw=0.8)
    top.set_ylabel("ground-truth probe F1")
    for r in runs:
        per = r.info[ABS]["eval_result_unstructured"]["per_letter"]
        ys = [per.get(c, {}).get("absorption_fraction") for c in letters]
        bottom.plot(range(len(letters)), [NAN if y is None else y for y in ys], "o-", ms=3, label=r.label)
    bottom.set_xticks(range(len(letters)), letters)
    bottom.set_ylabel("absorption fraction")
    bottom.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def seed_spread_figure(plt, runs, title):
    """Mean ± sample std over seeds per setting: EV, absorption, full absorption, max decoder cosine."""
    settings = by_setting(runs)
    panels = [("explained variance", SEED_COLUMNS[0][1]), ("mean absorption fraction", SEED_COLUMNS[3][1]),
              ("mean full absorption", SEED_COLUMNS[4][1]), ("mean max decoder cosine", SEED_COLUMNS[5][1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    names = list(settings)
    for ax, (name, path) in zip(axes, panels):
        stats = [_mean_std([r.metric(*path) for r in settings[n].values()]) for n in names]
        ax.bar(range(len(names)), [0 if math.isnan(m) else m for m, _ in stats],
               yerr=[0 if math.isnan(e) else e for _, e in stats], capsize=3)
        ax.set_xticks(range(len(names)), [f"{n} ({len(settings[n])})" for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(name)
    fig.suptitle(f"{title}  (mean ± std over seeds; n in brackets)")
    fig.tight_layout()
    return fig


def _series_panel(ax, runs, key, name, fontsize=None):
    """One logged statistic over training tokens, a line per run; runs without it are left out."""
    from matplotlib.ticker import EngFormatter, MaxNLocator
    for r in runs:
        pts = [(e["tokens"], e[key]) for e in r.log if e.get(key) is not None and "tokens" in e]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r.label)
    ax.set_title(name, fontsize=fontsize)
    ax.set_xlabel("training tokens")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(EngFormatter())


def curves_figure(plt, runs, title):
    keys = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead fraction")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (key, name) in zip(axes, keys):
        _series_panel(ax, runs, key, name)
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def competition_figure(plt, runs, title):
    """Momentum / progressive statistics over training: penalty share, pairs, trainer-specific series."""
    series = [("penalty_share", "penalty share of the loss"), ("cofiring_pairs", "co-firing pairs per batch"),
              ("frac_w2", "momentum: fraction with w = 2"), ("momentum_mean", "momentum: mean m"),
              ("pairs_c_pos", "progressive: pairs with c > 0"), ("lambda2", "progressive: lambda2(p)")]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (key, name) in zip(axes.flat, series):
        _series_panel(ax, runs, key, name, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def separation_figure(plt, runs, title):
    """Histograms of |cos| over co-firing pairs at 25/50/75/100% of training, per progressive run."""
    runs = [r for r in runs if r.artifacts.get("separation_progression")]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        for snap in r.artifacts["separation_progression"]:
            edges, counts = snap["bin_edges"], snap["counts"]
            total = sum(counts) or 1
            ax.step(edges[:-1], [c / total for c in counts], where="post",
                    label=f"{snap['progress']:.0%}: mean max|cos| {snap['mean_max_abs_cosine']:.3f}")
        ax.set_xlabel("|cos(d_i, d_j)| over co-firing pairs")
        ax.set_ylabel("fraction of pairs")
        ax.set_title(r.label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def momentum_figure(plt, runs, title):
    runs = [r for r in runs if r.artifacts.get("momentum_final")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.hist(r.artifacts["momentum_final"], bins=60, histtype="step", label=r.label)
        ax.axvline(r.artifacts.get("tau", NAN), ls="--", lw=0.8)
    ax.set_xlabel("final momentum m_i (dashed: tau)")
    ax.set_ylabel("latents")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- summary

SUMMARY_COLUMNS = [
    ("L0", (CORE, "metrics", "sparsity", "l0")),
    ("EV", (CORE, "metrics", "reconstruction_quality", "explained_variance")),
    ("MSE", (CORE, "metrics", "reconstruction_quality", "mse")),
    ("CE score", (CORE, "metrics", "model_performance_preservation", "ce_loss_score")),
    ("KL score", (CORE, "metrics", "model_behavior_preservation", "kl_div_score")),
    ("alive", (CORE, "metrics", "misc", "frac_alive")),
    ("absorption", (ABS, "eval_result_metrics", "mean", "mean_absorption_fraction_score")),
    ("full absorption", (ABS, "eval_result_metrics", "mean", "mean_full_absorption_score")),
    ("max cos", (TRAINING, "final_info", "mean_max_decoder_cosine")),
    ("null floor", ("absorption null control", "mean_absorption_fraction_score")),  # the null SAE on this stream
]


SEED_COLUMNS = [("EV", SUMMARY_COLUMNS[1][1]), ("CE score", SUMMARY_COLUMNS[3][1]), ("L0", SUMMARY_COLUMNS[0][1]),
                ("absorption", SUMMARY_COLUMNS[6][1]), ("full absorption", SUMMARY_COLUMNS[7][1]),
                ("max cos", SUMMARY_COLUMNS[8][1]), ("top-1 probe", None)]


def seed_value(run: Run, path) -> float:
    return probing_value(run, "sae_top_1_test_accuracy") if path is None else run.metric(*path)


def by_setting(runs: list[Run]) -> dict[str, dict]:
    """{setting: {seed: run}} (a setting is a trainer and its differing hyperparameters, seed left out)."""
    out: dict[str, dict] = {}
    for r in runs:
        out.setdefault(r.setting or r.label, {})[r.seed] = r
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for one value), NaNs left out."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return NAN, NAN
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def mean_std(values: list[float]) -> str:
    n = sum(not math.isnan(v) for v in values)
    m, sd = _mean_std(values)
    return "n/a" if n == 0 else (f"{m:.4g}" if n == 1 else f"{m:.4g} ± {sd:.2g}")


def resolve_baseline(name: str, settings: dict) -> str | None:
    """A baseline given as a setting ("topk k=32") or as a trainer with a single setting ("batchtopk")."""
    if name in settings:
        return name
    of_trainer = [s for s, members in settings.items() if next(iter(members.values())).trainer == name]
    if len(of_trainer) > 1:
        print(f"note: baseline '{name}' matches several settings {of_trainer}; name one with --baseline",
              file=sys.stderr)
    return of_trainer[0] if len(of_trainer) == 1 else None


def seed_tables(runs: list[Run], baselines: list[str]) -> list[str]:
    """Mean ± std over seeds per setting, and paired differences (same seed, same stream) against each
    baseline setting; empty when no setting has two seeds."""
    settings = by_setting(runs)
    if max((len(s) for s in settings.values()), default=0) < 2:
        return []
    head = "| setting | seeds | " + " | ".join(c for c, _ in SEED_COLUMNS) + " |"
    rule = "|---|---|" + "---|" * len(SEED_COLUMNS)
    lines = ["### Across seeds (mean ± sample std)", "", head, rule]
    for name, members in settings.items():
        lines.append(f"| {name} | {len(members)} | " + " | ".join(
            mean_std([seed_value(r, p) for r in members.values()]) for _, p in SEED_COLUMNS) + " |")
    lines.append("")
    for base in [resolve_baseline(b, settings) for b in baselines]:
        if base is None:
            continue
        lines += [f"### Paired differences: setting − {base} (same seed; mean ± sample std of the differences)",
                  "", head.replace("| seeds |", "| pairs |"), rule]
        for name, members in settings.items():
            seeds = [sd for sd in members if sd in settings[base]]
            if name == base or not seeds:
                continue
            cells = [mean_std([seed_value(members[sd], p) - seed_value(settings[base][sd], p) for sd in seeds])
                     for _, p in SEED_COLUMNS]
            lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def evaluated_on(run: Run) -> tuple[str, str] | None:
    """(LM dtype, machine) that produced the run's eval numbers (its last re-evaluation's machine, if any); None
    where the machine is not recorded (runs from before it was)."""
    prov = run.training.get("provenance", {})
    machine = next((r["machine"] for r in reversed(run.info.get("re-evaluations", [])) if "machine" in r),
                   prov.get("machine"))
    return (str(prov.get("llm_dtype")), machine) if machine else None


def mixed_evaluation(runs: list[Run]) -> str | None:
    """A warning where runs of one group were evaluated with different LM dtypes or on different machines: one
    SAE's absorption moved by 0.04 between two bf16 CPUs (README, Comparing runs)."""
    kinds = sorted({k for k in map(evaluated_on, runs) if k is not None})
    if len(kinds) < 2:
        return None
    return ("runs evaluated with different LM dtypes or machines (" + "; ".join(f"{d} on {m}" for d, m in kinds) +
            "): their eval numbers differ by the machine too; re-evaluate them on one machine "
            "(python evals/run.py RUN_DIR ...) before comparing")


def summary_markdown(groups: dict, baselines: list[str] = ("topk", "batchtopk")) -> str:
    lines = ["# Run summary", ""]
    for (model, hook), runs in groups.items():
        lines += [f"## {model} / {hook}", ""]
        if warning := mixed_evaluation(runs):
            lines += [f"**Note:** {warning}.", ""]
        lines += ["| run | label | " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " | top-1 probe | tokens |",
                  "|---|---|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
        for r in runs:
            vals = [r.metric(*p) for _, p in SUMMARY_COLUMNS] + [probing_value(r, "sae_top_1_test_accuracy")]
            cells = ["n/a" if math.isnan(v) else f"{v:.4g}" for v in vals]
            lines.append(f"| {r.name} | {r.label} | " + " | ".join(cells) +
                         f" | {r.training.get('provenance', {}).get('train_tokens', 'n/a')} |")
        lines.append("")
        lines += seed_tables(runs, list(baselines))
    return "\n".join(lines)


RUN_MARKERS = ("final_info.json", "config.toml", "checkpoint.pt", "failed.txt")


def find_runs(root: Path) -> list[Path]:
    """The run directories under root: run_* folders holding a run's files. Other folders that match the
    pattern (run_configs/) are not runs and are never listed."""
    return sorted(d for d in root.glob("run_*") if d.is_dir() and any((d / m).exists() for m in RUN_MARKERS))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run directories (default: ./run_*)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the figures and summary.md")
    p.add_argument("--label", action="append", default=[], metavar="RUN=TEXT", help="override a run's label")
    p.add_argument("--baseline", action="append", default=None, metavar="SETTING",
                   help="setting that summary.md's paired differences are taken against (repeatable; "
                        "default: topk and batchtopk)")
    args = p.parse_args(argv)
    # paths resolved once here (`~`, relative, spaces); nothing below depends on the working directory
    args.out = Path(os.path.abspath(args.out.expanduser()))
    dirs = [Path(os.path.abspath(d.expanduser())) for d in args.runs] or find_runs(Path.cwd())
    runs, problems = [], []
    for d in dirs:
        run, why = load_run(d)
        if run is None:
            problems.append((d, why))
        else:
            runs.append(run)
    for d, why in problems:
        print(f"skipped {d}: {why}", file=sys.stderr)
    if not runs:
        print("no readable runs (looked for run_*/final_info.json)", file=sys.stderr)
        return 1
    labels = {}
    if (Path.cwd() / "labels.json").is_file():
        labels.update(json.loads((Path.cwd() / "labels.json").read_text()))
    for item in args.label:
        name, _, text = item.partition("=")
        labels[name] = text

    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, hook), members in groups.items():
        if warning := mixed_evaluation(members):
            print(f"note: {model} / {hook}: {warning}", file=sys.stderr)
        auto_labels(members)
        for r in members:
            r.label = labels.get(r.name, r.label)
        suffix = "" if len(groups) == 1 else f"__{slug(model)}__{slug(hook)}"
        title = f"{model}  {hook}"
        figures = {name: bar_figure(plt, members, panels, title) for name, panels in PANELS.items()}
        figures["sparse_probing_accuracy"] = probing_figure(plt, members, title)
        figures["pareto_l0"] = pareto_figure(plt, members, title)
        figures["absorption_vs_l0"] = absorption_vs_l0_figure(plt, members, title)
        if any(r.info.get(ABS, {}).get("eval_result_unstructured", {}).get("per_letter") for r in members):
            figures["absorption_letters"] = absorption_letters_figure(plt, members, title)
        if max(len(v) for v in by_setting(members).values()) > 1:
            figures["seed_spread"] = seed_spread_figure(plt, members, title)
        figures["training_curves"] = curves_figure(plt, members, title)
        if any(r.trainer in ("momentum", "progressive") for r in members):
            figures["competition_stats"] = competition_figure(plt, [r for r in members if r.trainer in ("momentum", "progressive")], title)
        if any(r.artifacts.get("separation_progression") for r in members):
            figures["separation_progression"] = separation_figure(plt, members, title)
        if any(r.artifacts.get("momentum_final") for r in members):
            figures["momentum_distribution"] = momentum_figure(plt, members, title)
        for name, fig in figures.items():
            path = args.out / f"{name}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    (args.out / "summary.md").write_text(summary_markdown(groups, args.baseline or ["topk", "batchtopk"]))
    print(f"plotted {len(runs)} run(s) in {len(groups)} group(s): {', '.join(str(w) for w in written)}; "
          f"table in {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Aggregate run_*/final_info.json into figures (minimal for now: reconstruction and sparsity).

    python plot.py [RUN_DIR ...] [--out plots]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(dirs: list[Path]) -> tuple[dict, list[str]]:
    runs, problems = {}, []
    for d in dirs:
        f = d / "final_info.json"
        if not f.is_file():
            problems.append(f"{d}: no final_info.json (unfinished or failed run)")
            continue
        try:
            info = json.loads(f.read_text())
            runs[d.name] = info["core evaluation results"]["metrics"]
        except (json.JSONDecodeError, KeyError) as e:
            problems.append(f"{d}: unreadable final_info.json ({type(e).__name__}: {e})")
    return runs, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    dirs = args.runs or sorted(Path(".").glob("run_*"))
    runs, problems = load_runs(dirs)
    for msg in problems:
        print(f"skipped {msg}", file=sys.stderr)
    if not runs:
        print("no finished runs found (looked for run_*/final_info.json)", file=sys.stderr)
        return 1
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    panels = [("reconstruction_quality.png", [("reconstruction_quality", "explained_variance"), ("reconstruction_quality", "mse")]),
              ("sparsity_metrics.png", [("sparsity", "l0"), ("sparsity", "l1")])]
    args.out.mkdir(parents=True, exist_ok=True)
    for fname, metrics in panels:
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
        for ax, (group, key) in zip(axes, metrics):
            vals = [runs[n].get(group, {}).get(key) for n in names]
            ax.bar(range(len(names)), [v if v is not None else float("nan") for v in vals])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(key)
        fig.tight_layout()
        fig.savefig(args.out / fname, dpi=120)
        plt.close(fig)
        print(f"wrote {args.out / fname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

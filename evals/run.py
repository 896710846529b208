"""Re-evaluate finished runs without retraining; merge the results into each final_info.json atomically.

    python evals/run.py RUN_DIR [RUN_DIR ...] [--types core absorption sae_probes] [--set eval.absorption_words=8000]

Default --types: the run's own eval.types. Runs that share model, hook and data settings are evaluated
together (one LM load, shared forwards). Each eval's result replaces the one under its key; an eval that
now runs leaves "skipped evaluations", one that is skipped is recorded there with its reason; the
re-evaluation itself is recorded under "re-evaluations" (time, types, overrides, code version).
Exit codes: 0 done; 2 bad input (no finished run, unknown eval, bad override), nothing written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repository's packages, not evals/ siblings
    REPO = Path(__file__).resolve().parent.parent
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "evals"]

import evals  # noqa: E402,F401  (registers the evals with the config loader)
import trainers  # noqa: E402,F401  (registers the trainer configs a run's config.toml names)
from workbench.config import ConfigError, absolute_path, load_config  # noqa: E402

FINAL_INFO = "final_info.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories (holding final_info.json)")
    p.add_argument("--types", nargs="+", default=None, help="evals to run (default: the run's eval.types)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval setting for this re-evaluation, e.g. --set eval.absorption_words=8000")
    return p.parse_args(argv)


def load_run(run_dir: Path, overrides: list[str], types: list[str] | None):
    """(resolved config, final_info) of a finished run; ConfigError names the fix."""
    if not (run_dir / FINAL_INFO).is_file():
        raise ConfigError(f"'{run_dir}' holds no {FINAL_INFO}: not a finished run (run experiment.py first)")
    if not (run_dir / "sae" / "cfg.json").is_file():
        raise ConfigError(f"'{run_dir}/sae' is missing: the trained SAE is needed to evaluate")
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only eval.* settings can change after training")
    extra = [f"eval.types={json.dumps(types)}"] if types is not None else []
    cfg = load_config(run_dir / "config.toml", [*overrides, *extra])
    return cfg, json.loads((run_dir / FINAL_INFO).read_text())


def merge(final: dict, results: dict, skipped: dict, record: dict) -> dict:
    """final_info with new results under their keys, the skip list updated, the re-evaluation recorded."""
    from evals import module

    out = dict(final)
    out.update(results)
    still_skipped = {k: v for k, v in final.get("skipped evaluations", {}).items()
                     if module(k).KEY not in results}
    out["skipped evaluations"] = {**still_skipped, **skipped}
    out["re-evaluations"] = [*final.get("re-evaluations", []), record]
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.run_dirs = [absolute_path(d) for d in args.run_dirs]  # resolved once, at the entry point
    from workbench.runio import atomic_write_json, code_version

    try:
        runs = [(d, *load_run(d, args.set, args.types)) for d in args.run_dirs]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from workbench.lm import cache_root, load_lm, machine_name, resolve_auto_dtypes, resolve_device
    from workbench.phases import Phases
    from workbench.sae import load_sae

    runs = [(d, resolve_auto_dtypes(cfg), final) for d, cfg, final in runs]  # a run's config.toml holds concrete
    groups: dict[str, list] = {}  # runs evaluated together share everything the evals read but the SAE
    for run_dir, cfg, final in runs:
        key = json.dumps([cfg.model.name, cfg.model.hook, cfg.model.dtype, cfg.model.device, cfg.seed,
                          vars(cfg.data), vars(cfg.eval)], sort_keys=True, default=str)
        groups.setdefault(key, []).append((run_dir, cfg, final))
    for members in groups.values():
        cfg = members[0][1]
        start = time.perf_counter()
        phases = Phases(["model load", *cfg.eval.types], cache_root(cfg.model) / "phase_times.json",
                        setup_key=json.dumps(["re-evaluation", cfg.model.name, cfg.model.hook, len(members)]),
                        enabled=cfg.log.progress)
        with phases("model load"):
            model = load_lm(cfg.model)
        saes = [load_sae(run_dir / "sae") for run_dir, _, _ in members]
        results, skipped = evals.evaluate(cfg, model, saes, members[0][0] / "eval_artifacts", phases)
        record = {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "types": cfg.eval.types,
                  "overrides": args.set, "code_version": code_version(),
                  "machine": machine_name(resolve_device(cfg.model.device)), "wall_s": time.perf_counter() - start,
                  "command": " ".join(["python", "evals/run.py", *(argv if argv is not None else sys.argv[1:])])}
        for (run_dir, _, final), result in zip(members, results):
            atomic_write_json(run_dir / FINAL_INFO, merge(final, result, skipped, record))
            print(f"{run_dir}: {sorted(result)} merged" + (f"; skipped {sorted(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does mixed precision cost accuracy? The quickstart TopK SAE trained three ways, side by side:

    python bench/bench_precision.py [--tokens 400000]

  1. LM float32, SAE float32        (the float32 reference)
  2. LM bfloat16, SAE float32
  3. LM bfloat16, SAE bfloat16 autocast (sae.compute_dtype; weights and Adam stay float32)

Each run is scored by the core eval on the same held-out documents (EV = 1 - FVU, CE-loss score, L0),
with its own LM dtype, and the time of its activation harvest (cold, LM forward) and SAE training is
printed. Runs 2 and 3 share one bfloat16 activation stream through the cache.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
from workbench.config import load_config  # noqa: E402

QS = str(ROOT / "run_configs" / "quickstart.toml")
SETUPS = [("LM float32,  SAE float32 ", ["model.dtype='float32'", "sae.compute_dtype='float32'"]),
          ("LM bfloat16, SAE float32 ", ["model.dtype='bfloat16'", "sae.compute_dtype='float32'"]),
          ("LM bfloat16, SAE bfloat16", ["model.dtype='bfloat16'", "sae.compute_dtype='bfloat16'"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=400_000)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sae_wb_precision_"))
    base = [f"data.train_tokens={args.tokens}", f"cache.dir='{tmp / 'cache'}'", "eval.types=['core']",
            "log.progress=false"]
    rows = []
    try:
        for label, sets in SETUPS:
            out = tmp / f"run{len(rows)}"
            start = time.perf_counter()
            finals = experiment.run(load_config(QS, base + sets), out, False, ["--set", *sets])
            final = finals[0][1]
            prov = final["training results for layer 6"]["provenance"]
            m = final["core evaluation results"]["metrics"]
            rows.append((label, m["reconstruction_quality"]["explained_variance"],
                         m["model_performance_preservation"]["ce_loss_score"], m["sparsity"]["l0"],
                         prov["activation_source"], prov["train_wall_s"], prov["trainer_step_s"],
                         time.perf_counter() - start))
            print(f"done: {label}", flush=True)
        ref_ev, ref_ce = rows[0][1], rows[0][2]
        print(f"\n{'setup':28s} {'FVU':>7s} {'dFVU':>8s} {'CE score':>9s} {'dCE':>8s} {'L0':>5s} "
              f"{'stream+train s':>14s} {'SAE steps s':>11s}  activations")
        for label, ev, ce, l0, source, train_s, step_s, wall in rows:
            print(f"{label:28s} {1 - ev:7.4f} {(1 - ev) - (1 - ref_ev):+8.4f} {ce:9.4f} {ce - ref_ce:+8.4f} "
                  f"{l0:5.1f} {train_s:14.1f} {step_s:11.1f}  {source.split(':')[0].split(' ')[0]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time of every trainer against topk, float32 and bfloat16 autocast, side by side.

    python bench/bench_trainers.py [--steps 10] [--sizes cpu|gpu|all]

CPU size (d=640, n=4096, B=2048); GPU size (d=2304, n=16384, B=2048) when CUDA is present.
Activations are synthetic but structured (sparse codes over a random dictionary plus noise), so the
co-firing pattern, and with it the competition cost, resembles real SAE training.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evals  # noqa: E402,F401  (registers the evals with the config loader)
from trainers import make_trainer  # noqa: E402
from workbench.config import config_from_dict  # noqa: E402

TRAINER_SETTINGS = {
    "topk": {"name": "topk"},
    "momentum": {"name": "momentum", "base": "topk", "beta": 0.9, "tau": 0.5, "lambda2": 0.1},
    "progressive": {"name": "progressive", "theta0": 0.5, "lambda2_max": 0.1, "gamma": 2.0},
    "batchtopk": {"name": "batchtopk"},
    "matryoshka": {"name": "matryoshka"},
    "jumprelu": {"name": "jumprelu"},
    "ortsae": {"name": "ortsae", "gamma": 64.0},
    "ortsae_bf16search": {"name": "ortsae", "gamma": 64.0, "search_dtype": "bfloat16"},  # the argmax search's dtype
    "c2r": {"name": "c2r", "base": "topk", "lam": 1.0},
    "c2r_bf16search": {"name": "c2r", "base": "topk", "lam": 1.0, "search_dtype": "bfloat16"},
}
NO_K = {"jumprelu"}  # sparsity set by its L0 penalty (init_l0 = k), not a k key


def synthetic_acts(n_tokens: int, d: int, device, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_true = 4 * d
    dictionary = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    codes = torch.rand(n_tokens, n_true, generator=g)
    codes = torch.where(codes > 1 - 24 / n_true, torch.rand(n_tokens, n_true, generator=g) * 3, torch.zeros(()))
    x = codes @ dictionary + 0.1 * torch.randn(n_tokens, d, generator=g)
    x *= (d / x.pow(2).sum(1).mean()) ** 0.5
    return x.to(device)


def time_steps(name: str, d: int, n: int, B: int, k: int, steps: int, device,
               compute_dtype: str = "float32") -> tuple[float, dict]:
    cfg = config_from_dict({"model": {"name": "gemma-3-270m", "hook": "blocks.6.hook_resid_post"},
                            "data": {"dataset": "embedded", "train_tokens": B * (steps + 5)},
                            "sae": {"d_sae": n, "batch_size": B},
                            "trainer": {**TRAINER_SETTINGS[name], "warmup_steps": 0,
                                        **({"init_l0": float(k)} if name in NO_K else {"k": k})}})
    acts = synthetic_acts(B * 4, d, device)
    trainer = make_trainer(cfg.trainer, d_in=d, d_sae=n, total_steps=1000, total_tokens=1000 * B,
                           init_acts_BD=acts[:B], seed=0, device=device, compute_dtype=compute_dtype)
    batches = [acts[i * B:(i + 1) * B] for i in range(4)]
    for s in range(3):  # warm up allocator, kernels and the co-firing pattern
        trainer.step(batches[s % 4])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for s in range(steps):
        out = trainer.step(batches[s % 4])
    sync()
    return (time.perf_counter() - start) / steps, out.stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sizes", default="all", choices=["quickstart", "cpu", "gpu", "all"])
    p.add_argument("--trainers", nargs="+", default=list(TRAINER_SETTINGS), choices=list(TRAINER_SETTINGS),
                   help="which trainers (topk, the reference for the ratios, always runs first)")
    args = p.parse_args(argv)
    sizes = []
    if args.sizes in ("quickstart", "all"):  # run_configs/quickstart.toml's SAE
        sizes.append(("quickstart", torch.device("cpu"), 640, 2048, 1024, 32))
    if args.sizes in ("cpu", "all"):
        sizes.append(("cpu", torch.device("cpu"), 640, 4096, 2048, 32))
    if args.sizes in ("gpu", "all"):
        if torch.cuda.is_available():
            sizes.append(("gpu", torch.device("cuda"), 2304, 16384, 2048, 320))
        else:
            print("gpu size skipped: no CUDA device")
    for label, device, d, n, B, k in sizes:
        print(f"\n[{label}] d={d} n={n} B={B} k={k} device={device} threads={torch.get_num_threads()}")
        base = None
        for name in ["topk"] + [t for t in args.trainers if t != "topk"]:
            sec, stats = time_steps(name, d, n, B, k, args.steps, device)
            sec16, _ = time_steps(name, d, n, B, k, args.steps, device, compute_dtype="bfloat16")
            base = base or sec
            extra = f"  co-firing pairs {stats['cofiring_pairs']:,}" if "cofiring_pairs" in stats else ""
            print(f"  {name:12s} float32 {sec * 1000:8.1f} ms/step {B / sec:8.0f} tok/s {sec / base:5.2f}x topk | "
                  f"bfloat16 autocast {sec16 * 1000:8.1f} ms/step {B / sec16:8.0f} tok/s {sec / sec16:5.2f}x faster{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time of every trainer, dense and sparse step side by side, and each against topk.

    python bench/bench_trainers.py [--steps 5] [--sizes quickstart quickstart_trained gemma2] [--dtype auto|bfloat16|float32]

topk_auxk is topk with AuxK at work: 3% of its latents held dead (real runs get there once latents die).
relu's L0 is set by its L1 penalty, not a k: its encoder bias is set so that each latent fires on RELU_L0_PER_K * k / n
of the batch, as trained (quickstart_relu: L0 ~75 at k 32's budget); at init half the entries fire, which the sparse
step hands to the dense products (trainers/relu.py).
Sizes: the quickstart's SAE (640 x 2048, B 1024, k 32) and Gemma-2-2B's (2304 x 16384; see SIZES), on synthetic
activations (sparse codes over a random dictionary plus noise) with the SAE at initialization. Their co-firing
pattern is not a trained SAE's on real text: its distinct co-firing pairs are 0.87 of the B k (k - 1) / 2 occurrences
at the quickstart's size, where a trained quickstart SAE on the quickstart's activations has 0.31-0.39 (its pairs
recur over tokens; notes.txt, sessions 14 and 21), and the competition trainers' cost depends on it
(trainers/competition.py picks its path by it). So `quickstart_trained` times the quickstart's size on what a run
sees: the embedded model's real activations at the quickstart's hook (TRAINED_TOKENS of them, harvested as a run
does, normalized as a run does), every trainer starting from the weights of a topk SAE trained on them for
PRETRAIN_STEPS steps (trainers whose SAE has other parameters, relu and jumprelu, are left out there). The
competition trainers' lines print the share.
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
from workbench.cpu_kernels import bf16_matrix_engine  # noqa: E402
from workbench.cpu_memory import keep_freed_memory  # noqa: E402
from workbench.lm import bf16_native, concrete_dtype, cpu_kernels_for  # noqa: E402
from workbench.sae_ops import sparse_step_wanted  # noqa: E402

TRAINER_SETTINGS = {
    "topk": {"name": "topk"},
    "momentum": {"name": "momentum", "base": "topk", "beta": 0.9, "tau": 0.5, "lambda2": 0.1},
    "progressive": {"name": "progressive", "theta0": 0.5, "lambda2_max": 0.1, "gamma": 2.0},
    "batchtopk": {"name": "batchtopk"},
    "matryoshka": {"name": "matryoshka"},
    "jumprelu": {"name": "jumprelu"},
    "relu": {"name": "relu"},
    "ortsae": {"name": "ortsae", "gamma": 64.0},
    "ortsae_bf16search": {"name": "ortsae", "gamma": 64.0, "search_dtype": "bfloat16"},  # the argmax search's dtype
    "c2r": {"name": "c2r", "base": "topk", "lam": 1.0},
    "c2r_bf16search": {"name": "c2r", "base": "topk", "lam": 1.0, "search_dtype": "bfloat16"},
}
# topk with AuxK on: this fraction of the latents held dead (their counters frozen), as once a real run's
# latents start to die (AuxK's dead-latent block or bag is then part of every step)
AUXK_DEAD_FRAC = 0.03
TRAINER_SETTINGS["topk_auxk"] = {"name": "topk"}
RELU_L0_PER_K = 2.0


def sparsity_keys(name: str, k: int) -> dict:
    if name == "jumprelu":
        return {"init_l0": float(k)}  # sparsity set by its L0 penalty, started at L0 k
    if name == "relu":
        return {}  # set by its L1 penalty; make() sets the encoder bias for L0 = RELU_L0_PER_K * k
    return {"k": k}
# (d, n, B, k) per device: the quickstart's SAE, and Gemma-2-2B's (2304 x 16384; B 4096 and k 64 / 320 on a
# GPU, B 1024 and k 64 on a CPU, where a B-4096 dense step takes seconds)
SIZES = {"quickstart": {"cpu": [(640, 2048, 1024, 32)], "cuda": [(640, 2048, 1024, 32)]},
         "quickstart_trained": {"cpu": [(640, 2048, 1024, 32)], "cuda": [(640, 2048, 1024, 32)]},
         "gemma2": {"cpu": [(2304, 16384, 1024, 64)], "cuda": [(2304, 16384, 4096, 64), (2304, 16384, 4096, 320)]}}


def synthetic_acts(n_tokens: int, d: int, device, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_true = 4 * d
    dictionary = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    codes = torch.rand(n_tokens, n_true, generator=g)
    codes = torch.where(codes > 1 - 24 / n_true, torch.rand(n_tokens, n_true, generator=g) * 3, torch.zeros(()))
    x = codes @ dictionary + 0.1 * torch.randn(n_tokens, d, generator=g)
    x *= (d / x.pow(2).sum(1).mean()) ** 0.5
    return x.to(device)


def make(name: str, d: int, n: int, B: int, k: int, device, compute_dtype: str, sparse_step: str,
         acts: torch.Tensor | None = None, sae_state: dict | None = None):
    """(trainer, 4 batches of activations): synthetic ones, or the given acts (their first 4 B rows) with the SAE's
    weights from sae_state (a topk SAE's state dict)."""
    cfg = config_from_dict({"model": {"name": "gemma-3-270m", "hook": "blocks.6.hook_resid_post"},
                            "data": {"dataset": "embedded", "train_tokens": B * 20},
                            "sae": {"d_sae": n, "batch_size": B},
                            "trainer": {**TRAINER_SETTINGS[name], "warmup_steps": 0,
                                        **sparsity_keys(name, k)}})
    acts = synthetic_acts(B * 4, d, device) if acts is None else acts[:B * 4].to(device)
    trainer = make_trainer(cfg.trainer, d_in=d, d_sae=n, total_steps=1000, total_tokens=1000 * B, init_acts_BD=acts[:B],
                           seed=0, device=device, compute_dtype=compute_dtype, sparse_step=sparse_step,
                           kernels=cpu_kernels_for(cfg.model, device))  # as a run loads them
    if sae_state is not None:  # batchtopk's kind keep their own inference threshold (not used in training)
        assert not trainer.sae.load_state_dict(sae_state, strict=False).unexpected_keys
    if name == "relu":  # each latent's (1 - L0 / n) pre-activation quantile on the bench's batches
        with torch.no_grad():
            pre_BF = trainer.sae.pre_acts(acts) - trainer.sae.b_enc
            rank = max(1, round((1 - RELU_L0_PER_K * k / n) * pre_BF.shape[0]))
            trainer.sae.b_enc.copy_(-pre_BF.kthvalue(rank, dim=0).values)
    if name == "topk_auxk":
        trainer.tokens_since_fired_F[:int(AUXK_DEAD_FRAC * n)] = trainer.dead_after_tokens
        trainer.count_step = lambda out: None  # the dead set stays as it is
    return trainer, acts


def time_interleaved(trainers: list, acts: torch.Tensor, B: int, steps: int) -> tuple[list[float], list[dict]]:
    """Median step time of each trainer, their steps taken in turn (round r steps every trainer once), so
    the load of this machine's neighbours falls on all of them alike."""
    sync = torch.cuda.synchronize if acts.device.type == "cuda" else (lambda: None)
    batches = [acts[i * B:(i + 1) * B] for i in range(4)]
    times = [[] for _ in trainers]
    for r in range(steps + 2):  # two warm-up rounds: allocator, kernels, the co-firing pattern
        for t, trainer in enumerate(trainers):
            sync()
            start = time.perf_counter()
            out = trainer.step(batches[r % 4])
            sync()
            if r >= 2:
                times[t].append(time.perf_counter() - start)
            trainer.last_stats = out.stats
    stats = [{k: v() if callable(v) else v for k, v in tr.last_stats.items()} for tr in trainers]
    return [sorted(ts)[len(ts) // 2] for ts in times], stats


TRAINED_TOKENS = 100_000  # real activations for quickstart_trained (~100 LM batches of the quickstart)
PRETRAIN_STEPS = 300       # topk steps over them (three passes) before the timed steps: the co-firing of trained codes
NOT_FROM_TOPK_WEIGHTS = ("relu", "jumprelu")  # their SAEs have other parameters or sparsity: not on that size


def trained_setting(B: int, k: int, n: int, device, compute_dtype: str) -> tuple[torch.Tensor, dict]:
    """(the quickstart's real activations, normalized as a run does; the state dict of a topk SAE trained on them)."""
    import itertools

    from workbench.activations import ActivationScaler, harvest
    from workbench.config import load_config
    from workbench.lm import load_hook_forward, resolve_auto_dtypes, special_token_ids
    from workbench.stream import train_texts
    from workbench.text import context_windows

    cfg = resolve_auto_dtypes(load_config(str(Path(__file__).resolve().parent.parent / "run_configs" / "quickstart.toml"), []),
                              device)
    start = time.perf_counter()
    forward = load_hook_forward(cfg.model)
    contexts = context_windows(train_texts(cfg, [0]), forward.tokenizer, cfg.data.context_size)
    chunks = harvest(forward, contexts, cfg.data.llm_batch_size, special_token_ids(forward.tokenizer), out_device=device)
    acts = torch.cat(list(itertools.islice(chunks, -(-TRAINED_TOKENS // (cfg.data.llm_batch_size * cfg.data.context_size)))))
    acts = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0)).to(device)]  # mixed, as a run
    acts = ActivationScaler.estimate(acts)(acts)
    trainer, _ = make("topk", acts.shape[1], n, B, k, device, compute_dtype, "auto", acts=acts)
    for step in range(PRETRAIN_STEPS):
        lo = step * B % (acts.shape[0] - B + 1)
        trainer.step(acts[lo:lo + B])
    print(f"quickstart_trained: {acts.shape[0]:,} activations of {cfg.model.name} {cfg.model.hook} ({cfg.model.dtype}), "
          f"a topk SAE trained {PRETRAIN_STEPS} steps on them ({time.perf_counter() - start:.0f} s)", flush=True)
    return acts, {key: value.detach().clone() for key, value in trainer.sae.state_dict().items()}


def matmul_gflops(device, dtype, size=2048) -> float:
    """The measured rate of one large matmul in the step's dtype: the roof the step is compared to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ a
    sync()
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    sync()
    return 5 * 2 * size**3 / (time.perf_counter() - start) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="sae.compute_dtype (auto: bfloat16 where the device multiplies it natively, as in a run)")
    p.add_argument("--trainers", nargs="+", default=None, choices=list(TRAINER_SETTINGS),
                   help="which trainers (topk, the reference for the ratios, always runs first); default all, "
                        "less the bf16-search variants where the device has no native bf16 (emulated: minutes a step)")
    args = p.parse_args(argv)
    keep_freed_memory()  # as experiment.py does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = concrete_dtype(args.dtype, device)
    if args.trainers is None:
        native, why = bf16_native(device)
        args.trainers = [t for t in TRAINER_SETTINGS if native or not t.endswith("_bf16search")]
        if not native:
            print(f"bf16-search variants skipped: {why}")
    roof = matmul_gflops(device, getattr(torch, args.dtype))
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype}: "
          f"matmul roof {roof:.0f} GFLOP/s (2048^3)")
    for size in args.sizes:
        for d, n, B, k in SIZES[size][device.type]:
            acts = state = None
            if size == "quickstart_trained":
                acts, state = trained_setting(B, k, n, device, args.dtype)
            print(f"\n[{size}] d={d} n={n} B={B} k={k}   (ms per step; sparse = sae.sparse_step on; "
                  f"auto = what sae.sparse_step=auto runs; ratio = auto / a topk step timed in turn with it)")
            auto = sparse_step_wanted("auto", n, args.dtype, bf16_matrix_engine(device.type))
            for name in ["topk"] + [t for t in args.trainers if t != "topk"]:
                if state is not None and name in NOT_FROM_TOPK_WEIGHTS:
                    continue
                modes = ["off", "on"] if make(name, 8, 256, 8, 2, device, args.dtype, "on")[0].sparse_codes else ["off"]
                made = [make(name, d, n, B, k, device, args.dtype, m, acts, state) for m in modes]
                reference = [make("topk", d, n, B, k, device, args.dtype, "auto", acts, state)[0]] if name != "topk" else []
                secs, stats = time_interleaved([tr for tr, _ in made] + reference, made[0][1], B, args.steps)
                dense_s = secs[0]
                line = f"  {name:18s} dense {dense_s * 1000:8.1f}"
                auto_s = dense_s
                if len(modes) == 2:
                    sparse_s = secs[1]
                    auto_s = sparse_s if auto else dense_s
                    line += f"  sparse {sparse_s * 1000:8.1f} ({dense_s / sparse_s:4.2f}x)  auto={'sparse' if auto else 'dense '}"
                else:
                    line += " " * 41
                topk_s = secs[-1] if reference else auto_s
                line += f"  {B / auto_s:8.0f} tok/s  {auto_s / topk_s:5.2f}x topk"
                if name == "topk":  # the step's useful work: encoder forward + dense-equivalent decoder and backward
                    line += f"  ({6 * B * d * n / auto_s / 1e9:.0f} GFLOP/s dense-equivalent, {6 * B * d * n / auto_s / 1e9 / roof:.0%} of roof)"
                if "cofiring_pairs" in stats[0]:  # share: of the occurrences (token, r < s), if every entry fired
                    share = stats[0]["cofiring_pairs"] / (B * k * (k - 1) / 2)
                    line += f"  co-firing pairs {stats[0]['cofiring_pairs']:,} ({share:.2f} of the occurrences)"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

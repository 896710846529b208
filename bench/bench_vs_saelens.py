"""This project vs SAELens 6.54 on the embedded default, then cold vs warm cache, then sweep cost.

    python bench/bench_vs_saelens.py [--tokens 400000] [--skip-saelens]

1. The same TopK SAE (Gemma-3-270M bf16, blocks.6.hook_resid_post, 2048 latents, k 32, batch 1024,
   context 128, lr 1e-3, the quickstart's SAE precision (bf16 autocast in both), same training text,
   same token count) trained end to end (LM forward
   included, activation cache off) by this project and by SAELens, one after the other: tokens/s, ratio,
   and both SAEs' FVU and L0 on the same held-out activations.
2. A cold run (LM forward, cache written) vs a warm run (cache read, LM never loaded): wall times.
3. A four-trainer sweep (topk, momentum, progressive, relu) vs a single run, cold and warm: the marginal
   wall time of each extra trainer, as a share of a single run's wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
from workbench.config import load_config  # noqa: E402
from workbench.cpu_memory import keep_freed_memory  # noqa: E402

QS = str(ROOT / "run_configs" / "quickstart.toml")


def run_ours(out: Path, sets: list[str]) -> dict:
    args = [f"--out_dir={out}", "--config", QS, "--set", "log.progress=false"]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    finals = experiment.run(load_config(QS, sets + ["log.progress=false"]), out, False, args)
    wall = time.perf_counter() - start
    prov = finals[0][1]["training results for layer 6"]["provenance"]
    return {"wall": wall, "prov": prov, "dirs": [d for d, _ in finals]}


def heldout_acts(model, cfg, n_tokens=20_000) -> torch.Tensor:
    from workbench.activations import hook_activations, special_mask
    from workbench.lm import special_token_ids
    from workbench.text import held_out_contexts

    toks = held_out_contexts(cfg.data, model.tokenizer, n_tokens // 127 + 1, cfg.seed)
    xs = []
    for i in range(0, toks.shape[0], 16):
        t = toks[i:i + 16]
        a = hook_activations(model, t, cfg.model.hook, cfg.model.layer)
        xs.append(a[~special_mask(t, special_token_ids(model.tokenizer))].float())
    return torch.cat(xs)[:n_tokens]


@torch.no_grad()
def fvu_l0(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    f = encode(x)
    xh = decode(f)
    return ((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), (f != 0).sum(1).float().mean().item()


def train_saelens(model, cfg, tokens: int, tmp: Path):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from workbench.text import documents

    ds = datasets.Dataset.from_dict({"text": list(documents(cfg.data, held_out=False, seed=cfg.seed))})
    tc = cfg.trainer
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=cfg.sae.d_sae, k=tc.k,
                                  normalize_activations="expected_average_only_in"),
        model_name="google/gemma-3-270m", hook_name=cfg.model.hook, dataset_path=str(tmp / "unused"),
        is_dataset_tokenized=False, streaming=False, context_size=cfg.data.context_size,
        training_tokens=tokens, train_batch_size_tokens=cfg.sae.batch_size,
        store_batch_size_prompts=cfg.data.llm_batch_size, n_batches_in_buffer=cfg.data.buffer_batches,
        lr=tc.lr, lr_warm_up_steps=tc.warmup_steps, lr_decay_steps=int(tc.decay_frac * tokens // cfg.sae.batch_size),
        device="cpu", dtype="float32", seed=cfg.seed, exclude_special_tokens=True,
        autocast=cfg.sae.compute_dtype == "bfloat16",  # the same bf16 SAE autocast as ours (the LM is shared)
        n_batches_for_norm_estimate=max(1, cfg.data.norm_tokens // cfg.sae.batch_size),
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
        output_path=str(tmp / "saelens_out"), checkpoint_path=str(tmp / "saelens_ckpt"), verbose=False)
    start = time.perf_counter()
    sae = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=ds, override_model=model).run()
    return sae, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--skip-saelens", action="store_true")
    args = p.parse_args(argv)
    keep_freed_memory()  # as experiment.py does; both projects run in this process, so both get it
    tmp = Path(tempfile.mkdtemp(prefix="sae_wb_bench_"))
    base = [f"data.train_tokens={args.tokens}", f"cache.dir='{tmp / 'cache'}'"]
    try:
        print(f"== 1. end to end, {args.tokens:,} tokens, this project vs SAELens 6.54 (cache off) ==", flush=True)
        ours = run_ours(tmp / "run_ours", base + ["cache.enabled=false", "eval.types=[]"])
        p1 = ours["prov"]
        ours_tps = p1["train_tokens"] / p1["train_wall_s"]
        from workbench.lm import load_lm, resolve_auto_dtypes
        from workbench.sae import load_sae
        cfg = resolve_auto_dtypes(load_config(QS))  # the dtypes the run above used
        model = load_lm(cfg.model)
        x = heldout_acts(model, cfg)
        ours_sae = load_sae(ours["dirs"][0] / "sae")
        fvu_o, l0_o = fvu_l0(ours_sae.encode, ours_sae.decode, x)
        print(f"  this project: {ours_tps:8.0f} tok/s (LM + training, {p1['train_wall_s']:.0f} s)  FVU {fvu_o:.4f}  L0 {l0_o:.1f}")
        if not args.skip_saelens:
            lens_sae, lens_s = train_saelens(model, cfg, args.tokens, tmp)
            lens_sae.eval()
            fvu_l, l0_l = fvu_l0(lens_sae.encode, lens_sae.decode, x)
            print(f"  SAELens 6.54: {args.tokens / lens_s:8.0f} tok/s (LM + training, {lens_s:.0f} s)  FVU {fvu_l:.4f}  L0 {l0_l:.1f}")
            print(f"  ratio (this / SAELens): {ours_tps / (args.tokens / lens_s):.2f}x tokens/s")
        del model

        print("\n== 2. cold (LM, cache written) vs warm (cache read) run, evaluation off ==", flush=True)
        cold = run_ours(tmp / "run_cold", base + ["eval.types=[]"])
        warm = run_ours(tmp / "run_warm", base + ["eval.types=[]"])
        print(f"  cold {cold['wall']:.1f} s ({cold['prov']['activation_source']})")
        print(f"  warm {warm['wall']:.1f} s ({warm['prov']['activation_source']}, LM load {warm['prov']['model_load_s']:.1f} s)")
        print(f"  warm / cold = {warm['wall'] / cold['wall']:.2%}")

        print("\n== 3. four-trainer sweep (topk, momentum, progressive, relu) vs one trainer, evaluation off ==",
              flush=True)
        sweep = ("sweep=[{label='mom', name='momentum', base='topk', k=32, lr=1e-3, warmup_steps=50}, "
                 "{label='prog', name='progressive', k=32, lr=1e-3, warmup_steps=50, lambda2_max=1.0}, "
                 "{label='relu', name='relu', l1_coeff=0.5, lr=1e-3, warmup_steps=50}]")
        cold4 = run_ours(tmp / "run_four_cold", [f"data.train_tokens={args.tokens}",
                                                 f"cache.dir='{tmp / 'cache_sweep'}'", "eval.types=[]", sweep])
        warm4 = run_ours(tmp / "run_four_warm", base + ["eval.types=[]", sweep])
        for label, one, four in (("cold (LM forward)", cold, cold4), ("warm (cache read)", warm, warm4)):
            extra = (four["wall"] - one["wall"]) / 3
            print(f"  {label}: one {one['wall']:.1f} s, four {four['wall']:.1f} s, "
                  f"each extra trainer +{extra:.1f} s = {extra / one['wall']:.0%} of a single run")
        for d in cold4["dirs"]:
            pv = json.loads((d / "final_info.json").read_text())["training results for layer 6"]["provenance"]
            print(f"    {d.name:20s} its SAE steps {pv['trainer_step_s']:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

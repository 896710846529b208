"""Which layer should an absorption study on the embedded default read? The first-letter ground-truth
probe decides which letters SAEBench's absorption eval can score (F1 > 0.6), and it does not depend on any
SAE: train it at several layers and print, side by side, letters scored and mean / min probe F1.

    python bench/absorption_probe_by_layer.py [--layers 3 6 9 12 15] [--words_per_letter 150]

Same word sample, prompt template and seed as the absorption eval (evals/absorption.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def probe_f1_by_letter(model, layer: int, words: list[str], seed: int, device: str) -> dict[str, float]:
    """Train sae_bench's 26-way linear probe on the layer's activations at the word's last token and score
    it on the held-out words as sae_bench does (one-vs-rest F1 at score > 0)."""
    from sae_bench.evals.absorption import common
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sklearn import metrics

    from evals.sae_bench_bridge import forwards_stop_at_hook, seed_everything

    cfg = AbsorptionEvalConfig()
    with tempfile.TemporaryDirectory() as probes_dir, forwards_stop_at_hook(model), \
            mock.patch.object(common, "get_alpha_tokens", lambda *a, **k: list(words)):
        seed_everything(seed)
        common.train_and_save_probes(model, [layer], cfg.prompt_template, cfg.prompt_token_pos,
                                     probes_dir=probes_dir, device=device)
        probe = common.load_probe(model.cfg.model_name, layer, probes_dir, device=device)
        acts, labels = common.load_probe_data_split_or_train(model, cfg.prompt_template, cfg.prompt_token_pos,
                                                             layer, "test", probes_dir, device=device)
        with torch.no_grad():  # the split's activations are inference-mode tensors
            scores = probe(acts.to(device).to(next(probe.parameters()).dtype)).float().cpu()
    answers = [idx for _, idx in labels]
    letters = "abcdefghijklmnopqrstuvwxyz"
    return {c: metrics.f1_score([a == i for a in answers], (scores[:, i] > 0).numpy()) for i, c in enumerate(letters)}


def main(argv=None) -> int:
    import evals  # noqa: F401  (registers the evals with the config loader)
    import trainers  # noqa: F401
    from evals.absorption import word_sample
    from workbench.config import load_config
    from workbench.lm import load_lm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12, 15])
    p.add_argument("--words_per_letter", type=int, default=150)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    cfg = load_config(ROOT / "run_configs" / "quickstart.toml")
    model = load_lm(cfg.model)
    words, _ = word_sample(model.tokenizer, 0, args.seed, args.words_per_letter)
    device = str(next(model.parameters()).device)
    print(f"{cfg.model.name}, {len(words)} words ({args.words_per_letter} per first letter), seed {args.seed}")
    print(f"{'layer':>5} {'letters F1>0.6':>15} {'mean F1':>8} {'min F1':>7} {'time':>6}  weakest letters")
    for layer in args.layers:
        start = time.perf_counter()
        f1 = probe_f1_by_letter(model, layer, words, args.seed, device)
        weakest = ", ".join(f"{c} {v:.2f}" for c, v in sorted(f1.items(), key=lambda kv: kv[1])[:4])
        print(f"{layer:>5} {sum(v > 0.6 for v in f1.values()):>15} {sum(f1.values()) / 26:>8.3f} "
              f"{min(f1.values()):>7.3f} {time.perf_counter() - start:>5.0f}s  {weakest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

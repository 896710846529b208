"""TransformerLens's forward as the evals run it, with TL's stock weight layout and with lens_linear_layout's:

    python bench/bench_lens_forward.py [--rounds 7] [--device cpu]

TL 3.9 copies each projection weight into F.linear's layout on every call; load_lm stores the weights in that
layout instead (workbench.lm.lens_linear_layout). Both models are the embedded Gemma-3-270M in the evals' dtype,
fed real held-out text at the shapes the evals use:
  - sae_probes' activations: 16 prompts x 48 tokens, the forward stopped after the hook's layer;
  - absorption's probe activations: 64 prompts x 70 tokens, stopped after the hook's layer;
  - core's CE / KL: 4 contexts x 128 tokens, the whole model to the logits;
  - a TransformerLens harvest batch: 16 x 128, stopped after the hook's layer.
Rounds alternate between the two layouts; the median of each is printed with the ratio, and each pair of
outputs is compared bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evals  # noqa: E402,F401  (registers the evals with the config loader)
import trainers  # noqa: E402,F401  (registers the trainer configs)
from workbench.config import load_config  # noqa: E402
from workbench.lm import load_lm  # noqa: E402
from workbench.text import held_out_contexts  # noqa: E402

SHAPES = [("sae_probes acts  16 x 48, to the hook", 16, 48, True),
          ("absorption probe 64 x 70, to the hook", 64, 70, True),
          ("core CE / KL      4 x 128, logits", 4, 128, False),
          ("TL harvest       16 x 128, to the hook", 16, 128, True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    cfg = load_config(str(ROOT / "run_configs" / "quickstart.toml"), [f"model.device='{args.device}'"])
    laid_out = load_lm(cfg.model)
    stock = copy.deepcopy(laid_out)
    with torch.no_grad():
        for param in stock.parameters():  # TL's own layout: every weight contiguous as TL allocates it
            param.data = param.data.contiguous()
    contexts = held_out_contexts(cfg.data, laid_out.tokenizer, 64, cfg.seed).to(laid_out.cfg.device)
    sync = torch.cuda.synchronize if contexts.is_cuda else (lambda: None)
    hook, stop = cfg.model.hook, cfg.model.layer + 1
    print(f"{laid_out.cfg.model_name} {laid_out.cfg.dtype} on {laid_out.cfg.device}, hook {hook}, "
          f"{args.rounds} alternated rounds (median ms)")
    print(f"{'forward':40s} {'TL stock':>9s} {'laid out':>9s} {'ratio':>6s}  same bits")

    @torch.no_grad()
    def forward(model, tokens, to_hook):
        if to_hook:
            return model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)[1][hook]
        return model(tokens)

    for label, batch, length, to_hook in SHAPES:
        tokens = contexts[:batch, :length]
        same = torch.equal(forward(stock, tokens, to_hook), forward(laid_out, tokens, to_hook))
        times = {"stock": [], "laid": []}
        for _ in range(args.rounds):
            for name, model in (("stock", stock), ("laid", laid_out)):
                sync()
                start = time.perf_counter()
                forward(model, tokens, to_hook)
                sync()
                times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["stock"]) * 1e3, statistics.median(times["laid"]) * 1e3
        print(f"{label:40s} {a:9.1f} {b:9.1f} {a / b:5.2f}x  {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Core evaluation in SAEBench's core schema, on held-out text.

Written here rather than called from sae_bench 0.6.0 because its explained_variance is wrong
(it uses E||x||^2 - (mean_d E[x_d^2])^2 as the variance; OFFLINE_FACTS.md) and its CE part runs three
full forwards per batch with no way to share the model's early layers. Definitions (float64 sums):
    explained_variance = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2       (TRAINERS.md; as sae_lens 6)
    mse                = mean over tokens and dims of (x - x_hat)^2           (SAEBench core's convention)
    cossim             = mean_t cos(x_t, x_hat_t)
    l2_ratio           = mean_t ||x_hat_t|| / ||x_t||;  relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>
    ce_loss_score      = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl_div_score       = (KL_zero - KL_sae) / KL_zero,   KL = KL(p_clean || p_patched) per position
BOS/EOS/pad positions are never reconstructed (they keep the original activation) nor ablated, and
positions whose input or target token is special are not scored.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from evals import EvalContext
from workbench.activations import hook_activations, special_mask

KEY = "core evaluation results"


class _Sums:
    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sum_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = self.sum_err2 = self.sum_cos = self.sum_norm_in = self.sum_norm_out = 0.0
        self.sum_ratio = self.sum_xhat2 = self.sum_dot = self.sum_l0 = self.sum_l1 = 0.0
        self.fires_F = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat, f = x.double().cpu(), x_hat.double().cpu(), f.double().cpu()
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += x.shape[0]
        self.sum_x_D += x.sum(0)
        self.sum_x2 += x.pow(2).sum().item()
        self.sum_err2 += (x - x_hat).pow(2).sum().item()
        self.sum_cos += ((x * x_hat).sum(-1) / (n_in * n_out).clamp_min(1e-12)).sum().item()
        self.sum_norm_in += n_in.sum().item()
        self.sum_norm_out += n_out.sum().item()
        self.sum_ratio += (n_out / n_in.clamp_min(1e-4)).sum().item()
        self.sum_xhat2 += n_out.pow(2).sum().item()
        self.sum_dot += (x * x_hat).sum().item()
        self.sum_l0 += (f != 0).sum().item()
        self.sum_l1 += f.abs().sum().item()
        self.fires_F += (f != 0).sum(0)


def reconstruction_metrics(sums: _Sums, d_in: int) -> dict:
    n = max(sums.n, 1)
    total_var = sums.sum_x2 - sums.sum_x_D.pow(2).sum().item() / n  # sum ||x - mean||^2
    density_F = sums.fires_F / n
    return {
        "reconstruction_quality": {
            "explained_variance": 1 - sums.sum_err2 / total_var if total_var > 0 else None,
            "mse": sums.sum_err2 / (n * d_in),
            "cossim": sums.sum_cos / n},
        "shrinkage": {
            "l2_norm_in": sums.sum_norm_in / n, "l2_norm_out": sums.sum_norm_out / n,
            "l2_ratio": sums.sum_ratio / n,
            "relative_reconstruction_bias": sums.sum_xhat2 / sums.sum_dot if sums.sum_dot else None},
        "sparsity": {"l0": sums.sum_l0 / n, "l1": sums.sum_l1 / n},
        "misc": {"frac_alive": (density_F > 0).double().mean().item(),
                 "freq_over_1_percent": (density_F > 0.01).double().mean().item(),
                 "freq_over_10_percent": (density_F > 0.1).double().mean().item()},
    }


@torch.no_grad()
def variance_sums(model, saes, contexts_NT, hook, layer, special_ids, n_tokens, batch, progress) -> list[_Sums]:
    """One LM pass to the hook over held-out text; every SAE reconstructs the same activations."""
    sums = [_Sums(sae.d_in, sae.d_sae) for sae in saes]
    seen = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="core: reconstruction", disable=not progress)
    for i in range(0, contexts_NT.shape[0], batch):
        tokens = contexts_NT[i:i + batch]
        acts = hook_activations(model, tokens, hook, layer)
        x = acts[~special_mask(tokens, special_ids).to(acts.device)].float()[: n_tokens - seen]
        for sae, acc in zip(saes, sums):
            f = sae.encode(x.to(sae.W_enc.device))
            acc.add(x, sae.decode(f), f)
        seen += x.shape[0]
        bar.update(x.shape[0])
        if seen >= n_tokens:
            break
    bar.close()
    return sums


# Positions per pass over the vocabulary axis. A batch's logits in float32 are ~0.5 GB at a 262k vocabulary, and
# each statistic streamed them through memory again; on a CPU 4 rows (4 MB) stay in cache for all of them (a GPU
# takes larger chunks: fewer kernel launches). Every statistic is per row, so the chunking leaves the numbers as
# they were.
VOCAB_ROWS = {"cpu": 4, "other": 256}


def vocab_rows(device) -> int:
    return VOCAB_ROWS["cpu" if torch.device(device).type == "cpu" else "other"]


def _row_chunks(logits_BTV: torch.Tensor, rows_N: torch.Tensor, targets_N: torch.Tensor, rows: int):
    """(slice, float32 logits (rows, V), their log-partition, CE) for each chunk of the scored positions rows_N
    (indices into the flattened batch x position axis), read straight from the logits without a gathered copy."""
    flat_V = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    for i in range(0, rows_N.shape[0], rows):
        part = slice(i, i + rows)
        lg = flat_V.index_select(0, rows_N[part]).float()
        lse = torch.logsumexp(lg, dim=-1)
        yield part, lg, lse, lse - lg.gather(-1, targets_N[part, None])[:, 0]


def clean_stats(logits_BTV, rows_N, targets_N, rows: int):
    """The clean pass at the scored positions: (p_clean (N, V) float32, CE per position,
    sum_v p_clean * log p_clean per position)."""
    n, vocab = rows_N.shape[0], logits_BTV.shape[-1]
    p_clean_NV = torch.empty(n, vocab, dtype=torch.float32, device=logits_BTV.device)
    ce_N, self_N = torch.empty(n, device=logits_BTV.device), torch.empty(n, device=logits_BTV.device)
    for part, lg, lse, ce in _row_chunks(logits_BTV, rows_N, targets_N, rows):
        p = torch.sub(lg, lse[:, None], out=p_clean_NV[part]).exp_()
        ce_N[part], self_N[part] = ce, (p * lg).sum(-1) - lse
    return p_clean_NV, ce_N, self_N


def patched_stats(logits_BTV, rows_N, targets_N, p_clean_NV, rows: int):
    """A patched pass at the same positions: (CE per position, sum_v p_clean * log p_patched per position).
    KL(p_clean || p_patched) per position = self term - this cross term."""
    n = rows_N.shape[0]
    ce_N, cross_N = torch.empty(n, device=logits_BTV.device), torch.empty(n, device=logits_BTV.device)
    for part, lg, lse, ce in _row_chunks(logits_BTV, rows_N, targets_N, rows):
        ce_N[part], cross_N[part] = ce, (p_clean_NV[part] * lg).sum(-1) - lse
    return ce_N, cross_N


def _scores(m: dict) -> dict:
    ce_den, kl_den = m["ce_zero"] - m["ce_clean"], m["kl_zero"]
    return {
        "model_behavior_preservation": {
            "kl_div_score": (m["kl_zero"] - m["kl_sae"]) / kl_den if kl_den > 0 else None,
            "kl_div_with_ablation": m["kl_zero"], "kl_div_with_sae": m["kl_sae"]},
        "model_performance_preservation": {
            "ce_loss_score": (m["ce_zero"] - m["ce_sae"]) / ce_den if ce_den != 0 else None,
            "ce_loss_with_ablation": m["ce_zero"], "ce_loss_with_sae": m["ce_sae"],
            "ce_loss_without_sae": m["ce_clean"]},
    }


@torch.no_grad()
def downstream_metrics(model, saes, contexts_NT, hook, layer, special_ids, batch, progress) -> tuple[list[dict], int]:
    """CE loss and KL(p_clean || p_patched) with each SAE spliced in, and with the activation zero-ablated.

    KL = sum p_c (lp_c - lp_s) = [sum p_c logit_c - lse_c] - [sum p_c logit_s - lse_s].
    The clean and zero-ablated passes are shared by all SAEs; for resid_post hooks the layers up to the
    hook run once and each variant resumes from there."""
    totals = [{"ce_sae": 0.0, "kl_sae": 0.0} for _ in saes]
    shared = {"ce_clean": 0.0, "ce_zero": 0.0, "kl_zero": 0.0}
    n_pos = 0
    resume = hook.endswith("hook_resid_post") and layer + 1 < model.cfg.n_layers
    rows = vocab_rows(model.cfg.device)
    for i in tqdm(range(0, contexts_NT.shape[0], batch), desc="core: CE/KL", disable=not progress):
        tokens = contexts_NT[i:i + batch].to(model.cfg.device)
        special_BT = special_mask(tokens, special_ids)
        score_BT = torch.zeros_like(special_BT)  # input and target both ordinary tokens; the last position has none
        score_BT[:, :-1] = ~special_BT[:, :-1] & ~special_BT[:, 1:]
        rows_N = score_BT.flatten().nonzero()[:, 0]  # scored positions in the flattened (batch x position) logits
        targets = tokens[:, 1:][score_BT[:, :-1]]
        keep = ~special_BT

        def patched(act, replace):
            act = act.clone()
            act[keep] = replace(act[keep])
            return act

        if resume:
            resid = hook_activations(model, tokens, hook, layer)
            forward = lambda replace: model(resid if replace is None else patched(resid, replace),
                                            start_at_layer=layer + 1)
        else:
            forward = lambda replace: model.run_with_hooks(
                tokens, fwd_hooks=[] if replace is None else [(hook, lambda a, hook: patched(a, replace))])

        p_clean, ce_c, self_term_N = clean_stats(forward(None), rows_N, targets, rows)
        shared["ce_clean"] += ce_c.sum().item()

        def patched_totals(fn):
            ce, cross = patched_stats(forward(fn), rows_N, targets, p_clean, rows)
            return ce.sum().item(), (self_term_N - cross).clamp_min(0).sum().item()

        shared["ce_zero"], shared["kl_zero"] = [a + b for a, b in zip(
            (shared["ce_zero"], shared["kl_zero"]), patched_totals(torch.zeros_like))]
        for sae, tot in zip(saes, totals):
            ce, kl = patched_totals(lambda a, sae=sae: sae(a.float().to(sae.W_enc.device)).to(a.dtype).to(a.device))
            tot["ce_sae"] += ce
            tot["kl_sae"] += kl
        n_pos += targets.shape[0]
    per = lambda v: v / max(n_pos, 1)
    return [_scores({**{k: per(v) for k, v in shared.items()}, **{k: per(v) for k, v in tot.items()}})
            for tot in totals], n_pos


def core_eval_many(model, saes, contexts_NT, hook, layer, special_ids, *, ce_contexts, ce_batch_size,
                   variance_tokens, llm_batch_size=8, progress=True) -> list[dict]:
    """Core metrics of several SAEs on the same held-out text, grouped as SAEBench's core output."""
    sums = variance_sums(model, saes, contexts_NT, hook, layer, special_ids, variance_tokens, llm_batch_size, progress)
    downs, n_pos = downstream_metrics(model, saes, contexts_NT[:ce_contexts], hook, layer, special_ids,
                                      ce_batch_size, progress)
    return [{**down, **reconstruction_metrics(acc, sae.d_in),
             "token_stats": {"total_tokens_eval_reconstruction": n_pos, "total_tokens_eval_sparsity_variance": acc.n}}
            for sae, acc, down in zip(saes, sums, downs)]


def core_eval(model, sae, contexts_NT, hook, layer, special_ids, **kw) -> dict:
    return core_eval_many(model, [sae], contexts_NT, hook, layer, special_ids, **kw)[0]


def run(ctx: EvalContext) -> list[dict]:
    cfg = ctx.run_cfg
    start = time.time()
    all_metrics = core_eval_many(ctx.model, ctx.saes, ctx.eval_contexts_NT, cfg.model.hook, cfg.model.layer,
                                 ctx.special_ids, ce_contexts=cfg.eval.ce_contexts, ce_batch_size=cfg.eval.ce_batch_size,
                                 variance_tokens=cfg.eval.variance_tokens, llm_batch_size=cfg.data.llm_batch_size,
                                 progress=ctx.progress)
    sae_set = f"{cfg.model.name}_layer_{cfg.model.layer}_sae"
    eval_cfg = {
        "model_name": cfg.model.name, "llm_dtype": cfg.model.dtype, "batch_size_prompts": cfg.eval.ce_batch_size,
        "n_eval_reconstruction_batches": -(-cfg.eval.ce_contexts // cfg.eval.ce_batch_size),
        "dataset": cfg.data.dataset, "context_size": cfg.data.context_size,
        "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "exclude_special_tokens_from_reconstruction": True, "held_out": True,
        "implementation": "sae_workbench evals/core.py (SAEBench core schema, corrected explained variance)"}
    return [{"eval_type_id": "core", "unique_id": f"{sae_set}_custom_sae", "sae_set": sae_set, "sae_id": "custom_sae",
             "eval_cfg": eval_cfg, "metrics": metrics, "datetime_epoch_millis": int(time.time() * 1000),
             "eval_runtime_s": time.time() - start, "saes_evaluated_together": len(ctx.saes)}
            for metrics in all_metrics]

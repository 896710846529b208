"""Core metrics: closed forms on an identity SAE and a zero SAE, and a naive reference on a random SAE."""
import pytest
import torch

from evals.core import core_eval
from tests.helpers import tiny_lm
from workbench.sae import make_sae

HOOK, LAYER, SPECIAL = "blocks.0.hook_resid_post", 0, [0]


def contexts(n=6, T=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab, (n, T), generator=g)
    t[:, 0] = 0  # BOS
    t[2, 5] = 0  # a special token mid-context
    return t


def identity_sae(d):
    """ReLU SAE with 2d latents: x = ReLU(x) - ReLU(-x) exactly."""
    sae = make_sae(d, 2 * d, "standard")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def run(model, sae, toks, hook=HOOK):
    return core_eval(model, sae, toks, hook, LAYER, SPECIAL, ce_contexts=toks.shape[0], ce_batch_size=4,
                     variance_tokens=10_000, llm_batch_size=4, progress=False)


def acts_of(model, toks):
    _, cache = model.run_with_cache(toks)
    return cache[HOOK][toks != 0].double()


@pytest.mark.parametrize("hook", [HOOK, "blocks.0.hook_mlp_out"])  # resumed forward and hooked forward
def test_identity_sae_scores_exactly_one(hook):
    model, toks = tiny_lm(), contexts()
    m = run(model, identity_sae(16), toks, hook)
    assert m["reconstruction_quality"]["explained_variance"] == 1.0
    assert m["reconstruction_quality"]["mse"] == 0.0
    assert m["model_performance_preservation"]["ce_loss_score"] == 1.0
    assert m["model_behavior_preservation"]["kl_div_score"] == 1.0
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == 0.0
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0, abs=1e-12)
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert m["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-12)
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == int((toks != 0).sum())


def test_zero_sae_scores_zero_and_closed_form_ev():
    model, toks = tiny_lm(), contexts()
    m = run(model, make_sae(16, 8, "standard"), toks)
    x = acts_of(model, toks)
    ev = 1 - x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["model_performance_preservation"]["ce_loss_score"] == 0.0
    assert m["model_behavior_preservation"]["kl_div_score"] == 0.0
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(ev.item(), rel=1e-9)
    assert m["sparsity"]["l0"] == 0.0 and m["misc"]["frac_alive"] == 0.0


def test_random_sae_matches_naive_reference():
    model, toks = tiny_lm(), contexts()
    g = torch.Generator().manual_seed(3)
    sae = make_sae(16, 32, "topk", k=4).init_tied_(g, b_dec=torch.randn(16, generator=g))
    m = run(model, sae, toks)
    x = acts_of(model, toks)
    with torch.no_grad():
        f = sae.encode(x.float()).double()
        xh = sae(x.float()).double()
    ev = 1 - (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(ev.item(), rel=1e-6)
    assert m["reconstruction_quality"]["mse"] == pytest.approx((x - xh).pow(2).mean().item(), rel=1e-6)
    assert m["sparsity"]["l0"] == pytest.approx((f != 0).sum(1).double().mean().item())
    assert m["sparsity"]["l1"] == pytest.approx(f.sum(1).mean().item(), rel=1e-6)
    # CE with the SAE spliced in, computed directly with hooks at ordinary positions
    mask = toks != 0

    def splice(act, hook):
        act = act.clone()
        act[mask] = sae(act[mask])
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[(HOOK, splice)])
        clean = model(toks)
    score = mask[:, :-1] & mask[:, 1:]
    tgt = toks[:, 1:][score]
    ce = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1][score].double(), tgt).item()
    mp = m["model_performance_preservation"]
    assert mp["ce_loss_with_sae"] == pytest.approx(ce(logits), rel=1e-5)
    assert mp["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-5)
    den = mp["ce_loss_with_ablation"] - mp["ce_loss_without_sae"]
    assert mp["ce_loss_score"] == pytest.approx((mp["ce_loss_with_ablation"] - mp["ce_loss_with_sae"]) / den)


def test_many_saes_at_once_equal_one_at_a_time():
    from evals.core import core_eval_many
    model, toks = tiny_lm(), contexts()
    g = torch.Generator().manual_seed(4)
    saes = [make_sae(16, 32, "topk", k=4).init_tied_(g, b_dec=torch.randn(16, generator=g)), identity_sae(16)]
    kw = dict(ce_contexts=toks.shape[0], ce_batch_size=4, variance_tokens=10_000, llm_batch_size=4, progress=False)
    together = core_eval_many(model, saes, toks, HOOK, LAYER, SPECIAL, **kw)
    for sae, m in zip(saes, together):
        assert m == core_eval(model, sae, toks, HOOK, LAYER, SPECIAL, **kw)


@pytest.mark.parametrize("rows", [1, 3, 4, 64])
def test_vocab_statistics_in_row_chunks_equal_the_whole_tensor_formulas(rows):
    """clean_stats / patched_stats read the scored positions' logits a few rows at a time; each number is the
    one the formulas give on the whole gathered (N, V) tensor, and KL = self - cross is KL(p_clean || p_patched)."""
    from evals.core import clean_stats, patched_stats

    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 9, 997
    clean_BTV = (torch.randn(B, T, V, generator=g) * 3).bfloat16()
    patched_BTV = (clean_BTV.float() + torch.randn(B, T, V, generator=g)).bfloat16()
    score_BT = torch.rand(B, T, generator=g) > 0.3
    score_BT[:, -1] = False
    rows_N = score_BT.flatten().nonzero()[:, 0]
    targets_N = torch.randint(0, V, (rows_N.shape[0],), generator=g)

    p_clean, ce_c, self_c = clean_stats(clean_BTV, rows_N, targets_N, rows)
    ce_p, cross_p = patched_stats(patched_BTV, rows_N, targets_N, p_clean, rows)

    lc, lp = clean_BTV[score_BT].float(), patched_BTV[score_BT].float()  # the whole-tensor formulas
    lse_c, lse_p = torch.logsumexp(lc, -1), torch.logsumexp(lp, -1)
    ref_p = (lc - lse_c[:, None]).exp_()
    assert torch.equal(p_clean, ref_p)
    assert torch.equal(ce_c, lse_c - lc.gather(-1, targets_N[:, None])[:, 0])
    assert torch.equal(ce_p, lse_p - lp.gather(-1, targets_N[:, None])[:, 0])
    assert torch.equal(self_c, (ref_p * lc).sum(-1) - lse_c)
    assert torch.equal(cross_p, (ref_p * lp).sum(-1) - lse_p)
    ce_ref = torch.nn.functional.cross_entropy(lp.double(), targets_N, reduction="none")
    assert torch.allclose(ce_p.double(), ce_ref, rtol=1e-5)
    kl_ref = (ref_p.double() * (lc.double().log_softmax(-1) - lp.double().log_softmax(-1))).sum(-1)
    assert torch.allclose((self_c - cross_p).double(), kl_ref, atol=2e-5)

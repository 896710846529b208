"""TRAINERS.md sections 1-2 against plain references written straight from the formulas."""
import math

import pytest
import torch

from tests.helpers import tiny_run_config
from trainers import make_trainer
from trainers.base import lr_factor
from trainers.relu import l1_coeff_at
from trainers.topk import auxk_loss
from workbench.sae_ops import Encoding, normalize_rows_, remove_parallel_grad_, topk_relu


def make(cfg, acts, total_steps=100, total_tokens=3200):
    return make_trainer(cfg.trainer, d_in=acts.shape[1], d_sae=cfg.sae.d_sae, total_steps=total_steps,
                        total_tokens=total_tokens, init_acts_BD=acts, seed=0)


def naive_topk(pre, k):
    out = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda i: -pre[b, i].item())[:k]
        for i in order:
            out[b, i] = max(pre[b, i].item(), 0.0)
    return out


def test_topk_matches_naive_and_counts():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(7, 30, generator=g)
    pre[0] = -pre[0].abs()  # a row with no positive entry: TopK(ReLU) is all zero
    got = topk_relu(pre, 5)
    torch.testing.assert_close(got, naive_topk(pre, 5))
    assert int((got[0] > 0).sum()) == 0
    assert ((got > 0).sum(1)[1:] <= 5).all()


def test_init_and_forward_match_formula():
    torch.manual_seed(0)
    x = torch.randn(32, 8) + 3.0
    cfg = tiny_run_config()
    tr = make(cfg, x)
    sae = tr.sae
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.b_dec, x.mean(0))
    assert sae.b_enc.abs().max() == 0
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = naive_topk(pre.detach(), 4)
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec)


def naive_auxk(residual, pre, dead, k_aux, W_dec):
    dead_idx = [i for i in range(pre.shape[1]) if dead[i]]
    if not dead_idx:
        return torch.tensor(0.0)
    e_hat = torch.zeros_like(residual)
    for b in range(pre.shape[0]):
        top = sorted(dead_idx, key=lambda i: -pre[b, i].item())[:min(k_aux, len(dead_idx))]
        for i in top:
            e_hat[b] += max(pre[b, i].item(), 0.0) * W_dec[i]
    mean = residual.mean(0)
    return ((residual - e_hat) ** 2).sum() / ((residual - mean) ** 2).sum()


@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_auxk_matches_naive(n_dead):
    g = torch.Generator().manual_seed(n_dead)
    residual, pre = torch.randn(9, 8, generator=g), torch.randn(9, 40, generator=g)
    W_dec = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=g)[:n_dead]] = True
    got = auxk_loss(residual, Encoding(pre, None, None, None, sparse=False), dead, 4, W_dec)
    torch.testing.assert_close(got, naive_auxk(residual, pre, dead, 4, W_dec))


def test_topk_loss_and_dead_counting():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    cfg = tiny_run_config(dead_after_tokens=64, auxk_alpha=0.5, k_aux=3)
    tr = make(cfg, x)
    tr.tokens_since_fired_F[:10] = 100  # latents 0..9 dead
    out = tr.loss(x, 0.0)
    sae = tr.sae
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    f = naive_topk(pre, 4)
    x_hat = f @ sae.W_dec.detach() + sae.b_dec.detach()
    recon = ((x - x_hat) ** 2).sum(1).mean()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    aux = naive_auxk(x - x_hat, pre, dead, 3, sae.W_dec.detach())
    torch.testing.assert_close(out.parts["recon"], recon)
    torch.testing.assert_close(out.parts["auxk"], aux)
    torch.testing.assert_close(out.loss, recon + 0.5 * aux)
    # after a step, latents that fired are reset to 0 tokens, others advance by the batch size
    fired = (tr.sae.encode(x) > 0).any(0)
    before = tr.tokens_since_fired_F.clone()
    out = tr.step(x)
    fired = (out.latents_BF > 0).any(0)
    assert (tr.tokens_since_fired_F[fired] == 0).all()
    assert (tr.tokens_since_fired_F[~fired] == before[~fired] + 32).all()


def test_relu_loss_matches_formula_with_warmup():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    cfg = tiny_run_config(name="relu", l1_coeff=2.0, l1_warmup_frac=0.1)
    tr = make(cfg, x)
    sae = tr.sae
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])  # non-unit rows: the L1 is decoder-norm weighted
    out = tr.loss(x, 0.05)
    f = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    recon = ((x - (f @ sae.W_dec + sae.b_dec)) ** 2).sum(1).mean()
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.loss, recon + 1.0 * l1)  # half-way through the warmup: lambda1 = 1.0
    assert l1_coeff_at(cfg.trainer, 0.0) == 0.0 and l1_coeff_at(cfg.trainer, 0.5) == 2.0
    # and the gradients: the trainer sums the L1 term by latents first (its d/df is ||d_i|| / B broadcast)
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(recon + 1.0 * l1, params)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("as_codes", [False, True])
def test_step_output_fired_and_l0_match_the_matrix(as_codes):
    """fired_F (column maxima > 0) and l0 (codes counted, no matrix) against the (B, F) matrix's mask, with zeros,
    negative zeros, an all-zero column and values at bf16's smallest normal."""
    from workbench.sae_ops import Codes
    from workbench.training import StepOutput

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 9, generator=g)
    pre[:, 4] = -1.0  # never fires
    pre[2, 7], pre[3, 7] = -0.0, 0.0
    pre[5, 1] = torch.finfo(torch.bfloat16).tiny
    lat = pre.relu().to(torch.bfloat16)
    lat[2, 7] = -0.0  # a negative zero is not > 0
    if as_codes:  # the entries a sparse step selected: some ReLU'd to 0, so held but not firing
        rows, cols = torch.nonzero(pre > -0.5, as_tuple=True)
        latents = Codes(rows, cols, lat[rows, cols], tuple(lat.shape), sparse=True)
    else:
        latents = lat
    out = StepOutput(torch.tensor(0.0), {}, torch.zeros(6, 2), torch.zeros(6, 2), latents)
    assert torch.equal(out.fired_F(), (lat > 0).any(0)) and not out.fired_F()[4] and out.fired_F()[1]
    assert out.l0().item() == pytest.approx((lat > 0).sum(1).float().mean().item(), abs=0)
    assert 0 < out.l0().item() < 9


def test_decoder_constraint():
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1))
    W.grad = torch.randn(10, 6, generator=g)
    remove_parallel_grad_(W)
    torch.testing.assert_close((W.grad * W).sum(1), torch.zeros(10), atol=1e-6, rtol=0)
    with torch.no_grad():
        W.mul_(3.0)
    normalize_rows_(W)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(10))


def test_step_keeps_rows_unit_and_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 8) @ torch.randn(8, 8)
    cfg = tiny_run_config(lr=1e-2, warmup_steps=0)
    tr = make(cfg, x, total_steps=200)
    first = tr.step(x).loss.item()
    for _ in range(60):
        last = tr.step(x).loss.item()
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64))
    assert last < 0.5 * first


def test_lr_schedule_shape():
    total, warm = 100, 5
    f = [lr_factor(s, total, warm, 0.2) for s in range(total)]
    assert f[0] == pytest.approx(1 / 5) and f[4] == pytest.approx(1.0)
    assert f[50] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    # default lr: 2e-4 / sqrt(n / 2^14)
    x = torch.randn(32, 8)
    tr = make(tiny_run_config(), x)
    assert tr.lr == pytest.approx(2e-4 / math.sqrt(64 / 2**14))


@pytest.mark.parametrize("trainer", [{"name": "topk", "k": 8}, {"name": "relu", "l1_coeff": 0.5},
                                     {"name": "momentum", "base": "topk", "k": 8},
                                     {"name": "progressive", "k": 8}])
def test_bfloat16_autocast_trains_as_well_as_float32(trainer):
    """sae.compute_dtype = bfloat16 runs the forward under autocast with float32 weights and Adam: after
    the same 150 steps on the same structured data, FVU (float32 eval) and L0 match the float32 run."""
    from bench.bench_trainers import synthetic_acts

    acts = synthetic_acts(150 * 128, 32, "cpu", seed=3)
    cfg = tiny_run_config(**trainer)
    results = {}
    for dtype in ("float32", "bfloat16"):
        tr = make_trainer(cfg.trainer, d_in=32, d_sae=128, total_steps=150, total_tokens=150 * 128,
                          init_acts_BD=acts, seed=0, compute_dtype=dtype)
        for i in range(150):
            tr.step(acts[i * 128:(i + 1) * 128])
        assert all(p.dtype == torch.float32 for p in tr.sae.parameters())
        with torch.no_grad():
            f = tr.sae.encode(acts[:2048])
            fvu = (acts[:2048] - tr.sae.decode(f)).pow(2).sum() / (acts[:2048] - acts[:2048].mean(0)).pow(2).sum()
        results[dtype] = (fvu.item(), (f > 0).sum(1).float().mean().item())
    (fvu32, l032), (fvu16, l016) = results["float32"], results["bfloat16"]
    assert fvu32 < 0.9  # it learned something
    assert abs(fvu16 - fvu32) < 0.02 + 0.05 * fvu32, results
    assert abs(l016 - l032) < 0.1 * l032 + 0.5, results

"""TRAINERS.md section 5 (batchtopk, matryoshka, jumprelu) against plain references written from the
formulas, at small sizes."""
import io
import json

import pytest
import torch

from tests.helpers import tiny_run_config
from trainers import make_trainer
from trainers.jumprelu import JumpReLUFn, StepFn
from trainers.matryoshka import group_ends
from workbench.sae import load_sae
from workbench.sae_ops import batch_topk_relu


def make(cfg, acts, total_steps=100, total_tokens=3200, seed=0):
    return make_trainer(cfg.trainer, d_in=acts.shape[1], d_sae=cfg.sae.d_sae, total_steps=total_steps,
                        total_tokens=total_tokens, init_acts_BD=acts, seed=seed)


def naive_batch_topk(pre, k_total):
    """Sort every entry of the batch by (value desc, flat index asc); keep the first k_total, ReLU'd."""
    flat = pre.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-max(flat[i], 0.0), i))[:k_total]
    out = [0.0] * len(flat)
    for i in order:
        out[i] = max(flat[i], 0.0)
    return torch.tensor(out).view_as(pre)


@pytest.mark.parametrize("k_total", [1, 17, 40, 500])
def test_batch_topk_matches_naive(k_total):
    g = torch.Generator().manual_seed(k_total)
    pre = torch.randn(8, 30, generator=g)
    got = batch_topk_relu(pre, k_total)
    torch.testing.assert_close(got, naive_batch_topk(pre, k_total))
    assert int((got > 0).sum()) == min(k_total, int((pre > 0).sum()))


def test_batch_topk_breaks_ties_by_flat_index():
    pre = torch.tensor([[0.5, 2.0, 1.0, 1.0], [1.0, 3.0, 1.0, -1.0]])  # four entries tie at 1.0
    got = batch_topk_relu(pre, 4)
    expected = torch.tensor([[0.0, 2.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, naive_batch_topk(pre, 4))


def test_batch_topk_gradient_reaches_only_kept_entries():
    pre = torch.randn(6, 10, requires_grad=True)
    out = batch_topk_relu(pre, 12)
    out.sum().backward()
    torch.testing.assert_close(pre.grad, (out > 0).float())


def batches(n, B=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) + 1.0 for _ in range(n)]


def test_batchtopk_loss_l0_and_threshold_ema():
    cfg = tiny_run_config(name="batchtopk", k=4, threshold_beta=0.9, threshold_start_step=3)
    data = batches(12)
    tr = make(cfg, data[0], total_steps=200)
    assert tr.threshold_start == 3  # min(3, 5% of 200)
    theta = None
    for step, x in enumerate(data):
        pre = ((x - tr.sae.b_dec) @ tr.sae.W_enc + tr.sae.b_enc).detach()
        f_ref = naive_batch_topk(pre, 4 * x.shape[0])
        out = tr.step(x)
        torch.testing.assert_close(out.latents_BF.detach(), f_ref)
        assert int((out.latents_BF > 0).sum()) == 4 * x.shape[0]  # training L0 is k on average
        if step >= 3:
            smallest = f_ref[f_ref > 0].min().item()
            theta = smallest if theta is None else 0.9 * theta + 0.1 * smallest
        expected = 0.0 if theta is None else theta
        torch.testing.assert_close(tr.sae.threshold, torch.full((64,), expected), rtol=1e-6, atol=1e-7)
    assert tr.summary()["threshold_updates"] == len(data) - 3


def test_batchtopk_start_step_and_ema_memory_are_capped_by_run_length():
    cfg = tiny_run_config(name="batchtopk", k=4)  # threshold_start_step 1000, threshold_beta 0.999 by default
    short = make(cfg, batches(1)[0], total_steps=100)
    assert short.threshold_start == 5 and short.threshold_beta == pytest.approx(1 - 4 / 95)
    long = make(cfg, batches(1)[0], total_steps=100_000)
    assert long.threshold_start == 1000 and long.threshold_beta == 0.999


def test_batchtopk_loss_matches_formula():
    cfg = tiny_run_config(name="batchtopk", k=4)
    x = batches(1)[0]
    tr = make(cfg, x)
    out = tr.loss(x, 0.0)
    sae = tr.sae
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    f = naive_batch_topk(pre, 4 * 32)
    recon = f @ sae.W_dec.detach() + sae.b_dec.detach()
    l_recon = ((x - recon) ** 2).sum(1).mean()
    torch.testing.assert_close(out.parts["recon"].detach(), l_recon)
    assert out.parts["auxk"].item() == 0.0  # nothing is dead at step 0
    torch.testing.assert_close(out.loss.detach(), l_recon)


def test_saved_batchtopk_sae_on_raw_activations_reproduces_inference_encode(tmp_path):
    """Fold the normalization scale, save as SAELens jumprelu, load with sae_lens: on raw activations it
    computes the trainer's inference encode pre * [pre > theta] on the normalized ones."""
    from sae_lens import SAE as LensSAE

    cfg = tiny_run_config(name="batchtopk", k=4, threshold_start_step=0)
    data = batches(20)
    tr = make(cfg, data[0], total_steps=20)
    for x in data:
        tr.step(x)
    scale = 0.02
    raw = batches(1, seed=9)[0] / scale  # the normalized batch is raw * scale
    tr.sae.folded(scale).save(tmp_path / "sae", {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu"
    lens = LensSAE.load_from_disk(tmp_path / "sae")
    theta = tr.sae.threshold[0].item()
    assert theta > 0
    with torch.no_grad():
        x = raw * scale
        pre = (x - tr.sae.b_dec) @ tr.sae.W_enc + tr.sae.b_enc
        f_inference = pre * (pre > theta)
        torch.testing.assert_close(lens.encode(raw), f_inference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lens.decode(lens.encode(raw)) * scale,
                                   f_inference @ tr.sae.W_dec + tr.sae.b_dec, rtol=1e-4, atol=1e-3)
        assert (lens.encode(raw) > 0).sum(1).float().mean() > 0


# ---------------------------------------------------------------- matryoshka

def test_group_ends_default_fractions():
    fr = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
    assert group_ends(fr, 2048) == [64, 192, 448, 960, 2048]
    assert group_ends([1.0], 64) == [64]


def test_matryoshka_prefix_losses_match_naive_loop():
    fr, weights = [0.125, 0.375, 0.5], [0.5, 0.3, 0.2]
    cfg = tiny_run_config(name="matryoshka", k=4, group_fractions=fr, group_weights=weights)
    x = batches(1)[0]
    tr = make(cfg, x)
    with torch.no_grad():
        tr.sae.b_enc.add_(0.3)  # move off the tied init so every prefix differs
    out = tr.loss(x, 0.0)
    sae = tr.sae
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    f = naive_batch_topk(pre, 4 * 32)
    W, b = sae.W_dec.detach(), sae.b_dec.detach()
    total = 0.0
    for g, m in enumerate([8, 32, 64]):
        recon_g = b + sum(f[:, i:i + 1] * W[i] for i in range(m))
        l_g = ((x - recon_g) ** 2).sum(1).mean()
        if g < 2:
            torch.testing.assert_close(out.parts[f"recon_prefix{g + 1}"], l_g, rtol=1e-5, atol=1e-5)
        total = total + weights[g] * l_g
    torch.testing.assert_close(out.parts["recon"], l_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), total, rtol=1e-5, atol=1e-5)


def test_matryoshka_with_one_group_is_batchtopk():
    data = batches(8)
    a = make(tiny_run_config(name="matryoshka", k=4, group_fractions=[1.0], threshold_start_step=0), data[0], 8)
    b = make(tiny_run_config(name="batchtopk", k=4, threshold_start_step=0), data[0], 8)
    for x in data:
        la, lb = a.step(x).loss.item(), b.step(x).loss.item()
        assert la == pytest.approx(lb, rel=1e-6)
    for name, p in a.sae.state_dict().items():
        torch.testing.assert_close(p, b.sae.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_matryoshka_bad_fractions_are_config_errors():
    from workbench.config import ConfigError
    with pytest.raises(ConfigError, match="group_fractions"):
        tiny_run_config(name="matryoshka", k=4, group_fractions=[0.5, 0.4])
    with pytest.raises(ConfigError, match="empty group"):
        tiny_run_config(name="matryoshka", k=4, group_fractions=[0.001, 0.999])
    with pytest.raises(ConfigError, match="group_weights"):
        tiny_run_config(name="matryoshka", k=4, group_fractions=[0.5, 0.5], group_weights=[1.0])


# ---------------------------------------------------------------- jumprelu

def test_jumprelu_forward_and_ste_gradients_match_formulas():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(16, 6, generator=g, dtype=torch.float64)
    theta = torch.rand(6, generator=g, dtype=torch.float64) * 0.5 + 0.1
    eps = 0.3
    pre.requires_grad_(True)
    theta.requires_grad_(True)
    up = torch.randn(16, 6, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient
    f = JumpReLUFn.apply(pre, theta, eps)
    torch.testing.assert_close(f.detach(), (pre * (pre > theta)).detach())
    (f * up).sum().backward()
    near = ((pre - theta).abs() / eps < 0.5).double().detach()
    torch.testing.assert_close(pre.grad, (pre > theta).double().detach() * up)
    torch.testing.assert_close(theta.grad, (-(theta / eps) * near * up).sum(0).detach())

    pre.grad, theta.grad = None, None
    h = StepFn.apply(pre, theta, eps)
    torch.testing.assert_close(h.detach(), (pre > theta).float().detach())
    (h.double() * up).sum().backward()
    assert pre.grad is None  # the L0 term sends the pre-activations nothing
    torch.testing.assert_close(theta.grad, (-(1 / eps) * near * up).sum(0).detach())


def test_jumprelu_loss_and_l0_penalty_match_formula():
    cfg = tiny_run_config(name="jumprelu", l0_coeff=0.7, l0_warmup_frac=0.5, bandwidth=0.1, init_threshold=0.2)
    x = batches(1)[0]
    tr = make(cfg, x)
    torch.testing.assert_close(tr.sae.threshold, torch.full((64,), 0.2))
    out = tr.loss(x, progress=0.25)  # lambda0 half warmed up
    sae = tr.sae
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    f = pre * (pre > 0.2)
    recon = f @ sae.W_dec.detach() + sae.b_dec.detach()
    l_recon = ((x - recon) ** 2).sum(1).mean()
    l0 = (pre > 0.2).float().sum(1).mean()
    torch.testing.assert_close(out.parts["l0_penalty"], l0)
    torch.testing.assert_close(out.loss.detach(), l_recon + 0.35 * l0)
    out.loss.backward()  # log-threshold gradient = theta * dL/dtheta (chain rule through exp)
    near = ((pre - 0.2).abs() / 0.1 < 0.5).float()
    grad_f = (2 * (recon - x) @ sae.W_dec.detach().T) / x.shape[0]
    dtheta = (-(0.2 / 0.1) * near * grad_f).sum(0) + 0.35 * (-(1 / 0.1) * near).sum(0) / x.shape[0]
    torch.testing.assert_close(tr.log_threshold_F.grad, 0.2 * dtheta, rtol=1e-4, atol=1e-5)


def test_jumprelu_data_driven_init_starts_near_init_l0_and_learns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    cfg = tiny_run_config(name="jumprelu", init_l0=6.0, l0_coeff=0.05)
    tr = make(cfg, x)
    l0 = (tr.sae.encode(x) > 0).sum(1).float().mean().item()
    assert l0 == pytest.approx(6.0, abs=0.5)
    before = tr.log_threshold_F.detach().clone()
    for b in x.split(32)[:20]:
        out = tr.step(b)
    assert not torch.equal(before, tr.log_threshold_F.detach())
    torch.testing.assert_close(tr.sae.threshold, tr.log_threshold_F.detach().exp())
    assert out.stats["threshold_mean"] > 0


@pytest.mark.parametrize("name,extra", [("batchtopk", {"k": 4, "threshold_start_step": 2}),
                                        ("matryoshka", {"k": 4, "threshold_start_step": 2}),
                                        ("jumprelu", {"init_l0": 4.0}),
                                        ("ortsae", {"k": 4, "chunk_size": 24, "threshold_start_step": 2}),
                                        ("c2r", {"k": 4, "chunk_size": 24})])
def test_state_dict_round_trip_continues_exactly(name, extra):
    """Trainer state (threshold, EMA count, log-thresholds, Adam, the chunk permutation's generator)
    survives a checkpoint bit for bit."""
    data = batches(10)
    cfg = tiny_run_config(name=name, **extra)
    a = make(cfg, data[0], total_steps=10)
    for x in data[:5]:
        a.step(x)
    buf = io.BytesIO()  # through bytes, as a checkpoint file: nothing shared with the live trainer
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    b = make(cfg, data[1], total_steps=10, seed=7)  # different init: everything must come from the state
    b.load_state_dict(state)
    for x in data[5:]:
        a.step(x)
        b.step(x)
    for n, p in a.sae.state_dict().items():
        assert torch.equal(p, b.sae.state_dict()[n]), n
    assert a.summary() == b.summary()


@pytest.mark.parametrize("name,extra", [("batchtopk", {"k": 4}), ("jumprelu", {"init_l0": 4.0}), ("ortsae", {"k": 4}),
                                        ("c2r", {"k": 4}), ("c2r", {"k": 4, "base": "batchtopk"}), ("null", {"k": 4})])
def test_new_saes_load_in_sae_lens_with_the_same_reconstruction(name, extra, tmp_path):
    from sae_lens import SAE as LensSAE

    cfg = tiny_run_config(name=name, **extra)
    data = batches(30)
    tr = make(cfg, data[0], total_steps=30)
    for x in data:
        tr.step(x)
    tr.sae.save(tmp_path / "sae", {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    lens = LensSAE.load_from_disk(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(lens.decode(lens.encode(x)), tr.sae(x))
        torch.testing.assert_close(ours(x), tr.sae(x))
        if tr.sae.architecture == "jumprelu":
            torch.testing.assert_close(ours.threshold, tr.sae.threshold)

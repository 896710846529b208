"""The sparse TopK step (embedding-bag decoder, encoder backward on the selected latents) against the dense
step: the same loss, gradients and, after several optimizer steps, weights, for every TopK-family trainer,
JumpReLU (whose codes include the STE window below its thresholds) and the ReLU-based ones (whose codes are the
active entries, or the dense fallback when those are too many)."""
import shutil

import pytest
import torch

from tests.helpers import tiny_run_config
from trainers import make_trainer

SETTINGS = {
    "topk": {"name": "topk"},
    "batchtopk": {"name": "batchtopk", "threshold_start_step": 0},
    "matryoshka": {"name": "matryoshka", "group_fractions": [0.25, 0.25, 0.5]},
    "momentum": {"name": "momentum", "base": "topk", "lambda2": 0.5},
    "progressive": {"name": "progressive", "lambda2_max": 0.5, "theta0": 0.2},
    "c2r": {"name": "c2r", "base": "topk", "lam": 1.0},
    "c2r_batchtopk": {"name": "c2r", "base": "batchtopk", "lam": 1.0},
    "ortsae": {"name": "ortsae", "gamma": 1.0},
    # a wide STE window (pre ~ N(0, 1)): ~60 entries of the batch fall in it below theta, ~60 above
    "jumprelu": {"name": "jumprelu", "init_l0": 8.0, "bandwidth": 0.5, "l0_coeff": 0.3},
}
RELU_BASED = {"relu": {"name": "relu", "l1_coeff": 0.5},
              "momentum_relu": {"name": "momentum", "base": "relu", "lambda2": 0.5},
              "c2r_relu": {"name": "c2r", "base": "relu", "lam": 1.0}}
SETTINGS.update(RELU_BASED)
NO_K = {"jumprelu", "relu"}


def pair(name, compute_dtype="float32", d=16, n=64, B=64, k_aux=6, kernels=None):
    """(dense, sparse) trainers of one init; kernels: the sparse one's CPU kernels (its encoder weight gradient)."""
    cfg = tiny_run_config(warmup_steps=0, **({} if name in NO_K else {"k": 4, "k_aux": k_aux}), **SETTINGS[name])
    acts = torch.randn(4 * B, d, generator=torch.Generator().manual_seed(1))
    made = [make_trainer(cfg.trainer, d_in=d, d_sae=n, total_steps=50, total_tokens=50 * B, init_acts_BD=acts,
                         seed=0, compute_dtype=compute_dtype, sparse_step=mode, kernels=kernels if mode == "on" else None)
            for mode in ("off", "on")]
    for tr in made:  # latents 0..9 dead, so AuxK takes part
        tr.tokens_since_fired_F[:10] = 10**9
    return made, [acts[i * B:(i + 1) * B] for i in range(4)]


def grads(trainer, x):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.autocast):
        out = trainer.loss(x, 0.1)
    trainer.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    return out, [p.grad.clone() for p in trainer.params]


# AuxK: k_aux 6 < 10 dead latents (the sparse step's top-k_aux bag) and 16 >= 10 (every dead latent, a block)
@pytest.mark.parametrize("k_aux", [6, 16])
@pytest.mark.parametrize("name", [n for n in SETTINGS if n not in RELU_BASED])
def test_sparse_step_equals_dense(name, k_aux):
    check_sparse_step_equals_dense(name, k_aux)


# SPARSE_MAX_DENSITY 1: the active entries (~half of them at init) go the sparse way; 0: every step falls back to
# the dense products from the sparse step's no-grad encoder forward
@pytest.mark.parametrize("max_density", [1.0, 0.0])
@pytest.mark.parametrize("name", list(RELU_BASED))
def test_relu_sparse_step_equals_dense(name, max_density, monkeypatch):
    import trainers.relu
    from workbench.sae_ops import Codes
    monkeypatch.setattr(trainers.relu, "SPARSE_MAX_DENSITY", dict.fromkeys(trainers.relu.SPARSE_MAX_DENSITY, max_density))
    out_s = check_sparse_step_equals_dense(name, 6)
    assert isinstance(out_s.latents, Codes) == (max_density == 1.0)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_relu_density_limit_is_the_compute_dtypes(compute_dtype):
    """A ReLU step with ~6% of its entries active: sparse in float32 (limit 8%), the dense products in bf16 (5%,
    where bf16's dense products run several times float32's rate); in bf16 the limit is lower for a wide SAE."""
    from trainers.relu import SPARSE_MAX_DENSITY, sparse_max_density
    from workbench.sae_ops import Codes

    (_, sparse), batches = pair("relu", compute_dtype)
    with torch.no_grad():  # each latent's 95% quantile of pre over the batch as its threshold
        pre_BF = sparse.sae.pre_acts(batches[0]) - sparse.sae.b_enc
        sparse.sae.b_enc.copy_(-pre_BF.quantile(0.95, dim=0))
    out = sparse.step(batches[0])
    density = (out.latents_BF > 0).float().mean().item()  # 4 of 64 rows per latent
    assert sparse_max_density("bfloat16", 64) < density < sparse_max_density("float32", 64)
    assert sparse_max_density("bfloat16", 16384) < sparse_max_density("bfloat16", 2048) == SPARSE_MAX_DENSITY[("bfloat16", False)]
    assert isinstance(out.latents, Codes) == (compute_dtype == "float32")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here: the kernels are not built")
@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_sparse_step_with_the_cpu_kernels_equals_dense(name, tmp_path, monkeypatch):
    """The CPU kernels (workbench/cpu_kernels.py) for the decoder's embedding bag and the encoder's weight gradient in
    place of torch's bag and dense @ CSR (and batchtopk's selection): the same check, for codes of fixed k (and AuxK's
    bag), batchtopk's (and matryoshka's bag into token x group rows) and jumprelu's varying counts per row, and relu's
    active entries (selected by the kernel's positive_entries)."""
    import trainers.relu
    from workbench import cpu_kernels
    monkeypatch.setattr(trainers.relu, "SPARSE_MAX_DENSITY", dict.fromkeys(trainers.relu.SPARSE_MAX_DENSITY, 1.0))
    lib = cpu_kernels.load(tmp_path)
    calls, original = [], cpu_kernels.weighted_row_sums
    monkeypatch.setattr(cpu_kernels, "weighted_row_sums", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    selections, select = [], cpu_kernels.positive_entries
    monkeypatch.setattr(cpu_kernels, "positive_entries", lambda *a: selections.append(select(*a)) or selections[-1])
    check_sparse_step_equals_dense(name, 6, kernels=lib)
    assert {"transposed": True} in calls and {} in calls  # the encoder's gradient and the bag's two sums ran
    assert (len(selections) > 0) == (name == "relu") and all(found is not None for found in selections)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here: the kernels are not built")
def test_relu_too_dense_for_the_kernels_selection_takes_the_dense_step(tmp_path, monkeypatch):
    """With the CPU kernels, a ReLU step denser than its limit (0 here: every step) is only counted by positive_entries
    and takes the dense products, as without them."""
    import trainers.relu
    from workbench import cpu_kernels
    from workbench.sae_ops import Codes
    monkeypatch.setattr(trainers.relu, "SPARSE_MAX_DENSITY", dict.fromkeys(trainers.relu.SPARSE_MAX_DENSITY, 0.0))
    selections, select = [], cpu_kernels.positive_entries
    monkeypatch.setattr(cpu_kernels, "positive_entries", lambda *a: selections.append(select(*a)) or selections[-1])
    out_s = check_sparse_step_equals_dense("relu", 6, kernels=cpu_kernels.load(tmp_path))
    assert not isinstance(out_s.latents, Codes) and selections and all(found is None for found in selections)


def check_sparse_step_equals_dense(name, k_aux, kernels=None):
    (dense, sparse), batches = pair(name, k_aux=k_aux, kernels=kernels)
    assert not dense.sparse_step and sparse.sparse_step
    out_d, g_d = grads(dense, batches[0])
    out_s, g_s = grads(sparse, batches[0])
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    assert name in NO_K or name in RELU_BASED or out_d.parts["auxk"] > 0  # the dead latents' path is exercised
    for key in out_d.parts:
        torch.testing.assert_close(out_s.parts[key], out_d.parts[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s.latents_BF, out_d.latents_BF)
    if name == "jumprelu":  # the entries below theta in the STE window (f = 0) are part of the sparse step's codes
        assert (out_s.latents.vals_E == 0).sum() > 20 and (out_s.latents.vals_E > 0).sum() > 20
    for gs, gd in zip(g_s, g_d):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)
    for step in range(6):  # whole steps: optimizer, decoder constraint, dead counts, threshold EMA
        for tr in (dense, sparse):
            tr.step(batches[step % 4])
    for (key, pd), ps in zip(dense.sae.state_dict().items(), sparse.sae.state_dict().values()):
        torch.testing.assert_close(ps, pd, rtol=1e-4, atol=1e-5, msg=key)
    assert torch.equal(dense.tokens_since_fired_F, sparse.tokens_since_fired_F)
    return out_s


@pytest.mark.parametrize("with_kernels", [False, True])
@pytest.mark.parametrize("k_aux", [6, 16])
@pytest.mark.parametrize("name", ["topk", "batchtopk", "jumprelu"])
def test_sparse_step_in_bfloat16_is_as_close_to_float32_as_the_dense_step(name, k_aux, with_kernels, tmp_path,
                                                                          monkeypatch):
    """Under bf16 autocast both steps round; the sparse one (float32 accumulation in its bags and
    index_adds) may not stray further from the float32 gradients than the dense one does. With the CPU kernels (a
    bf16 run's codes cast to float32 for the bag and its gradients, the row top-k on bf16 pre-activations, batchtopk's
    radix select) likewise, and the same entries selected as without them."""
    kernels = None
    if with_kernels:
        if shutil.which("cc") is None:
            pytest.skip("no C compiler here: the kernels are not built")
        from workbench import cpu_kernels
        kernels, calls = cpu_kernels.load(tmp_path), []
        for fn in ("weighted_row_sums", "row_topk", "batch_topk_entries"):
            original = getattr(cpu_kernels, fn)
            monkeypatch.setattr(cpu_kernels, fn, lambda *a, _o=original, _n=fn, **kw: calls.append((_n, kw)) or _o(*a, **kw))
    (ref, _), batches = pair(name, "float32", k_aux=k_aux)
    out_r, g_ref = grads(ref, batches[0])
    (dense16, sparse16), _ = pair(name, "bfloat16", k_aux=k_aux, kernels=kernels)
    _, g_d = grads(dense16, batches[0])
    out_s, g_s = grads(sparse16, batches[0])
    for gr, gd, gs in zip(g_ref, g_d, g_s):
        err_d, err_s = ((gd - gr).norm() / gr.norm()).item(), ((gs - gr).norm() / gr.norm()).item()
        assert err_s <= max(1.5 * err_d, 1e-3), (err_s, err_d)
    if with_kernels:
        assert ("weighted_row_sums", {}) in calls  # the decoder's bag (the encoder's gradient: transposed=True)
        selection = {"topk": "row_topk", "batchtopk": "batch_topk_entries"}.get(name)
        assert selection is None or (selection, {}) in calls
        # the same selection as the float32 step's, up to bf16's rounding of pre-activations near a cutoff
        assert ((out_s.latents_BF > 0) == (out_r.latents_BF > 0)).float().mean() > 0.99


def test_auto_picks_by_measured_rule():
    from workbench.sae_ops import sparse_step_wanted
    assert not sparse_step_wanted("auto", 2048, "bfloat16", matrix_engine=True)  # quickstart on AMX: dense faster
    assert sparse_step_wanted("auto", 2048, "bfloat16", matrix_engine=False)  # AVX512-BF16: sparse faster
    for engine in (True, False):
        assert sparse_step_wanted("auto", 16384, "bfloat16", engine) and sparse_step_wanted("auto", 2048, "float32", engine)
        assert not sparse_step_wanted("off", 16384, "float32", engine) and sparse_step_wanted("on", 2048, "bfloat16", engine)
    cfg = tiny_run_config(name="relu")
    relu = make_trainer(cfg.trainer, d_in=8, d_sae=16, total_steps=5, total_tokens=160,
                        init_acts_BD=torch.randn(8, 8), seed=0, sparse_step="on")
    assert relu.sparse_step  # ReLU's codes are its active entries: a selection too


@pytest.mark.parametrize("sparse", [False, True])
def test_encoder_gradients_equal_autograd_through_the_input(sparse):
    """encoder_pre_acts gives b_dec its gradient through x - b_dec as -W_enc (sum_b g_b), not by the input-
    gradient matmul: every parameter's gradient equals plain autograd of (x - b_dec) W_enc + b_enc."""
    from workbench.sae_ops import Encoding, encoder_pre_acts
    g = torch.Generator().manual_seed(3)
    x, W, b_enc, b_dec = (torch.randn(*s, generator=g) for s in [(32, 16), (16, 48), (48,), (16,)])
    weight_BF = torch.randn(32, 48, generator=g)
    params = [t.clone().requires_grad_() for t in (W, b_enc, b_dec)]
    ((x - params[2]) @ params[0] + params[1]).topk(5, dim=1).values.mul(weight_BF[:, :5]).sum().backward()
    ours = [t.clone().requires_grad_() for t in (W, b_enc, b_dec)]
    pre_BF, bias_F = encoder_pre_acts((x - b_dec), ours[0], ours[1], ours[2], grad=not sparse)
    assert pre_BF.requires_grad != sparse
    torch.testing.assert_close(pre_BF.detach(), (x - b_dec) @ W + b_enc)
    codes = Encoding(pre_BF, x - b_dec, ours[0], bias_F, sparse).topk_codes(5)
    order = codes.vals_E.view(32, 5).detach().argsort(dim=1, descending=True)  # the reference's order
    vals_B5 = codes.latents_BF.gather(1, codes.idx_E.view(32, 5).gather(1, order)) if not sparse else \
        codes.vals_E.view(32, 5).gather(1, order)
    vals_B5.mul(weight_BF[:, :5]).sum().backward()
    for ref, got in zip(params, ours):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_aux", [3, 12])
@pytest.mark.parametrize("sparse", [False, True])
def test_auxk_gradients_equal_plain_autograd(sparse, k_aux):
    """AuxK alone (8 dead latents of 48; k_aux 3 selects among them, 12 takes all of them as one block): every
    parameter's gradient equals plain autograd of the formula over a dense masked top-k, in both steps.
    (The block path hands W_dec, and W_enc in the sparse step, a sparse gradient over the dead latents.)"""
    from trainers.topk import auxk_loss
    from workbench.sae_ops import Encoding, encoder_pre_acts
    g = torch.Generator().manual_seed(5)
    x, W, b_enc, b_dec, resid = (torch.randn(*s, generator=g) for s in [(32, 16), (16, 48), (48,), (16,), (32, 16)])
    W_dec = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1)
    dead_F = torch.zeros(48, dtype=torch.bool)
    dead_F[[1, 5, 7, 20, 21, 30, 40, 47]] = True
    ref = [t.clone().requires_grad_() for t in (W, b_enc, b_dec, W_dec)]
    pre_BF = ((x - ref[2]) @ ref[0] + ref[1]).masked_fill(~dead_F, float("-inf"))
    top = pre_BF.topk(min(k_aux, 8), dim=1)
    e_hat = torch.zeros(32, 48).scatter(1, top.indices, top.values.relu()) @ ref[3]
    ((resid - e_hat).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()).backward()
    ours = [t.clone().requires_grad_() for t in (W, b_enc, b_dec, W_dec)]
    pre_BF, bias_F = encoder_pre_acts(x - b_dec, ours[0], ours[1], ours[2], grad=not sparse)
    auxk_loss(resid, Encoding(pre_BF, x - b_dec, ours[0], bias_F, sparse), dead_F, k_aux, ours[3]).backward()
    for name, r, o in zip(["W_enc", "b_enc", "b_dec", "W_dec"], ref, ours):
        got = o.grad.to_dense() if o.grad.is_sparse else o.grad
        torch.testing.assert_close(got, r.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ours[3].grad.is_sparse == (k_aux >= 8 or not sparse)  # the block path's n_dead rows


@pytest.mark.parametrize("by_rows", [True, False])
def test_encoder_weight_grad_both_layouts_equal_the_dense_product(by_rows):
    """dW_enc = sae_in^T G at the entries: dense @ CSR (the CPU's, written in W_enc's layout) and the transposed
    COO product (elsewhere), against the dense matrix product; rows with different entry counts (BatchTopK)."""
    from workbench.sae_ops import encoder_weight_grad
    g = torch.Generator().manual_seed(0)
    B, D, n = 9, 5, 40
    keep = torch.rand(B, n, generator=g) < torch.linspace(0.05, 0.5, B)[:, None]
    rows_E, idx_E = keep.nonzero(as_tuple=True)
    g_E = torch.randn(rows_E.numel(), generator=g)
    x_BD = torch.randn(B, D, generator=g)
    G_BF = torch.zeros(B, n).index_put_((rows_E, idx_E), g_E)
    got = encoder_weight_grad(x_BD, rows_E, idx_E, g_E, n, by_rows=by_rows)
    torch.testing.assert_close(got, x_BD.T @ G_BF)
    if by_rows:
        assert got.is_contiguous()  # no transposing copy left for autograd


@pytest.mark.parametrize("name", ["relu", "jumprelu", "c2r", "topk"])
def test_sparse_step_reproduces_its_own_weights(name, monkeypatch):
    """Two runs of one config and seed on the same batches end with the same weights, to the bit. The sparse step
    gathers per-latent values at its entries (relu's decoder norms, jumprelu's thresholds, c2r's a_i and a_j*(i)) with
    index_select, whose backward sums a latent's entries in one order; relu's [] indexing, whose accumulating index_put
    sums them in a different order each run on a CPU once they pass torch's parallel grain, failed this for relu (~41k
    entries over 512 latents here; relu's codes are ~half the entries at init, a Gemma-2-size TopK batch has 65k).
    topk: the control."""
    import trainers.relu
    monkeypatch.setattr(trainers.relu, "SPARSE_MAX_DENSITY", dict.fromkeys(trainers.relu.SPARSE_MAX_DENSITY, 1.0))
    settings = {**SETTINGS[name], **({"init_l0": 64.0} if name == "jumprelu" else {} if name in NO_K else {"k": 64})}
    cfg = tiny_run_config(warmup_steps=0, **settings)
    B, d, n = 640, 32, 512
    acts = torch.randn(3 * B, d, generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(2):
        trainer = make_trainer(cfg.trainer, d_in=d, d_sae=n, total_steps=50, total_tokens=50 * B, init_acts_BD=acts,
                               seed=0, sparse_step="on")
        for step in range(3):
            out = trainer.step(acts[step * B:(step + 1) * B])
        runs.append(trainer.sae.state_dict())
    # more entries than torch's CPU grain (32768), where its accumulating index_put goes parallel
    assert out.latents.vals_E.numel() > 35_000
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key

"""The fast (pair-list) momentum and progressive trainers against a plain dense reference written
straight from TRAINERS.md sections 3-4: loss value, gradients, momentum state and weights w_i."""
import shutil

import pytest
import torch

import trainers.competition as comp
from tests.helpers import tiny_run_config
from trainers import make_trainer
from trainers.competition import cofiring_pairs, max_abs_cosine_F
from trainers.progressive import schedule_at
from workbench import cpu_kernels

N, D, B = 48, 10, 64


def dense_overlap(latents):
    M = (latents > 0).double()
    a = M.sum(0)
    C = M.T @ M
    both = (a[:, None] > 0) & (a[None, :] > 0)
    nmat = torch.where(both, C / torch.minimum(a[:, None], a[None, :]).clamp_min(1), torch.zeros_like(C))
    nmat.fill_diagonal_(0)
    return nmat


def dense_s(W_dec):
    s = (W_dec @ W_dec.T).abs()
    return s - torch.diag(torch.diag(s))


def make(name, seed, kernels=None, compute_dtype="float32", **kw):
    base = {"name": name, "k": 6, "lr": 1e-3, "warmup_steps": 0, **kw}
    cfg = tiny_run_config(**base)
    cfg.sae.d_sae = N
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(B, D, generator=g) @ torch.randn(D, D, generator=g)
    tr = make_trainer(cfg.trainer, d_in=D, d_sae=N, total_steps=20, total_tokens=20 * B, init_acts_BD=acts, seed=seed,
                      kernels=kernels, compute_dtype=compute_dtype)
    with torch.no_grad():  # random decoder (unit rows) and a b_enc that makes ReLU codes dense-ish
        W = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
        tr.sae.W_dec.copy_(W)
        tr.sae.W_enc.copy_(W.T + 0.3 * torch.randn(D, N, generator=g))
        tr.sae.b_enc.copy_(0.2 * torch.randn(N, generator=g))
    return tr, acts


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cofiring_pairs_match_dense(seed, method, monkeypatch):
    import trainers.competition as comp
    monkeypatch.setattr(comp, "MAX_PAIR_OCCURRENCES", 500)  # several token chunks, merged
    monkeypatch.setattr(comp, "DENSE_BLOCK", 7)             # several latent blocks
    g = torch.Generator().manual_seed(seed)
    lat = torch.relu(torch.randn(B, N, generator=g) - 0.8)
    pairs = cofiring_pairs(lat, method)
    dense = dense_overlap(lat)
    sparse = torch.zeros(N, N, dtype=torch.float64)
    sparse[pairs.i, pairs.j] = pairs.overlap.double()
    sparse = sparse + sparse.T
    torch.testing.assert_close(sparse, dense)
    assert (pairs.i < pairs.j).all()
    M = (lat > 0).double()
    torch.testing.assert_close(pairs.counts.double(), (M.T @ M)[pairs.i, pairs.j])


def stat(value):
    return value() if callable(value) else value  # a stat that costs work is a callable, read when logged


def base_loss_of(tr, acts, progress):
    """The trainer's base_loss with its latents made dense (TopK codes hold them) and detached, as penalty's active()
    gives them."""
    parts, base, latents, recon, codes = tr.base_loss(acts, progress)
    return parts, base, (codes.latents_BF if latents is None else latents).detach(), recon, codes


def dense_n_pairs(latents):
    M = (latents > 0).double()
    return int(torch.triu(M.T @ M, diagonal=1).count_nonzero())


# "pairs": the pair list (any base); "tokens": per-token co-firing from the TopK codes (the topk base's path), its
# n x n table through the Gram; with the C kernels (float32 on a CPU): "tokens+kernel" as a run chooses (momentum:
# the token kernel or the table by rows, occurrence_penalty; progressive: the table by rows), "tokens+rows" and
# "tokens+token_kernel" with momentum's choice forced one way
PATHS = [("relu", "pairs"), ("topk", "pairs"), ("topk", "tokens"), ("topk", "tokens+kernel"), ("topk", "tokens+rows"),
         ("topk", "tokens+token_kernel")]


@pytest.fixture(scope="module")
def built_kernels(tmp_path_factory):
    return cpu_kernels.load(tmp_path_factory.mktemp("kernels")) if shutil.which("cc") else None


@pytest.fixture
def kernels_for(built_kernels, monkeypatch):
    """path -> the kernels a trainer gets on that path; on the kernel path every table penalty goes through it."""
    calls, used = [], []
    apply = comp._KernelAbsCosine.apply
    monkeypatch.setattr(comp._KernelAbsCosine, "apply",
                        lambda W, kernel, rows_dtype: calls.append(kernel.func.__name__) or apply(W, kernel, rows_dtype))

    def get(path):
        if not path.startswith("tokens+"):
            return None
        if built_kernels is None:
            pytest.skip("no C compiler here: the pair kernel is not built")
        share = {"tokens+rows": float("inf"), "tokens+token_kernel": 0.0}.get(path)
        if share is not None:
            monkeypatch.setattr(comp, "TABLE_SHARE_FOR_TOKENS", dict.fromkeys(comp.TABLE_SHARE_FOR_TOKENS, share))
        used.append(path)
        return built_kernels
    yield get
    assert bool(calls) == bool(used)
    if "tokens+token_kernel" in used:
        assert set(calls) == {"token_pairs_abs_cosine"}
    if "tokens+rows" in used:
        assert set(calls) == {"pair_rows_abs_cosine"}


@pytest.mark.parametrize("base,path", PATHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_momentum_matches_dense_reference(seed, base, path, kernels_for):
    beta, tau, lam = 0.8, 0.7, 0.3
    tr, acts = make("momentum", seed, kernels_for(path), base=base, beta=beta, tau=tau, lambda2=lam, l1_coeff=0.1,
                    l1_warmup_frac=0.0)
    m_ref = torch.zeros(N, dtype=torch.float64)
    for step in range(3):
        W_ref = tr.sae.W_dec.detach().clone().double().requires_grad_(True)
        _, base_loss, latents, _, codes = base_loss_of(tr, acts, step / 20)
        c = dense_overlap(latents.detach())
        m_ref = beta * m_ref + (1 - beta) * c.sum(1)
        w = 1.0 + (m_ref > tau).double()
        pen = lam * ((w[:, None] + w[None, :]) * c * dense_s(W_ref)).sum() / N
        pen.backward()
        m_before = tr.momentum_F.clone()
        value, stats = tr.penalty(lambda: latents, step / 20, codes if path != "pairs" else None)  # the penalty alone
        assert (tr.token_pairs(codes) is not None) == (base == "topk")
        torch.testing.assert_close(value.double(), pen.detach(), rtol=1e-5, atol=1e-7)
        assert stat(stats["cofiring_pairs"]) == dense_n_pairs(latents)
        (g_fast,) = torch.autograd.grad(value, tr.sae.W_dec)
        torch.testing.assert_close(g_fast.double(), W_ref.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(tr.momentum_F.double(), m_ref, rtol=1e-5, atol=1e-6)
        assert stats["frac_w2"] == pytest.approx((w > 1).double().mean().item())
        tr.momentum_F.copy_(m_before)
        out = tr.step(acts)  # the real step: its loss is the base loss plus the same penalty
        torch.testing.assert_close(out.loss.double(), base_loss.double() + pen.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tr.momentum_F.double(), m_ref, rtol=1e-5, atol=1e-6)
    assert stat(out.stats["cofiring_pairs"]) > 0 and out.parts["competition"] > 0


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("name", ["momentum", "progressive"])
def test_bf16_runs_take_the_pair_kernel_unless_the_cpu_has_amx(name, amx, built_kernels, monkeypatch):
    """bf16 autocast on a CPU: the penalty goes through the pair kernel on vector-bf16 CPUs (AVX512-BF16), reading the
    decoder rows in bf16 where the kernels were built with its dot products (else float32), and through the bf16 Gram
    on AMX; each equals the float64 reference on the step's own codes: the pair kernel to float32 sums of the rows it
    read, the Gram to bf16's 3 digits."""
    if built_kernels is None:
        pytest.skip("no C compiler here: the pair kernel is not built")
    flags = "flags : fpu avx2 avx512f avx512_bf16" + (" amx_bf16 amx_tile" if amx else "")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    assert cpu_kernels.bf16_matrix_engine("cpu") == amx
    rows_read = []
    apply = comp._KernelAbsCosine.apply
    monkeypatch.setattr(comp._KernelAbsCosine, "apply",
                        lambda W, kernel, rows_dtype: rows_read.append(rows_dtype) or apply(W, kernel, rows_dtype))
    settings = ({"base": "topk", "beta": 0.0, "tau": 1e9, "lambda2": 0.3} if name == "momentum" else
                {"theta0": 0.3, "lambda2_max": 0.3, "gamma": 2.0, "schedule": "static"})
    # momentum: the table by rows (as on real codes)
    monkeypatch.setattr(comp, "TABLE_SHARE_FOR_TOKENS", dict.fromkeys(comp.TABLE_SHARE_FOR_TOKENS, float("inf")))
    tr, acts = make(name, 0, built_kernels, compute_dtype="bfloat16", **settings)
    assert tr.autocast and tr.penalty_dtype() == torch.bfloat16
    bf16_rows = cpu_kernels.pair_rows_bf16_vectorized(built_kernels)
    W_ref = tr.sae.W_dec.detach().clone()
    if bf16_rows and not amx:
        W_ref = W_ref.bfloat16()  # the values the kernel multiplies
    W_ref = W_ref.double()
    _, _, latents, _, codes = base_loss_of(tr, acts, 0.0)
    n_ij = dense_overlap(latents)
    c = n_ij if name == "momentum" else ((n_ij - 0.3) / 0.3).clamp(0, 1)
    w_sum = 2.0 if name == "momentum" else 1.0  # momentum: w_i = w_j = 1 (tau above every m_i)
    ref = 0.3 * (w_sum * c * dense_s(W_ref)).sum() / N
    value, _ = tr.penalty(lambda: latents, 0.0, codes)
    assert rows_read == ([] if amx else [torch.bfloat16 if bf16_rows else torch.float32])
    tol = 2e-2 if amx else 1e-5
    torch.testing.assert_close(value.double(), ref, rtol=tol, atol=1e-7)


@pytest.mark.parametrize("bf16_dots", [False, True])
def test_pair_kernel_routing_by_dtype_size_and_cpu(bf16_dots, monkeypatch):
    """Which penalty path a CPU run takes (pair_kernels, pair_rows_dtype, token_kernel_wanted): float32 always the
    kernels, reading float32 rows; bf16 on AMX never (its Gram); bf16 on AVX512-BF16 the kernels up to
    GRAM_MAX_LATENTS, above only where they read bf16 rows (built with the dot products), which also move momentum's
    choice of the token kernel from half the occurrences to 0.8 of them."""
    import types

    kernels = types.SimpleNamespace(pair_rows_bf16_vectorized=lambda: int(bf16_dots))
    small, large = torch.empty(comp.GRAM_MAX_LATENTS, 1), torch.empty(comp.GRAM_MAX_LATENTS + 1, 1)
    for amx in (False, True):
        flags = "flags : fpu avx512f avx512_bf16" + (" amx_bf16" if amx else "")
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
        for W in (small, large):
            assert comp.pair_kernels(W, torch.float32, kernels) is kernels
            assert comp.pair_kernels(W, torch.float32, None) is None
        assert (comp.pair_kernels(small, torch.bfloat16, kernels) is kernels) == (not amx)
        assert (comp.pair_kernels(large, torch.bfloat16, kernels) is kernels) == (not amx and bf16_dots)
    rows = torch.bfloat16 if bf16_dots else torch.float32
    assert comp.pair_rows_dtype(torch.bfloat16, kernels) == rows
    assert comp.pair_rows_dtype(torch.float32, kernels) == torch.float32
    B, k = 10, 5  # 200 occurrences (both orders)
    tokens = comp.TokenPairs(torch.zeros(B, k, dtype=torch.long), torch.ones(B, k, dtype=torch.bool), torch.zeros(3))
    for entries, token_kernel in ((99, False), (100, not bf16_dots), (159, not bf16_dots), (160, True)):
        assert comp.token_kernel_wanted(tokens, torch.tensor([0, entries]), rows) == token_kernel


@pytest.mark.parametrize("path", ["pairs", "tokens", "tokens+kernel"])  # progressive: always the table
@pytest.mark.parametrize("schedule", ["progressive", "static"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_progressive_matches_dense_reference(seed, schedule, path, kernels_for):
    theta0, lam_max, gamma = 0.4, 0.5, 2.0
    tr, acts = make("progressive", seed, kernels_for(path), theta0=theta0, lambda2_max=lam_max, gamma=gamma,
                    schedule=schedule)
    for p in (0.0, 0.3, 0.9, 1.0):
        W_ref = tr.sae.W_dec.detach().clone().double().requires_grad_(True)
        _, base_loss, latents, _, codes = base_loss_of(tr, acts, p)
        thr = theta0 if schedule == "static" else max(theta0 * (1 - p), 1e-3)
        lam = lam_max if schedule == "static" else lam_max * (1 - p) ** gamma
        assert schedule_at(tr.cfg, p) == pytest.approx((thr, lam))
        nmat = dense_overlap(latents.detach())
        c = ((nmat - thr) / thr).clamp(0, 1)
        c.fill_diagonal_(0)
        pen = lam * (c * dense_s(W_ref)).sum() / N
        pen.backward()
        value, stats = tr.penalty(lambda: latents, p, codes if path != "pairs" else None)
        torch.testing.assert_close(value.double(), pen.detach(), rtol=1e-5, atol=1e-7)
        (g_fast,) = torch.autograd.grad(value, tr.sae.W_dec)
        torch.testing.assert_close(g_fast.double(), W_ref.grad, rtol=1e-4, atol=1e-7)
        assert stat(stats["pairs_c_pos"]) == int((c > 0).sum().item() // 2)
        assert stat(stats["cofiring_pairs"]) == dense_n_pairs(latents)
        if stat(stats["pairs_c_pos"]):
            assert stat(stats["mean_c"]) == pytest.approx(c[c > 0].mean().item(), rel=1e-5)
        out = tr.loss(acts, p)
        torch.testing.assert_close(out.loss.double(), base_loss.double() + pen.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["pairs", "tokens"])
@pytest.mark.parametrize("normalize,tau", [("mean", 0.3), ("quantile", 0.8)])
def test_momentum_normalizations_match_dense_reference(normalize, tau, path):
    """TRAINERS.md section 6: m from the mean overlap over co-firing partners, or w = 2 above a quantile."""
    beta, lam = 0.8, 0.3
    tr, acts = make("momentum", 3, base="topk", beta=beta, tau=tau, lambda2=lam, normalize=normalize)
    m_ref = torch.zeros(N, dtype=torch.float64)
    for step in range(3):
        W_ref = tr.sae.W_dec.detach().clone().double().requires_grad_(True)
        _, _, latents, _, codes = base_loss_of(tr, acts, step / 20)
        c = dense_overlap(latents.detach())
        partners = (c > 0).double().sum(1) if normalize == "mean" else None
        signal = c.sum(1) / partners.clamp_min(1) if normalize == "mean" else c.sum(1)
        m_ref = beta * m_ref + (1 - beta) * signal
        cut = torch.quantile(m_ref, tau) if normalize == "quantile" else tau
        w = 1.0 + (m_ref > cut).double()
        pen = lam * ((w[:, None] + w[None, :]) * c * dense_s(W_ref)).sum() / N
        value, stats = tr.penalty(lambda: latents, step / 20, codes if path == "tokens" else None)
        torch.testing.assert_close(value.double(), pen.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(tr.momentum_F.double(), m_ref, rtol=1e-5, atol=1e-6)
        assert stats["frac_w2"] == pytest.approx((w > 1).double().mean().item())
    if normalize == "mean":
        assert (m_ref <= 1).all() and 0 < stats["frac_w2"] < 1
    else:
        assert stats["frac_w2"] <= 1 - tau + 1 / N


def test_training_steps_match_dense_reference_weights():
    """Several optimizer steps with the fast penalty end at the same weights as with the dense one."""
    tr, acts = make("momentum", 5, base="topk", beta=0.9, tau=0.2, lambda2=0.5)
    ref, _ = make("momentum", 5, base="topk", beta=0.9, tau=0.2, lambda2=0.5)

    def dense_loss(acts_BD, progress):
        parts, base, latents, recon, _ = base_loss_of(ref, acts, progress)
        c = dense_overlap(latents.detach()).float()
        with torch.no_grad():
            ref.momentum_F.mul_(0.9).add_(0.1 * c.sum(1))
        w = 1.0 + (ref.momentum_F > 0.2).float()
        pen = 0.5 * ((w[:, None] + w[None, :]) * c * dense_s(ref.sae.W_dec)).sum() / N
        from trainers.base import StepOutput
        return StepOutput(base + pen, parts, acts, recon, latents)

    ref.loss = dense_loss
    for _ in range(5):
        tr.step(acts)
        ref.step(acts)
    for a, b in zip(tr.sae.parameters(), ref.sae.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.momentum_F, ref.momentum_F, rtol=1e-5, atol=1e-6)


def test_progressive_snapshots_and_max_cosine():
    tr, acts = make("progressive", 0, theta0=0.4, lambda2_max=0.5)
    for _ in range(20):
        tr.step(acts)
    snaps = tr.artifacts()["separation_progression"]
    assert [s["progress"] for s in snaps] == [0.25, 0.5, 0.75, 1.0]
    assert [s["step"] for s in snaps] == [5, 10, 15, 20]
    assert all(sum(s["counts"]) == s["n_pairs"] for s in snaps)
    W = tr.sae.W_dec.detach()
    torch.testing.assert_close(max_abs_cosine_F(W, chunk=7), dense_s(W).max(1).values)


@pytest.mark.parametrize("name,settings,keys", [
    ("progressive", {"theta0": 0.3, "lambda2_max": 0.5}, ("cofiring_pairs", "pairs_c_pos", "mean_c")),
    ("momentum", {"base": "topk", "tau": 0.5, "lambda2": 0.5, "normalize": "mean"}, ("cofiring_pairs", "frac_w2"))])
def test_token_path_kernels_and_large_n_counting_agree(monkeypatch, name, settings, keys):
    """The per-token penalty's kernels (the full Gram at small n; gathered rows per token, in one or several
    chunks) and occurrence counts by sort (the path for n^2 above the count table) give the same value,
    gradient and statistics; the Gram one matches the dense reference in the tests above."""
    import trainers.competition as comp

    tr, acts = make(name, 4, **settings)
    _, _, latents, _, codes = base_loss_of(tr, acts, 0.2)
    state = {key: value.clone() for key, value in tr.extra_state().items() if torch.is_tensor(value)}

    def run():
        tr.load_extra_state({**tr.extra_state(), **state})  # momentum's m: each call starts from the same one
        value, stats = tr.penalty(lambda: latents, 0.2, codes)
        (grad,) = torch.autograd.grad(value, tr.sae.W_dec)
        return value.detach(), grad, *(stat(stats[key]) for key in keys)

    gram = run()
    monkeypatch.setattr(comp, "GRAM_MAX_LATENTS", 0)  # per token, one chunk
    one_chunk = run()
    monkeypatch.setattr(comp, "TOKEN_CHUNK_ELEMENTS", 5 * 6 * D)  # 5 tokens per chunk
    monkeypatch.setattr(comp, "COUNT_TABLE_MAX", 0)
    chunks = run()
    for other in (one_chunk, chunks):
        torch.testing.assert_close(other[0], gram[0])
        torch.testing.assert_close(other[1], gram[1])
        assert other[2:] == pytest.approx(gram[2:])
    assert gram[2] == dense_n_pairs(latents)

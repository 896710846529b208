"""TRAINERS.md section 7 (ortsae, c2r) against plain references written from the formulas: a double loop
over the pairs of each chunk, with autograd through Python's max (the gradient reaches the maximizing
pair only, as it does through torch.max)."""
import pytest
import torch

from tests.helpers import tiny_run_config
from tests.test_reference_trainers import batches, make
from trainers.c2r import c2r_loss
from trainers.max_cosine import chunk_max_cosines, chunks_of
from trainers.ortsae import ortho_loss
from workbench.sae_ops import max_cosine


def naive_mu(W, members):
    """{i: (mu_i, j*(i))}: max over j in members, j != i, of cos(d_i, d_j), by a double loop."""
    out = {}
    for i in members:
        best, arg = None, None
        for j in members:
            if j == i:
                continue
            c = (W[i] @ W[j]) / (W[i].norm() * W[j].norm())
            if best is None or c.item() > best.item():
                best, arg = c, j
        out[i] = (best, arg)
    return out


def naive_ortsae(W, chunks):
    per_chunk = []
    for K in chunks:
        mu = naive_mu(W, K)
        per_chunk.append(sum(max(mu[i][0], torch.zeros(())) ** 2 for i in K) / len(K))
    return sum(per_chunk) / len(per_chunk)


def naive_c2r(W, f, chunks):
    n = W.shape[0]
    a = [torch.linalg.vector_norm(f[:, i]) for i in range(n)]  # subgradient 0 at a silent latent
    total = torch.zeros(())
    for K in chunks:
        mu = naive_mu(W, K)
        for i in K:
            m, j = mu[i]
            total = total + (a[i] + a[j]) * max(m, torch.zeros(())) ** 2
    return total / n


def problem(n=12, d=5, B=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    W[3] = W[7] + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)  # a clearly absorbing pair
    f = torch.relu(torch.randn(B, n, generator=g, dtype=torch.float64))
    f[:, 5] = 0  # a latent that never fires: a_i = 0 (norm's gradient at 0 must not be NaN)
    return W.float().requires_grad_(True), f.float().requires_grad_(True)


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("rows", [2, 5, 64])  # row blocks of the search: smaller, not dividing, larger than n
def test_max_cosine_search_matches_the_double_loop(rows):
    W, _ = problem()
    members = torch.tensor([0, 3, 4, 7, 9, 11])
    values, where = max_cosine(W.detach(), members, block=rows)
    ref = naive_mu(W.detach(), members.tolist())
    assert where.tolist() == [ref[i][1] for i in members.tolist()]
    torch.testing.assert_close(values, torch.stack([ref[i][0] for i in members.tolist()]), rtol=0, atol=1e-6)
    a, _ = max_cosine(W.detach(), absolute=True)  # |cos| form (progressive's snapshot)
    assert (a >= max_cosine(W.detach())[0] - 1e-7).all()


@pytest.mark.parametrize("absolute", [False, True])
def test_max_cosine_over_symmetric_blocks_equals_the_full_gram(absolute):
    """Blocks of 256 (700 members: 256, 256, 188), each pair of blocks
    multiplied once and read along rows and columns: the same maxima and argmaxes as the full Gram's rows, for all
    latents and for a shuffled subset (positions map back to latents); a duplicated row (255, 256: two blocks) ties two
    partners of other latents, and the earlier one in the members' order wins, as a row's max over the full Gram
    gives it."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(900, 16, generator=g)
    W[256] = W[255]  # a tie across the first blocks' boundary, for a latent of the first block and of the third
    W[12] = W[255] + 0.01 * torch.randn(16, generator=g)
    W[600] = W[255] + 0.01 * torch.randn(16, generator=g)
    for members in (None, torch.randperm(900, generator=g)[:700]):
        idx = torch.arange(900) if members is None else members
        unit = torch.nn.functional.normalize(W[idx], dim=1)
        cos = unit @ unit.T
        if absolute:
            cos = cos.abs()
        cos.fill_diagonal_(float("-inf"))
        ref = cos.max(dim=1)
        values, where = max_cosine(W, members, absolute=absolute, block=256)
        torch.testing.assert_close(values, ref.values, rtol=0, atol=1e-6)
        assert torch.equal(where, idx[ref.indices])
    where = max_cosine(W, absolute=absolute, block=256)[1]
    assert where[12] == 255 and where[600] == 255  # the tie between 255 and 256: the first
    assert torch.equal(max_cosine(W, absolute=absolute)[1], where)  # the default blocks: 512, 388


def test_one_chunk_penalties_and_gradients_equal_the_double_loop_over_all_pairs():
    W, f = problem()
    chunks = chunks_of(12, 8192, torch.Generator().manual_seed(0), "cpu")
    assert len(chunks) == 1 and chunks[0].tolist() == list(range(12))  # n <= chunk_size: all pairs, no draw
    ours_o = ortho_loss(chunk_max_cosines(W, chunks))
    ref_o = naive_ortsae(W, [list(range(12))])
    torch.testing.assert_close(ours_o, ref_o, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads(ours_o, W)[0], grads(ref_o, W)[0], rtol=1e-4, atol=1e-6)
    ours_c = c2r_loss(chunk_max_cosines(W, chunks), f)
    ref_c = naive_c2r(W, f, [list(range(12))])
    torch.testing.assert_close(ours_c, ref_c, rtol=1e-5, atol=1e-7)
    gw, gf = grads(ours_c, W, f)
    rw, rf = grads(ref_c, W, f)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gf, rf, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(gf).all() and gf[:, 5].abs().sum() == 0  # the silent latent: no NaN, no push
    assert ours_o.item() > 0.05 and ours_c.item() > 0.05  # the near-duplicate pair is what they penalize
    # the sparse step's codes (f's nonzero entries, and a stored zero) give the same value and gradients
    from workbench.sae_ops import Codes
    keep = f.detach() > 0
    keep[0, 5] = True  # an entry of the silent latent, stored as 0
    rows, idx = keep.nonzero(as_tuple=True)
    vals = f.detach()[rows, idx].clone().requires_grad_(True)
    ours_s = c2r_loss(chunk_max_cosines(W, chunks), Codes(rows, idx, vals, tuple(f.shape), True))
    torch.testing.assert_close(ours_s, ref_c, rtol=1e-5, atol=1e-7)
    gw_s, gv_s = grads(ours_s, W, vals)
    torch.testing.assert_close(gw_s, rw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gv_s, rf[rows, idx], rtol=1e-4, atol=1e-6)


def test_several_chunks_follow_the_seeded_permutation():
    W, f = problem(n=20)
    ours = chunks_of(20, 6, torch.Generator().manual_seed(3), "cpu")
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    expect = [perm[0:6], perm[6:12], perm[12:18], perm[18:20]]
    assert [c.tolist() for c in ours] == expect  # the last chunk is the remainder
    torch.testing.assert_close(ortho_loss(chunk_max_cosines(W, ours)), naive_ortsae(W, expect), rtol=1e-5, atol=1e-7)
    ours_c = c2r_loss(chunk_max_cosines(W, ours), f)
    ref_c = naive_c2r(W, f, expect)
    torch.testing.assert_close(ours_c, ref_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads(ours_c, W)[0], grads(ref_c, W)[0], rtol=1e-4, atol=1e-6)
    # pairs across chunks are never compared: the chunked penalty is not the all-pairs one
    assert abs(ortho_loss(chunk_max_cosines(W, ours)).item() - naive_ortsae(W, [list(range(20))]).item()) > 1e-4


def test_bfloat16_search_finds_the_same_partners_on_well_separated_rows():
    W, _ = problem(n=40, d=16)
    chunks = [torch.arange(40)]
    a, b = chunk_max_cosines(W, chunks)[0], chunk_max_cosines(W, chunks, torch.bfloat16)[0]
    agree = (a.argmax_K == b.argmax_K).float().mean().item()
    assert agree >= 0.9 and (b.mu_K.dtype == torch.float32)
    torch.testing.assert_close(b.mu_K.detach(), a.mu_K.detach(), rtol=0, atol=0.05)


@pytest.mark.parametrize("name,coef,extra", [("ortsae", "gamma", {"k": 4, "gamma": 0.7}),
                                             ("c2r", "lam", {"k": 4, "lam": 0.3}),
                                             ("c2r", "lam", {"k": 4, "lam": 0.3, "base": "batchtopk"}),
                                             ("c2r", "lam", {"lam": 0.3, "base": "relu"})])
def test_trainer_loss_is_base_plus_coefficient_times_penalty(name, coef, extra):
    data = batches(3)
    cfg = tiny_run_config(name=name, chunk_size=24, **extra)
    tr = make(cfg, data[0])
    assert tr.name == name and tr.architecture == {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}[
        extra.get("base", "batchtopk" if name == "ortsae" else "topk")]
    g = torch.Generator().manual_seed(0 + 0x5EED)  # the trainer's permutation stream (seed 0)
    perm = torch.randperm(64, generator=g).tolist()
    expect = [perm[s:s + 24] for s in range(0, 64, 24)]
    W = tr.sae.W_dec.detach().clone()
    out = tr.loss(data[0], 0.0)
    if name == "ortsae":
        ref = naive_ortsae(W, expect)
    else:
        ref = naive_c2r(W, out.latents_BF.detach(), expect)
    torch.testing.assert_close(out.parts[name], getattr(cfg.trainer, coef) * ref, rtol=1e-4, atol=1e-7)
    assert 0 < out.stats["penalty_share"] < 1 and 0 < out.stats["mean_max_cos_pos"] < 1


def test_interval_applies_the_penalty_every_nth_step_scaled():
    data = batches(4)
    cfg = tiny_run_config(name="ortsae", k=4, gamma=0.5, interval=3)
    tr = make(cfg, data[0])
    seen = []
    for x in data:
        out = tr.step(x)
        seen.append("ortsae" in out.parts)
    assert seen == [True, False, False, True]
    fresh = make(cfg, data[0])
    W = fresh.sae.W_dec.detach().clone()
    out = fresh.loss(data[0], 0.0)
    torch.testing.assert_close(out.parts["ortsae"], 3 * 0.5 * naive_ortsae(W, [list(range(64))]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("overrides,key", [({"gamma": -1.0}, "gamma"), ({"chunk_size": 1}, "chunk_size"),
                                           ({"interval": 0}, "interval"), ({"search_dtype": "fp8"}, "search_dtype")])
def test_bad_values_are_config_errors(overrides, key):
    from workbench.config import ConfigError
    with pytest.raises(ConfigError, match=f"trainer.{key}"):
        tiny_run_config(name="ortsae", k=4, **overrides)
    with pytest.raises(ConfigError, match="trainer.base"):
        tiny_run_config(name="c2r", k=4, base="jumprelu")


def test_null_control_is_topk_at_initialization_and_never_moves():
    data = batches(5)
    null = make(tiny_run_config(name="null", k=4), data[0])
    topk = make(tiny_run_config(name="topk", k=4), data[0])
    start = {n: p.clone() for n, p in null.sae.state_dict().items()}
    for n, p in topk.sae.state_dict().items():
        assert torch.equal(p, start[n]), n  # the same init as the topk trainer with this seed
    for x in data:
        out = null.step(x)
    for n, p in null.sae.state_dict().items():
        assert torch.equal(p, start[n]), n
    assert null.step_count == 5 and (out.latents_BF > 0).sum(1).float().mean().item() == 4.0

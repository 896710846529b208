"""The fused bf16 and float32 CPU kernels (workbench/cpu_kernels.c) against transformers' Gemma-3 modules and a
float64 reference: RMSNorm equal to the module's output up to one step of the element type (its float32 sums run
in another order), GELU-tanh x up at least as close to the exactly rounded function as torch's own ops, the rotary
embedding bit-identical; and the fallback without a compiler."""
import dataclasses
import functools
import shutil
import unittest.mock

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm

import evals  # noqa: F401  (registers the evals with the config loader)
import trainers  # noqa: F401
from workbench import cpu_kernels

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here: the kernels are not built")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cpu_kernels.load(tmp_path_factory.mktemp("kernel_cache"))


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 spacing (2^-7 relative)."""
    a, b = a.double(), b.double()
    return (a - b).abs() / (b.abs() * 2.0**-7).clamp_min(1e-30)


def float32_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's float32 spacing (2^-23 relative)."""
    a, b = a.double(), b.double()
    return (a - b).abs() / (b.abs() * 2.0**-23).clamp_min(1e-300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, scale, transposed", [((4, 33, 640), 3000.0, False), ((4, 9, 4, 256), 1.0, True)])
def test_rms_norm_equals_gemma3s_module(lib, shape, scale, transposed, dtype):
    """Residual-stream norms (rows of 640, norms in the thousands) and the q/k norms (rows of head_dim 256, on the
    attention's (B, H, T, d_head) transpose of a (B, T, H, d_head) tensor)."""
    g = torch.Generator().manual_seed(0)
    norm = Gemma3RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.5)
    x = (torch.randn(*shape, generator=g) * scale).to(dtype)
    if transposed:
        x = x.transpose(1, 2)
        assert not x.is_contiguous() and cpu_kernels._rows_tile_memory(x)
    ref = norm(x)
    got = cpu_kernels.rms_norm(lib, x, (1.0 + norm.weight.detach().float()).contiguous(), norm.eps)
    assert got.dtype == dtype and got.shape == ref.shape and got.stride() == x.stride()
    if dtype == torch.bfloat16:  # the float32 sum of squares is added in another order: at most one bf16 step
        assert (got == ref).float().mean() > 0.999
        assert bf16_steps(got, ref).max() <= 1.0
    else:  # the same order changes the last bits; against float64, as close as the module
        assert float32_steps(got, ref).max() <= 8.0
        exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.double())
        assert float32_steps(got, exact).max() <= 8.0 and float32_steps(ref, exact).max() <= 8.0


def test_gelu_tanh_times_up_is_as_close_to_the_exact_function_as_torch(lib):
    g = torch.Generator().manual_seed(1)
    mlp = Gemma3MLP(Gemma3TextConfig(hidden_size=8, intermediate_size=8, hidden_activation="gelu_pytorch_tanh"))
    gate = (torch.randn(64, 4096, generator=g) * 3).bfloat16()
    up = torch.randn(64, 4096, generator=g).bfloat16()
    torch_ops = (mlp.act_fn(gate) * up)
    got = cpu_kernels.gelu_tanh_mul(lib, gate, up)
    x = gate.double()
    # 0.5 x (1 + tanh(z)) as x sigmoid(2 z): the same function, without the cancellation that zeroes the tail
    act = x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))
    exact = (act.bfloat16().double() * up.double()).bfloat16()  # rounded where transformers rounds
    normal = exact.double().abs() > 1e-30  # far tails: both are ~0, their bf16 subnormals differ
    frac_got = (got == exact)[normal].float().mean().item()
    frac_torch = (torch_ops == exact)[normal].float().mean().item()
    assert frac_got >= 0.999 and frac_got >= frac_torch, (frac_got, frac_torch)  # here 1.0 vs 0.93
    assert bf16_steps(got, exact)[normal].max() <= 1.0
    assert (got.double() - exact.double())[~normal].abs().max() < 1e-30
    nan = cpu_kernels.gelu_tanh_mul(lib, torch.tensor([float("nan"), 1.0]).bfloat16(), torch.ones(2).bfloat16())
    assert nan[0].isnan() and nan[1] == mlp.act_fn(torch.tensor([1.0]).bfloat16())[0]


def test_gelu_tanh_times_up_in_float32_is_within_a_few_steps_of_the_exact_function(lib):
    """torch's float32 0.5 g (1 + tanh(z)) loses the far negative tail to cancellation (relative error up to 1
    there); the kernel's g / (1 + e^(-2z)) keeps it."""
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(64, 4096, generator=g) * 3, torch.randn(64, 4096, generator=g)
    got = cpu_kernels.gelu_tanh_mul(lib, gate, up)
    x = gate.double()
    exact = x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)) * up.double()
    assert got.dtype == torch.float32
    normal = exact.abs() > 1e-30  # beyond, float32 underflows (both are ~0)
    steps = float32_steps(got, exact)[normal]
    assert steps.median() <= 1.0
    assert steps.max() <= 128.0  # e^(-2z) to 2e-7 relative, amplified in the far tail (62 here, at g ~ -8)
    center = normal & (gate.abs() < 2)  # where torch's form has no cancellation: both within a few steps (4 and 8)
    assert float32_steps(got, exact)[center].max() <= 8.0
    torch_err = float32_steps(Gemma3MLP(Gemma3TextConfig(hidden_size=8, intermediate_size=8,
                                                         hidden_activation="gelu_pytorch_tanh")).act_fn(gate) * up, exact)
    assert torch_err[normal].max() > 1e5 > steps.max()  # the tail torch loses (2^23 steps: it returns 0)


def test_fused_modules_equal_the_stock_modules_and_fall_back_off_their_types(lib):
    """fuse_gemma3 reroutes only Gemma-3's norms and GELU-tanh MLPs (and, once, the rotary function), for bf16 and
    float32 inputs; a float16 input takes the stock forward."""
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(0)
    stack = torch.nn.Sequential(Gemma3RMSNorm(64), Gemma3MLP(cfg), torch.nn.Linear(64, 64)).bfloat16()
    with torch.no_grad():
        stack[0].weight.normal_()
    x = torch.randn(3, 5, 64).bfloat16()
    ref16, ref32, ref_half = stack(x), stack.float()(x.float()), stack.half()(x.half())
    stack.bfloat16()
    assert cpu_kernels.fuse_gemma3(stack, lib) == 2
    from transformers.models.gemma3 import modeling_gemma3
    rotary = modeling_gemma3.apply_rotary_pos_emb
    assert hasattr(rotary, "original") and cpu_kernels.fuse_gemma3(torch.nn.Sequential(), lib) == 0
    assert modeling_gemma3.apply_rotary_pos_emb is rotary  # installed once, not wrapped again
    got16 = stack(x)
    assert bf16_steps(got16, ref16).max() <= 4.0  # a few bf16 steps through the MLP's matmul
    assert (got16 == ref16).float().mean() > 0.95
    got32 = stack.float()(x.float())
    assert not torch.equal(got32, ref32)  # the kernels ran: the last bits differ (a few steps, through the matmul)
    torch.testing.assert_close(got32, ref32, rtol=1e-5, atol=1e-6)
    assert torch.equal(stack.half()(x.half()), ref_half)  # float16: the modules' own ops


def test_rotary_is_bit_identical_to_transformers_and_falls_back(lib):
    """The attention's q (4 heads) and k (1 head), transposed to (B, H, T, d) as Gemma-3's attention has them."""
    from transformers.models.gemma3 import modeling_gemma3

    original = getattr(modeling_gemma3.apply_rotary_pos_emb, "original", modeling_gemma3.apply_rotary_pos_emb)
    fused = cpu_kernels._fused_rotary(original, lib)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 17, 4, 64, generator=g).transpose(1, 2)
    k = torch.randn(3, 17, 1, 64, generator=g).transpose(1, 2)
    angle = torch.randn(3, 17, 64, generator=g) * 3
    calls = []
    spy = functools.partial(lambda f, *a: calls.append(1) or f(*a), cpu_kernels.rope)
    for dtype in (torch.bfloat16, torch.float32):
        q_, k_, cos, sin = q.to(dtype), k.to(dtype), angle.cos().to(dtype), angle.sin().to(dtype)
        # the batch's own tables, and one table for every row (transformers' when the positions are one range)
        for c, s in [(cos, sin), (cos[:1], sin[:1])]:
            with unittest.mock.patch.object(cpu_kernels, "rope", spy):
                got_qk = fused(q_, k_, c, s)
            for got, ref in zip(got_qk, original(q_, k_, c, s)):
                assert got.dtype == dtype and torch.equal(got, ref)
                assert [st for st, n in zip(got.stride(), got.shape) if n > 1] == [st for st, n in zip(ref.stride(), ref.shape) if n > 1]
    assert len(calls) == 8  # q and k, by the kernel each time
    half = (q.half(), k.half(), angle.cos().half(), angle.sin().half())  # float16: the original's own ops
    mixed = (q, k, angle.cos().bfloat16(), angle.sin().bfloat16())  # types that differ: the original's promotion
    for args in (half, mixed):
        with unittest.mock.patch.object(cpu_kernels, "rope", spy):
            got_qk = fused(*args)
        assert all(torch.equal(a, b) for a, b in zip(got_qk, original(*args)))
    assert len(calls) == 8


def test_packed_linears_equal_f_linear_to_round_off():
    """lm.pack_linears: oneDNN's kernels on weights packed once, for any input rows (2D, 3D, one row), with and without
    a bias, float32 and bf16 layers; as close to the float64 product as F.linear (its sums may run in another order);
    an input of another dtype than its layer's takes nn.Linear's forward; float16 layers untouched."""
    from workbench import lm

    g = torch.Generator().manual_seed(3)
    pair = {dtype: torch.nn.Sequential(torch.nn.Linear(640, 1024, bias=False), torch.nn.Linear(1024, 256)).to(dtype)
            for dtype in (torch.float32, torch.bfloat16)}
    for layers in pair.values():
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / 25)
    stack = torch.nn.Sequential(pair[torch.float32], pair[torch.bfloat16], torch.nn.Linear(8, 8).half())
    refs = {}
    for dtype, layers in pair.items():
        for shape in [(2048, 640), (3, 77, 640), (1, 640)]:
            x = torch.randn(shape, generator=g).to(dtype)
            refs[dtype, shape] = x, layers(x), torch.nn.functional.linear(
                torch.nn.functional.linear(x.double(), layers[0].weight.double()).to(dtype).double(),
                layers[1].weight.double(), layers[1].bias.double())
    assert lm.pack_linears(stack, rows=2048) == 4
    for (dtype, shape), (x, ref, exact) in refs.items():
        got = pair[dtype](x)
        assert got.shape == ref.shape and got.dtype == dtype
        err_got, err_ref = ((got.double() - exact).norm() / exact.norm()).item(), ((ref.double() - exact).norm() / exact.norm()).item()
        if dtype == torch.float32:
            assert err_got < 1e-6 and err_ref < 1e-6, (err_got, err_ref)  # float32 round-off (2^-24 = 6e-8 a step)
        else:  # the output rounded to bf16 (2^-9 = 2e-3 at most), sums in float32; the hidden layer's rounding in exact
            assert err_got < 4e-3 and err_got < 1.05 * err_ref + 1e-4, (err_got, err_ref)
    x32 = torch.randn(2, 640, generator=g)  # a float32 input to a bf16 layer: nn.Linear's forward (and its error)
    with pytest.raises(RuntimeError, match="dtype"):
        pair[torch.bfloat16][0](x32)
    assert not hasattr(stack[2], "_packed_weight")
    x16 = torch.randn(2, 8).half()
    assert torch.equal(stack[2](x16), torch.nn.functional.linear(x16, stack[2].weight, stack[2].bias))


def test_rows_tile_memory():
    x = torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16)
    assert cpu_kernels._rows_tile_memory(x) and cpu_kernels._rows_tile_memory(x.transpose(1, 2))
    assert not cpu_kernels._rows_tile_memory(x.transpose(2, 3))  # rows strided
    assert not cpu_kernels._rows_tile_memory(x[:, :, :2])  # gaps between rows
    assert cpu_kernels._rows_tile_memory(x.float()) and not cpu_kernels._rows_tile_memory(x.half())


def test_no_compiler_gives_the_reason_and_the_harvest_keeps_torchs_ops(tmp_path, monkeypatch):
    from workbench import lm
    from workbench.config import load_config

    with pytest.raises(cpu_kernels.Unavailable, match="no C compiler 'no-such-cc'"):
        cpu_kernels.load(tmp_path, "no-such-cc")
    with pytest.raises(cpu_kernels.Unavailable, match="'false' could not build cpu_kernels.c"):
        cpu_kernels.load(tmp_path, "false")
    model = dataclasses.replace(load_config("run_configs/quickstart.toml").model, cache_dir=str(tmp_path), dtype="bfloat16")
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "flags : avx512_bf16 amx_bf16")  # AMX: SDPA in bf16 (no +eager_attention)
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.warns(UserWarning, match=r"fused CPU kernels off \(no C compiler 'no-such-cc' on PATH\)"):
        assert lm.harvest_label(model, cpu) == "hf+onednn_linear"
    monkeypatch.delenv("CC")
    other = dataclasses.replace(model, cache_dir=str(tmp_path / "other"))
    assert lm.harvest_label(other, cpu) == "hf+fused_cpu_kernels+onednn_linear"
    assert lm.harvest_label(dataclasses.replace(other, onednn_linear=False), cpu) == "hf+fused_cpu_kernels"
    assert lm.harvest_label(dataclasses.replace(other, fused_kernels=False, onednn_linear=False), cpu) == "hf"
    assert lm.harvest_label(dataclasses.replace(other, dtype="float32"), cpu) == "hf+fused_cpu_kernels+onednn_linear"
    assert lm.harvest_label(dataclasses.replace(other, dtype="float32", onednn_linear=False), cpu) == "hf+fused_cpu_kernels"
    assert lm.harvest_label(dataclasses.replace(other, dtype="float16"), cpu) == "hf"
    assert lm.harvest_label(other, torch.device("cuda")) == "hf"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "flags : avx2 fma")  # bf16 not native: torch's F.linear
    assert lm.harvest_label(dataclasses.replace(other, fused_kernels=False), cpu) == "hf+eager_attention"
    assert lm.harvest_label(dataclasses.replace(other, fused_kernels=False, dtype="float32"), cpu) == "hf+onednn_linear"
    # the trainers' pair kernel is float32: the library loads for any CPU run with the key on
    assert lm.cpu_kernels_for(dataclasses.replace(other, dtype="float32"), cpu) is not None
    assert lm.cpu_kernels_for(dataclasses.replace(other, fused_kernels=False), cpu) is None


def rows_of(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense table's nonzeros by row (CSR), each row's columns shuffled: the kernel takes them in any order."""
    n = K.shape[0]
    r, c = K.nonzero(as_tuple=True)
    order = torch.argsort(r * n + torch.randperm(n, generator=torch.Generator().manual_seed(0))[c])
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    return row_ptr, c[order].int(), K[r, c][order].float()


@pytest.fixture(scope="module")
def lib_without_bf16_dots(tmp_path_factory):
    """The kernels built without AVX512-BF16 (as on a CPU without it): the portable bf16 pair rows."""
    try:
        return cpu_kernels.load(tmp_path_factory.mktemp("kernel_cache_plain"), extra_flags=("-mno-avx512bf16",))
    except cpu_kernels.Unavailable as e:  # a compiler for another architecture has no such flag
        pytest.skip(f"no x86 build without AVX512-BF16 here: {e}")


@pytest.mark.parametrize("rows", ["float32", "bfloat16", "bfloat16 portable"])
@pytest.mark.parametrize("n, d, density", [(301, 64, 0.2), (64, 640, 0.9), (120, 45, 0.3), (50, 7, 0.0)])
def test_pair_kernel_equals_the_gram_formula(lib, request, rows, n, d, density):
    """sum_ij K_ij |w_i . w_j| and KS W (KS = K sign(W W^T)) over a sparse symmetric K given by rows, against
    float64: rows with partner counts that are and are not multiples of eight, row lengths that are not a vector
    width (45: one 32-element bf16 chunk and a tail), no pairs; stored zeros are skipped; with per-latent weights.
    bf16 rows: the same formula on the bf16 values (float32 sums), with AVX512-BF16 dot products where this CPU has
    them and in the portable build."""
    if rows == "bfloat16 portable":
        lib = request.getfixturevalue("lib_without_bf16_dots")
        assert not cpu_kernels.pair_rows_bf16_vectorized(lib)
    elif rows == "bfloat16":
        assert cpu_kernels.pair_rows_bf16_vectorized(lib) == ("avx512_bf16" in cpu_kernels.cpu_flags().split())
    g = torch.Generator().manual_seed(n)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    if rows != "float32":  # the reference below multiplies the bf16 values
        W = W.bfloat16()
    K = torch.triu((torch.rand(n, n, generator=g) < density) * torch.rand(n, n, generator=g), diagonal=1)
    K = (K + K.T).float()
    row_ptr, cols, vals = rows_of(K)
    if vals.numel():
        vals[::3] = 0.0  # stored zeros: progressive's clamp leaves them in place
        K = torch.zeros_like(K).index_put_((torch.repeat_interleave(torch.arange(n), row_ptr.diff()), cols.long()), vals)
    value, half = cpu_kernels.pair_rows_abs_cosine(lib, row_ptr, cols, vals, W)
    assert half.dtype == torch.float32
    G = W.double() @ W.double().T
    assert value == pytest.approx((K.double() * G.abs()).sum().item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(half.double(), (K.double() * G.sign()) @ W.double(), rtol=1e-5, atol=1e-5)
    assert cpu_kernels.pair_rows_abs_cosine(lib, row_ptr, cols, vals, W)[0] == value  # the same bits again
    # per-latent weights (momentum's w): K_ij (w_i + w_j)
    w = 1 + (torch.rand(n, generator=g) < 0.5).float()
    value, half = cpu_kernels.pair_rows_abs_cosine(lib, row_ptr, cols, vals, W, w)
    Kw = K.double() * (w[:, None] + w[None, :]).double()
    assert value == pytest.approx((Kw * G.abs()).sum().item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(half.double(), (Kw * G.sign()) @ W.double(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lib_without_avx512(tmp_path_factory):
    """The kernels built without AVX-512 (as on a CPU without it): the table's scalar loop over partners."""
    try:
        return cpu_kernels.load(tmp_path_factory.mktemp("kernel_cache_no_avx512"), extra_flags=("-mno-avx512f",))
    except cpu_kernels.Unavailable as e:
        pytest.skip(f"no x86 build without AVX-512 here: {e}")


@pytest.mark.parametrize("build", ["native", "without AVX-512"])
@pytest.mark.parametrize("B, k, n", [(64, 8, 40), (300, 5, 1000), (1, 3, 4), (50, 37, 60), (20, 32, 3000)])
def test_pair_table_rows_equal_the_scattered_table(lib, request, build, B, k, n):
    """K_ij = sum over the occurrences of (i, j) of omega, by rows: against one index_add into the dense n x n
    table; pairs that recur over tokens sum, zero weights (absent pairs, the diagonal) give no entry, each row
    lists a partner once, and latents that never fire have empty rows; the row sums. From the activity mask instead
    of omega, the co-firing counts C_ij; with the firing counts as well, the overlaps n_ij. Token rows shorter than,
    between and at multiples of the vector loop's sixteen lanes (k 37: two chunks and a partial one), in this CPU's
    build and the scalar one."""
    if build != "native":
        lib = request.getfixturevalue("lib_without_avx512")
    g = torch.Generator().manual_seed(B)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    active = torch.rand(B, k, generator=g) < 0.8
    omega = (active[:, :, None] & active[:, None, :] & ~torch.eye(k, dtype=torch.bool)) * torch.rand(B, k, k, generator=g)
    omega = (omega + omega.transpose(1, 2)).float()
    dense = torch.zeros(n * n).index_add_(0, (idx[:, :, None] * n + idx[:, None, :]).flatten(), omega.flatten()).view(n, n)
    row_ptr, cols, vals, sums = cpu_kernels.pair_table_rows(lib, idx, omega, n)
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff())
    torch.testing.assert_close(sums, dense.sum(1), rtol=1e-5, atol=1e-6)
    assert (vals > 0).all() and len(set(zip(rows.tolist(), cols.tolist()))) == vals.numel()
    assert vals.numel() == int(dense.count_nonzero())
    torch.testing.assert_close(dense[rows, cols.long()], vals, rtol=1e-6, atol=0)
    if n == 1000:
        assert (row_ptr.diff() == 0).any()  # some latents never fire in 300 x 5 draws of 1000
    # from the activity mask: the co-firing counts C_ij (omega 1 for each pair of active entries r != s)
    both = (active[:, :, None] & active[:, None, :] & ~torch.eye(k, dtype=torch.bool)).float()
    counts = torch.zeros(n * n).index_add_(0, (idx[:, :, None] * n + idx[:, None, :]).flatten(), both.flatten()).view(n, n)
    row_ptr, cols, vals, sums = cpu_kernels.pair_table_rows(lib, idx, active, n)
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff())
    assert vals.numel() == int(counts.count_nonzero()) and len(set(zip(rows.tolist(), cols.tolist()))) == vals.numel()
    assert torch.equal(counts[rows, cols.long()], vals)
    assert counts.max() > 1 or B == 1 or n == 1000  # pairs that recur over tokens count each time
    # with the firing counts a_i: the overlaps n_ij = C_ij / min(a_i, a_j), and each row's sum
    fires = torch.zeros(n, dtype=torch.long).index_add_(0, idx.flatten(), active.flatten().long())
    overlap = counts / torch.minimum(fires[:, None], fires[None, :]).clamp_min(1)
    row_ptr, cols, vals, sums = cpu_kernels.pair_table_rows(lib, idx, active, n, fires)
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff())
    torch.testing.assert_close(vals, overlap[rows, cols.long()], rtol=1e-6, atol=0)
    torch.testing.assert_close(sums, overlap.sum(1), rtol=1e-5, atol=1e-6)


def test_pair_table_rows_vector_loop_gives_the_scalar_table(lib, request):
    """The AVX-512 loop over partners (sixteen lanes: gather, compress, scatter) and the scalar loop build the same
    table to the bit: columns in first-seen order, each sum over its occurrences in the same order, on codes whose
    latents recur over tokens (a TopK code's co-firing) with some entries inactive."""
    if "avx512f" not in cpu_kernels.cpu_flags().split():
        pytest.skip("this CPU has no AVX-512: both builds run the scalar loop")
    scalar = request.getfixturevalue("lib_without_avx512")
    g = torch.Generator().manual_seed(3)
    B, k, n = 512, 32, 700
    # latents 0-13 fire in runs of four (0-3, 1-4, ...): pairs that recur over many tokens; the rest at random,
    # distinct within a token as TopK's are
    first = torch.randint(0, 10, (B,), generator=g)
    idx = torch.stack([torch.cat([torch.arange(f, f + 4), 14 + torch.randperm(n - 14, generator=g)[:k - 4]])
                       for f in first.tolist()])
    active = torch.rand(B, k, generator=g) < 0.9
    fires = torch.zeros(n, dtype=torch.long).index_add_(0, idx.flatten(), active.flatten().long())
    for fires_F in (None, fires):
        vector_table = cpu_kernels.pair_table_rows(lib, idx, active, n, fires_F)
        scalar_table = cpu_kernels.pair_table_rows(scalar, idx, active, n, fires_F)
        assert all(torch.equal(a, b) for a, b in zip(vector_table, scalar_table))


@pytest.mark.parametrize("build", ["native", "without AVX-512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, F", [(64, 300), (3, 16), (5, 7), (2, 40), (1, 1)])
def test_positive_entries_equal_torchs_nonzero(lib, request, build, dtype, B, F):
    """ReLU's codes: the rows and columns of pre > 0 in nonzero's row-major order, with pre's values there, for rows
    whose length is and is not a multiple of the vector loop's sixteen lanes, in this CPU's build and the scalar one;
    0, -0, NaN, -inf and negatives are not > 0, +inf and a denormal are. More entries than max_entries: None (at
    exactly the count: the entries)."""
    if build != "native":
        lib = request.getfixturevalue("lib_without_avx512")
    g = torch.Generator().manual_seed(B * F)
    pre = torch.randn(B * F, generator=g) - 1.5  # ~7% > 0, as ReLU's trained codes are sparse
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-39, -1e-39, 2.0])
    where = torch.randperm(B * F, generator=g)[:min(B * F, len(specials))]
    pre[where] = specials[:len(where)]
    pre = pre.view(B, F).to(dtype)
    rows, cols = (pre > 0).nonzero(as_tuple=True)
    count = rows.numel()
    got = cpu_kernels.positive_entries(lib, pre, count)
    assert got[2].dtype == dtype
    assert torch.equal(got[0], rows) and torch.equal(got[1], cols) and torch.equal(got[2], pre[rows, cols])
    assert torch.equal(cpu_kernels.positive_entries(lib, pre, B * F)[1], cols)  # room to spare: the same entries
    if count > 0:
        assert cpu_kernels.positive_entries(lib, pre, count - 1) is None


@pytest.mark.parametrize("B, k, n, d", [(64, 32, 300, 640), (40, 7, 50, 19), (3, 1, 5, 8), (17, 9, 2000, 36),
                                        (16, 64, 500, 300)])
def test_token_kernel_equals_the_table_formula(lib, B, k, n, d):
    """sum_b sum_{r != s} omega_brs |w_i . w_j| and KS W with K the occurrences' table, token by token, for momentum's
    omega_brs = (w_i + w_j) / min(a_i, a_j) on pairs of active entries: against float64 on the scattered table, with
    k and d that are and are not multiples of the register tiles (4 rows, 8 and 16 columns) and of the gradient's
    column chunks (k 32: 256 columns, 640 = 2.5 chunks; k 64: 128 columns, 300 with a tail), inactive entries, a
    single latent per token, pairs that recur over tokens (n 50) and latents that never fire (n 2000). The value has
    the same bits at one thread as at two; the gradient the same bits again at a given thread count and the same
    value within float32 rounding at another."""
    g = torch.Generator().manual_seed(B * k)
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    active = torch.rand(B, k, generator=g) < 0.8
    fires = torch.zeros(n, dtype=torch.long).index_add_(0, idx.flatten(), active.flatten().long())
    w = 1 + (torch.rand(n, generator=g) < 0.5).float()
    both = active[:, :, None] & active[:, None, :] & ~torch.eye(k, dtype=torch.bool)
    i, j = idx[:, :, None], idx[:, None, :]
    omega = both * (w[i] + w[j]).double() / torch.minimum(fires[i], fires[j]).clamp_min(1)
    K = torch.zeros(n * n, dtype=torch.float64).index_add_(0, (i * n + j).flatten(), omega.flatten()).view(n, n)
    G = W.double() @ W.double().T
    value, half = cpu_kernels.token_pairs_abs_cosine(lib, idx, active, fires, w, W)
    assert value == pytest.approx((K * G.abs()).sum().item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(half.double(), (K * G.sign()) @ W.double(), rtol=1e-5, atol=1e-5)
    again = cpu_kernels.token_pairs_abs_cosine(lib, idx, active, fires, w, W)
    assert again[0] == value and torch.equal(again[1], half)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.token_pairs_abs_cosine(lib, idx, active, fires, w, W)
    finally:
        torch.set_num_threads(threads)
    assert one[0] == value
    torch.testing.assert_close(one[1], half, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B, D, n, entries", [(64, 640, 300, 1000), (50, 109, 70, 400), (8, 33, 5, 0), (300, 96, 2000, 900)])
def test_weighted_row_sums_and_row_dots_equal_the_dense_products(lib, B, D, n, entries):
    """The sparse step's three sums over entries e (token rows_e, latent idx_e, value v_e), against float64 on the
    scattered dense G (B x n): the encoder's weight gradient x^T G (transposed: W_enc's layout), the decoder's bag
    G W and its weight gradient G^T g, and the bag's gradient for its weights g[rows_e] . W[idx_e]. Entries in no
    particular order, a latent's entries over many rows, latents without entries (n 2000: most; their sums must be
    written as zeros over whatever the output's memory held), D with and without the 64- and 32-float register chunks
    and a tail, n not a multiple of the 32-group blocks, no entries at all. The same bits at one thread as at two."""
    g = torch.Generator().manual_seed(D)
    x, W, grad = torch.randn(B, D, generator=g), torch.randn(n, D, generator=g), torch.randn(B, D, generator=g)
    flat = torch.randperm(B * n, generator=g)[:entries]
    rows, idx, vals = flat // n, flat % n, torch.randn(entries, generator=g)
    G = torch.zeros(B, n, dtype=torch.float64).index_put_((rows, idx), vals.double())

    def all_four():
        torch.empty(D, n).fill_(float("nan"))  # garbage where the allocator may hand the outputs' memory out again
        return [cpu_kernels.weighted_row_sums(lib, x, rows, idx, vals, n, transposed=True),
                cpu_kernels.weighted_row_sums(lib, W, idx, rows, vals, B),
                cpu_kernels.weighted_row_sums(lib, grad, rows, idx, vals, n),
                cpu_kernels.row_dots(lib, grad, rows, W, idx)]
    got = all_four()
    for out, ref in zip(got, [x.double().T @ G, G @ W.double(), G.T @ grad.double(),
                              (grad[rows].double() * W[idx].double()).sum(1)]):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = all_four()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, got))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, F, k_total", [(1024, 2048, 32 * 1024), (37, 50, 111), (64, 40, 2000), (8, 16, 1000),
                                           (5, 7, 1)])
def test_batch_topk_entries_equal_the_mask(lib, B, F, k_total, dtype):
    """BatchTopK's kept entries by the radix select against batch_topk_mask(ReLU(pre)).nonzero(): real-valued pre;
    values rounded to halves (many ties at the cutoff, some kept and some not: lowest flat indices first); more
    places than positive entries (zeros kept from the lowest flat index on, -0.0 among them); more places than
    entries; one. In float32 (two radix passes) and bf16 (one; bf16's rounding of real values ties many more)."""
    from workbench.sae_ops import batch_topk_mask
    g = torch.Generator().manual_seed(B)
    pre = torch.randn(B, F, generator=g)
    if B < 1024:
        pre = (pre * 2).round() / 2
        pre[0, :3] = -0.0
    pre = pre.to(dtype)
    rows, cols = cpu_kernels.batch_topk_entries(lib, pre, k_total)
    ref_rows, ref_cols = batch_topk_mask(pre.float().relu(), k_total).nonzero(as_tuple=True)
    assert rows.numel() == min(k_total, B * F)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    if B == 37:  # the cutoff splits a run of ties
        cut = pre.relu()[rows, cols].min()
        assert (pre.relu() == cut).sum() > (pre.relu()[rows, cols] == cut).sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, F, k, ties", [(1024, 2048, 32, False), (64, 16384, 64, False), (300, 2048, 32, True),
                                          (50, 100, 30, True), (20, 9, 9, False), (7, 333, 1, True)])
def test_row_topk_equals_a_stable_sort(lib, B, F, k, ties, dtype):
    """TopK's selection by the kernel (blocks' maxima, then a heap) against each row's first k columns in a stable sort
    by value, descending (ties to the lowest columns), ascending: real values (1024 x 2048, k 32, as the quickstart;
    Gemma-2's 16384, k 64); values rounded to halves (runs of ties split at the cutoff; 0.0 and -0.0 among them);
    k above F / 8 (no blocks: the heap over the row); k = F; k = 1. And the kept values equal torch.topk's."""
    g = torch.Generator().manual_seed(B + F)
    pre = torch.randn(B, F, generator=g)
    if ties:
        pre = (pre * 2).round() / 2
        pre[:, :F // 3] = pre[:, :F // 3].abs().neg()  # -0.0 where round gave 0 in the first third
    pre = pre.to(dtype)
    got = cpu_kernels.row_topk(lib, pre, k)
    ref = pre.float().sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    assert torch.equal(got, ref)
    assert torch.equal(pre.gather(1, got).sort(dim=1).values, pre.topk(k, dim=1).values.sort(dim=1).values)
    if ties:  # the cutoff splits a run of equal values in some rows, and zeros of both signs are there to tie
        cut = pre.gather(1, got).min(dim=1, keepdim=True).values
        assert ((pre == cut).sum(1) > (pre.gather(1, got) == cut).sum(1)).any()
        assert (pre.float().view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any()

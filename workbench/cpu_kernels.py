"""CPU kernels (cpu_kernels.c): fused bfloat16 and float32 kernels for the training harvest's HuggingFace Gemma-3 forward,
each one pass: RMSNorm, GELU-tanh times the up projection, and the rotary embedding; and the competition
trainers' penalty over their co-firing pairs (pair_table_rows and pair_rows_abs_cosine over the table of pairs;
token_pairs_abs_cosine token by token). Eager torch has no fused CPU kernels for the first three: it ran them as
5-8 elementwise passes each, ~60% of a harvest batch on a 2-core CPU (notes.txt, sessions 10-11); nor a
product over a sparse pattern that is as fast as the penalty's dense Gram (session 12).

The C source is compiled once per machine with the system C compiler ($CC, else cc) into the cache directory
and loaded with ctypes; its OpenMP is the libgomp torch already loaded, so both share one thread pool.
Without a compiler, or where the build fails, `load` says why and the harvest keeps torch's ops. Results
equal torch's to bf16 rounding (tests/test_cpu_kernels.py), so the activation cache key names the kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -march=native: the library is built for this CPU (AVX-512 here), so its cache key holds the CPU's flags
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]


class Unavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


@functools.cache  # read once: the bf16 routing asks every step, and /proc/cpuinfo grows with the core count
def cpu_flags() -> str:
    """The CPU's feature line of /proc/cpuinfo ("flags" on x86, "Features" on Arm); '' where there is none."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def bf16_matrix_engine(device_type: str) -> bool:
    """bf16 matmuls run on a matrix engine: a GPU's tensor cores, a CPU's AMX tiles (not AVX512-BF16's vector dot
    products). Measured there: the dense bf16 products beat the sparse step's gathers at 2048 latents, and the bf16
    Gram beat the float32 pair kernel; on an AVX512-BF16 CPU neither (notes.txt, session 20)."""
    return device_type == "cuda" or (device_type == "cpu" and "amx_bf16" in cpu_flags().split())


def load(cache_dir: Path, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled kernels (built on first use into cache_dir/kernels/<key>/; an atomic rename publishes
    them), with compiler, else $CC, else cc, and extra_flags after FLAGS (tests build the portable versions with
    e.g. -mno-avx512bf16). Raises Unavailable with the reason."""
    return _load(Path(cache_dir), compiler or os.environ.get("CC") or "cc", tuple(extra_flags))


@functools.cache
def _load(cache_dir: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    cc_path = shutil.which(compiler)
    if cc_path is None:
        raise Unavailable(f"no C compiler '{compiler}' on PATH")
    source = SOURCE.read_bytes()
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc_path.encode(), cpu_flags().encode()]))
    target = cache_dir / "kernels" / key.hexdigest()[:24] / "cpu_kernels.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            proc = subprocess.run([cc_path, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["no output"])[0]
                raise Unavailable(f"'{compiler}' could not build {SOURCE.name}: {first}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.rms_norm_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.gelu_tanh_mul_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.rope_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8
    lib.rms_norm_f32.argtypes, lib.gelu_tanh_mul_f32.argtypes = lib.rms_norm_bf16.argtypes, lib.gelu_tanh_mul_bf16.argtypes
    lib.rope_f32.argtypes = lib.rope_bf16.argtypes
    lib.pair_rows_abs_cosine_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2
    lib.pair_rows_abs_cosine_f32.restype = ctypes.c_double
    lib.pair_rows_abs_cosine_bf16.argtypes = lib.pair_rows_abs_cosine_f32.argtypes
    lib.pair_rows_abs_cosine_bf16.restype = ctypes.c_double
    lib.pair_rows_bf16_vectorized.restype = ctypes.c_int
    lib.pair_table_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 4
    lib.pair_table_rows.restype = ctypes.c_int64
    lib.token_pairs_abs_cosine_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
    lib.token_pairs_abs_cosine_f32.restype = ctypes.c_double
    lib.weighted_row_sums_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]
    lib.row_dots_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.batch_topk_entries_f32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.batch_topk_entries_f32.restype = ctypes.c_uint32
    lib.batch_topk_entries_bf16.argtypes = lib.batch_topk_entries_f32.argtypes
    lib.batch_topk_entries_bf16.restype = ctypes.c_uint32
    lib.row_topk_f32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.row_topk_bf16.argtypes = lib.row_topk_f32.argtypes
    lib.positive_entries_f32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
    lib.positive_entries_f32.restype = ctypes.c_int64
    lib.positive_entries_bf16.argtypes = lib.positive_entries_f32.argtypes
    lib.positive_entries_bf16.restype = ctypes.c_int64
    return lib


HARVEST_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}  # the fused kernels' element types: name suffix


def _fusable_cpu(*tensors: torch.Tensor) -> bool:
    """Contiguous on a CPU, all of one of the kernels' element types (HARVEST_DTYPES)."""
    return (tensors[0].dtype in HARVEST_DTYPES
            and all(t.dtype == tensors[0].dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def _kernel(lib: ctypes.CDLL, name: str, x: torch.Tensor):
    """The kernel `name` for x's element type: name_bf16 or name_f32."""
    return getattr(lib, f"{name}_{HARVEST_DTYPES[x.dtype]}")


def _rows_tile_memory(x: torch.Tensor) -> bool:
    """One of the kernels' element types on a CPU, its last dim contiguous and the tensor dense in some dim order
    (e.g. the attention's q, transposed to (B, H, T, d_head)): memory is then its rows of the last dim, one after
    another."""
    if x.dtype not in HARVEST_DTYPES or x.device.type != "cpu" or x.stride(-1) != 1:
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm of bf16 or float32 x over its last dim (rows tiling memory: _rows_tile_memory); scale =
    1 + weight (float32, contiguous). The output has x's strides (empty_like keeps a dense layout)."""
    out = torch.empty_like(x)
    assert out.stride() == x.stride()
    d = x.shape[-1]
    _kernel(lib, "rms_norm", x)(x.data_ptr(), scale.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def gelu_tanh_mul(lib: ctypes.CDLL, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for contiguous tensors of one shape and type (_fusable_cpu); in bf16 the act is rounded
    to bf16 before the product, as transformers rounds it."""
    out = torch.empty_like(gate)
    _kernel(lib, "gelu_tanh_mul", gate)(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
    return out


def rope(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of x (B, H, T, d; rows tiling memory) with contiguous cos, sin (B, T, d) or
    (1, T, d) (one table for every row), all bf16 or all float32: bit-identical to x * cos + rotate_half(x) * sin,
    in x's strides."""
    out = torch.empty_like(x)
    assert out.stride() == x.stride()
    B, H, T, d = x.shape
    assert cos.shape == sin.shape and cos.shape[0] in (1, B) and cos.shape[1:] == (T, d)
    _kernel(lib, "rope", x)(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), B, H, T, d, *x.stride()[:3],
                            0 if cos.shape[0] == 1 else T * d)
    return out


def _table_weights(idx_Bk: torch.Tensor, weights: torch.Tensor, fires_F: torch.Tensor | None,
                   n: int) -> tuple[int, int, int, int, torch.Tensor | None]:
    """(B, k, omega pointer, active pointer, 1 / a) for the table builders: weights are omega (float32, B x k x k) or
    the entries' activity (bool, B x k), with the firing counts a_i optionally (activity only)."""
    assert idx_Bk.dtype == torch.int64 and idx_Bk.is_contiguous() and weights.is_contiguous()
    B, k = idx_Bk.shape
    if weights.dtype == torch.bool:
        assert weights.shape == (B, k)
        inv_fires = None if fires_F is None else _inverse_fires(fires_F, n)
        return B, k, 0, weights.data_ptr(), inv_fires  # a bool tensor is one byte per entry, 0 or 1
    assert weights.dtype == torch.float32 and weights.shape == (B, k, k) and fires_F is None
    return B, k, weights.data_ptr(), 0, None


def _inverse_fires(fires_F: torch.Tensor, n: int) -> torch.Tensor:
    assert fires_F.shape == (n,)
    return 1.0 / fires_F.float().clamp_min(1)  # a latent in a co-firing pair fired at least once


def pair_table_rows(lib: ctypes.CDLL, idx_Bk: torch.Tensor, weights: torch.Tensor, n: int,
                    fires_F: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_ptr (n + 1), cols, vals, row sums (n)): the table K_ij = the sum of omega[b, r, s] over the occurrences
    with idx[b, r] = i, idx[b, s] = j, as its nonzero entries by row (CSR; each row's columns in first-seen order), for
    int64 latent indices idx (B x k, values < n, distinct within a token) and weights either float32 omega >= 0
    (B x k x k, 0 where a pair is absent) or a bool activity mask (B x k; omega 1 for each pair of active entries:
    K = the co-firing counts C_ij; with each latent's firing count a_i (fires_F) omega 1 / min(a_i, a_j): K = the
    overlaps n_ij), all contiguous on a CPU; row_ptr[-1] is the number of entries (both orders of each pair). One pass
    over the occurrences: work B k^2, memory the rows' bounds min(n - 1, occurrences (k - 1)), where the dense table
    costs n^2."""
    B, k, omega_ptr, active_ptr, inv_fires = _table_weights(idx_Bk, weights, fires_F, n)
    occurrences_F = torch.bincount(idx_Bk.flatten(), minlength=n)
    capacity = int((occurrences_F * (k - 1)).clamp_max_(n - 1).sum())  # the C side's slots, summed
    row_ptr, row_sums = torch.empty(n + 1, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
    cols, vals = torch.empty(capacity, dtype=torch.int32), torch.empty(capacity, dtype=torch.float32)
    nnz = lib.pair_table_rows(idx_Bk.data_ptr(), omega_ptr, active_ptr, 0 if inv_fires is None else inv_fires.data_ptr(),
                              B, k, n, capacity, row_ptr.data_ptr(), cols.data_ptr(), vals.data_ptr(), row_sums.data_ptr())
    assert nnz >= 0, "pair_table_rows: the rows' slots exceed the capacity"
    return row_ptr, cols[:nnz], vals[:nnz], row_sums


def token_pairs_abs_cosine(lib: ctypes.CDLL, idx_Bk: torch.Tensor, active_Bk: torch.Tensor, fires_F: torch.Tensor,
                           weight_F: torch.Tensor, W_FD: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(sum_b sum_{r != s} omega_brs |w_i . w_j|, KS W) for momentum's occurrence weights omega_brs =
    (weight_i + weight_j) / min(a_i, a_j) where entries r != s (latents i = idx[b, r], j = idx[b, s]) both fire, else
    0, with K their table ((w_i + w_j) n_ij) and KS = K * sign(W W^T): the value and gradient half of
    pair_rows_abs_cosine on that table, token by token without building it. idx: int64 (B x k), distinct latents
    within each token; active: bool (B x k); fires_F: the firing counts a (n); weight_F, W: float32; all contiguous on
    a CPU. The gradient has the same bits for a given thread count, the value for any."""
    assert idx_Bk.dtype == torch.int64 and active_Bk.dtype == torch.bool and active_Bk.shape == idx_Bk.shape
    assert W_FD.dtype == weight_F.dtype == torch.float32
    assert all(t.is_contiguous() for t in (idx_Bk, active_Bk, weight_F, W_FD))
    B, k = idx_Bk.shape
    n, d = W_FD.shape
    assert weight_F.shape == (n,)
    inv_fires = _inverse_fires(fires_F, n)
    half_FD = torch.empty_like(W_FD)
    value = lib.token_pairs_abs_cosine_f32(idx_Bk.data_ptr(), active_Bk.data_ptr(), inv_fires.data_ptr(),
                                           weight_F.data_ptr(), W_FD.data_ptr(), half_FD.data_ptr(), B, k, n, d)
    return value, half_FD


def pair_rows_abs_cosine(lib: ctypes.CDLL, row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                         W_FD: torch.Tensor, weight_F: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """(sum_ij K_ij |w_i . w_j|, KS W with KS = K * sign(W W^T)) for a symmetric K >= 0 with a zero diagonal given
    by rows as pair_table_rows gives it (zero entries are skipped) and rows W in float32 or bfloat16 (the products
    of its values, summed in float32), all contiguous on a CPU: the work is K's nonzeros, not n^2. KS W is float32.
    With per-latent weights (float32, n), K_ij = vals_ij (weight_i + weight_j)."""
    assert row_ptr.dtype == torch.int64 and cols.dtype == torch.int32
    assert vals.dtype == torch.float32 and W_FD.dtype in HARVEST_DTYPES and W_FD.is_contiguous()
    assert all(t.is_contiguous() for t in (row_ptr, cols, vals))
    n, d = W_FD.shape
    assert row_ptr.shape == (n + 1,) and cols.shape == vals.shape == (int(row_ptr[-1]),)
    if weight_F is not None:
        assert weight_F.dtype == torch.float32 and weight_F.shape == (n,) and weight_F.is_contiguous()
    half_FD = torch.empty(n, d, dtype=torch.float32)
    value = _kernel(lib, "pair_rows_abs_cosine", W_FD)(row_ptr.data_ptr(), cols.data_ptr(), vals.data_ptr(),
                                                       0 if weight_F is None else weight_F.data_ptr(), W_FD.data_ptr(),
                                                       half_FD.data_ptr(), n, d)
    return value, half_FD


def pair_rows_bf16_vectorized(lib: ctypes.CDLL) -> bool:
    """pair_rows_abs_cosine's bf16 rows run on AVX512-BF16 dot products here (built with them), not one by one."""
    return bool(lib.pair_rows_bf16_vectorized())


def weighted_row_sums(lib: ctypes.CDLL, src: torch.Tensor, pick_E: torch.Tensor, group_E: torch.Tensor,
                      vals_E: torch.Tensor, n_groups: int, transposed: bool = False) -> torch.Tensor:
    """out[j] = sum over the entries e with group_E[e] = j of vals_E[e] src[pick_E[e]] (rows of src), (n_groups, D), or
    its transpose (D, n_groups) laid out as such: the sparse step's embedding bag and its weight gradients
    (workbench/sae_ops.py). float32 src and vals, int64 indices (group < n_groups, pick < len(src)), all contiguous
    on a CPU; entries in any order (each group's sum runs in the given order: the same bits for any thread count)."""
    assert src.dtype == vals_E.dtype == torch.float32 and pick_E.dtype == group_E.dtype == torch.int64
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in (src, pick_E, group_E, vals_E)) and src.dim() == 2
    E, D = vals_E.numel(), src.shape[1]
    assert pick_E.shape == group_E.shape == (E,)
    out = torch.empty((D, n_groups) if transposed else (n_groups, D), dtype=torch.float32)
    lib.weighted_row_sums_f32(src.data_ptr(), pick_E.data_ptr(), group_E.data_ptr(), vals_E.data_ptr(), E, n_groups, D,
                              out.data_ptr(), int(transposed))
    return out


def row_dots(lib: ctypes.CDLL, a: torch.Tensor, ia_E: torch.Tensor, b: torch.Tensor, ib_E: torch.Tensor) -> torch.Tensor:
    """out[e] = a[ia_E[e]] . b[ib_E[e]] for float32 rows of one length and int64 indices, contiguous on a CPU."""
    assert a.dtype == b.dtype == torch.float32 and ia_E.dtype == ib_E.dtype == torch.int64
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in (a, ia_E, b, ib_E)) and a.shape[1] == b.shape[1]
    assert ia_E.shape == ib_E.shape
    out = torch.empty(ia_E.numel(), dtype=torch.float32)
    lib.row_dots_f32(a.data_ptr(), ia_E.data_ptr(), b.data_ptr(), ib_E.data_ptr(), ia_E.numel(), a.shape[1], out.data_ptr())
    return out


def batch_topk_entries(lib: ctypes.CDLL, pre_BF: torch.Tensor, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int64, row-major: where sae_ops.batch_topk_mask keeps entries of ReLU(pre) (the k_total largest
    over the batch, ties at the cutoff to the lowest flat indices), for float32 or bf16 pre contiguous on a CPU (bf16:
    one radix pass, its 16 bits being the whole value); no B x F mask or ReLU'd copy is made."""
    assert pre_BF.dtype in HARVEST_DTYPES and pre_BF.is_contiguous() and pre_BF.device.type == "cpu" and pre_BF.dim() == 2
    B, F = pre_BF.shape
    k_total = min(k_total, B * F)
    rows, cols = torch.empty(k_total, dtype=torch.int64), torch.empty(k_total, dtype=torch.int64)
    if k_total > 0:
        getattr(lib, f"batch_topk_entries_{HARVEST_DTYPES[pre_BF.dtype]}")(pre_BF.data_ptr(), B, F, k_total, rows.data_ptr(),
                                                                           cols.data_ptr())
    return rows, cols


def row_topk(lib: ctypes.CDLL, pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64: each row's k largest columns of pre (float32 or bf16, contiguous on a CPU), ascending, ties at the
    cutoff to the lowest columns: the set torch.topk(pre, k).indices holds, up to which tied entries it takes."""
    assert pre_BF.dtype in HARVEST_DTYPES and pre_BF.is_contiguous() and pre_BF.device.type == "cpu" and pre_BF.dim() == 2
    B, F = pre_BF.shape
    assert 0 < k <= F, (k, F)
    cols = torch.empty((B, k), dtype=torch.int64)
    getattr(lib, f"row_topk_{HARVEST_DTYPES[pre_BF.dtype]}")(pre_BF.data_ptr(), B, F, k, cols.data_ptr())
    return cols


def positive_entries(lib: ctypes.CDLL, pre_BF: torch.Tensor,
                     max_entries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, cols, values) of the entries of pre > 0 (float32 or bf16, contiguous on a CPU), row-major as
    (pre > 0).nonzero(as_tuple=True) gives them, with pre's values there; None where there are more than max_entries
    (then only counted). ReLU's codes with no B x F mask."""
    assert pre_BF.dtype in HARVEST_DTYPES and pre_BF.is_contiguous() and pre_BF.device.type == "cpu" and pre_BF.dim() == 2
    B, F = pre_BF.shape
    capacity = max(0, min(max_entries, B * F))
    rows, cols = torch.empty(capacity, dtype=torch.int64), torch.empty(capacity, dtype=torch.int64)
    vals = torch.empty(capacity, dtype=pre_BF.dtype)
    count = _kernel(lib, "positive_entries", pre_BF)(pre_BF.data_ptr(), B, F, capacity, rows.data_ptr(), cols.data_ptr(),
                                                     vals.data_ptr())
    return None if count > capacity else (rows[:count], cols[:count], vals[:count])


def _fused_rotary(original, lib: ctypes.CDLL):
    """transformers' Gemma-3 apply_rotary_pos_emb, with the fused kernel where its inputs suit it (bf16 or float32
    on a CPU, (B, H, T, d) rows tiling memory, cos / sin (B or 1, T, d) contiguous, all of one type), else the
    original."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        suits = (unsqueeze_dim == 1 and q.dim() == k.dim() == 4 and cos.shape == sin.shape
                 and cos.shape in ((q.shape[0], q.shape[2], q.shape[3]), (1, q.shape[2], q.shape[3]))
                 and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and q.shape[3] % 2 == 0
                 and all(_rows_tile_memory(t) for t in (q, k)) and _fusable_cpu(cos, sin)
                 and q.dtype == k.dtype == cos.dtype)
        if not suits:
            return original(q, k, cos, sin, unsqueeze_dim)
        return rope(lib, q, cos, sin), rope(lib, k, cos, sin)
    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _rows_tile_memory(x):
        return type(self).forward(self, x)
    return rms_norm(self._fused_lib, x, self._fused_scale, self.eps)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not _fusable_cpu(gate, up):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(gelu_tanh_mul(self._fused_lib, gate, up))


def fuse_gemma3(stack: torch.nn.Module, lib: ctypes.CDLL) -> int:
    """Route a Gemma-3 decoder stack's RMSNorms (residual, q and k norms) and GELU-tanh MLPs through the kernels,
    on this instance only (the evals' TransformerLens model is untouched). Returns how many modules changed.
    Other inputs (not bf16 or float32 on a CPU, or laid out otherwise) take the module's own forward."""
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm

    # The rotary embedding is a module-level function that the attention looks up when it runs, so it is
    # replaced there, once: bit-identical to the original (tests/test_cpu_kernels.py), and only for inputs
    # that suit the kernel, so other Gemma-3 models in the process compute exactly what they did.
    if not hasattr(modeling_gemma3.apply_rotary_pos_emb, "original"):
        modeling_gemma3.apply_rotary_pos_emb = _fused_rotary(modeling_gemma3.apply_rotary_pos_emb, lib)
    changed = 0
    for module in stack.modules():
        if isinstance(module, Gemma3RMSNorm):
            # 1 + weight once: the harvest model's weights are frozen
            module._fused_lib, module._fused_scale = lib, (1.0 + module.weight.detach().float()).contiguous()
            module.forward = types.MethodType(_norm_forward, module)
        elif isinstance(module, Gemma3MLP) and module.config.hidden_activation == "gelu_pytorch_tanh":
            module._fused_lib = lib
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        changed += 1
    return changed

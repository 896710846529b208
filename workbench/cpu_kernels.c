/* CPU kernels (workbench/cpu_kernels.py). Fused bfloat16 and float32 kernels for the training harvest's HuggingFace
   forward: eager torch runs each as 5-8 elementwise passes (in bf16 with float32 copies between them); here each
   element is read once, computed in float32 and rounded as torch rounds at the same places. And the
   competition trainers' penalty over their co-firing pairs only (pair_rows_abs_cosine_f32 over a table of pairs,
   token_pairs_abs_cosine_f32 token by token), and the sparse step's sums over its entries (at the end). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch's cast does */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u) : rounded;  /* a NaN stays NaN */
}

/* e^x as 2^n e^r, r in [-ln2/2, ln2/2], degree-6 Taylor polynomial (relative error < 2e-7), |x| clamped to 87;
   branch free, so the loops below vectorize (libm's expf is a call per element) */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
    float n = __builtin_rintf(x * 1.4426950408889634f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  /* ln 2 in two parts */
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

/* The harvest's kernels take bfloat16 or float32 elements: each computes in float32, and where the bf16 ops of
   torch round an intermediate to bf16 the bf16 version rounds it too (round_as), so one body serves both; the
   exported functions below pass the element type as a constant, which the compiler folds into each version. */
static inline float load_as(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_as(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float round_as(float v, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

/* Gemma's RMSNorm of one row of length d: out = x * rsqrt(mean(x^2) + eps) * scale, scale = 1 + weight (float32),
   all in float32 as transformers' Gemma3RMSNorm computes it, rounded once to the element type. */
static inline void rms_norm_row(const void *x, const float *scale, void *out, int64_t d, float eps, int bf16) {
    float sum_sq = 0.f;
    #pragma omp simd reduction(+:sum_sq)
    for (int64_t i = 0; i < d; i++) {
        float v = load_as(x, i, bf16);
        sum_sq += v * v;
    }
    float inv_rms = 1.f / __builtin_sqrtf(sum_sq / (float)d + eps);
    for (int64_t i = 0; i < d; i++)
        store_as(out, i, (load_as(x, i, bf16) * inv_rms) * scale[i], bf16);
}

void rms_norm_bf16(const uint16_t *x, const float *scale, uint16_t *out, int64_t rows, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row(x + r * d, scale, out + r * d, d, eps, 1);
}

void rms_norm_f32(const float *x, const float *scale, float *out, int64_t rows, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row(x + r * d, scale, out + r * d, d, eps, 0);
}

/* The gated MLP's elementwise part over elements [start, end): out = act * up, act = gelu_tanh(gate) (in bf16
   rounded before the product, as transformers' act_fn(gate) * up rounds it), gelu_tanh(g) = 0.5 g (1 + tanh(z)),
   z = sqrt(2/pi) (g + 0.044715 g^3), computed as g / (1 + e^(-2z)) (the same function). */
static inline void gelu_tanh_mul_span(const void *gate, const void *up, void *out, int64_t start, int64_t end, int bf16) {
    for (int64_t i = start; i < end; i++) {
        float g = load_as(gate, i, bf16);
        float two_z = 1.5957691216057308f * (g + 0.044715f * g * g * g);
        float act = g / (1.f + exp_approx(-two_z));
        store_as(out, i, round_as(act, bf16) * load_as(up, i, bf16), bf16);
    }
}

#define GELU_BLOCK 16384

void gelu_tanh_mul_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += GELU_BLOCK)
        gelu_tanh_mul_span(gate, up, out, start, start + GELU_BLOCK < n ? start + GELU_BLOCK : n, 1);
}

void gelu_tanh_mul_f32(const float *gate, const float *up, float *out, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += GELU_BLOCK)
        gelu_tanh_mul_span(gate, up, out, start, start + GELU_BLOCK < n ? start + GELU_BLOCK : n, 0);
}

/* Rotary position embedding of one row of length d in place of transformers' apply_rotary_pos_emb:
   out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]), each product and the sum rounded
   where torch's ops round, so the result is bit-identical: round_as in bf16; in float32 no fused multiply-add
   (fp-contract off here and in the callers it is inlined into: one rounding where torch has two). */
#define NO_FMA __attribute__((optimize("fp-contract=off")))

static inline NO_FMA float rope_elem(float x, float rotated, float c, float s, int bf16) {
    return round_as(x * c, bf16) + round_as(rotated * s, bf16);
}

static inline NO_FMA void rope_row(const void *x, const void *c, const void *s, void *o, int64_t d, int bf16) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++)
        store_as(o, i, rope_elem(load_as(x, i, bf16), -load_as(x, i + half, bf16), load_as(c, i, bf16),
                                 load_as(s, i, bf16), bf16), bf16);
    for (int64_t i = half; i < d; i++)
        store_as(o, i, rope_elem(load_as(x, i, bf16), load_as(x, i - half, bf16), load_as(c, i, bf16),
                                 load_as(s, i, bf16), bf16), bf16);
}

/* x and out (B, H, T, d) share strides (elements) for B, H, T, their rows contiguous; cos and sin are contiguous
   (B, T, d), or (1, T, d) for every batch row with cos_stride_b 0 (transformers' position table when the batch's
   positions are one range). */
#define ROPE_ROWS(ELEM, BF16)                                                                                      \
    _Pragma("omp parallel for collapse(2) schedule(static)")                                                      \
    for (int64_t b = 0; b < B; b++)                                                                                \
        for (int64_t h = 0; h < H; h++)                                                                            \
            for (int64_t t = 0; t < T; t++) {                                                                      \
                const int64_t at = b * stride_b + h * stride_h + t * stride_t, pos = b * cos_stride_b + t * d;    \
                rope_row((const ELEM *)x + at, (const ELEM *)cos + pos, (const ELEM *)sin + pos, (ELEM *)out + at, \
                         d, BF16);                                                                                 \
            }

NO_FMA void rope_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int64_t B, int64_t H,
               int64_t T, int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_t, int64_t cos_stride_b) {
    ROPE_ROWS(uint16_t, 1)
}

NO_FMA void rope_f32(const float *x, const float *cos, const float *sin, float *out, int64_t B, int64_t H, int64_t T,
              int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_t, int64_t cos_stride_b) {
    ROPE_ROWS(float, 0)
}

#define PAIR_BLOCK 8  /* partners per pass: eight dot chains, the gradient row stored once per eight */

/* The competition penalty sum_ij K_ij |d_i . d_j| over a symmetric coefficient table K >= 0 (n x n, zero diagonal)
   given as its nonzero entries by row (both orders of each pair): row i's partners are cols[row_ptr[i]..row_ptr[i+1]),
   its coefficients vals[..], in any order. With decoder rows W (n x d, float32 or bfloat16) it also gives the
   gradient's half KS W (float32), KS = K * sign(W W^T): only the co-firing pairs cost a dot product and an axpy,
   where the Gram path multiplies all n^2 pairs twice. Each thread owns rows i (no write races; a pair's dot is
   computed from both of its rows); a row's partners go eight at a time (the last few one by one), so eight dot
   products run as independent chains and the gradient row is loaded and stored once per eight (eight measured
   1.1-1.3x faster than four; tiling the partners to stay in L2 was not faster). Returns the value, summed over rows
   in order (the same bits for any thread count). With per-latent weights (weight, n; else NULL) the coefficient is
   K_ij (weight_i + weight_j). */
static inline void pair_block(const float *w_i, float *g_i, const char *const *rows, const float *k, int m, int64_t d,
                              double *row_total) {
    const float *const *w = (const float *const *)rows;
    if (m == PAIR_BLOCK) {  /* written out for eight: the compiler keeps the eight chains in registers */
        float dot[8], ks[8];
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f, d4 = 0.f, d5 = 0.f, d6 = 0.f, d7 = 0.f;
        const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3], *w4 = w[4], *w5 = w[5], *w6 = w[6], *w7 = w[7];
        #pragma omp simd reduction(+:d0, d1, d2, d3, d4, d5, d6, d7)
        for (int64_t c = 0; c < d; c++) {
            const float x = w_i[c];
            d0 += x * w0[c];
            d1 += x * w1[c];
            d2 += x * w2[c];
            d3 += x * w3[c];
            d4 += x * w4[c];
            d5 += x * w5[c];
            d6 += x * w6[c];
            d7 += x * w7[c];
        }
        dot[0] = d0, dot[1] = d1, dot[2] = d2, dot[3] = d3, dot[4] = d4, dot[5] = d5, dot[6] = d6, dot[7] = d7;
        for (int t = 0; t < 8; t++) {
            *row_total += (double)(k[t] * __builtin_fabsf(dot[t]));
            ks[t] = dot[t] < 0.f ? -k[t] : k[t];
        }
        const float s0 = ks[0], s1 = ks[1], s2 = ks[2], s3 = ks[3], s4 = ks[4], s5 = ks[5], s6 = ks[6], s7 = ks[7];
        #pragma omp simd
        for (int64_t c = 0; c < d; c++)
            g_i[c] += ((s0 * w0[c] + s1 * w1[c]) + (s2 * w2[c] + s3 * w3[c])) + ((s4 * w4[c] + s5 * w5[c]) + (s6 * w6[c] + s7 * w7[c]));
        return;
    }
    for (int t = 0; t < m; t++) {
        const float *w_j = w[t];
        float dt = 0.f;
        #pragma omp simd reduction(+:dt)
        for (int64_t c = 0; c < d; c++)
            dt += w_i[c] * w_j[c];
        *row_total += (double)(k[t] * __builtin_fabsf(dt));
        const float s = dt < 0.f ? -k[t] : k[t];
        #pragma omp simd
        for (int64_t c = 0; c < d; c++)
            g_i[c] += s * w_j[c];
    }
}

/* The same block for bfloat16 rows. With AVX512-BF16 the dots are vdpbf16ps (32 products per instruction, float32
   sums) and the gradient row is accumulated in float32 as the even and odd elements of each 32-element chunk (for
   the chunk at c: g[c..c+16) its even elements, g[c+16..c+32) its odd ones): a bf16 vector gives both as float32
   with one shift or one mask, no conversion shuffles; pair_row_finish_bf16 interleaves them back once per row. Half
   the bytes of the float32 rows per partner, and half the dot instructions (1.5-1.6x faster than the float32 rows
   on a trained quickstart SAE's table); the products are those of the float32 kernel on the bf16-rounded rows,
   summed in another order. Elements past the last whole chunk (d % 32) stay in place. Two partial sums per chunk,
   a software prefetch of the next block's rows: not faster (measured). */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define PAIR_BF16_VECTOR 1
#define BF16_CHUNK 32

static inline __attribute__((always_inline)) void pair_block_bf16(const uint16_t *w_i, float *g, const char *const *rows,
                                                                  const float *k, int m, int64_t d, double *row_total) {
    const uint16_t *const *w = (const uint16_t *const *)rows;
    const int64_t whole = d - d % BF16_CHUNK;
    __m512 acc[PAIR_BLOCK];
    float dot[PAIR_BLOCK];
    for (int t = 0; t < m; t++)
        acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < whole; c += BF16_CHUNK) {
        const __m512bh x = (__m512bh)_mm512_loadu_si512(w_i + c);
        for (int t = 0; t < m; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], x, (__m512bh)_mm512_loadu_si512(w[t] + c));
    }
    for (int t = 0; t < m; t++) {
        dot[t] = _mm512_reduce_add_ps(acc[t]);
        for (int64_t c = whole; c < d; c++)
            dot[t] += bf16_to_float(w_i[c]) * bf16_to_float(w[t][c]);
        *row_total += (double)(k[t] * __builtin_fabsf(dot[t]));
        dot[t] = dot[t] < 0.f ? -k[t] : k[t];  /* now the signed coefficient */
    }
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t c = 0; c < whole; c += BF16_CHUNK) {
        __m512 even = _mm512_loadu_ps(g + c), odd = _mm512_loadu_ps(g + c + 16);
        for (int t = 0; t < m; t++) {
            const __m512i y = _mm512_loadu_si512(w[t] + c);
            const __m512 s = _mm512_set1_ps(dot[t]);
            even = _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(y, 16)), even);
            odd = _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_and_si512(y, high)), odd);
        }
        _mm512_storeu_ps(g + c, even);
        _mm512_storeu_ps(g + c + 16, odd);
    }
    for (int t = 0; t < m; t++)
        for (int64_t c = whole; c < d; c++)
            g[c] += dot[t] * bf16_to_float(w[t][c]);
}

static inline void pair_row_finish_bf16(const float *g, float *out, int64_t d) {
    const int64_t whole = d - d % BF16_CHUNK;
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t c = 0; c < whole; c += BF16_CHUNK) {
        const __m512 even = _mm512_loadu_ps(g + c), odd = _mm512_loadu_ps(g + c + 16);
        _mm512_storeu_ps(out + c, _mm512_permutex2var_ps(even, lo, odd));
        _mm512_storeu_ps(out + c + 16, _mm512_permutex2var_ps(even, hi, odd));
    }
    memcpy(out + whole, g + whole, (size_t)(d - whole) * sizeof(float));
}
#else
#define PAIR_BF16_VECTOR 0
/* Without AVX512-BF16: the float32 products of the bf16 rows one by one, in place (correct, not fast; the Python side
   routes bf16 rows here only where pair_rows_bf16_vectorized says so, and tests call it directly). */
static inline void pair_block_bf16(const uint16_t *w_i, float *g, const char *const *rows, const float *k, int m,
                                   int64_t d, double *row_total) {
    const uint16_t *const *w = (const uint16_t *const *)rows;
    for (int t = 0; t < m; t++) {
        float dt = 0.f;
        for (int64_t c = 0; c < d; c++)
            dt += bf16_to_float(w_i[c]) * bf16_to_float(w[t][c]);
        *row_total += (double)(k[t] * __builtin_fabsf(dt));
        const float s = dt < 0.f ? -k[t] : k[t];
        for (int64_t c = 0; c < d; c++)
            g[c] += s * bf16_to_float(w[t][c]);
    }
}

static inline void pair_row_finish_bf16(const float *g, float *out, int64_t d) {
    memcpy(out, g, (size_t)d * sizeof(float));
}
#endif

int pair_rows_bf16_vectorized(void) { return PAIR_BF16_VECTOR; }

/* The rows of either element type; bf16 is a constant in each exported version below, folded by the compiler. */
static inline double pair_rows_abs_cosine(const int64_t *row_ptr, const int32_t *cols, const float *vals,
                                          const float *weight, const void *W, float *grad_half, int64_t n, int64_t d,
                                          int bf16) {
    const int64_t row_bytes = d * (bf16 ? (int64_t)sizeof(uint16_t) : (int64_t)sizeof(float));
    double *row_totals = malloc((size_t)n * sizeof(double));
    #pragma omp parallel
    {
        float *g_local = bf16 ? malloc((size_t)d * sizeof(float)) : NULL;  /* bf16: the row's chunked layout */
        #pragma omp for schedule(dynamic, 8)
        for (int64_t i = 0; i < n; i++) {
            const char *w_i = (const char *)W + i * row_bytes;
            float *g_i = bf16 ? g_local : grad_half + i * d;
            for (int64_t c = 0; c < d; c++)
                g_i[c] = 0.f;
            double row_total = 0.0;
            const char *w[PAIR_BLOCK];
            float k[PAIR_BLOCK];
            int block = 0;
            for (int64_t e = row_ptr[i]; e < row_ptr[i + 1]; e++) {
                if (vals[e] == 0.f)
                    continue;
                w[block] = (const char *)W + (int64_t)cols[e] * row_bytes;
                k[block++] = weight ? vals[e] * (weight[i] + weight[cols[e]]) : vals[e];
                if (block == PAIR_BLOCK) {
                    if (bf16)
                        pair_block_bf16((const uint16_t *)w_i, g_i, w, k, PAIR_BLOCK, d, &row_total);
                    else
                        pair_block((const float *)w_i, g_i, w, k, PAIR_BLOCK, d, &row_total);
                    block = 0;
                }
            }
            if (block && bf16)
                pair_block_bf16((const uint16_t *)w_i, g_i, w, k, block, d, &row_total);
            else if (block)
                pair_block((const float *)w_i, g_i, w, k, block, d, &row_total);
            if (bf16)
                pair_row_finish_bf16(g_i, grad_half + i * d, d);
            row_totals[i] = row_total;
        }
        free(g_local);
    }
    double total = 0.0;
    for (int64_t i = 0; i < n; i++)
        total += row_totals[i];
    free(row_totals);
    return total;
}

double pair_rows_abs_cosine_f32(const int64_t *row_ptr, const int32_t *cols, const float *vals, const float *weight,
                                const float *W, float *grad_half, int64_t n, int64_t d) {
    return pair_rows_abs_cosine(row_ptr, cols, vals, weight, W, grad_half, n, d, 0);
}

double pair_rows_abs_cosine_bf16(const int64_t *row_ptr, const int32_t *cols, const float *vals, const float *weight,
                                 const uint16_t *W, float *grad_half, int64_t n, int64_t d) {
    return pair_rows_abs_cosine(row_ptr, cols, vals, weight, W, grad_half, n, d, 1);
}

/* The table K_ij = sum of omega[b, r, s] over the occurrences (token b, entries r, s) with idx[b, r] = i and
   idx[b, s] = j, for per-token latent indices idx (B x k) and occurrence weights omega >= 0 (B x k x k; 0 where
   a pair is absent, the diagonal included), built as rows for pair_rows_abs_cosine_f32 without the n x n table, in
   one pass: each latent's occurrences are listed (a counting sort of the B k entries), then each row sums its
   partners' weights in a thread-local n-vector (L1/L2-resident) and emits them in first-seen order into its own slot
   of cols / vals, sized by its bound min(n - 1, occurrences (k - 1)) (capacity: the slots' total, which the caller
   allocated; -1 if it is short), with the row's sum; the rows are then moved down to CSR (row_ptr, n + 1 entries),
   a copy of the entries, sequential (~0.3 ms for 0.3M entries), where counting first would scan the occurrences
   twice. Returns the number of entries. With omega NULL the weights are the entries' activity (active, B x k bytes):
   1 for each pair of active entries r != s, so the table holds the co-firing counts C_ij, without a B x k x k weight
   tensor; with inv_fires (1 / a_i, n) as well, 1 / min(a_i, a_j) = max(1 / a_i, 1 / a_j) instead, so it holds the
   overlaps n_ij = C_ij / min(a_i, a_j). An entry's weight as a partner (0 if it did not fire, else 1 / a_j or 1) is made
   once per entry, not once per occurrence of its token (1.7 -> 1.25 ms on a trained quickstart SAE's codes). With
   AVX-512 the activity path takes a token's partners sixteen at a time (partners_16: a gather of their sums, the new
   ones compressed into seen, a scatter of the sums back; 1.47 -> 1.10 ms on those codes, the same table to the bit:
   each sum adds its occurrences in the same order, and lanes compress in partner order, so first-seen order holds). */
#define PREFETCH_AHEAD 4

static inline void prefetch_bytes(const void *at, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64)
        __builtin_prefetch((const char *)at + b);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define PARTNER_LANES 16

/* One occurrence's partners from the activity mask, sixteen lanes at a time: lane s adds max(weight_s, self) to
   acc[j_s] where weight_s != 0 and s is not the occurrence's own entry r; a partner whose sum was 0 joins seen (in lane
   order). A token's latents are distinct, so no two lanes of a scatter hit one sum. Returns the new length of seen. */
static inline int64_t partners_16(const int32_t *partners, const float *weights, int64_t kp, int64_t r, float self_weight,
                                  float *acc, int32_t *seen, int64_t m) {
    const __m512 zero = _mm512_setzero_ps(), self = _mm512_set1_ps(self_weight);
    for (int64_t s0 = 0; s0 < kp; s0 += PARTNER_LANES) {
        const __m512 w = _mm512_loadu_ps(weights + s0);
        __mmask16 live = _mm512_cmpneq_ps_mask(w, zero);
        if (r >= s0 && r < s0 + PARTNER_LANES)
            live &= (__mmask16)~(1u << (r - s0));
        const __m512i j = _mm512_loadu_si512(partners + s0);
        const __m512 before = _mm512_mask_i32gather_ps(zero, live, j, acc, 4);
        const __mmask16 fresh = live & _mm512_cmpeq_ps_mask(before, zero);
        _mm512_storeu_si512(seen + m, _mm512_maskz_compress_epi32(fresh, j));  /* a register compress, then one store */
        m += __builtin_popcount(fresh);
        _mm512_mask_i32scatter_ps(acc, live, j, _mm512_add_ps(before, _mm512_max_ps(w, self)), 4);
    }
    return m;
}
#else
#define PARTNER_LANES 1
#endif

static void occurrences_by_latent(const int64_t *idx, int64_t entries, int64_t n, int64_t *start, int64_t *at) {
    int64_t *cursor = calloc((size_t)n + 1, sizeof(int64_t));
    for (int64_t e = 0; e < entries; e++)
        cursor[idx[e] + 1]++;
    for (int64_t i = 0; i < n; i++)
        cursor[i + 1] += cursor[i];
    memcpy(start, cursor, ((size_t)n + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < entries; e++)
        at[cursor[idx[e]]++] = e;
    free(cursor);
}

int64_t pair_table_rows(const int64_t *idx, const float *omega, const uint8_t *active, const float *inv_fires, int64_t B,
                        int64_t k, int64_t n, int64_t capacity, int64_t *row_ptr, int32_t *cols, float *vals,
                        float *row_sums) {
    int64_t *start = malloc(((size_t)n + 1) * sizeof(int64_t)), *at = malloc((size_t)(B * k) * sizeof(int64_t));
    int64_t *slot = malloc(((size_t)n + 1) * sizeof(int64_t));
    occurrences_by_latent(idx, B * k, n, start, at);
    slot[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t bound = (start[i + 1] - start[i]) * (k - 1);
        slot[i + 1] = slot[i] + (bound < n - 1 ? bound : n - 1);
    }
    if (slot[n] > capacity) {
        free(start), free(at), free(slot);
        return -1;
    }
    /* from the activity mask: each entry's weight as a partner, made once per entry (not once per occurrence of its
       token): 0 where it did not fire, else 1 / a of its latent (the overlaps) or 1 (the counts); for the vector loop
       its latent as int32 too, token rows padded to kp entries (weight 0). */
    const int64_t kp = (k + PARTNER_LANES - 1) / PARTNER_LANES * PARTNER_LANES;
    float *partner_weight = omega ? NULL : malloc((size_t)(B * kp) * sizeof(float));
    int32_t *partner_idx = omega || PARTNER_LANES == 1 ? NULL : malloc((size_t)(B * kp) * sizeof(int32_t));
    if (!omega) {
        #pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t s = 0; s < kp; s++) {
                const int64_t e = b * k + s;
                partner_weight[b * kp + s] = s < k && active[e] ? (inv_fires ? inv_fires[idx[e]] : 1.f) : 0.f;
                if (partner_idx)
                    partner_idx[b * kp + s] = s < k ? (int32_t)idx[e] : 0;
            }
    }
    #pragma omp parallel
    {
        float *acc = calloc((size_t)n, sizeof(float));  /* the row's sums so far; its partners listed in seen */
        /* + PARTNER_LANES: written before m is known to grow (a whole vector of lanes in the vector loop) */
        int32_t *seen = malloc(((size_t)n + PARTNER_LANES) * sizeof(int32_t));
        float *activity = malloc((size_t)k * sizeof(float));         /* an occurrence's weights from active */
        #pragma omp for schedule(dynamic, 16)
        for (int64_t i = 0; i < n; i++) {
            int64_t m = 0;
            const float self_weight = inv_fires ? inv_fires[i] : 0.f;
            for (int64_t t = start[i]; t < start[i + 1]; t++) {
                const int64_t e = at[t];
                const int64_t *partners = idx + (e / k) * k;
                const float *weights = omega ? omega + e * k : activity;
                if (t + PREFETCH_AHEAD < start[i + 1]) {  /* occurrences are scattered over the batch */
                    const int64_t f = at[t + PREFETCH_AHEAD];
                    if (omega)
                        prefetch_bytes(omega + f * k, k * sizeof(float));
                    else
                        prefetch_bytes(partner_weight + (f / k) * kp, kp * sizeof(float));
                    if (partner_idx)
                        prefetch_bytes(partner_idx + (f / k) * kp, kp * sizeof(int32_t));
                    else
                        prefetch_bytes(idx + (f / k) * k, k * sizeof(int64_t));
                }
                if (!omega) {  /* 1 / min(a_i, a_j) = max(1 / a_i, 1 / a_j) for each other entry that fired */
                    if (!active[e])
                        continue;
                    const float *token_weight = partner_weight + (e / k) * kp;
#if PARTNER_LANES > 1
                    m = partners_16(partner_idx + (e / k) * kp, token_weight, kp, e % k, self_weight, acc, seen, m);
                    continue;
#else
                    for (int64_t s = 0; s < k; s++) {
                        const float w = token_weight[s];
                        activity[s] = (w != 0.f) & (s != e % k) ? (w > self_weight ? w : self_weight) : 0.f;
                    }
#endif
                }
                for (int64_t s = 0; s < k; s++) {  /* branch free: whether j is new is a coin flip */
                    const float v = weights[s];
                    const int64_t j = partners[s];
                    const float before = acc[j];   /* 0 until j is seen with a weight > 0 (weights are >= 0) */
                    seen[m] = (int32_t)j;
                    m += (v != 0.f) & (before == 0.f);
                    acc[j] = before + v;
                }
            }
            const int64_t base = slot[i];
            float row_sum = 0.f;
            for (int64_t u = 0; u < m; u++) {
                const float v = acc[seen[u]];
                cols[base + u] = seen[u];
                vals[base + u] = v;
                row_sum += v;
                acc[seen[u]] = 0.f;
            }
            row_ptr[i + 1] = m;  /* the row's length until the move below */
            row_sums[i] = row_sum;
        }
        free(acc);
        free(seen);
        free(activity);
    }
    free(partner_weight);
    free(partner_idx);
    row_ptr[0] = 0;
    for (int64_t i = 0; i < n; i++) {  /* down to CSR: a row's start never passes its slot's, so memmove in order */
        const int64_t m = row_ptr[i + 1];
        row_ptr[i + 1] = row_ptr[i] + m;
        if (row_ptr[i] != slot[i]) {
            memmove(cols + row_ptr[i], cols + slot[i], (size_t)m * sizeof(int32_t));
            memmove(vals + row_ptr[i], vals + slot[i], (size_t)m * sizeof(float));
        }
    }
    free(start);
    free(at);
    free(slot);
    return row_ptr[n];
}

/* The same penalty and gradient half for momentum's occurrence weights, by token: sum_b sum_{r != s} omega_brs |S_brs|,
   S_b = R_b R_b^T with R_b the decoder rows of token b's latents i = idx[b, r] (distinct within a token),
   omega_brs = (weight_i + weight_j) / min(a_i, a_j) where entries r != s are both active (else 0), given
   inv_fires = 1 / a (n), and grad_half = KS W as above, K_ij summed over the occurrences (K = (w_i + w_j) n_ij).
   No table is built, and each token's k x k dots and its k x d gradient rows are small dense products that reuse
   every loaded row across a register tile (four rows by two partners for the dots, four rows by sixteen columns for
   the gradient), where the pair kernel loads a partner row per dot product: cheaper while the occurrences are not
   much more than the table's entries (trainers/competition.py token_kernel_wanted picks).
   Tokens go to threads in contiguous blocks, each accumulating into its own copy of the gradient (the first is
   grad_half; copies are capped at 1 GB, fewer threads where they would not fit), summed in thread order at the end:
   the same bits for a given thread count. The value is summed over tokens in order (the same bits for any). */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float sum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* Loaded vectors held in registers: on x86 GCC otherwise reloads them as memory operands of every FMA, which made
   the dot tile load-bound (12 loads per 8 FMAs; 1.25x slower measured). Elsewhere FMAs take no memory operands. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)  /* a 32-byte vector in one register */
#define HOLD6(a, b, c, d, e, f) __asm__("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d), "+x"(e), "+x"(f))
#else
#define HOLD6(a, b, c, d, e, f)
#endif

#define TOKEN_TILE 4  /* rows per register tile; a token's rows are padded to a multiple with a zero row */

/* out[q][u] = a[q] . b[u] for four rows a and two rows b of length d */
static inline void dot_tile_4x2(const float *const *a, const float *const *b, int64_t d, float out[4][2]) {
    v8f s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
        v8f y0 = load8(b[0] + c), y1 = load8(b[1] + c);
        v8f x0 = load8(a[0] + c), x1 = load8(a[1] + c), x2 = load8(a[2] + c), x3 = load8(a[3] + c);
        HOLD6(y0, y1, x0, x1, x2, x3);
        s00 += x0 * y0, s01 += x0 * y1, s10 += x1 * y0, s11 += x1 * y1;
        s20 += x2 * y0, s21 += x2 * y1, s30 += x3 * y0, s31 += x3 * y1;
    }
    out[0][0] = sum8(s00), out[0][1] = sum8(s01), out[1][0] = sum8(s10), out[1][1] = sum8(s11);
    out[2][0] = sum8(s20), out[2][1] = sum8(s21), out[3][0] = sum8(s30), out[3][1] = sum8(s31);
    for (; c < d; c++)
        for (int q = 0; q < 4; q++)
            for (int u = 0; u < 2; u++)
                out[q][u] += a[q][c] * b[u][c];
}

/* g[q][c] += sum_s a[q][s] rows[s][c] for the four rows q of a tile over columns c in [c0, c1) (g[q] NULL: a padding
   row, skipped) */
static inline void gradient_tile(const float *const *a, const float *const *rows, int64_t k, int64_t c0, int64_t c1,
                                 float *const *g) {
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
        v8f g00 = {0}, g01 = {0}, g10 = {0}, g11 = {0}, g20 = {0}, g21 = {0}, g30 = {0}, g31 = {0};
        for (int64_t s = 0; s < k; s++) {
            const v8f y0 = load8(rows[s] + c), y1 = load8(rows[s] + c + 8);
            g00 += a[0][s] * y0, g01 += a[0][s] * y1, g10 += a[1][s] * y0, g11 += a[1][s] * y1;
            g20 += a[2][s] * y0, g21 += a[2][s] * y1, g30 += a[3][s] * y0, g31 += a[3][s] * y1;
        }
        const v8f tile[4][2] = {{g00, g01}, {g10, g11}, {g20, g21}, {g30, g31}};
        for (int q = 0; q < 4; q++)
            if (g[q]) {
                store8(g[q] + c, load8(g[q] + c) + tile[q][0]);
                store8(g[q] + c + 8, load8(g[q] + c + 8) + tile[q][1]);
            }
    }
    for (; c < c1; c++)
        for (int q = 0; q < 4; q++)
            if (g[q]) {
                float acc = 0.f;
                for (int64_t s = 0; s < k; s++)
                    acc += a[q][s] * rows[s][c];
                g[q][c] += acc;
            }
}

#define GRADIENT_COPIES_MAX_FLOATS ((int64_t)1 << 28)  /* 1 GB of float32 gradient copies */
/* The gradient tiles go over the token's rows in column chunks of at most this many bytes (all k rows), so every tile
   after the first reads the chunk from L1: the k x d rows are re-read once per tile, from L2 or L3 where d k is large
   (Gemma-2's 2304 x 64 rows, 590 KB: 0.58 -> 0.46 s a call, notes.txt session 16). The dots gained nothing from
   chunks (their eight chains would be summed per chunk). */
#define GRADIENT_CHUNK_BYTES 32768

double token_pairs_abs_cosine_f32(const int64_t *idx, const uint8_t *active, const float *inv_fires, const float *weight,
                                  const float *W, float *grad_half, int64_t B, int64_t k, int64_t n, int64_t d) {
    const int64_t kp = (k + TOKEN_TILE - 1) / TOKEN_TILE * TOKEN_TILE, copy_floats = n * d;
    const int64_t chunk_16 = GRADIENT_CHUNK_BYTES / ((int64_t)sizeof(float) * kp) / 16 * 16;
    const int64_t chunk = chunk_16 > 16 ? chunk_16 : 16;  /* columns, whole register tiles */
    int64_t threads = omp_get_max_threads(), fit = GRADIENT_COPIES_MAX_FLOATS / (copy_floats > 0 ? copy_floats : 1);
    threads = threads < fit ? threads : fit;
    threads = threads < 1 ? 1 : threads;
    float *copies = threads > 1 ? malloc((size_t)((threads - 1) * copy_floats) * sizeof(float)) : NULL;
    double *token_totals = malloc((size_t)B * sizeof(double));
    #pragma omp parallel num_threads((int)threads)
    {
        const int t = omp_get_thread_num();
        float *grad = t == 0 ? grad_half : copies + (int64_t)(t - 1) * copy_floats;
        memset(grad, 0, (size_t)copy_floats * sizeof(float));
        float *zero_row = calloc((size_t)d, sizeof(float));
        const float **rows = malloc((size_t)kp * sizeof(float *));
        float *A = malloc((size_t)(kp * kp) * sizeof(float));  /* S, then omega * sign(S) in place */
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const int64_t *latents = idx + b * k;
            for (int64_t r = 0; r < kp; r++)
                rows[r] = r < k ? W + latents[r] * d : zero_row;
            for (int64_t r0 = 0; r0 < kp; r0 += TOKEN_TILE)  /* the upper triangle of tiles, mirrored */
                for (int64_t s0 = r0; s0 < kp; s0 += 2) {
                    float out[4][2];
                    dot_tile_4x2(rows + r0, rows + s0, d, out);
                    for (int q = 0; q < 4; q++)
                        for (int u = 0; u < 2; u++)
                            A[(r0 + q) * kp + s0 + u] = A[(s0 + u) * kp + r0 + q] = out[q][u];
                }
            const uint8_t *token_active = active + b * k;
            double total = 0.0;
            for (int64_t r = 0; r < kp; r++)
                for (int64_t s = 0; s < kp; s++) {
                    float w = 0.f;
                    if (r < k && s < k && r != s && token_active[r] && token_active[s]) {
                        const int64_t i = latents[r], j = latents[s];
                        w = (weight[i] + weight[j]) * (inv_fires[i] > inv_fires[j] ? inv_fires[i] : inv_fires[j]);
                    }
                    const float dot = A[r * kp + s];
                    total += (double)(w * __builtin_fabsf(dot));
                    A[r * kp + s] = dot < 0.f ? -w : w;
                }
            token_totals[b] = total;
            for (int64_t c0 = 0; c0 < d; c0 += chunk) {
                const int64_t c1 = c0 + chunk < d ? c0 + chunk : d;
                for (int64_t r0 = 0; r0 < kp; r0 += TOKEN_TILE) {
                    const float *a[4] = {A + r0 * kp, A + (r0 + 1) * kp, A + (r0 + 2) * kp, A + (r0 + 3) * kp};
                    float *g[4];
                    for (int q = 0; q < 4; q++)
                        g[q] = r0 + q < k ? grad + latents[r0 + q] * d : NULL;
                    gradient_tile(a, rows, k, c0, c1, g);
                }
            }
        }
        free(zero_row);
        free(rows);
        free(A);
        #pragma omp for schedule(static)  /* after the loop's barrier: every copy is complete */
        for (int64_t e = 0; e < copy_floats; e++) {
            float v = grad_half[e];
            for (int64_t u = 0; u < threads - 1; u++)
                v += copies[u * copy_floats + e];
            grad_half[e] = v;
        }
    }
    double total = 0.0;
    for (int64_t b = 0; b < B; b++)
        total += token_totals[b];
    free(copies);
    free(token_totals);
    return total;
}

/* The sparse step's sums over its entries e (a latent idx[e] of token rows[e], value vals[e]), in one kernel:
   out[j] = sum over the entries with group[e] = j of vals[e] src[pick[e]], for rows src of length D:
   - the decoder's embedding bag, x_hat (B x D) = sum over a token's entries of f_e W_dec[idx_e] (group rows, pick idx);
   - its weight gradient, dW_dec (n x D) = sum over a latent's entries of f_e g[rows_e] (group idx, pick rows);
   - the encoder's weight gradient, dW_enc = x^T G, column i the sum over latent i's entries of g_e x[rows_e]; written
     transposed, in W_enc's (D x n) layout.
   Entries are grouped (a counting sort, each group's in the given order) and groups go to threads in blocks of
   GROUP_BLOCK. A group's sum is held in registers, 64 floats of D at a time, over its entries; transposed, the block's
   sums go out COLUMN_BLOCK floats (two cache lines) of each of out's D rows. Every element of out is written once
   (zeros for a group without entries), each a sum in entry order: the same bits for any thread count. torch's dense @
   CSR product for dW_enc took 20 ms at the quickstart's 1024 x 640 x 2048 with 32 entries a token (this: 3), 81 ms at
   Gemma-2's 2304 x 16384 (this: 41, of which writing dW's 151 MB is ~12): notes.txt, session 17. */
#define GROUP_BLOCK 32

static inline void weighted_sum(const float *src, const int64_t *pick, const float *vals, const int64_t *order,
                                int64_t p0, int64_t p1, int64_t D, float *out) {
    int64_t c = 0;
    for (; c + 64 <= D; c += 64) {  /* 64 floats: four cache lines of each row per pass (32: Gemma-2's bag 1.4x slower) */
        v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
        for (int64_t p = p0; p < p1; p++) {
            const float *r = src + pick[order[p]] * D + c, v = vals[order[p]];
            s0 += v * load8(r), s1 += v * load8(r + 8), s2 += v * load8(r + 16), s3 += v * load8(r + 24);
            s4 += v * load8(r + 32), s5 += v * load8(r + 40), s6 += v * load8(r + 48), s7 += v * load8(r + 56);
        }
        store8(out + c, s0), store8(out + c + 8, s1), store8(out + c + 16, s2), store8(out + c + 24, s3);
        store8(out + c + 32, s4), store8(out + c + 40, s5), store8(out + c + 48, s6), store8(out + c + 56, s7);
    }
    for (; c + 32 <= D; c += 32) {
        v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t p = p0; p < p1; p++) {
            const float *r = src + pick[order[p]] * D + c, v = vals[order[p]];
            s0 += v * load8(r), s1 += v * load8(r + 8), s2 += v * load8(r + 16), s3 += v * load8(r + 24);
        }
        store8(out + c, s0), store8(out + c + 8, s1), store8(out + c + 16, s2), store8(out + c + 24, s3);
    }
    for (; c < D; c++) {
        float s = 0.f;
        for (int64_t p = p0; p < p1; p++)
            s += vals[order[p]] * src[pick[order[p]] * D + c];
        out[c] = s;
    }
}

void weighted_row_sums_f32(const float *src, const int64_t *pick, const int64_t *group, const float *vals, int64_t E,
                           int64_t n_groups, int64_t D, float *out, int transposed) {
    int64_t *start = malloc(((size_t)n_groups + 1) * sizeof(int64_t)), *order = malloc(((size_t)E + 1) * sizeof(int64_t));
    occurrences_by_latent(group, E, n_groups, start, order);
    #pragma omp parallel
    {
        float *acc = transposed ? malloc((size_t)GROUP_BLOCK * (size_t)D * sizeof(float)) : NULL;
        #pragma omp for schedule(dynamic, 2)
        for (int64_t j0 = 0; j0 < n_groups; j0 += GROUP_BLOCK) {
            const int64_t w = n_groups - j0 < GROUP_BLOCK ? n_groups - j0 : GROUP_BLOCK;
            for (int64_t j = 0; j < w; j++)
                weighted_sum(src, pick, vals, order, start[j0 + j], start[j0 + j + 1], D,
                             transposed ? acc + j * D : out + (j0 + j) * D);
            if (transposed)
                for (int64_t d = 0; d < D; d++) {
                    float *o = out + d * n_groups + j0;
                    for (int64_t j = 0; j < w; j++)
                        o[j] = acc[j * D + d];
                }
        }
        free(acc);
    }
    free(start);
    free(order);
}

/* out[e] = a[ia[e]] . b[ib[e]] for rows of length D: the embedding bag's gradient for its weights, g[rows_e] . W[idx_e] */
void row_dots_f32(const float *a, const int64_t *ia, const float *b, const int64_t *ib, int64_t E, int64_t D, float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < E; e++) {
        const float *x = a + ia[e] * D, *y = b + ib[e] * D;
        v8f s0 = {0}, s1 = {0};
        int64_t c = 0;
        for (; c + 16 <= D; c += 16)
            s0 += load8(x + c) * load8(y + c), s1 += load8(x + c + 8) * load8(y + c + 8);
        float s = sum8(s0 + s1);
        for (; c < D; c++)
            s += x[c] * y[c];
        out[e] = s;
    }
}

/* BatchTopK's selection: the k largest entries of ReLU(pre) over the whole (B x F) batch, ties at the cutoff to the
   lowest flat indices, as (rows, cols) in row-major order: the entries of batch_topk_mask(...).nonzero(), with no
   B x F mask or ReLU'd copy made. ReLU'd values are >= 0, so their float bits order as unsigned integers: the cutoff
   (the k-th largest) is found by two radix passes over 16 bits each (per-thread histograms; bf16: one), then a count
   pass and a fill pass by rows. Writes k entries; returns the cutoff's bits. */
static inline uint32_t relu_bits(float v) {  /* branchless: a branch on the sign mispredicts on half the entries (4x slower) */
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & ~(uint32_t)((int32_t)u >> 31);  /* negative (and -0) -> 0 */
}

#define RADIX 65536

/* entry e's ReLU'd value as float32 bits: a bf16 value's are its 16 bits then 16 zeros */
static inline uint32_t relu_bits_at(const void *pre, int64_t e, int bf16) { return relu_bits(load_as(pre, e, bf16)); }

static inline __attribute__((always_inline)) uint32_t radix_digit(const void *pre, int64_t N, int64_t k, int pass,
                                                                  uint32_t prefix, int64_t *above, int bf16) {
    /* the digit (bits 31-16 on pass 0, 15-0 on pass 1, among entries whose high bits are `prefix`) that holds the k-th
       largest, given `above` entries known larger; adds the entries of larger digits to *above */
    const int threads = omp_get_max_threads();
    int64_t *hist = calloc((size_t)threads * RADIX, sizeof(int64_t));
    #pragma omp parallel
    {
        int64_t *h = hist + (int64_t)omp_get_thread_num() * RADIX;
        #pragma omp for schedule(static)
        for (int64_t e = 0; e < N; e++) {
            const uint32_t u = relu_bits_at(pre, e, bf16);
            if (pass == 0)
                h[u >> 16]++;
            else if ((u >> 16) == prefix)
                h[u & 0xFFFF]++;
        }
    }
    int64_t seen = *above;
    uint32_t digit = 0;
    for (int64_t b = RADIX - 1; b >= 0; b--) {
        int64_t count = 0;
        for (int t = 0; t < threads; t++)
            count += hist[(int64_t)t * RADIX + b];
        if (seen + count >= k) {
            digit = (uint32_t)b;
            break;
        }
        seen += count;
    }
    *above = seen;
    free(hist);
    return digit;
}

static inline __attribute__((always_inline)) uint32_t batch_topk_entries(const void *pre, int64_t B, int64_t F, int64_t k,
                                                                         int64_t *rows, int64_t *cols, int bf16) {
    const int64_t N = B * F;
    int64_t above = 0;
    const uint32_t high = radix_digit(pre, N, k, 0, 0, &above, bf16);
    /* bf16: the high digit is the whole value, so no second pass */
    const uint32_t cut = high << 16 | (bf16 ? 0 : radix_digit(pre, N, k, 1, high, &above, bf16));
    /* above = entries > cut; the rest of the k are ties at cut, lowest flat index first */
    int64_t *greater = malloc((size_t)B * sizeof(int64_t)), *equal = malloc((size_t)B * sizeof(int64_t));
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t g = 0, q = 0;
        for (int64_t i = 0; i < F; i++) {
            const uint32_t u = relu_bits_at(pre, b * F + i, bf16);
            g += u > cut, q += u == cut;
        }
        greater[b] = g, equal[b] = q;
    }
    int64_t ties_left = k - above, at = 0;
    for (int64_t b = 0; b < B; b++) {  /* each row's start in the output and its share of the ties */
        const int64_t take = equal[b] < ties_left ? equal[b] : ties_left;
        ties_left -= take;
        equal[b] = take;
        const int64_t n_b = greater[b] + take;
        greater[b] = at;
        at += n_b;
    }
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t o = greater[b], ties = equal[b];
        for (int64_t i = 0; i < F; i++) {
            const uint32_t u = relu_bits_at(pre, b * F + i, bf16);
            if (u > cut || (u == cut && ties-- > 0))
                rows[o] = b, cols[o++] = i;
        }
    }
    free(greater);
    free(equal);
    return cut;
}

uint32_t batch_topk_entries_f32(const float *pre, int64_t B, int64_t F, int64_t k, int64_t *rows, int64_t *cols) {
    return batch_topk_entries(pre, B, F, k, rows, cols, 0);
}

uint32_t batch_topk_entries_bf16(const uint16_t *pre, int64_t B, int64_t F, int64_t k, int64_t *rows, int64_t *cols) {
    return batch_topk_entries(pre, B, F, k, rows, cols, 1);
}

/* TopK's selection: each row's k largest entries of pre (B x F, float32 or bf16), their columns in ascending order,
   ties at the cutoff to the lowest columns. Floats map to unsigned keys of the same order. The row is cut into 2k
   blocks; the k-th largest of the blocks' maxima is a threshold that at least k keys reach (one in each of k blocks)
   and few more do (~1.4k for i.i.d. keys); the columns at or above it, found only in the blocks whose maximum reaches
   it, go through a min-heap of k, whose least is the cutoff. torch's topk took 4.8-5.3 ms of a 35-ms bf16 TopK step at
   the quickstart's 1024 x 2048, k 32 (notes.txt, session 22). */
static inline uint32_t order_key(float v) {  /* a < b as floats (NaN aside) iff key(a) < key(b) as unsigned */
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u = u == 0x80000000u ? 0 : u;  /* -0 == +0: one key, so they tie */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline void heap_sift_down(uint32_t *h, int64_t k, int64_t i) {  /* min-heap: h[0] the least */
    const uint32_t v = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k)
            break;
        if (c + 1 < k && h[c + 1] < h[c])
            c++;
        if (h[c] >= v)
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

/* the k-th largest of key[at[0..n)] (at NULL: of key[0..n)), n >= k, by a min-heap of k in h */
static inline uint32_t kth_largest_key(const uint32_t *key, const int64_t *at, int64_t n, int64_t k, uint32_t *h) {
    for (int64_t i = 0; i < k; i++)
        h[i] = key[at ? at[i] : i];
    for (int64_t i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(h, k, i);
    for (int64_t i = k; i < n; i++) {
        const uint32_t v = key[at ? at[i] : i];
        if (v > h[0])
            h[0] = v, heap_sift_down(h, k, 0);
    }
    return h[0];
}

static inline __attribute__((always_inline)) void row_topk(const void *pre, int64_t B, int64_t F, int64_t k,
                                                           int64_t *cols, int bf16) {
    const int64_t blocks = 2 * k <= F / 4 ? 2 * k : 0, width = blocks ? F / blocks : F;  /* 0: the heap over all */
    #pragma omp parallel
    {
        uint32_t *key = malloc((size_t)F * sizeof(uint32_t)), *heap = malloc((size_t)k * sizeof(uint32_t));
        uint32_t *block_max = malloc((size_t)(blocks + 1) * sizeof(uint32_t));
        int64_t *cand = malloc((size_t)F * sizeof(int64_t));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < F; i++)
                key[i] = order_key(load_as(pre, b * F + i, bf16));
            int64_t n = 0;
            if (blocks) {
                for (int64_t q = 0; q < blocks; q++) {  /* the last block takes the remainder */
                    const int64_t end = q == blocks - 1 ? F : (q + 1) * width;
                    uint32_t m = 0;
                    for (int64_t i = q * width; i < end; i++)
                        m = key[i] > m ? key[i] : m;
                    block_max[q] = m;
                }
                const uint32_t t = kth_largest_key(block_max, NULL, blocks, k, heap);
                for (int64_t q = 0; q < blocks; q++)
                    if (block_max[q] >= t) {
                        const int64_t end = q == blocks - 1 ? F : (q + 1) * width;
                        for (int64_t i = q * width; i < end; i++)
                            cand[n] = i, n += key[i] >= t;
                    }
            } else
                for (; n < F; n++)
                    cand[n] = n;
            const uint32_t cut = kth_largest_key(key, cand, n, k, heap);
            int64_t above = 0;
            for (int64_t j = 0; j < n; j++)
                above += key[cand[j]] > cut;
            int64_t ties = k - above, o = 0;
            int64_t *out = cols + b * k;
            for (int64_t j = 0; j < n && o < k; j++) {
                const uint32_t v = key[cand[j]];
                if (v > cut || (v == cut && ties-- > 0))
                    out[o++] = cand[j];
            }
        }
        free(key);
        free(heap);
        free(block_max);
        free(cand);
    }
}

void row_topk_f32(const float *pre, int64_t B, int64_t F, int64_t k, int64_t *cols) { row_topk(pre, B, F, k, cols, 0); }
void row_topk_bf16(const uint16_t *pre, int64_t B, int64_t F, int64_t k, int64_t *cols) { row_topk(pre, B, F, k, cols, 1); }

/* ReLU's selection: the entries of pre (B x F, float32 or bf16) that are > 0, as (rows, cols) in row-major order (those
   of (pre > 0).nonzero()) with their values (pre's elements), from a count pass and, where there are at most `capacity`,
   a fill pass by rows: no B x F mask is made, and a step whose codes are too dense for the sparse step (the caller's
   capacity) pays the count pass only. Returns the count. pre > 0 on the float bits: 0 < u <= +inf's (NaN and -0 are
   not > 0). With AVX-512 (BW, VL, VBMI2) the fill takes sixteen entries at a time: the kept columns and values
   compressed in registers and written by masked stores of exactly the kept lanes (a row never writes past its own
   range, which another thread may be filling); else one by one, branch free. 2.2 -> 0.4 ms for torch's mask,
   nonzero and gather on a ReLU quickstart SAE's bf16 pre-activations (1024 x 2048, 4.4% > 0). */
static inline uint32_t is_positive(const void *pre, int64_t e, int bf16) {
    uint32_t u;
    const float v = load_as(pre, e, bf16);
    memcpy(&u, &v, sizeof u);
    return u - 1u < 0x7F800000u;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define POSITIVE_LANES 16
/* entries i0..i0+15 of row b (at e0): the kept ones' columns and values written from o; returns how many */
static inline __attribute__((always_inline)) int positive_16(const void *pre, int64_t e0, int64_t i0, int64_t *cols,
                                                             void *vals, int64_t o, int bf16) {
    __mmask16 keep;
    if (bf16) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)((const uint16_t *)pre + e0));
        keep = _mm256_cmplt_epu16_mask(_mm256_sub_epi16(x, _mm256_set1_epi16(1)), _mm256_set1_epi16((short)0x7F80));
        _mm256_mask_storeu_epi16((uint16_t *)vals + o, (__mmask16)((1u << __builtin_popcount(keep)) - 1),
                                 _mm256_maskz_compress_epi16(keep, x));
    } else {
        const __m512i x = _mm512_loadu_si512((const float *)pre + e0);
        keep = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(x, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7F800000));
        _mm512_mask_storeu_epi32((float *)vals + o, (__mmask16)((1u << __builtin_popcount(keep)) - 1),
                                 _mm512_maskz_compress_epi32(keep, x));
    }
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __mmask8 low = (__mmask8)keep, high = (__mmask8)(keep >> 8);
    const int n_low = __builtin_popcount(low), n_high = __builtin_popcount(high);
    _mm512_mask_storeu_epi64(cols + o, (__mmask8)((1u << n_low) - 1),
                             _mm512_maskz_compress_epi64(low, _mm512_add_epi64(iota, _mm512_set1_epi64(i0))));
    _mm512_mask_storeu_epi64(cols + o + n_low, (__mmask8)((1u << n_high) - 1),
                             _mm512_maskz_compress_epi64(high, _mm512_add_epi64(iota, _mm512_set1_epi64(i0 + 8))));
    return n_low + n_high;
}
#else
#define POSITIVE_LANES 1
#endif

static inline __attribute__((always_inline)) int64_t positive_entries(const void *pre, int64_t B, int64_t F,
                                                                      int64_t capacity, int64_t *rows, int64_t *cols,
                                                                      void *vals, int bf16) {
    int64_t *start = malloc(((size_t)B + 1) * sizeof(int64_t));
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t count = 0;
        for (int64_t i = 0; i < F; i++)
            count += is_positive(pre, b * F + i, bf16);
        start[b + 1] = count;
    }
    start[0] = 0;
    for (int64_t b = 0; b < B; b++)
        start[b + 1] += start[b];
    const int64_t total = start[B];
    if (total <= capacity) {
        #pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            int64_t o = start[b], i = 0;
            const int64_t end = start[b + 1];
            for (int64_t r = o; r < end; r++)
                rows[r] = b;
#if POSITIVE_LANES > 1
            for (; i + POSITIVE_LANES <= F && o < end; i += POSITIVE_LANES)
                o += positive_16(pre, b * F + i, i, cols, vals, o, bf16);
#endif
            for (; i < F && o < end; i++) {
                const int64_t e = b * F + i;
                /* written at o whether or not it is kept (the next kept entry overwrites it); o < end keeps it in the
                   row's own range */
                cols[o] = i;
                if (bf16)
                    ((uint16_t *)vals)[o] = ((const uint16_t *)pre)[e];
                else
                    ((float *)vals)[o] = ((const float *)pre)[e];
                o += is_positive(pre, e, bf16);
            }
        }
    }
    free(start);
    return total;
}

int64_t positive_entries_f32(const float *pre, int64_t B, int64_t F, int64_t capacity, int64_t *rows, int64_t *cols,
                             float *vals) {
    return positive_entries(pre, B, F, capacity, rows, cols, vals, 0);
}

int64_t positive_entries_bf16(const uint16_t *pre, int64_t B, int64_t F, int64_t capacity, int64_t *rows, int64_t *cols,
                              uint16_t *vals) {
    return positive_entries(pre, B, F, capacity, rows, cols, vals, 1);
}

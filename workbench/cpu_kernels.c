/* Fused bfloat16 kernels for the training harvest's HuggingFace forward on a CPU (workbench/cpu_kernels.py).
   Eager torch runs each as 5-8 elementwise passes with float32 copies between them; here each element is read
   once, computed in float32 and rounded to bfloat16 once, as torch rounds at the same places. */
#include <stdint.h>
#include <string.h>

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

/* Gemma's RMSNorm over rows of length d: out = bf16(x * rsqrt(mean(x^2) + eps) * scale), scale = 1 + weight
   (float32), all in float32 as transformers' Gemma3RMSNorm computes it. */
void rms_norm_bf16(const uint16_t *x, const float *scale, uint16_t *out, int64_t rows, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *x_row = x + r * d;
        uint16_t *out_row = out + r * d;
        float sum_sq = 0.f;
        #pragma omp simd reduction(+:sum_sq)
        for (int64_t i = 0; i < d; i++) {
            float v = bf16_to_float(x_row[i]);
            sum_sq += v * v;
        }
        float inv_rms = 1.f / __builtin_sqrtf(sum_sq / (float)d + eps);
        for (int64_t i = 0; i < d; i++)
            out_row[i] = float_to_bf16((bf16_to_float(x_row[i]) * inv_rms) * scale[i]);
    }
}

/* The gated MLP's elementwise part: out = bf16(bf16(gelu_tanh(gate)) * up), gelu_tanh(g) = 0.5 g (1 + tanh(z)),
   z = sqrt(2/pi) (g + 0.044715 g^3), computed as g / (1 + e^(-2z)) (the same function). The act is rounded to
   bf16 before the product, as transformers' act_fn(gate) * up rounds it. */
void gelu_tanh_mul_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    const int64_t block = 16384;
    #pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < n; start += block) {
        int64_t end = start + block < n ? start + block : n;
        for (int64_t i = start; i < end; i++) {
            float g = bf16_to_float(gate[i]);
            float two_z = 1.5957691216057308f * (g + 0.044715f * g * g * g);
            float act = g / (1.f + exp_approx(-two_z));
            out[i] = float_to_bf16(bf16_to_float(float_to_bf16(act)) * bf16_to_float(up[i]));
        }
    }
}

/* Rotary position embedding of x (B, H, T, d) in place of transformers' apply_rotary_pos_emb:
   out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[d/2:], x[:d/2]); each op rounded
   to bf16 where torch's bf16 ops round, so the result is bit-identical. x and out share strides (elements) for
   B, H, T, their rows contiguous; cos and sin are contiguous (B, T, d). */
void rope_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int64_t B, int64_t H,
               int64_t T, int64_t d, int64_t stride_b, int64_t stride_h, int64_t stride_t) {
    const int64_t half = d / 2;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t t = 0; t < T; t++) {
                const int64_t at = b * stride_b + h * stride_h + t * stride_t;
                const uint16_t *x_row = x + at, *c = cos + (b * T + t) * d, *s = sin + (b * T + t) * d;
                uint16_t *o = out + at;
                for (int64_t i = 0; i < half; i++) {
                    float rotated = -bf16_to_float(x_row[i + half]);
                    o[i] = float_to_bf16(bf16_to_float(float_to_bf16(bf16_to_float(x_row[i]) * bf16_to_float(c[i])))
                                         + bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[i]))));
                }
                for (int64_t i = half; i < d; i++) {
                    float rotated = bf16_to_float(x_row[i - half]);
                    o[i] = float_to_bf16(bf16_to_float(float_to_bf16(bf16_to_float(x_row[i]) * bf16_to_float(c[i])))
                                         + bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[i]))));
                }
            }
        }
    }
}

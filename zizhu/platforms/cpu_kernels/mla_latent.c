/* Per new token of an MLA layer: RMS-normalise c_kv, rotate k_pe and q's rope dims, and store
 * [c_kv | k_pe] at the token's cache slot. In torch that is ~15 operators per layer (norm, eight
 * multiplies and two adds of the rotation, splits, cats, an index_copy); here it is one pass.
 * Rotation as zizhu.ops.apply_rotary: out = [x1 cos - x2 sin | x2 cos + x1 sin], where (x1, x2) are
 * the two halves, or the even and odd dims when `interleaved`. The cache is fp32 or (cache_bf16, a
 * bf16 model's) bf16, the row rounded to nearest even as torch rounds fp32 to bf16. */
#include <stdint.h>
#include <string.h>

#include "mla.h"
#include "simd.h"

static void rotate(const float* x, float* out, const float* cos, const float* sin, int64_t half, int interleaved) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = interleaved ? x[2 * i] : x[i], x2 = interleaved ? x[2 * i + 1] : x[half + i];
        out[i] = x1 * cos[i] - x2 * sin[i];
        out[half + i] = x2 * cos[i] + x1 * sin[i];
    }
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);  /* NaN stays a quiet NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

void mla_write_latent_f32(float* q, int64_t q_stride, int64_t head_stride, int64_t H, int64_t nope,
                          const float* kv, int64_t kv_stride, const float* norm_w, float eps, const float* cos,
                          const float* sin, int interleaved, void* cache, int cache_bf16, const int64_t* slots,
                          int64_t T, int64_t R, int64_t P, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * (P / 2), *s = sin + t * (P / 2);
        float tmp[P > 0 ? P : 1];
        for (int64_t h = 0; h < H; h++) {
            float* pe = q + t * q_stride + h * head_stride + nope;
            rotate(pe, tmp, c, s, P / 2, interleaved);
            for (int64_t i = 0; i < P; i++) pe[i] = tmp[i];
        }
        const float* src = kv + t * kv_stride;
        float wide[R + P];
        float* row = cache_bf16 ? wide : (float*)cache + slots[t] * (R + P);
        rms_norm_row(src, norm_w, row, R, eps);
        rotate(src + R, row + R, c, s, P / 2, interleaved);
        if (cache_bf16)
            for (int64_t i = 0; i < R + P; i++) ((uint16_t*)cache)[slots[t] * (R + P) + i] = f32_to_bf16(wide[i]);
    }
}

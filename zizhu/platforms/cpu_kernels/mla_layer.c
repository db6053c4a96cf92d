/* One MLA layer of a decode step in one call: h + o_proj(attention(norm(h))).
 *
 * The pieces are the kernels the platform already calls one by one (the projections with their
 * norms, the latent write with RoPE, absorbed decode); driven from here, a batch-1 step makes one
 * call per layer instead of five, and none of the ~15 torch calls between them. Those calls, not
 * arithmetic, were a third of a batch-1 step: after each kernel has streamed megabytes of weights
 * through the caches, every small torch call runs cold (35 us for a one-row add instead of 2).
 * Projections are int8 with per-row scales, row-major (gemm_int8.c, the norm fused into the product)
 * or (int8_panels) in int8 panels (gemm_int8_panels.c), or, with NULL scales, fp32 or bf16, row-major (gemm.c) or, with a tail panel, packed by pack_panels
 * (gemm_packed.c), the rows normalised first; the cache fp32 or bf16. */
#include <stdint.h>
#include <stdlib.h>

#include "gemm.h"
#include "gemm_int8.h"
#include "gemm_int8_panels.h"
#include "gemm_packed.h"
#include "mla.h"
#include "simd.h"

/* y [M, N] = norm(x) @ w^T, x [M, K] with row stride xs, norm optional; tmp holds M x K floats. An
 * int8 w (w_scale given) is row-major, or in int8 panels with `int8_panels`; a full-precision one is
 * row-major, or packed when its tail panel is given. */
static void project(const float* x, int64_t xs, int64_t M, int64_t K, const void* w, const float* w_scale,
                    int int8_panels, const void* tail, int w_bf16, const float* norm, float eps, float* y, int64_t N,
                    float* tmp, int threads) {
    if (w_scale && !int8_panels) {
        int8_gemm_f32(x, (const int8_t*)w, w_scale, y, M, N, K, xs, N, norm, eps, threads);
        return;
    }
    if (norm) {
        for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * xs, norm, tmp + m * K, K, eps);
        x = tmp;
        xs = K;
    }
    if (w_scale) int8_gemm_panels_f32(x, xs, M, K, (const int8_t*)w, w_scale, N, y, N, threads);
    else if (tail) gemm_f32_packed(x, w, tail, w_bf16, y, M, N, K, xs, N, threads);
    else gemm_f32(x, w, w_bf16, y, M, N, K, xs, N, threads);
}

/* h, out [B, D]; weights as MLADecodeLayer (zizhu/ops/attention.py) lists them. */
void mla_decode_layer_f32(const float* h, float* out, int64_t B, int64_t D,
                          const float* input_norm, float input_eps,
                          const void* q_kv_a, const float* q_kv_a_scale, int64_t QL,
                          const float* q_a_norm, float q_a_eps,
                          const void* q_b, const float* q_b_scale,
                          const float* kv_a_norm, float kv_a_eps,
                          const void* w_uk, const void* w_uv, int w_bf16,
                          const void* o, const float* o_scale, int proj_bf16, int int8_panels,
                          const void* q_kv_a_tail, const void* q_b_tail, const void* o_tail,
                          int64_t H, int64_t Dn, int64_t P, int64_t Dv, int64_t R, float scale,
                          const float* cos, const float* sin, int interleaved, void* cache, int cache_bf16,
                          const int64_t* slots, const int64_t* tables, int64_t table_stride, const int64_t* seq_lens,
                          int64_t block_size, int threads) {
    const int64_t A = QL + R + P, Q = H * (Dn + P);
    float* q_kv = malloc(sizeof(float) * (B * A + 1));
    float* q = malloc(sizeof(float) * (B * Q + 1));
    float* scratch = malloc(sizeof(float) * (2 * B * H * R + 1));
    float* attended = malloc(sizeof(float) * (B * H * Dv + 1));
    float* normed = malloc(sizeof(float) * (B * (D > QL ? D : QL) + 1));
    project(h, D, B, D, q_kv_a, q_kv_a_scale, int8_panels, q_kv_a_tail, proj_bf16, input_norm, input_eps, q_kv, A, normed, threads);
    project(q_kv, A, B, QL, q_b, q_b_scale, int8_panels, q_b_tail, proj_bf16, q_a_norm, q_a_eps, q, Q, normed, threads);
    mla_write_latent_f32(q, Q, Dn + P, H, Dn, q_kv + QL, A, kv_a_norm, kv_a_eps, cos, sin, interleaved, cache,
                         cache_bf16, slots, B, R, P, threads);
    mla_decode_f32(q, Q, Dn + P, q + Dn, Q, Dn + P, w_uk, w_uv, w_bf16, cache, cache_bf16, tables, table_stride,
                   seq_lens, scratch, scratch + B * H * R, attended, B, H, Dn, Dv, R, P, block_size, scale, threads);
    project(attended, H * Dv, B, H * Dv, o, o_scale, int8_panels, o_tail, proj_bf16, NULL, 0.0f, out, D, NULL, threads);
    for (int64_t j = 0; j < B * D; j++) out[j] = h[j] + out[j];
    free(q_kv); free(q); free(scratch); free(attended); free(normed);
}

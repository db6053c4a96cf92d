/* One MLA layer of a decode step, int8 projections, in one call: h + o_proj(attention(norm(h))).
 *
 * The pieces are the kernels the platform already calls one by one (int8 products with their norms
 * fused, the latent write with RoPE, absorbed decode); driven from here, a batch-1 step makes one
 * call per layer instead of five, and none of the ~15 torch calls between them. Those calls, not
 * arithmetic, were a third of a batch-1 step: after each kernel has streamed megabytes of weights
 * through the caches, every small torch call runs cold (35 us for a one-row add instead of 2). */
#include <stdint.h>
#include <stdlib.h>

#include "gemm_int8.h"
#include "mla.h"

/* h, out [B, D]; weights as MLADecodeLayer (zizhu/ops/attention.py) lists them. */
void mla_decode_layer_i8(const float* h, float* out, int64_t B, int64_t D,
                         const float* input_norm, float input_eps,
                         const int8_t* q_kv_a, const float* q_kv_a_scale, int64_t QL,
                         const float* q_a_norm, float q_a_eps,
                         const int8_t* q_b, const float* q_b_scale,
                         const float* kv_a_norm, float kv_a_eps,
                         const void* w_uk, const void* w_uv, int w_bf16,
                         const int8_t* o, const float* o_scale,
                         int64_t H, int64_t Dn, int64_t P, int64_t Dv, int64_t R, float scale,
                         const float* cos, const float* sin, int interleaved, float* cache, const int64_t* slots,
                         const int64_t* tables, int64_t table_stride, const int64_t* seq_lens, int64_t block_size,
                         int threads) {
    const int64_t A = QL + R + P, Q = H * (Dn + P);
    float* q_kv = malloc(sizeof(float) * (B * A + 1));
    float* q = malloc(sizeof(float) * (B * Q + 1));
    float* scratch = malloc(sizeof(float) * (2 * B * H * R + 1));
    float* attended = malloc(sizeof(float) * (B * H * Dv + 1));
    int8_gemm_f32(h, q_kv_a, q_kv_a_scale, q_kv, B, A, D, D, A, input_norm, input_eps, threads);
    int8_gemm_f32(q_kv, q_b, q_b_scale, q, B, Q, QL, A, Q, q_a_norm, q_a_eps, threads);
    mla_write_latent_f32(q, Q, Dn + P, H, Dn, q_kv + QL, A, kv_a_norm, kv_a_eps, cos, sin, interleaved, cache, 0, slots, B,
                         R, P, threads);
    mla_decode_f32(q, Q, Dn + P, q + Dn, Q, Dn + P, w_uk, w_uv, w_bf16, cache, 0, tables, table_stride, seq_lens, scratch,
                   scratch + B * H * R, attended, B, H, Dn, Dv, R, P, block_size, scale, threads);
    int8_gemm_f32(attended, o, o_scale, out, B, D, H * Dv, H * Dv, D, NULL, 0.0f, threads);
    for (int64_t j = 0; j < B * D; j++) out[j] = h[j] + out[j];
    free(q_kv); free(q); free(scratch); free(attended);
}

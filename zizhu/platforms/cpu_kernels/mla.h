/* The MLA kernels that the fused decode layer (mla_layer.c) drives, and that layer itself. */
#ifndef ZIZHU_MLA_H
#define ZIZHU_MLA_H
#include <stdint.h>

void mla_write_latent_f32(float* q, int64_t q_stride, int64_t head_stride, int64_t H, int64_t nope,
                          const float* kv, int64_t kv_stride, const float* norm_w, float eps, const float* cos,
                          const float* sin, int interleaved, void* cache, int cache_bf16, const int64_t* slots,
                          int64_t T, int64_t R, int64_t P, int threads);
void mla_decode_f32(const float* q_nope, int64_t qn_sb, int64_t qn_sh, const float* q_pe, int64_t qp_sb, int64_t qp_sh,
                    const void* w_uk, const void* w_uv, int w_bf16, const void* cache, int cache_bf16,
                    const int64_t* tables, int64_t table_stride, const int64_t* seq_lens, float* q_lat, float* o_lat,
                    float* out, int64_t B, int64_t H, int64_t Dn, int64_t Dv, int64_t R, int64_t P, int64_t block_size,
                    float scale, int threads);
void mla_decode_layer_f32(const float* h, float* out, int64_t B, int64_t D, const float* input_norm, float input_eps,
                          const void* q_kv_a, const float* q_kv_a_scale, int64_t QL, const float* q_a_norm,
                          float q_a_eps, const void* q_b, const float* q_b_scale, const float* kv_a_norm,
                          float kv_a_eps, const void* w_uk, const void* w_uv, int w_bf16, const void* o,
                          const float* o_scale, int proj_bf16, int int8_panels, const void* q_kv_a_tail,
                          const void* q_b_tail,
                          const void* o_tail, int64_t H, int64_t Dn, int64_t P, int64_t Dv, int64_t R,
                          float scale, const float* cos, const float* sin, int interleaved, void* cache,
                          int cache_bf16, const int64_t* slots, const int64_t* tables, int64_t table_stride,
                          const int64_t* seq_lens, int64_t block_size, int threads);
#endif

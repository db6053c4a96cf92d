/* The grouped expert call of gemm.c, which the routed entry of moe_route.c finishes with, and that
 * entry (the whole MoE block), which the decode stack (decode_stack.c) calls. */
#ifndef ZIZHU_MOE_H
#define ZIZHU_MOE_H
#include <stdint.h>

void moe_f32(const float* x, float* out, const int64_t* ids, const float* weights, int64_t T, int64_t K,
             int64_t E, const void* w13, const float* s13, const void* w2, const float* s2, int w_bf16,
             int w_packed, int64_t D, int64_t I, int threads);
void moe_routed_f32(const float* x, float* out, int64_t T, int64_t D, const float* norm_weight, float eps,
                    int add_input, const float* router, const float* bias, int64_t E, int scoring, int method,
                    int64_t n_group, int64_t topk_group, int64_t K, int norm, float scaling, int64_t S,
                    const void* w13, const float* s13, const void* w2, const float* s2, int w_bf16, int w_packed,
                    int64_t I, int threads);
#endif

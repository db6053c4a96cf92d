/* The grouped expert call of gemm.c, which the routed entry of moe_route.c finishes with. */
#ifndef ZIZHU_MOE_H
#define ZIZHU_MOE_H
#include <stdint.h>

void moe_f32(const float* x, float* out, const int64_t* ids, const float* weights, int64_t T, int64_t K,
             int64_t E, const void* w13, const float* s13, const void* w2, const float* s2,
             int64_t D, int64_t I, int threads);
#endif

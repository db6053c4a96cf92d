/* The full-precision few-row product of gemm.c, which the fused MLA layer (mla_layer.c) also drives. */
#ifndef ZIZHU_GEMM_H
#define ZIZHU_GEMM_H
#include <stdint.h>

/* y = x @ w^T for M rows, w [N, K] fp32 or (w_bf16) bf16, summed in fp32. */
void gemm_f32(const float* x, const void* w, int w_bf16, float* y, int64_t M, int64_t N, int64_t K, int64_t x_stride,
              int64_t y_stride, int threads);
#endif

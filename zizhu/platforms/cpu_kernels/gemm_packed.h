/* The panel products of gemm_packed.c that the grouped full-precision experts (gemm.c) and the fused MLA
 * layer (mla_layer.c) use. */
#ifndef ZIZHU_GEMM_PACKED_H
#define ZIZHU_GEMM_PACKED_H
#include <stdint.h>

#define PANEL 16

/* y = x @ w^T for M rows of a weight packed by pack_panels (its full panels and the tail panel). */
void gemm_f32_packed(const float* x, const void* wp, const void* tail, int w_bf16, float* y, int64_t M, int64_t N,
                     int64_t K, int64_t x_stride, int64_t y_stride, int threads);

/* Output columns [n0, n1) (n0 a multiple of PANEL, n1 - n0 <= PANEL) of y = x @ w^T for M rows of a
 * weight packed by pack_panels, fp32 or (w_bf16) bf16: `panel` is its panel n0 / PANEL. */
void gemm_cols_packed(const float* x, int64_t xs, const void* panel, int w_bf16, int64_t K, float* y, int64_t ys,
                      int64_t M, int64_t n0, int64_t n1);

/* Output columns [n0, n1) (n1 - n0 <= PANEL) of y = x @ w^T for M rows of row-major w[N, K], fp32 or
 * (w_bf16) bf16, through `panel`, scratch of PANEL x K floats. */
void gemm_cols_f32_panel(const float* x, int64_t xs, const void* w, int w_bf16, int64_t K, float* y, int64_t ys,
                         int64_t M, int64_t n0, int64_t n1, float* panel);
#endif

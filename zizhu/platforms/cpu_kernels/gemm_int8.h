/* The int8-weight kernels of gemm_int8.c that the grouped MoE call (gemm.c) and the fused MLA layer
 * (mla_layer.c) share. */
#ifndef ZIZHU_GEMM_INT8_H
#define ZIZHU_GEMM_INT8_H
#include <stdint.h>

/* Round M rows of x (K wide) to int16, one scale per row: q is [M, K & ~31], q_scale [M]. */
void quantize_rows_i16(const float* x, int64_t x_stride, int64_t M, int64_t K, int16_t* q, float* q_scale);

/* Output columns [n_begin, n_end) of y = x @ (w * scale)^T for M rows: x's int16 rows (xq, xq_scale)
 * and, for the elements past the last whole chunk of 32, its fp32 rows (x). */
void int8_cols(const float* x, int64_t xs, const int16_t* xq, const float* xq_scale, int64_t M, int64_t K,
               const int8_t* w, const float* scale, float* y, int64_t ys, int64_t n_begin, int64_t n_end);
/* y = x @ (w * scale)^T for M rows, each row RMS-normalised with norm_weight first when it is not
 * NULL (the exported entry, CpuPlatform.int8_linear). */
void int8_gemm_f32(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                   int64_t x_stride, int64_t y_stride, const float* norm_weight, float eps, int threads);
#endif

/* The int8 panel products of gemm_int8_panels.c, which greedy_head.c's screen shares. */
#ifndef ZIZHU_GEMM_INT8_PANELS_H
#define ZIZHU_GEMM_INT8_PANELS_H
#include <stdint.h>

#include "gemm_packed.h"

#define I8P_TILE_ROWS 6

/* One row of x rounded to int16: its scale, and in double (rounded up a little) |x|, |X^| and
 * |x - X^| for X^ = the rounded row times its scale. A row with a NaN or an inf has a NaN scale. */
typedef struct {
    float scale;
    double x_norm, xq_norm, dx_norm;
} Int16Row;

/* k-pairs of a row of K, and int32 words of x's int16 tiles for M rows. */
static inline int64_t i8p_pairs(int64_t K) { return (K + 1) / 2; }
static inline int64_t i8p_words(int64_t M, int64_t K) {
    return (M + I8P_TILE_ROWS - 1) / I8P_TILE_ROWS * I8P_TILE_ROWS * i8p_pairs(K);
}

/* Inside a parallel region, every thread: rows [0, M) of x rounded into xp (i8p_words zeroed words),
 * their scales and norms into rows. Ends in a barrier. */
void int8_panels_quantize(const float* x, int64_t xs, int64_t M, int64_t K, int32_t* xp, Int16Row* rows);

/* Inside a parallel region, every thread, after int8_panels_quantize: y[m][n] = sum_k xq[m][k] q[n][k]
 * over the panels qp (cpu_kernels.pack_int8_panels), in fp32, for every column of every panel (y has
 * 16 ceil(N / 16) columns, stride ys). With col_scale (16 ceil(N / 16) floats), scaled by
 * rows[m].scale * col_scale[n]. Ends in a barrier. */
void int8_panels_products(const int32_t* xp, const Int16Row* rows, int64_t M, int64_t K, const int8_t* qp, int64_t N,
                          const float* col_scale, float* y, int64_t ys);
#endif

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

/* Row x [K] rounded into row m of xp's tiles (every word of its pairs written), its scale into *row,
 * and with `norms` its norms (else 0). */
void int8_panels_quantize_row(const float* x, int64_t K, int64_t m, int32_t* xp, Int16Row* row, int norms);

/* Inside a parallel region, every thread: rows [0, M) of x rounded into xp (i8p_words words), their
 * scales, and with `norms` their norms, into rows. Ends in a barrier. */
void int8_panels_quantize(const float* x, int64_t xs, int64_t M, int64_t K, int32_t* xp, Int16Row* rows, int norms);

/* Rows [0, M) of xp's tiles (xp at the tile of row 0, `pairs` k-pairs a row) against one panel over all
 * of K: y[m][j] = sum_k xq[m][k] q[16p + j][k] for j < 16, with col_scale (the panel's 16) scaled by
 * rows[m].scale * col_scale[j]. Rows of y a tile does not hold are left alone. */
void int8_panel_rows(const int32_t* xp, int64_t pairs, int64_t M, const int8_t* panel, const Int16Row* rows,
                     const float* col_scale, float* y, int64_t ys);

/* y = x @ (q * scale)^T for M fp32 rows of x (row stride xs) and an int8 weight in panels qp
 * (cpu_kernels.pack_int8_panels) with per-row scales `scale [N]`; y's row stride ys. */
void int8_gemm_panels_f32(const float* x, int64_t xs, int64_t M, int64_t K, const int8_t* qp, const float* scale,
                          int64_t N, float* y, int64_t ys, int threads);

/* Rows of x per block whose int16 tiles stay in L2 while panels stream past (a multiple of the tile). */
int64_t i8p_row_block(int64_t K);

/* Inside a parallel region, every thread, after int8_panels_quantize: y[m][n] = sum_k xq[m][k] q[n][k]
 * over the panels qp (cpu_kernels.pack_int8_panels), in fp32, for every column of every panel (y has
 * 16 ceil(N / 16) columns, stride ys). With col_scale (16 ceil(N / 16) floats), scaled by
 * rows[m].scale * col_scale[n]. Ends in a barrier. */
void int8_panels_products(const int32_t* xp, const Int16Row* rows, int64_t M, int64_t K, const int8_t* qp, int64_t N,
                          const float* col_scale, float* y, int64_t ys);
#endif

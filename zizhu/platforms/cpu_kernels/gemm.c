/* fp32 GEMM for few rows, y[M, N] = x[M, K] @ w[N, K]^T, where MKL's GEMM pays more than the weight
 * stream; the grouped MoE call for fp32, bf16 and int8 experts (the int8 products are gemm_int8.c's).
 * - one activation row (batch-1 decode): four independent accumulators hide the FMA latency;
 * - more rows: 4 activation rows x 2 weight rows per register tile, eight independent chains,
 *   each loaded weight vector feeding four FMAs.
 * Weights are fp32 or bf16 (load_w: a bf16 checkpoint's weights as they are, half the bytes to
 * stream, the products in fp32).
 * Built at first use by zizhu/platforms/cpu_kernels/__init__.py; it links the OpenMP runtime that
 * torch already loaded, so both share one thread pool.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemm.h"
#include "gemm_int8.h"
#include "gemm_int8_panels.h"
#include "gemm_packed.h"
#include "simd.h"

/* Bytes ahead to prefetch: the hardware prefetcher alone left single-core DRAM streaming at about
 * a third of what the same loop reaches with this hint. */
#define PREFETCH 1024

/* Rows of x per pass over a thread's columns: 64 rows of K floats stay in L2 while every column
 * pair streams past them; unblocked, a 512-token prefill re-read all of x from L3 per pair. */
#define ROW_BLOCK 64

/* Rows of an fp32 expert from which each group of 16 weight rows is transposed into a panel first
 * (gemm_cols_f32_panel); fewer rows take the row-major 4 x 2 tiles, since the transpose costs about
 * as much as a few rows of products. One MoE layer of the small benchmark model (33 fp32 experts,
 * 4 routed + 1 shared per token), best of 3, 64 / 256 / 2,048 tokens: 24.2 / 61.8 / 440 ms with
 * the 4 x 2 tiles only, 21.7 / 56.5 / 301 ms with panels from 48 rows (36.7 / 71.4 / 302 ms from 8). */
#ifndef PANEL_MIN_ROWS
#define PANEL_MIN_ROWS 48
#endif

static inline void prefetch(const void* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + PREFETCH + b, _MM_HINT_T0);
}

/* A row dot product, the 4x2 register tile, and a thread's share of output columns [n_begin, n_end),
 * for fp32 (bf16 = 0) or bf16 weights; bf16 is a constant wherever they are inlined. */
static inline __attribute__((always_inline)) float dot_row(const float* x, const void* w, int64_t K, const int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        prefetch((const char*)w + k * size, 32 * size);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_w(w, k, bf16), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load_w(w, k + 8, bf16), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load_w(w, k + 16, bf16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load_w(w, k + 24, bf16), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_w(w, k, bf16), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += x[k] * scalar_w(w, k, bf16);
    return s;
}

static inline __attribute__((always_inline)) void tile_4x2(const float* x, int64_t xs, const void* w0, const void* w1,
                                                           int64_t K, float out[4][2], const int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k * size) % 64 == 0) {
            prefetch((const char*)w0 + k * size, 64);
            prefetch((const char*)w1 + k * size, 64);
        }
        const __m256 v0 = load_w(w0, k, bf16), v1 = load_w(w1, k, bf16);
        __m256 xv = _mm256_loadu_ps(x + k);
        c00 = _mm256_fmadd_ps(xv, v0, c00); c01 = _mm256_fmadd_ps(xv, v1, c01);
        xv = _mm256_loadu_ps(x + xs + k);
        c10 = _mm256_fmadd_ps(xv, v0, c10); c11 = _mm256_fmadd_ps(xv, v1, c11);
        xv = _mm256_loadu_ps(x + 2 * xs + k);
        c20 = _mm256_fmadd_ps(xv, v0, c20); c21 = _mm256_fmadd_ps(xv, v1, c21);
        xv = _mm256_loadu_ps(x + 3 * xs + k);
        c30 = _mm256_fmadd_ps(xv, v0, c30); c31 = _mm256_fmadd_ps(xv, v1, c31);
    }
    out[0][0] = hsum8(c00); out[0][1] = hsum8(c01); out[1][0] = hsum8(c10); out[1][1] = hsum8(c11);
    out[2][0] = hsum8(c20); out[2][1] = hsum8(c21); out[3][0] = hsum8(c30); out[3][1] = hsum8(c31);
    for (; k < K; k++)
        for (int i = 0; i < 4; i++) {
            out[i][0] += x[i * xs + k] * scalar_w(w0, k, bf16);
            out[i][1] += x[i * xs + k] * scalar_w(w1, k, bf16);
        }
}

static inline __attribute__((always_inline)) void cols(const float* x, const void* w, float* y, int64_t M, int64_t K,
                                                       int64_t xs, int64_t ys, int64_t n_begin, int64_t n_end,
                                                       const int bf16) {
    for (int64_t mb = 0; mb < M; mb += ROW_BLOCK) {
        const int64_t me = mb + ROW_BLOCK < M ? mb + ROW_BLOCK : M;
        const int64_t m4 = mb + ((me - mb) & ~(int64_t)3);
        for (int64_t n0 = n_begin; n0 < n_end; n0 += 2) {
            const int both = n0 + 1 < n_end;
            const void* w0 = w_at(w, n0 * K, bf16);
            const void* w1 = both ? w_at(w, (n0 + 1) * K, bf16) : w0;
            for (int64_t m = mb; m < m4; m += 4) {
                float out[4][2];
                tile_4x2(x + m * xs, xs, w0, w1, K, out, bf16);
                for (int i = 0; i < 4; i++) {
                    y[(m + i) * ys + n0] = out[i][0];
                    if (both) y[(m + i) * ys + n0 + 1] = out[i][1];
                }
            }
            for (int64_t m = m4; m < me; m++) {
                const float* xr = x + m * xs;
                y[m * ys + n0] = dot_row(xr, w0, K, bf16);
                if (both) y[m * ys + n0 + 1] = dot_row(xr, w1, K, bf16);
            }
        }
    }
}

static void gemm_cols(const float* x, const void* w, int w_bf16, float* y, int64_t M, int64_t K, int64_t xs, int64_t ys,
                      int64_t n_begin, int64_t n_end) {
    if (w_bf16) cols(x, w, y, M, K, xs, ys, n_begin, n_end, 1);
    else cols(x, w, y, M, K, xs, ys, n_begin, n_end, 0);
}


/* Split N into per-thread ranges of whole column pairs. */
#define PARALLEL_COLS(N, BODY)                                              \
    _Pragma("omp parallel num_threads(threads)") {                          \
        const int64_t pairs = ((N) + 1) / 2;                                \
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();     \
        const int64_t begin = 2 * (pairs * t / nt), end = 2 * (pairs * (t + 1) / nt); \
        const int64_t n_begin = begin, n_end = end < (N) ? end : (N);       \
        BODY;                                                               \
    }

/* fp32 or bf16 weights, for the few-row products where MKL's GEMM pays more than the weight stream
 * (and for bf16 weights at any row count: this CPU's bf16 GEMM is emulated). */
void gemm_f32(const float* x, const void* w, int w_bf16, float* y, int64_t M, int64_t N, int64_t K, int64_t x_stride,
              int64_t y_stride, int threads) {
    PARALLEL_COLS(N, gemm_cols(x, w, w_bf16, y, M, K, x_stride, y_stride, n_begin, n_end))
}

/* row[i] = silu(row[i]) * row[I + i] for i < I: the gate half times the up half of a w13 product.
 * With a vector exp: the rows of a 512-token prefill (5 experts each, I = 512) take 2.0 ms on one core
 * against 9.3 with libm's scalar expf, per layer. */
static void silu_mul(float* row, int64_t I) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        const __m256 g = _mm256_loadu_ps(row + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(row + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(row + I + i)));
    }
    for (; i < I; i++) row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
}

/* out[t] = sum_k weights[t, k] * ys[row_of[t, k]]: inside a parallel region, work-shared. */
static void weighted_sum(float* out, const float* ys, const float* weights, const int64_t* row_of, int64_t T, int64_t K,
                         int64_t D) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float* o = out + t * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float w = weights[t * K + k];
            const float* y = ys + row_of[t * K + k] * D;
            for (int64_t d = 0; d < D; d++) o[d] += w * y[d];
        }
    }
}

/* Row blocks (expert, first row, rows) of at most block_rows rows covering every expert's rows, and
 * their number. */
static int64_t* row_blocks(const int64_t* offsets, int64_t E, int64_t block_rows, int64_t* num_blocks) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) n += (offsets[e + 1] - offsets[e] + block_rows - 1) / block_rows;
    int64_t* blocks = malloc(sizeof(int64_t) * 3 * (n + 1));
    for (int64_t e = 0, b = 0; e < E; e++)
        for (int64_t p0 = offsets[e]; p0 < offsets[e + 1]; p0 += block_rows, b++) {
            blocks[3 * b] = e;
            blocks[3 * b + 1] = p0;
            blocks[3 * b + 2] = offsets[e + 1] - p0 < block_rows ? offsets[e + 1] - p0 : block_rows;
        }
    *num_blocks = n;
    return blocks;
}

/* The expert products of moe_f32 for int8 experts in panels (cpu_kernels.pack_int8_experts: expert e's
 * panel p of w13 is panel e * 2I / 16 + p of the stack, as rows would be), into ys [P, D] in expert
 * order. Each expert's rows are rounded into int16 tiles of their own (gemm_int8_panels.c), its first
 * row at the start of a tile, so that up to six rows of one expert meet each panel in outer products;
 * the row-major kernel's dot products re-read the rows for every group of four columns. One MoE
 * layer of the small benchmark model (33 int8 experts, 4 routed + 1 shared a token), 11 cold layers,
 * alternating with the row-major stacks, medians of 7: 1.02x the time at one token, 1.05x at 4 and
 * 8 (rows of one), 0.87x at 32, 0.83x at 64, 0.79x at 256 and 0.66x at 2,048. */
static void moe_int8_panels(const float* x, float* out, const float* weights, int64_t T, int64_t K, int64_t E,
                            const int64_t* offsets, const int64_t* row_of, const int64_t* source, const int8_t* w13,
                            const float* s13, const int8_t* w2, const float* s2, int64_t D, int64_t I, int threads) {
    const int64_t P = T * K, pairs_d = i8p_pairs(D), pairs_i = i8p_pairs(I), block_rows = i8p_row_block(D);
    int64_t* tiled = malloc(sizeof(int64_t) * (E + 1)); /* expert e's first row in the tiles */
    int64_t* tile_row = malloc(sizeof(int64_t) * (P + 1)); /* row -> its row in the tiles */
    tiled[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t count = offsets[e + 1] - offsets[e];
        tiled[e + 1] = tiled[e] + (count + I8P_TILE_ROWS - 1) / I8P_TILE_ROWS * I8P_TILE_ROWS;
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) tile_row[r] = tiled[e] + r - offsets[e];
    }
    int64_t num_blocks;  /* of a multiple of six rows, so each starts a tile */
    int64_t* blocks = row_blocks(offsets, E, block_rows, &num_blocks);
    const int64_t rows_tiled = tiled[E], groups13 = 2 * I / PANEL, groups2 = D / PANEL;
    int32_t* xp = malloc(sizeof(int32_t) * (rows_tiled * pairs_d + 1));
    int32_t* hp = malloc(sizeof(int32_t) * (rows_tiled * pairs_i + 1));
    Int16Row* x_rows = malloc(sizeof(Int16Row) * (rows_tiled + 1));
    Int16Row* h_rows = malloc(sizeof(Int16Row) * (rows_tiled + 1));
    float* h = malloc(sizeof(float) * P * 2 * I);
    float* ys = malloc(sizeof(float) * P * D);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++)
            int8_panels_quantize_row(x + source[r] * D, D, tile_row[r], xp, x_rows + tile_row[r], 0);
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < num_blocks * groups13; j++) {
            const int64_t* block = blocks + 3 * (j / groups13);
            const int64_t e = block[0], p0 = block[1], t0 = tile_row[p0], p = j % groups13;
            int8_panel_rows(xp + t0 * pairs_d, pairs_d, block[2], w13 + (e * groups13 + p) * pairs_d * 2 * PANEL,
                            x_rows + t0, s13 + e * 2 * I + p * PANEL, h + p0 * 2 * I + p * PANEL, 2 * I);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            silu_mul(h + r * 2 * I, I);
            int8_panels_quantize_row(h + r * 2 * I, I, tile_row[r], hp, h_rows + tile_row[r], 0);
        }
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < num_blocks * groups2; j++) {
            const int64_t* block = blocks + 3 * (j / groups2);
            const int64_t e = block[0], p0 = block[1], t0 = tile_row[p0], p = j % groups2;
            int8_panel_rows(hp + t0 * pairs_i, pairs_i, block[2], w2 + (e * groups2 + p) * pairs_i * 2 * PANEL,
                            h_rows + t0, s2 + e * D + p * PANEL, ys + p0 * D + p * PANEL, D);
        }
        weighted_sum(out, ys, weights, row_of, T, K, D);
    }
    free(tiled); free(tile_row); free(blocks); free(xp); free(hp); free(x_rows); free(h_rows); free(h); free(ys);
}

/* Routed experts of one layer in one call, from the router's choice to the weighted sum.
 * (token, expert) pairs are counting-sorted by expert so each selected expert's weights stream once
 * for all its tokens; every phase is one work-shared loop over all selected experts' columns, so a
 * step pays five barriers instead of two parallel regions per expert. Guided scheduling hands each
 * thread long runs of neighbouring columns first (steady weight streams) and small ones at the end
 * (balance): 11 layers of 33 int8 experts, best of 10, 1 / 8 / 32 tokens: 361 / 1,746 / 6,305 us
 * per layer against 408 / 2,054 / 6,941 with chunks of 32 columns and 373 / 1,765 / 7,920 static.
 * x [T, D], ids and weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]: int8
 * with per-row scales s13 / s2 (activations rounded per row to int16, see gemm_int8.c), or fp32
 * (w_bf16 = 0) or bf16 when the scales are NULL. w_packed: bit 0 when w13, bit 1 when w2 is in panels
 * (full precision: each packed by pack_panels, its N a multiple of PANEL; int8: both, see
 * moe_int8_panels), which is what the CPU platform loads them as. Full precision: one MoE layer of the small benchmark model at 8 / 32 / 64 / 256 tokens, alternating, took
 * 0.88 / 0.69 / 0.70 / 0.71 of the row-major time in fp32 and 0.80 / 0.64 / 0.58 / 0.67 in bf16
 * (cold weights; 2,048 tokens 0.99 and 0.93), since no panel is transposed per call and a few rows
 * meet each weight vector in six-row outer products instead of four-row dot products. */
void moe_f32(const float* x, float* out, const int64_t* ids, const float* weights, int64_t T, int64_t K,
             int64_t E, const void* w13, const float* s13, const void* w2, const float* s2, int w_bf16,
             int w_packed, int64_t D, int64_t I, int threads) {
    const int64_t P = T * K, D32 = D & ~(int64_t)31, I32 = I & ~(int64_t)31;
    const int quantized = s13 != NULL;
    int64_t* offsets = calloc(E + 1, sizeof(int64_t));
    int64_t* row_of = malloc(sizeof(int64_t) * P);   /* (token, k) -> its row in expert order */
    int64_t* source = malloc(sizeof(int64_t) * P);   /* row -> token */
    for (int64_t p = 0; p < P; p++) offsets[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    {
        int64_t* fill = malloc(sizeof(int64_t) * E);
        for (int64_t e = 0; e < E; e++) fill[e] = offsets[e];
        for (int64_t p = 0; p < P; p++) {
            const int64_t row = fill[ids[p]]++;
            row_of[p] = row;
            source[row] = p / K;
        }
        free(fill);
    }
    const int packed13 = w_packed & 1, packed2 = w_packed >> 1 & 1;
    if (quantized && packed13 && packed2) {
        moe_int8_panels(x, out, weights, T, K, E, offsets, row_of, source, w13, s13, w2, s2, D, I, threads);
        free(offsets); free(row_of); free(source);
        return;
    }
    float* xs = malloc(sizeof(float) * P * D);
    float* h = malloc(sizeof(float) * P * 2 * I);
    float* ys = malloc(sizeof(float) * P * D);
    /* int16 rows of xs and of the SiLU products, and their scales (int8 weights only) */
    int16_t* xq = quantized ? malloc(sizeof(int16_t) * (P * D32 + 1)) : NULL;
    int16_t* hq = quantized ? malloc(sizeof(int16_t) * (P * I32 + 1)) : NULL;
    float* xq_scale = quantized ? malloc(sizeof(float) * P) : NULL;
    float* hq_scale = quantized ? malloc(sizeof(float) * P) : NULL;
    /* row blocks: int8 experts in blocks of at most ROW_BLOCK rows (see the work items below), fp32
     * ones whole, so that each transposes a panel of its weight once per call (gemm_cols_f32_panel) */
    int64_t num_blocks;
    int64_t* blocks = row_blocks(offsets, E, quantized ? ROW_BLOCK : (P > 0 ? P : 1), &num_blocks);
    /* work items: groups of output columns (4 for int8 weights, 2 for fp32) of every row block, the
     * groups of one block consecutive, so a thread's run of items reuses the block's rows from L2.
     * (With items of all of an expert's rows, the shared expert of a 2,048-token prefill re-read
     * 4 MB of rows from L3 for every group of four columns.) */
    const int64_t width = quantized ? 4 : PANEL;
    const int64_t groups13 = (2 * I + width - 1) / width, groups2 = (D + width - 1) / width;
#pragma omp parallel num_threads(threads)
    {
        float* panel = quantized || (packed13 && packed2) ? NULL : malloc(sizeof(float) * PANEL * (D > I ? D : I));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            for (int64_t d = 0; d < D; d++) xs[r * D + d] = x[source[r] * D + d];
            if (quantized) quantize_rows_i16(xs + r * D, D, 1, D, xq + r * D32, xq_scale + r);
        }
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < num_blocks * groups13; j++) {
            const int64_t* block = blocks + 3 * (j / groups13);
            const int64_t e = block[0], p0 = block[1], rows = block[2], n0 = width * (j % groups13);
            const int64_t n1 = n0 + width < 2 * I ? n0 + width : 2 * I;
            if (quantized)
                int8_cols(xs + p0 * D, D, xq + p0 * D32, xq_scale + p0, rows, D, (const int8_t*)w13 + e * 2 * I * D,
                          s13 + e * 2 * I, h + p0 * 2 * I, 2 * I, n0, n1);
            else if (packed13)  /* panel n0 / PANEL of expert e sits where its row n0 did */
                gemm_cols_packed(xs + p0 * D, D, w_at(w13, (e * 2 * I + n0) * D, w_bf16), w_bf16, D, h + p0 * 2 * I,
                                 2 * I, rows, n0, n1);
            else if (rows >= PANEL_MIN_ROWS)
                gemm_cols_f32_panel(xs + p0 * D, D, w_at(w13, e * 2 * I * D, w_bf16), w_bf16, D, h + p0 * 2 * I, 2 * I,
                                    rows, n0, n1, panel);
            else
                gemm_cols(xs + p0 * D, w_at(w13, e * 2 * I * D, w_bf16), w_bf16, h + p0 * 2 * I, rows, D, D, 2 * I,
                          n0, n1);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            float* row = h + r * 2 * I;
            silu_mul(row, I);
            if (quantized) quantize_rows_i16(row, 2 * I, 1, I, hq + r * I32, hq_scale + r);
        }
#pragma omp for schedule(guided)
        for (int64_t j = 0; j < num_blocks * groups2; j++) {
            const int64_t* block = blocks + 3 * (j / groups2);
            const int64_t e = block[0], p0 = block[1], rows = block[2], n0 = width * (j % groups2);
            const int64_t n1 = n0 + width < D ? n0 + width : D;
            if (quantized)
                int8_cols(h + p0 * 2 * I, 2 * I, hq + p0 * I32, hq_scale + p0, rows, I, (const int8_t*)w2 + e * D * I,
                          s2 + e * D, ys + p0 * D, D, n0, n1);
            else if (packed2)
                gemm_cols_packed(h + p0 * 2 * I, 2 * I, w_at(w2, (e * D + n0) * I, w_bf16), w_bf16, I, ys + p0 * D, D,
                                 rows, n0, n1);
            else if (rows >= PANEL_MIN_ROWS)
                gemm_cols_f32_panel(h + p0 * 2 * I, 2 * I, w_at(w2, e * D * I, w_bf16), w_bf16, I, ys + p0 * D, D, rows,
                                    n0, n1, panel);
            else
                gemm_cols(h + p0 * 2 * I, w_at(w2, e * D * I, w_bf16), w_bf16, ys + p0 * D, rows, I, 2 * I, D, n0,
                          n1);
        }
        weighted_sum(out, ys, weights, row_of, T, K, D);
        free(panel);
    }
    free(offsets); free(blocks); free(row_of); free(source); free(xs); free(h); free(ys);
    free(xq); free(hq); free(xq_scale); free(hq_scale);
}

/* fp32 GEMM over a weight repacked into panels of 16 output columns: y[M, N] = x[M, K] @ w[N, K]^T.
 * (int8 weights stay row-major: gemm_int8.c's integer products read them faster at every row count
 * that decode produces for the large K of the models.)
 *
 * A row-major weight makes every output a dot product: each 8-wide FMA needs a load of x as well as
 * of w, the tile's x rows stream from L2 for every pair of columns, and the 129,280 x 256 vocabulary
 * projection at 64 rows ran at about half the FMA peak. Repacked once at load, as wp[panel][k][16]
 * (row 16p + j, column k of the weight at wp[(p * K + k) * 16 + j]), a 6-row x 16-column tile is an
 * outer product: per k one panel row (two vectors) and six broadcasts of x feed twelve FMAs into
 * twelve independent accumulators, the panel stays in L1 for every block of rows, and the weight
 * streams from memory once, in order. Used for the vocabulary head (see CpuPlatform.prepare_linear).
 * Panel p is a transpose of rows 16p..16p+15, the very bytes it replaces, so packing works in place,
 * slab by slab; the last N % 16 rows go to a zero-padded panel of their own. A bf16 weight (a bf16
 * model's) is packed the same way, still bf16, each panel row's middle quarters swapped, so that one
 * 32-byte load and two unpacks with zero widen it (columns 0-7, then 8-15). Against two widening
 * loads, alternating runs, median ratio of 9: 129,280 x 1,024 at 1 / 8 / 32 / 64 rows 1.10x / 1.02x /
 * 1.01x / 1.05x faster (x 256: 1.04x / 1.01x / 1.09x / 1.03x).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_packed.h"
#include "simd.h"

#define TILE_ROWS 6
/* Bytes of a panel that every tile of rows reads before the next part (more than one tile of rows):
 * a whole panel of K = 1,024 fp32 (64 KB) is twice L1, so each tile re-read it from L2. In parts of
 * 16 KB, alternating against whole panels: the 129,280 x 1,024 head at 64 rows 0.94x the time, a
 * small-model decode step at 64 sequences (fp32) 0.955x, at 8 0.98x; one row is not split. */
#define CHUNK_BYTES (16 << 10)
/* Panel rows (k) ahead to prefetch. */
#define PREFETCH_ROWS 16
/* Rows of x per pass over all panels: as many as keep x's block within this many bytes of L2 next to
 * the panel, so a prefill's thousands of rows are not re-read from memory for every panel. */
#define ROW_BLOCK_BYTES (256 << 10)

/* panel[k][j] = w[j][k] for the first `rows` (at most PANEL) rows of a row-major fp32 or bf16 w, zero
 * beyond. */
static void transpose_panel(const void* w, int w_bf16, int64_t K, int64_t rows, float* panel) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < PANEL; j++) panel[k * PANEL + j] = j < rows ? scalar_w(w, j * K + k, w_bf16) : 0.0f;
}

/* Where column j of a panel row sits: in place, or for bf16 with columns 4-7 and 8-11 swapped, the
 * order in which vpunpcklwd / vpunpckhwd take the words of each 128-bit lane. */
static inline int64_t slot(int64_t j, int bf16) {
    return bf16 && j >= 4 && j < 12 ? (j < 8 ? j + 4 : j - 4) : j;
}

/* panel[k][slot(j)] = src[j][k] for the first `rows` (at most PANEL) rows of a row-major src, zero
 * beyond, in src's own type: bf16 is a constant where this is inlined, so each element is one typed
 * move (a memcpy per element of a runtime size made packing a 129,280 x 1,024 head 6x slower). */
static inline __attribute__((always_inline)) void pack_one(void* panel, const void* src, int64_t K, int64_t rows,
                                                           const int bf16) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < PANEL; j++) {
            const int64_t at = k * PANEL + slot(j, bf16);
            if (bf16) ((uint16_t*)panel)[at] = j < rows ? ((const uint16_t*)src)[j * K + k] : 0;
            else ((float*)panel)[at] = j < rows ? ((const float*)src)[j * K + k] : 0.0f;
        }
}

static void pack_panel(void* panel, const void* src, int64_t K, int64_t rows, int bf16) {
    if (bf16) pack_one(panel, src, K, rows, 1);
    else pack_one(panel, src, K, rows, 0);
}

/* Weights fp32 or (w_bf16) bf16: the element type is kept, only the order changes. `tail` may be NULL
 * when N is a multiple of PANEL. */
void pack_panels(void* w, void* tail, int64_t N, int64_t K, int w_bf16, int threads) {
    const int64_t full = N / PANEL, size = w_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        char* slab = malloc(size * PANEL * K);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < full; p++) {
            char* panel = (char*)w + p * PANEL * K * size;
            memcpy(slab, panel, size * PANEL * K);
            pack_panel(panel, slab, K, PANEL, w_bf16);
        }
        free(slab);
    }
    if (tail) pack_panel(tail, (const char*)w + full * PANEL * K * size, K, N - full * PANEL, w_bf16);
}

/* `rows` (1..TILE_ROWS) rows of x against one panel; `cols` (1..16) valid output columns; with `acc`,
 * added to what y holds (a later part of the panel's K). */
static inline __attribute__((always_inline)) void tile(const float* x, int64_t xi, int64_t xk, const void* wp, const int bf16,
                                                       int64_t K, float* y, int64_t ys, const int rows, int64_t cols,
                                                       int acc) {
    const int64_t size = bf16 ? 2 : 4;
    __m256 c0[TILE_ROWS], c1[TILE_ROWS];
    for (int i = 0; i < rows; i++) {
        if (!acc) {
            c0[i] = c1[i] = _mm256_setzero_ps();
        } else if (cols == PANEL) {
            c0[i] = _mm256_loadu_ps(y + i * ys);
            c1[i] = _mm256_loadu_ps(y + i * ys + 8);
        } else {
            float in[PANEL] = {0};
            memcpy(in, y + i * ys, cols * sizeof(float));
            c0[i] = _mm256_loadu_ps(in);
            c1[i] = _mm256_loadu_ps(in + 8);
        }
    }
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char*)wp + (k + PREFETCH_ROWS) * PANEL * size, _MM_HINT_T0);
        __m256 w0, w1;
        if (bf16) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)((const uint16_t*)wp + k * PANEL));
            w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
            w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
        } else {
            w0 = _mm256_loadu_ps((const float*)wp + k * PANEL);
            w1 = _mm256_loadu_ps((const float*)wp + k * PANEL + 8);
        }
        for (int i = 0; i < rows; i++) {
            const __m256 b = _mm256_broadcast_ss(x + i * xi + k * xk);
            c0[i] = _mm256_fmadd_ps(b, w0, c0[i]);
            c1[i] = _mm256_fmadd_ps(b, w1, c1[i]);
        }
    }
    for (int i = 0; i < rows; i++) {
        float out[PANEL];
        float* dst = cols == PANEL ? y + i * ys : out;
        _mm256_storeu_ps(dst, c0[i]);
        _mm256_storeu_ps(dst + 8, c1[i]);
        if (cols < PANEL) memcpy(y + i * ys, out, cols * sizeof(float));
    }
}

/* M rows of x against one panel: tiles of TILE_ROWS rows, then one tile of the rows left. Row i, column k
 * of tile t is x[t * xt + i * xi + k * xk]. */
static inline __attribute__((always_inline)) void rows_of(const float* x, int64_t xi, int64_t xk, int64_t xt,
                                                          const void* panel, const int bf16, int64_t K, float* y,
                                                          int64_t ys, int64_t M, int64_t cols, int acc) {
    int64_t m = 0, t = 0;
    for (; m + TILE_ROWS <= M; m += TILE_ROWS, t++)
        tile(x + t * xt, xi, xk, panel, bf16, K, y + m * ys, ys, TILE_ROWS, cols, acc);
    const float* xr = x + t * xt;
    float* yr = y + m * ys;
    switch (M - m) {
        case 5: tile(xr, xi, xk, panel, bf16, K, yr, ys, 5, cols, acc); break;
        case 4: tile(xr, xi, xk, panel, bf16, K, yr, ys, 4, cols, acc); break;
        case 3: tile(xr, xi, xk, panel, bf16, K, yr, ys, 3, cols, acc); break;
        case 2: tile(xr, xi, xk, panel, bf16, K, yr, ys, 2, cols, acc); break;
        case 1: tile(xr, xi, xk, panel, bf16, K, yr, ys, 1, cols, acc); break;
        default: break;
    }
}

static void panel_rows_x(const float* x, int64_t xi, int64_t xk, int64_t xt, const void* panel, int w_bf16, int64_t K,
                         float* y, int64_t ys, int64_t M, int64_t cols) {
    const int64_t chunk = M > TILE_ROWS ? CHUNK_BYTES / (PANEL * (w_bf16 ? 2 : 4)) : K;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kc = K - k0 < chunk ? K - k0 : chunk;
        const void* part = w_at(panel, k0 * PANEL, w_bf16);
        if (w_bf16) rows_of(x + k0 * xk, xi, xk, xt, part, 1, kc, y, ys, M, cols, k0 > 0);
        else rows_of(x + k0 * xk, xi, xk, xt, part, 0, kc, y, ys, M, cols, k0 > 0);
    }
}

static void panel_rows(const float* x, int64_t xs, const void* panel, int w_bf16, int64_t K, float* y, int64_t ys,
                       int64_t M, int64_t cols) {
    panel_rows_x(x, xs, 1, TILE_ROWS * xs, panel, w_bf16, K, y, ys, M, cols);
}

/* Rows [0, M) of x as tiles of TILE_ROWS rows, each k's rows together (tile t, row i, column k at
 * xp[(t * K + k) * TILE_ROWS + i], rows past M zero), so a tile's broadcasts read one sequential
 * stream instead of six rows 4 KB apart. Alternating builds: the 129,280 x 1,024 head at 64 rows
 * 0.96x the time; a 64-sequence fp32 decode step of the small model 0.986x and 0.989x, its prefill
 * 0.97x and 1.00x. */
static void pack_rows(const float* x, int64_t xs, int64_t M, int64_t K, float* xp) {
    const int64_t tiles = (M + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float* dst = xp + t * K * TILE_ROWS;
        const int64_t rows = M - t * TILE_ROWS < TILE_ROWS ? M - t * TILE_ROWS : TILE_ROWS;
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < TILE_ROWS; i++) dst[k * TILE_ROWS + i] = i < rows ? x[(t * TILE_ROWS + i) * xs + k] : 0.0f;
    }
}

/* Each thread takes whole panels; within a panel every tile of rows reuses it from L1 (or L2). The rows
 * of a block are packed first (pack_rows), by both threads, when there is more than one tile. */
void gemm_f32_packed(const float* x, const void* wp, const void* tail, int w_bf16, float* y, int64_t M, int64_t N,
                     int64_t K, int64_t x_stride, int64_t y_stride, int threads) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
    int64_t block = ROW_BLOCK_BYTES / (K * (int64_t)sizeof(float)) / TILE_ROWS * TILE_ROWS;
    if (block < TILE_ROWS) block = TILE_ROWS;
    const int pack = M > TILE_ROWS;
    float* xp = pack ? malloc(sizeof(float) * K * ((block < M ? block : M) + TILE_ROWS)) : NULL;
#pragma omp parallel num_threads(threads)
    for (int64_t mb = 0; mb < M; mb += block) {
        const int64_t me = mb + block < M ? mb + block : M;
        if (pack) pack_rows(x + mb * x_stride, x_stride, me - mb, K, xp);  /* ends in a barrier */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const void* panel = p < N / PANEL ? w_at(wp, p * K * PANEL, w_bf16) : tail;
            const int64_t n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
            if (pack) panel_rows_x(xp, 1, TILE_ROWS, K * TILE_ROWS, panel, w_bf16, K, y + mb * y_stride + n0, y_stride, me - mb, cols);
            else panel_rows(x + mb * x_stride, x_stride, panel, w_bf16, K, y + mb * y_stride + n0, y_stride, me - mb, cols);
        }
    }
    free(xp);
}

/* Output columns [n0, n1) (at most 16, from a multiple of 16) of y = x @ w^T for M rows of a weight
 * packed by pack_panels, whose panel n0 / 16 starts at `panel`. */
void gemm_cols_packed(const float* x, int64_t xs, const void* panel, int w_bf16, int64_t K, float* y, int64_t ys,
                      int64_t M, int64_t n0, int64_t n1) {
    panel_rows(x, xs, panel, w_bf16, K, y + n0, ys, M, n1 - n0);
}

/* Output columns [n0, n1) (at most 16) of y = x @ w^T for M rows of a row-major w: the columns are
 * first transposed into `panel` (16 x K floats), then multiplied as above. The grouped fp32 experts
 * of a prefill use it: their row-major weights through the 4 x 2 tiles of gemm.c ran at ~37 GMAC/s
 * at 2,048 tokens, each FMA paying a load of x. */
void gemm_cols_f32_panel(const float* x, int64_t xs, const void* w, int w_bf16, int64_t K, float* y, int64_t ys,
                         int64_t M, int64_t n0, int64_t n1, float* panel) {
    transpose_panel(w_at(w, n0 * K, w_bf16), w_bf16, K, n1 - n0, panel);
    panel_rows(x, xs, panel, 0, K, y + n0, ys, M, n1 - n0);
}

/* int8 weights in panels against fp32 activations rounded per row to int16, as outer products:
 * y[M, N] = x[M, K] @ (q[N, K] * scale[N])^T, for the vocabulary head of an int8 model and for the
 * int8 screen of a full-precision one (greedy_head.c).
 *
 * The row-major int8 kernel (gemm_int8.c) forms dot products: at 64 rows it re-reads x from L2 for
 * every pair of weight rows, ~70 G multiply-adds a second on 2 cores on the 129,280 x 1,024 head.
 * Here the weight is stored in panels of 16 rows, each pair of k as 16 x 2 bytes
 * (qp[p][t][j][i] = q[16p + j][2t + i], zero-padded), which one vpmovsxbw per 8 columns widens to
 * int16; each row of x contributes its pair of int16 as one broadcast 32-bit word, and vpmaddwd sums
 * the pair into eight int32 lanes: 16 multiply-adds an instruction against 8 for an fp32 FMA, the
 * panel (16 KB at K = 1,024) in L1 for every tile of six rows. Each row of x is rounded on its own
 * (max |x| -> 32767, gemm_int8.c's rule), so its result does not depend on the batch.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_int8_panels.h"
#include "simd.h"

#define TILE_ROWS I8P_TILE_ROWS
/* k-pairs per part of a panel: an int32 lane gains at most 2 x 32767 x 127 a pair, so 256 pairs stay
 * below 2^31; a part's 8 KB of panel stays in L1 for every tile of rows. */
#define PART_PAIRS 256
/* Rows of x per pass over all panels, so their int16 tiles stay in L2. */
#define ROW_BLOCK_BYTES (192 << 10)
/* Bytes of panel ahead to prefetch when few rows share it: one row's products stream the panel as
 * fast as memory allows only with it (the 129,280 x 1,024 head at one row: 1.22x the row-major
 * kernel's time without, 1.01-1.07x with 4 KB; 1, 8 and 16 KB ahead no different). */
#define PREFETCH_AHEAD 4096

/* Row m of x rounded to int16 (gemm_int8.c's rule, bit for bit) in its tile of xp ([tile][pair][TILE_ROWS]
 * words, each the int16 pair of k = 2t, 2t + 1), with its scale; with `norms`, also the norms the
 * screen needs (greedy_head.c), in double. Vectorized: element by element, with the norms, rounding
 * 512 rows took 2.4 ms of their 7.9 ms product with a 1,024 x 1,024 int8 weight (now 0.4). */
void int8_panels_quantize_row(const float* x, int64_t K, int64_t m, int32_t* xp, Int16Row* row, int norms) {
    const int64_t pairs = i8p_pairs(K), K8 = K & ~(int64_t)7;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax8 = _mm256_setzero_ps(), nan8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v, abs_mask));
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], amax = 0.0f;
    int finite = _mm256_movemask_ps(nan8) == 0;
    _mm256_storeu_ps(lanes, amax8);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (int64_t k = K8; k < K; k++) {
        const float a = fabsf(x[k]);
        finite &= a <= INFINITY; /* false for NaN */
        amax = a > amax ? a : amax;
    }
    finite &= amax < INFINITY;
    /* a NaN or inf anywhere makes the whole row's outputs NaN, as the fp32 product would */
    const float scale = finite ? amax / 32767.0f : NAN, inv = finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
    int32_t* words = xp + (m / TILE_ROWS) * pairs * TILE_ROWS + m % TILE_ROWS;
    const __m256 inv8 = _mm256_set1_ps(inv);
    int64_t k = 0;
    for (; finite && k + 16 <= K; k += 16) {
        /* cvtps rounds to nearest even, as lrintf does; packs leaves 128-bit lanes interleaved */
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv8));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv8));
        int32_t w[8];
        _mm256_storeu_si256((__m256i*)w, _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
        for (int j = 0; j < 8; j++) words[(k / 2 + j) * TILE_ROWS] = w[j];
    }
    for (; k < K; k += 2) {
        const int16_t q0 = finite ? (int16_t)lrintf(x[k] * inv) : 0;
        const int16_t q1 = finite && k + 1 < K ? (int16_t)lrintf(x[k + 1] * inv) : 0;
        words[k / 2 * TILE_ROWS] = (int32_t)((uint32_t)(uint16_t)q0 | (uint32_t)(uint16_t)q1 << 16);
    }
    *row = (Int16Row){scale, 0.0, 0.0, 0.0};
    if (!norms) return;
    double xx = 0.0, qq = 0.0, dd = 0.0;
    for (int64_t i = 0; i < K; i++) {
        const int16_t q = (int16_t)((uint32_t)words[i / 2 * TILE_ROWS] >> (16 * (i & 1)));
        const double v = x[i], r = (double)scale * q;
        xx += v * v;
        qq += r * r;
        dd += (v - r) * (v - r);
    }
    const double up = 1.0 + 1e-9;
    *row = (Int16Row){scale, sqrt(xx) * up, sqrt(qq) * up, sqrt(dd) * up};
}

void int8_panels_quantize(const float* x, int64_t xs, int64_t M, int64_t K, int32_t* xp, Int16Row* rows, int norms) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) int8_panels_quantize_row(x + m * xs, K, m, xp, rows + m, norms);
}

/* Row i of a tile: its sums (two vectors of 8 columns) into y, added to what y holds when `acc`, and
 * with row_scale (the last part of K) scaled by row_scale[i] * col_scale[j]. */
static inline void store_row(__m256i c0, __m256i c1, float* y, int acc, const Int16Row* row_scale,
                             const float* col_scale) {
    __m256 f0 = _mm256_cvtepi32_ps(c0), f1 = _mm256_cvtepi32_ps(c1);
    if (acc) {
        f0 = _mm256_add_ps(f0, _mm256_loadu_ps(y));
        f1 = _mm256_add_ps(f1, _mm256_loadu_ps(y + 8));
    }
    if (row_scale) {
        const __m256 s = _mm256_set1_ps(row_scale->scale);
        f0 = _mm256_mul_ps(f0, _mm256_mul_ps(s, _mm256_loadu_ps(col_scale)));
        f1 = _mm256_mul_ps(f1, _mm256_mul_ps(s, _mm256_loadu_ps(col_scale + 8)));
    }
    _mm256_storeu_ps(y, f0);
    _mm256_storeu_ps(y + 8, f1);
}

/* `rows` rows of x (their tile's words from pair 0 of the part) against one part of a panel. */
static inline __attribute__((always_inline)) void tile(const int32_t* xp, const int8_t* panel, int64_t pairs,
                                                       const int rows, float* y, int64_t ys, int acc,
                                                       const Int16Row* row_scale, const float* col_scale) {
    __m256i c0[TILE_ROWS], c1[TILE_ROWS];
    for (int i = 0; i < rows; i++) c0[i] = c1[i] = _mm256_setzero_si256();
    for (int64_t t = 0; t < pairs; t++) {
        if (rows < 4 && !(t & 1)) _mm_prefetch((const char*)(panel + t * 2 * PANEL + PREFETCH_AHEAD), _MM_HINT_T0);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + t * 2 * PANEL)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + t * 2 * PANEL + PANEL)));
        for (int i = 0; i < rows; i++) {
            const __m256i b = _mm256_set1_epi32(xp[t * TILE_ROWS + i]);
            c0[i] = _mm256_add_epi32(c0[i], _mm256_madd_epi16(b, w0));
            c1[i] = _mm256_add_epi32(c1[i], _mm256_madd_epi16(b, w1));
        }
    }
    for (int i = 0; i < rows; i++) store_row(c0[i], c1[i], y + i * ys, acc, row_scale ? row_scale + i : NULL, col_scale);
}

/* tile() for six rows, in asm: GCC 12 keeps only some of the twelve sums of the intrinsic form in
 * registers and spills the rest, a store-to-load round trip in every iteration. */
static void tile6(const int32_t* xp, const int8_t* panel, int64_t pairs, float* y, int64_t ys, int acc,
                  const Int16Row* row_scale, const float* col_scale) {
    /* the sums pinned to ymm0-11: left to choose, GCC 12 put some in the asm's scratch registers and
     * moved them in and out of the stack around every iteration (1.2x the row-major kernel's time) */
    register __m256i c00 __asm__("ymm0") = _mm256_setzero_si256(), c01 __asm__("ymm1") = c00;
    register __m256i c10 __asm__("ymm2") = c00, c11 __asm__("ymm3") = c00, c20 __asm__("ymm4") = c00;
    register __m256i c21 __asm__("ymm5") = c00, c30 __asm__("ymm6") = c00, c31 __asm__("ymm7") = c00;
    register __m256i c40 __asm__("ymm8") = c00, c41 __asm__("ymm9") = c00, c50 __asm__("ymm10") = c00;
    register __m256i c51 __asm__("ymm11") = c00;
    for (int64_t t = 0; t < pairs; t++) {
        const int8_t* w = panel + t * 2 * PANEL;
        const int32_t* xt = xp + t * TILE_ROWS;
        __asm__(
            "vpmovsxbw (%[w]), %%ymm12\n\t"
            "vpmovsxbw 16(%[w]), %%ymm13\n\t"
#define ZZ_ROW(OFF, A0, A1)                                  \
            "vpbroadcastd " OFF "(%[x]), %%ymm14\n\t"      \
            "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"       \
            "vpaddd %%ymm15, %[" A0 "], %[" A0 "]\n\t"     \
            "vpmaddwd %%ymm14, %%ymm13, %%ymm15\n\t"       \
            "vpaddd %%ymm15, %[" A1 "], %[" A1 "]\n\t"
            ZZ_ROW("0", "c00", "c01") ZZ_ROW("4", "c10", "c11") ZZ_ROW("8", "c20", "c21")
            ZZ_ROW("12", "c30", "c31") ZZ_ROW("16", "c40", "c41") ZZ_ROW("20", "c50", "c51")
#undef ZZ_ROW
            : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),
              [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41), [c50] "+x"(c50), [c51] "+x"(c51)
            : [w] "r"(w), [x] "r"(xt)
            : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
    const __m256i sums[TILE_ROWS][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < TILE_ROWS; i++)
        store_row(sums[i][0], sums[i][1], y + i * ys, acc, row_scale ? row_scale + i : NULL, col_scale);
}

/* Rows [0, M) of xp's tiles against one part of a panel (the intrinsic five-row tile spills too, so
 * five rows go as four and one). */
static void tile_rows(const int32_t* xp, int64_t pairs, const int8_t* part, int64_t part_pairs, float* y, int64_t ys,
                      int64_t M, int acc, const Int16Row* row_scale, const float* col_scale) {
    for (int64_t m = 0; m < M; m += TILE_ROWS) {
        const int32_t* x = xp + (m / TILE_ROWS) * pairs * TILE_ROWS;
        float* yt = y + m * ys;
        const Int16Row* rs = row_scale ? row_scale + m : NULL;
        switch (M - m < TILE_ROWS ? M - m : TILE_ROWS) {
            case 6: tile6(x, part, part_pairs, yt, ys, acc, rs, col_scale); break;
            case 5:
                tile(x, part, part_pairs, 4, yt, ys, acc, rs, col_scale);
                tile(x + 4, part, part_pairs, 1, yt + 4 * ys, ys, acc, rs ? rs + 4 : NULL, col_scale);
                break;
            case 4: tile(x, part, part_pairs, 4, yt, ys, acc, rs, col_scale); break;
            case 3: tile(x, part, part_pairs, 3, yt, ys, acc, rs, col_scale); break;
            case 2: tile(x, part, part_pairs, 2, yt, ys, acc, rs, col_scale); break;
            default: tile(x, part, part_pairs, 1, yt, ys, acc, rs, col_scale); break;
        }
    }
}

void int8_panel_rows(const int32_t* xp, int64_t pairs, int64_t M, const int8_t* panel, const Int16Row* rows,
                     const float* col_scale, float* y, int64_t ys) {
    for (int64_t t0 = 0; t0 < pairs; t0 += PART_PAIRS) {
        const int64_t len = pairs - t0 < PART_PAIRS ? pairs - t0 : PART_PAIRS;
        const int last = t0 + len == pairs;
        tile_rows(xp + t0 * TILE_ROWS, pairs, panel + t0 * 2 * PANEL, len, y, ys, M, t0 > 0,
                  last && col_scale ? rows : NULL, col_scale);
    }
}

void int8_panels_products(const int32_t* xp, const Int16Row* rows, int64_t M, int64_t K, const int8_t* qp, int64_t N,
                          const float* col_scale, float* y, int64_t ys) {
    const int64_t pairs = i8p_pairs(K), panels = (N + PANEL - 1) / PANEL;
    const int64_t block = i8p_row_block(K);
    for (int64_t mb = 0; mb < M; mb += block) {
        const int64_t count = M - mb < block ? M - mb : block;
        const int32_t* xb = xp + (mb / TILE_ROWS) * pairs * TILE_ROWS;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++)
            int8_panel_rows(xb, pairs, count, qp + p * pairs * 2 * PANEL, rows + mb,
                            col_scale ? col_scale + p * PANEL : NULL, y + mb * ys + p * PANEL, ys);
    }
}

int64_t i8p_row_block(int64_t K) {
    const int64_t block = ROW_BLOCK_BYTES / (i8p_pairs(K) * 4) / TILE_ROWS * TILE_ROWS;
    return block < TILE_ROWS ? TILE_ROWS : block;
}

/* y = x @ (q * scale)^T for M fp32 rows of x and an int8 weight in panels (qp), its per-row scales
 * `scale [N]`: the exported entry (CpuPlatform.int8_linear on a weight prepare_linear put in panels). */
void int8_gemm_panels_f32(const float* x, int64_t xs, int64_t M, int64_t K, const int8_t* qp, const float* scale,
                          int64_t N, float* y, int64_t ys, int threads) {
    const int64_t panels = (N + PANEL - 1) / PANEL, Np = panels * PANEL;
    int32_t* xp = malloc(sizeof(int32_t) * (i8p_words(M, K) + 1)); /* every word a row of x reads is written */
    Int16Row* rows = malloc(sizeof(Int16Row) * (M + 1));
    /* the last panel's padding columns need room: padded scales and a scratch output, unless N is
     * whole panels */
    float* col_scale = NULL;
    if (Np != N) {
        col_scale = calloc(Np, sizeof(float));
        memcpy(col_scale, scale, sizeof(float) * N);
    }
    float* out = Np == N ? y : malloc(sizeof(float) * M * Np);
    const int64_t out_stride = Np == N ? ys : Np;
#pragma omp parallel num_threads(threads)
    {
        int8_panels_quantize(x, xs, M, K, xp, rows, 0);
        int8_panels_products(xp, rows, M, K, qp, N, col_scale ? col_scale : scale, out, out_stride);
    }
    if (out != y) {
        for (int64_t m = 0; m < M; m++) memcpy(y + m * ys, out + m * Np, sizeof(float) * N);
        free(out);
    }
    free(xp);
    free(rows);
    free(col_scale);
}

/* Greedy tokens from a packed full-precision vocabulary head, without its full product.
 *
 * A greedy row needs only the argmax of its logits. At 64 decode rows the fp32 head of a DeepSeek
 * vocabulary (129,280 x 1,024) is compute-bound at the FMA rate, a third of a decode step. So an int8
 * copy of the head screens first, and the few tokens that could still win are recomputed exactly:
 *
 *   x = X^ + dx (X^ the row rounded to int16 with one scale), w_n = W^_n + dw_n (W^_n the int8 row
 *   with its scale), so by Cauchy-Schwarz
 *   |x.w_n - L~_n| <= |X^| |dw_n| + |dx| (|dw_n| + |W^_n|) + delta (|x| |w_n| + |X^| |W^_n|) = E_n,
 *
 * delta covering fp32 rounding, both of the exact sums (K u) and of the screen's conversions and
 * scalings. Every token whose fp32 logit could be the largest has L~_n + E_n >= max_j (L~_j - E_j).
 * On the small benchmark model that leaves ~8 tokens a row (25 at most). They are recomputed with the
 * very panel products of the full head (gemm_cols_packed: one fixed order of fused multiply-adds per
 * column, whatever the number of rows), so the token is the fp32 head's argmax bit for bit, ties to
 * the first index. A row whose screen settles nothing (non-finite values, or too many tokens in the
 * window) gets the full product.
 *
 * The screen's products are outer products, as the fp32 panels' are: the int8 head is stored in
 * panels of 16 rows, each pair of k as 16 x 2 bytes, which one vpmovsxbw per 8 columns widens to
 * int16; each row of x contributes its pair of int16 as one broadcast 32-bit word, and vpmaddwd sums
 * the pair into eight int32 lanes: 16 multiply-adds an instruction against 8 for an fp32 FMA, the
 * panel (16 KB at K = 1,024) in L1 for every tile of rows.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_packed.h"
#include "simd.h"

#define TILE_ROWS 6
/* k-pairs per part of a panel: an int32 lane gains at most 2 x 32767 x 127 a pair, so 256 pairs stay
 * below 2^31; a part's 8 KB of panel stays in L1 for every tile of rows. */
#define PART_PAIRS 256
/* Rows of x per pass over all panels, so their int16 tiles stay in L2. */
#define ROW_BLOCK_BYTES (192 << 10)
/* Columns screened per block: the block's screen logits are read twice, the second time from L1. */
#define BLOCK 1024

void argmax_rows_f32(const float* x, int64_t stride, int64_t rows, int64_t cols, int64_t* out, int threads);

/* One row of x: its int16 scale and the norms of the bound, in double, rounded up a little. */
typedef struct {
    float scale;
    double x_norm, xq_norm, dx_norm;
} RowScreen;

/* Row m of x to int16 (max |x| -> 32767) in its tile of xp ([tile][pair][TILE_ROWS] words, each the
 * int16 pair of k = 2t, 2t + 1), with its norms. A row with a NaN or inf gets a NaN scale. */
static void quantize_row(const float* x, int64_t K, int64_t pairs, int64_t m, int32_t* xp, RowScreen* rs) {
    float amax = 0.0f;
    int finite = 1;
    for (int64_t k = 0; k < K; k++) {
        const float a = fabsf(x[k]);
        finite &= a <= INFINITY; /* false for NaN */
        amax = a > amax ? a : amax;
    }
    finite &= amax < INFINITY;
    const float scale = finite ? amax / 32767.0f : NAN, inv = finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
    int32_t* words = xp + (m / TILE_ROWS) * pairs * TILE_ROWS + m % TILE_ROWS;
    double xx = 0.0, qq = 0.0, dd = 0.0;
    for (int64_t t = 0; t < pairs; t++) {
        int16_t q[2] = {0, 0};
        for (int i = 0; i < 2 && 2 * t + i < K; i++) {
            const float v = x[2 * t + i];
            q[i] = (int16_t)lrintf(v * inv);
            const double r = (double)scale * q[i];
            xx += (double)v * v;
            qq += r * r;
            dd += (v - r) * (v - r);
        }
        words[t * TILE_ROWS] = (int32_t)((uint32_t)(uint16_t)q[0] | (uint32_t)(uint16_t)q[1] << 16);
    }
    const double up = 1.0 + 1e-9;
    *rs = (RowScreen){scale, sqrt(xx) * up, sqrt(qq) * up, sqrt(dd) * up};
}

/* `rows` rows of x (their tile's words from pair 0 of the part) against one part of a panel: integer
 * sums of `pairs` pairs into y (fp32, 16 columns a row), added to what y holds when `acc`. */
static inline __attribute__((always_inline)) void screen_tile(const int32_t* xp, const int8_t* panel, int64_t pairs,
                                                              const int rows, float* y, int64_t ys, int acc) {
    __m256i c0[TILE_ROWS], c1[TILE_ROWS];
    for (int i = 0; i < rows; i++) c0[i] = c1[i] = _mm256_setzero_si256();
    for (int64_t t = 0; t < pairs; t++) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + t * 2 * PANEL)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(panel + t * 2 * PANEL + PANEL)));
        for (int i = 0; i < rows; i++) {
            const __m256i b = _mm256_set1_epi32(xp[t * TILE_ROWS + i]);
            c0[i] = _mm256_add_epi32(c0[i], _mm256_madd_epi16(b, w0));
            c1[i] = _mm256_add_epi32(c1[i], _mm256_madd_epi16(b, w1));
        }
    }
    for (int i = 0; i < rows; i++) {
        __m256 f0 = _mm256_cvtepi32_ps(c0[i]), f1 = _mm256_cvtepi32_ps(c1[i]);
        if (acc) {
            f0 = _mm256_add_ps(f0, _mm256_loadu_ps(y + i * ys));
            f1 = _mm256_add_ps(f1, _mm256_loadu_ps(y + i * ys + 8));
        }
        _mm256_storeu_ps(y + i * ys, f0);
        _mm256_storeu_ps(y + i * ys + 8, f1);
    }
}

/* screen_tile for six rows, in asm: GCC 12 keeps only some of the twelve sums of the intrinsic form in
 * registers and spills the rest, a store-to-load round trip in every iteration. */
static void screen_tile6(const int32_t* xp, const int8_t* panel, int64_t pairs, float* y, int64_t ys, int acc) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
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
        for (int h = 0; h < 2; h++) {
            __m256 f = _mm256_cvtepi32_ps(sums[i][h]);
            if (acc) f = _mm256_add_ps(f, _mm256_loadu_ps(y + i * ys + 8 * h));
            _mm256_storeu_ps(y + i * ys + 8 * h, f);
        }
}

/* Rows [0, M) of xp's tiles against one part of a panel. */
static void screen_rows(const int32_t* xp, int64_t pairs, const int8_t* part, int64_t part_pairs, float* y, int64_t ys,
                        int64_t M, int acc) {
    for (int64_t m = 0; m < M; m += TILE_ROWS) {
        const int32_t* tile = xp + (m / TILE_ROWS) * pairs * TILE_ROWS;
        float* yt = y + m * ys;
        switch (M - m < TILE_ROWS ? M - m : TILE_ROWS) {
            case 6: screen_tile6(tile, part, part_pairs, yt, ys, acc); break;
            case 5: screen_tile(tile, part, part_pairs, 5, yt, ys, acc); break;
            case 4: screen_tile(tile, part, part_pairs, 4, yt, ys, acc); break;
            case 3: screen_tile(tile, part, part_pairs, 3, yt, ys, acc); break;
            case 2: screen_tile(tile, part, part_pairs, 2, yt, ys, acc); break;
            default: screen_tile(tile, part, part_pairs, 1, yt, ys, acc); break;
        }
    }
}

typedef struct {
    int64_t* ids;
    int64_t len, cap;
} Candidates;

static int push(Candidates* c, int64_t n) {
    if (c->len == c->cap) return 0;
    c->ids[c->len++] = n;
    return 1;
}

/* Tokens of one row whose logit could be the largest, in increasing order: screen logit
 * L~_n = sums[n] * x_scale * w_scale[n], bound E_n = c1 dw[n] + c2 g[n]. 0 when the screen settles
 * nothing (the caller then takes the full product). */
static int screen_row(const float* sums, int64_t N, float x_scale, const float* w_scale, const float* dw,
                      const float* g, float c1, float c2, Candidates* cand) {
    const __m256 v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), vx = _mm256_set1_ps(x_scale);
#define SCREEN_AT(i) _mm256_mul_ps(_mm256_loadu_ps(a + (i)), _mm256_mul_ps(vx, _mm256_loadu_ps(s + (i))))
#define BOUND_AT(i) _mm256_fmadd_ps(v1, _mm256_loadu_ps(d + (i)), _mm256_mul_ps(v2, _mm256_loadu_ps(gg + (i))))
    float lower = -INFINITY;
    cand->len = 0;
    for (int64_t b = 0; b < N; b += BLOCK) {
        const int64_t len = N - b < BLOCK ? N - b : BLOCK, full = len & ~(int64_t)7;
        const float *a = sums + b, *s = w_scale + b, *d = dw + b, *gg = g + b;
        __m256 lo8 = _mm256_set1_ps(-INFINITY);
        for (int64_t i = 0; i < full; i += 8) lo8 = _mm256_max_ps(lo8, _mm256_sub_ps(SCREEN_AT(i), BOUND_AT(i)));
        float lanes[8];
        _mm256_storeu_ps(lanes, lo8);
        for (int i = 0; i < 8; i++) lower = lanes[i] > lower ? lanes[i] : lower;
        for (int64_t i = full; i < len; i++) {
            const float lo = a[i] * (x_scale * s[i]) - (c1 * d[i] + c2 * gg[i]);
            lower = lo > lower ? lo : lower;
        }
        if (!(lower > -INFINITY) || lower == INFINITY) return 0; /* overflow in the screen */
        const __m256 l8 = _mm256_set1_ps(lower);
        for (int64_t i = 0; i < full; i += 8) {
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(SCREEN_AT(i), BOUND_AT(i)), l8, _CMP_GE_OQ));
            while (mask) {
                if (!push(cand, b + i + __builtin_ctz(mask))) return 0;
                mask &= mask - 1;
            }
        }
        for (int64_t i = full; i < len; i++)
            if (a[i] * (x_scale * s[i]) + (c1 * d[i] + c2 * gg[i]) >= lower && !push(cand, b + i)) return 0;
    }
#undef SCREEN_AT
#undef BOUND_AT
    /* the window only narrows as `lower` rises: keep those still in it */
    int64_t kept = 0;
    for (int64_t i = 0; i < cand->len; i++) {
        const int64_t n = cand->ids[i];
        if (sums[n] * (x_scale * w_scale[n]) + (c1 * dw[n] + c2 * g[n]) >= lower) cand->ids[kept++] = n;
    }
    cand->len = kept;
    return kept > 0;
}

/* The fp32 head's argmax over the candidates, each logit as the full product computes it; -1 when
 * one is not finite (the full product then decides, with its NaN rule). */
static int64_t exact_argmax(const float* x, const void* wp, const void* tail, int w_bf16, int64_t N, int64_t K,
                            const Candidates* cand) {
    const int64_t full_panels = N / PANEL;
    float logits[PANEL];
    int64_t best = -1, panel = -1;
    float best_value = 0.0f;
    for (int64_t i = 0; i < cand->len; i++) {
        const int64_t n = cand->ids[i], p = n / PANEL;
        if (p != panel) {
            panel = p;
            const int64_t n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
            const void* at = p < full_panels ? w_at(wp, p * K * PANEL, w_bf16) : tail;
            gemm_cols_packed(x, K, at, w_bf16, K, logits, PANEL, 1, 0, cols);
        }
        const float v = logits[n - p * PANEL];
        if (!isfinite(v)) return -1;
        if (best < 0 || v > best_value) {
            best = n;
            best_value = v;
        }
    }
    return best;
}

/* out[m] = argmax_n x[m] . w[n] for M fp32 rows of x, w the head packed by pack_panels (wp, tail;
 * fp32 or w_bf16), and for the screen: qp, its int8 rows in panels ([N / 16 rounded up][K / 2 rounded
 * up][16 x 2], zero-padded), their scales (w_scale, zero-padded to whole panels), and per row
 * dw[n] = |w_n - W^_n| and g[n] = max(|w_n|, |W^_n|), as cpu_kernels.greedy_screen made them. */
void greedy_head_f32(const float* x, int64_t xs, int64_t M, int64_t K, const void* wp, const void* tail, int w_bf16,
                     int64_t N, const int8_t* qp, const float* w_scale, const float* dw, const float* g, int64_t* out,
                     int threads) {
    const int64_t pairs = (K + 1) / 2, panels = (N + PANEL - 1) / PANEL, Np = panels * PANEL;
    const int64_t tiles = (M + TILE_ROWS - 1) / TILE_ROWS;
    int64_t block = ROW_BLOCK_BYTES / (pairs * 4) / TILE_ROWS * TILE_ROWS;
    if (block < TILE_ROWS) block = TILE_ROWS;
    int32_t* xp = calloc(tiles * pairs * TILE_ROWS, sizeof(int32_t));
    RowScreen* rs = malloc(sizeof(RowScreen) * M);
    float* sums = malloc(sizeof(float) * M * Np);
    /* fp32 rounding: of the exact sums (at most K u relative to sum |x_k w_k| <= |x| |w|) and of the
     * screen's conversions, partial sums and scalings (a few u of |X^| |W^|), doubled */
    const double delta = (double)(K + 64) * ldexp(1.0, -23);
    const int64_t cap = N / 16 > 64 ? N / 16 : 64;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * xs, K, pairs, m, xp, rs + m);
        for (int64_t mb = 0; mb < M; mb += block) {
            const int64_t rows = M - mb < block ? M - mb : block;
            const int32_t* xb = xp + (mb / TILE_ROWS) * pairs * TILE_ROWS;
#pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++)
                for (int64_t t0 = 0; t0 < pairs; t0 += PART_PAIRS) {
                    const int64_t len = pairs - t0 < PART_PAIRS ? pairs - t0 : PART_PAIRS;
                    screen_rows(xb + t0 * TILE_ROWS, pairs, qp + (p * pairs + t0) * 2 * PANEL, len,
                                sums + mb * Np + p * PANEL, Np, rows, t0 > 0);
                }
        }
        Candidates cand = {malloc(sizeof(int64_t) * cap), 0, cap};
#pragma omp for schedule(dynamic, 1)
        for (int64_t m = 0; m < M; m++) {
            const float* row = x + m * xs;
            const RowScreen r = rs[m];
            /* E_n <= (|X^| + |dx|) dw_n + (|dx| + delta (|x| + |X^|)) g_n, coefficients rounded up */
            const float c1 = (float)((r.xq_norm + r.dx_norm) * (1.0 + 1e-6));
            const float c2 = (float)((r.dx_norm + delta * (r.x_norm + r.xq_norm)) * (1.0 + 1e-6));
            int64_t token = -1;
            if (isfinite(r.scale) && isfinite(c1) && isfinite(c2) &&
                screen_row(sums + m * Np, N, r.scale, w_scale, dw, g, c1, c2, &cand))
                token = exact_argmax(row, wp, tail, w_bf16, N, K, &cand);
            if (token < 0) { /* the full product of this row, in its screen's place */
                float* logits = sums + m * Np;
                gemm_f32_packed(row, wp, tail, w_bf16, logits, 1, N, K, xs, N, 1);
                argmax_rows_f32(logits, N, 1, N, &token, 1);
            }
            out[m] = token;
        }
        free(cand.ids);
    }
    free(xp);
    free(rs);
    free(sums);
}

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
 * The screen is the int8 panel product of gemm_int8_panels.c.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_int8_panels.h"
#include "gemm_packed.h"
#include "simd.h"

/* Columns screened per block: the block's screen logits are read twice, the second time from L1. */
#define BLOCK 1024

void argmax_rows_f32(const float* x, int64_t stride, int64_t rows, int64_t cols, int64_t* out, int threads);

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
    const int64_t Np = (N + PANEL - 1) / PANEL * PANEL;
    int32_t* xp = malloc(sizeof(int32_t) * (i8p_words(M, K) + 1)); /* every word a row of x reads is written */
    Int16Row* rs = malloc(sizeof(Int16Row) * (M + 1));
    float* sums = malloc(sizeof(float) * M * Np);
    /* fp32 rounding: of the exact sums (at most K u relative to sum |x_k w_k| <= |x| |w|) and of the
     * screen's conversions, partial sums and scalings (a few u of |X^| |W^|), doubled */
    const double delta = (double)(K + 64) * ldexp(1.0, -23);
    const int64_t cap = N / 16 > 64 ? N / 16 : 64;
#pragma omp parallel num_threads(threads)
    {
        int8_panels_quantize(x, xs, M, K, xp, rs, 1);
        int8_panels_products(xp, rs, M, K, qp, N, NULL, sums, Np);
        Candidates cand = {malloc(sizeof(int64_t) * cap), 0, cap};
#pragma omp for schedule(dynamic, 1)
        for (int64_t m = 0; m < M; m++) {
            const float* row = x + m * xs;
            const Int16Row r = rs[m];
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

/* y[M, N] = x[M, K] @ (w[N, K] * scale[N])^T with fp32 activations and int8 weights.
 *
 * Weight-only int8 for CPUs without fast int8 or bf16 matmuls: every weight byte is read once
 * and widened in registers, so decode streams a quarter of the bytes of an fp32 weight.
 * - one activation row (batch-1 decode): four independent accumulators hide the FMA latency;
 * - more rows: 4 activation rows x 2 weight rows per register tile, eight independent chains,
 *   each widened weight vector feeding four FMAs.
 * Built at first use by zizhu/platforms/cpu_kernels/__init__.py; it links the OpenMP runtime that
 * torch already loaded, so both share one thread pool.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* Bytes ahead to prefetch: the hardware prefetcher alone left single-core DRAM streaming at about
 * a third of what the same loop reaches with this hint. */
#define PREFETCH 1024

static float dot_row(const float* x, const int8_t* w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char*)(w + k + PREFETCH), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), widen8(w + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), widen8(w + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), widen8(w + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8(w + k), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += x[k] * (float)w[k];
    return s;
}

/* rows m0..m0+3 of x against weight rows n0, n0+1 */
static void tile_4x2(const float* x, int64_t xs, const int8_t* w0, const int8_t* w1, int64_t K,
                     float out[4][2]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k & 63) == 0) {
            _mm_prefetch((const char*)(w0 + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(w1 + k + PREFETCH), _MM_HINT_T0);
        }
        const __m256 v0 = widen8(w0 + k), v1 = widen8(w1 + k);
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
            out[i][0] += x[i * xs + k] * (float)w0[k];
            out[i][1] += x[i * xs + k] * (float)w1[k];
        }
}

/* Rows of x per pass over a thread's columns: 64 rows of K floats stay in L2 while every column
 * pair streams past them; unblocked, a 512-token prefill re-read all of x from L3 per pair. */
#define ROW_BLOCK 64

/* Output columns [n_begin, n_end) of y = x @ (w * scale)^T, one thread's share. */
static void gemm_cols(const float* x, const int8_t* w, const float* scale, float* y,
                      int64_t M, int64_t K, int64_t xs, int64_t ys, int64_t n_begin, int64_t n_end) {
    for (int64_t mb = 0; mb < M; mb += ROW_BLOCK) {
        const int64_t me = mb + ROW_BLOCK < M ? mb + ROW_BLOCK : M;
        const int64_t m4 = mb + ((me - mb) & ~(int64_t)3);
        for (int64_t n0 = n_begin; n0 < n_end; n0 += 2) {
            const int both = n0 + 1 < n_end;
            const int8_t* w0 = w + n0 * K;
            const int8_t* w1 = both ? w0 + K : w0;
            for (int64_t m = mb; m < m4; m += 4) {
                float out[4][2];
                tile_4x2(x + m * xs, xs, w0, w1, K, out);
                for (int i = 0; i < 4; i++) {
                    y[(m + i) * ys + n0] = out[i][0] * scale[n0];
                    if (both) y[(m + i) * ys + n0 + 1] = out[i][1] * scale[n0 + 1];
                }
            }
            for (int64_t m = m4; m < me; m++) {
                const float* xr = x + m * xs;
                y[m * ys + n0] = dot_row(xr, w0, K) * scale[n0];
                if (both) y[m * ys + n0 + 1] = dot_row(xr, w1, K) * scale[n0 + 1];
            }
        }
    }
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

void int8_gemm_f32(const float* x, const int8_t* w, const float* scale, float* y,
                   int64_t M, int64_t N, int64_t K, int64_t x_stride, int64_t y_stride, int threads) {
    PARALLEL_COLS(N, gemm_cols(x, w, scale, y, M, K, x_stride, y_stride, n_begin, n_end))
}

/* Routed experts of one layer in one call, from the router's choice to the weighted sum.
 * (token, expert) pairs are counting-sorted by expert so each selected expert's weights stream once
 * for all its tokens; every phase is one work-shared loop over all selected experts' columns, so a
 * step pays four barriers instead of two parallel regions per expert.
 * x [T, D], ids and weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]. */
void int8_moe_f32(const float* x, float* out, const int64_t* ids, const float* weights, int64_t T, int64_t K,
                  int64_t E, const int8_t* w13, const float* s13, const int8_t* w2, const float* s2,
                  int64_t D, int64_t I, int threads) {
    const int64_t P = T * K;
    int64_t* offsets = calloc(E + 1, sizeof(int64_t));
    int64_t* active = malloc(sizeof(int64_t) * (E + 1));
    int64_t* row_of = malloc(sizeof(int64_t) * P);   /* (token, k) -> its row in expert order */
    int64_t* source = malloc(sizeof(int64_t) * P);   /* row -> token */
    float* xs = malloc(sizeof(float) * P * D);
    float* h = malloc(sizeof(float) * P * 2 * I);
    float* ys = malloc(sizeof(float) * P * D);
    for (int64_t p = 0; p < P; p++) offsets[ids[p] + 1]++;
    int64_t num_active = 0;
    for (int64_t e = 0; e < E; e++) {
        if (offsets[e + 1]) active[num_active++] = e;
        offsets[e + 1] += offsets[e];
    }
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
    const int64_t pairs13 = I, pairs2 = (D + 1) / 2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++)
            for (int64_t d = 0; d < D; d++) xs[r * D + d] = x[source[r] * D + d];
#pragma omp for schedule(dynamic, 64)
        for (int64_t j = 0; j < num_active * pairs13; j++) {
            const int64_t e = active[j / pairs13], n0 = 2 * (j % pairs13), p0 = offsets[e];
            gemm_cols(xs + p0 * D, w13 + e * 2 * I * D, s13 + e * 2 * I, h + p0 * 2 * I, offsets[e + 1] - p0, D, D,
                      2 * I, n0, n0 + 2);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            float* row = h + r * 2 * I;
            for (int64_t i = 0; i < I; i++) {
                const float g = row[i];
                row[i] = g / (1.0f + expf(-g)) * row[I + i];
            }
        }
#pragma omp for schedule(dynamic, 64)
        for (int64_t j = 0; j < num_active * pairs2; j++) {
            const int64_t e = active[j / pairs2], n0 = 2 * (j % pairs2), p0 = offsets[e];
            const int64_t n1 = n0 + 2 < D ? n0 + 2 : D;
            gemm_cols(h + p0 * 2 * I, w2 + e * D * I, s2 + e * D, ys + p0 * D, offsets[e + 1] - p0, I, 2 * I, D, n0, n1);
        }
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
    free(offsets); free(active); free(row_of); free(source); free(xs); free(h); free(ys);
}

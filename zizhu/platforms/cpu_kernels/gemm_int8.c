/* int8 weights against fp32 activations rounded per row to int16:
 * y[M, N] = x[M, K] @ (w[N, K] * scale[N])^T.
 *
 * Widening each int8 weight to fp32 (sign-extend, convert, FMA: three instructions per eight
 * weights) made the weight-only kernels compute-bound: about 20 GB/s of int8 weight on 2 cores,
 * the same time per output as an fp32 weight four times its size. Here 32 weight bytes are one load
 * and three shifts into two int16 vectors (the odd bytes by one arithmetic shift, the even bytes by
 * a shift up and back down), and each meets the activations in one vpmaddwd: 16 multiply-adds per
 * instruction, summed exactly in int32.
 *
 * Each activation row is rounded on its own (max |x| -> 32767), so a row's result does not depend
 * on the batch it came in, and the rounding (relative 1.5e-5 of the row's largest value) is far
 * below the weights' own int8 rounding. Its int16 copy stores each 32-element chunk as
 * [16 even elements | 16 odd elements], the order the shifts leave the weight bytes in. Elements
 * past the last whole chunk are summed in fp32.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_int8.h"
#include "simd.h"

#define CHUNK 32
/* int32 sums are moved to fp32 every this many elements: each lane gains at most
 * 2 x 2 x 32767 x 127 per chunk, so 64 chunks stay below 2^31. */
#define FLUSH (64 * CHUNK)
/* Rows of x per pass over a thread's columns (they stay in L2 while the columns stream past). */
#define ROW_BLOCK 64
/* Bytes ahead of each weight row to prefetch, at least: the next rows of the tile, or this much. */
#ifndef PREFETCH_MIN
#define PREFETCH_MIN 1024
#endif

void quantize_rows_i16(const float* x, int64_t x_stride, int64_t M, int64_t K, int16_t* q, float* q_scale) {
    const int64_t K32 = K & ~(int64_t)(CHUNK - 1), K8 = K & ~(int64_t)7;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i evens_first = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * x_stride;
        __m256 amax8 = _mm256_setzero_ps(), nan8 = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            const __m256 v = _mm256_loadu_ps(r + k);
            amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v, abs_mask));
            nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, amax8);
        float amax = 0.0f;
        int finite = _mm256_movemask_ps(nan8) == 0;
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        for (int64_t k = K8; k < K; k++) {
            const float a = fabsf(r[k]);
            amax = a > amax ? a : amax;
            finite &= a <= INFINITY;  /* false for NaN */
        }
        finite &= amax < INFINITY;
        /* a NaN or inf anywhere makes the whole row's outputs NaN, as the fp32 product would */
        q_scale[m] = finite ? amax / 32767.0f : NAN;
        const __m256 inv = _mm256_set1_ps(finite && amax > 0.0f ? 32767.0f / amax : 0.0f);
        int16_t* o = q + m * K32;
        for (int64_t c = 0; c < K32; c += CHUNK) {
            /* each group of eight with its even elements first, then packed pairwise: lane 0 of
             * a01 holds elements 0, 2, .., 14 and lane 1 elements 1, 3, .., 15; a23 the same for
             * 16-31. (Element by element, the rows of an int8 MoE layer's 1,365-token prefill took
             * 8 ms to gather and round, a twentieth of the layer; this is 3.5x faster, same bits.) */
            __m256i v[4];
            for (int j = 0; j < 4; j++)
                v[j] = _mm256_permutevar8x32_epi32(
                    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + c + 8 * j), inv)), evens_first);
            const __m256i a01 = _mm256_packs_epi32(v[0], v[1]), a23 = _mm256_packs_epi32(v[2], v[3]);
            _mm256_storeu_si256((__m256i*)(o + c), _mm256_permute2x128_si256(a01, a23, 0x20));
            _mm256_storeu_si256((__m256i*)(o + c + CHUNK / 2), _mm256_permute2x128_si256(a01, a23, 0x31));
        }
    }
}

static inline __m256i even_bytes(__m256i w) { return _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8); }
static inline __m256i odd_bytes(__m256i w) { return _mm256_srai_epi16(w, 8); }

/* R rows of xq against C weight rows over the whole chunks: out[i][j] = sum_k xq[i, k] * w[j, k]. */
static inline __attribute__((always_inline)) void tile(const int16_t* xq, int64_t K32, const int R,
                                                       const int8_t* w, int64_t K, const int C, float out[4][4]) {
    const int64_t ahead = C * K > PREFETCH_MIN ? C * K : PREFETCH_MIN;  /* the next rows, or further */
    __m256 f[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) f[i][j] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K32; k0 += FLUSH) {
        const int64_t k1 = k0 + FLUSH < K32 ? k0 + FLUSH : K32;
        __m256i a[4][4];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++) a[i][j] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; k += CHUNK) {
            /* even bytes against every row, then odd bytes: few live registers, so no accumulator
             * spills to the stack (spilled, each chunk waited on a store-to-load round trip) */
            __m256i v[4];
            for (int j = 0; j < C; j++) {
                _mm_prefetch((const char*)(w + j * K + k + ahead), _MM_HINT_T0);
                v[j] = _mm256_loadu_si256((const __m256i*)(w + j * K + k));
            }
            for (int j = 0; j < C; j++) {
                const __m256i e = even_bytes(v[j]);
                for (int i = 0; i < R; i++)
                    a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(e, _mm256_loadu_si256((const __m256i*)(xq + i * K32 + k))));
            }
            for (int j = 0; j < C; j++) {
                const __m256i o = odd_bytes(v[j]);
                for (int i = 0; i < R; i++)
                    a[i][j] = _mm256_add_epi32(
                        a[i][j], _mm256_madd_epi16(o, _mm256_loadu_si256((const __m256i*)(xq + i * K32 + k + CHUNK / 2))));
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++) f[i][j] = _mm256_add_ps(f[i][j], _mm256_cvtepi32_ps(a[i][j]));
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) out[i][j] = hsum8(f[i][j]);
}

/* Four rows of xq against two weight rows, the tile of products with four rows or more: each
 * weight vector feeds four rows and each activation vector two weight rows (against 4 x 1 tiles,
 * best of 5 on 2 cores: 32 x 129,280 x 1,024 63.7 -> 53.8 ms, 512 x 1,024 x 1,024 8.7 -> 7.6 ms,
 * 4 x 1,024 x 1,024 63 -> 55 us). In asm because GCC 12 spills some of the eight sums of the
 * intrinsic form to the stack, which puts a store-to-load round trip into every iteration. */
static inline void tile42(const int16_t* xq, int64_t K32, const int8_t* w, int64_t K, float out[4][4]) {
    const int64_t ahead = 2 * K > PREFETCH_MIN ? 2 * K : PREFETCH_MIN;
    const int16_t *x0 = xq, *x1 = xq + K32, *x2 = xq + 2 * K32, *x3 = xq + 3 * K32;
    const int8_t *w0 = w, *w1 = w + K;
    for (int i = 0; i < 4; i++) out[i][0] = out[i][1] = 0.0f;
    for (int64_t k0 = 0; k0 < K32; k0 += FLUSH) {
        const int64_t k1 = k0 + FLUSH < K32 ? k0 + FLUSH : K32;
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
        for (int64_t k = k0; k < k1; k += CHUNK) {
            _mm_prefetch((const char*)(w0 + k + ahead), _MM_HINT_T0);
            _mm_prefetch((const char*)(w1 + k + ahead), _MM_HINT_T0);
            __asm__(
                "vmovdqu (%[w0],%[k]), %%ymm0\n\t"
                "vpsllw $8, %%ymm0, %%ymm1\n\t"
                "vpsraw $8, %%ymm1, %%ymm1\n\t"   /* even bytes of w0 */
                "vpsraw $8, %%ymm0, %%ymm0\n\t"   /* odd bytes of w0 */
                "vmovdqu (%[w1],%[k]), %%ymm2\n\t"
                "vpsllw $8, %%ymm2, %%ymm3\n\t"
                "vpsraw $8, %%ymm3, %%ymm3\n\t"
                "vpsraw $8, %%ymm2, %%ymm2\n\t"
#define ZZ_ROW(X, A0, A1)                                   \
                "vmovdqu (%[" X "],%[k],2), %%ymm4\n\t"     \
                "vpmaddwd %%ymm4, %%ymm1, %%ymm5\n\t"       \
                "vpaddd %%ymm5, %[" A0 "], %[" A0 "]\n\t"   \
                "vpmaddwd %%ymm4, %%ymm3, %%ymm5\n\t"       \
                "vpaddd %%ymm5, %[" A1 "], %[" A1 "]\n\t"   \
                "vmovdqu 32(%[" X "],%[k],2), %%ymm4\n\t"   \
                "vpmaddwd %%ymm4, %%ymm0, %%ymm5\n\t"       \
                "vpaddd %%ymm5, %[" A0 "], %[" A0 "]\n\t"   \
                "vpmaddwd %%ymm4, %%ymm2, %%ymm5\n\t"       \
                "vpaddd %%ymm5, %[" A1 "], %[" A1 "]\n\t"
                ZZ_ROW("x0", "a00", "a01") ZZ_ROW("x1", "a10", "a11") ZZ_ROW("x2", "a20", "a21") ZZ_ROW("x3", "a30", "a31")
#undef ZZ_ROW
                : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11),
                  [a20] "+x"(a20), [a21] "+x"(a21), [a30] "+x"(a30), [a31] "+x"(a31)
                : [w0] "r"(w0), [w1] "r"(w1), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [k] "r"(k)
                : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "memory");
        }
        const __m256i acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
        for (int i = 0; i < 8; i++) out[i / 2][i % 2] += hsum8(_mm256_cvtepi32_ps(acc[i]));
    }
}

/* Finish R x C outputs: row and weight scales, plus the fp32 sum over elements past K32. */
static inline void store(const float* x, int64_t xs, const float* xq_scale, const int8_t* w, int64_t K, int64_t K32,
                         const float* scale, float* y, int64_t ys, int64_t m, int64_t n, int R, int C,
                         float out[4][4]) {
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) {
            float tail = 0.0f;
            for (int64_t k = K32; k < K; k++) tail += x[(m + i) * xs + k] * (float)w[(n + j) * K + k];
            y[(m + i) * ys + n + j] = (out[i][j] * xq_scale[m + i] + tail) * scale[n + j];
        }
}

#define TILE_CASE(R, C)                                                                        \
    case C:                                                                                    \
        tile(xq + m * K32, K32, R, w + n * K, K, C, out);                                      \
        store(x, xs, xq_scale, w, K, K32, scale, y, ys, m, n, R, C, out);                      \
        break;

#define ROWS_CASE(R)                                                                           \
    case R:                                                                                    \
        tile(xq + m * K32, K32, R, w + n * K, K, 1, out);                                      \
        store(x, xs, xq_scale, w, K, K32, scale, y, ys, m, n, R, 1, out);                      \
        break;

void int8_cols(const float* x, int64_t xs, const int16_t* xq, const float* xq_scale, int64_t M, int64_t K,
               const int8_t* w, const float* scale, float* y, int64_t ys, int64_t n_begin, int64_t n_end) {
    const int64_t K32 = K & ~(int64_t)(CHUNK - 1);
    float out[4][4];
    for (int64_t mb = 0; mb < M; mb += ROW_BLOCK) {
        const int64_t me = mb + ROW_BLOCK < M ? mb + ROW_BLOCK : M;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
            const int cols = n_end - n0 < 4 ? (int)(n_end - n0) : 4;
            int64_t m = mb;
            for (; m + 4 <= me; m += 4) {
                int64_t n = n0;
                for (; n + 2 <= n0 + cols; n += 2) {
                    tile42(xq + m * K32, K32, w + n * K, K, out);
                    store(x, xs, xq_scale, w, K, K32, scale, y, ys, m, n, 4, 2, out);
                }
                if (n < n0 + cols) {
                    switch (1) { TILE_CASE(4, 1) }
                }
            }
            const int rest = (int)(me - m); /* 0-3 rows left: one tile of that height */
            if (rest)
                for (int64_t n = n0; n < n0 + cols; n++) {
                    switch (rest) { ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) }
                }
        }
    }
}

/* norm_weight, when not NULL: each row of x is first RMS-normalised with it (rms_norm_row, the
 * very arithmetic of rms_norm_f32), so a norm that feeds only this projection costs no call of its
 * own. */
void int8_gemm_f32(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                   int64_t x_stride, int64_t y_stride, const float* norm_weight, float eps, int threads) {
    const int64_t K32 = K & ~(int64_t)(CHUNK - 1);
    int16_t* xq = malloc(sizeof(int16_t) * (M * K32 + 1));
    float* xq_scale = malloc(sizeof(float) * M);
    float* normed = norm_weight ? malloc(sizeof(float) * (M * K + 1)) : NULL;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t m0 = M * t / nt, m1 = M * (t + 1) / nt;
        const float* rows = x;
        int64_t rs = x_stride;
        if (normed) {
            for (int64_t m = m0; m < m1; m++) rms_norm_row(x + m * x_stride, norm_weight, normed + m * K, K, eps);
            rows = normed;
            rs = K;
        }
        quantize_rows_i16(rows + m0 * rs, rs, m1 - m0, K, xq + m0 * K32, xq_scale + m0);
#pragma omp barrier
        const int64_t quads = (N + 3) / 4;
        const int64_t n_begin = 4 * (quads * t / nt), n_end_q = 4 * (quads * (t + 1) / nt);
        int8_cols(rows, rs, xq, xq_scale, M, K, w, scale, y, y_stride, n_begin, n_end_q < N ? n_end_q : N);
    }
    free(xq);
    free(xq_scale);
    free(normed);
}

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
#include <immintrin.h>
#include <stdint.h>

/* Bytes ahead to prefetch: the hardware prefetcher alone left single-core DRAM streaming at about
 * a third of what the same loop reaches with this hint. */
#define PREFETCH 1024

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline __m256 widen8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

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
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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
    out[0][0] = hsum(c00); out[0][1] = hsum(c01); out[1][0] = hsum(c10); out[1][1] = hsum(c11);
    out[2][0] = hsum(c20); out[2][1] = hsum(c21); out[3][0] = hsum(c30); out[3][1] = hsum(c31);
    for (; k < K; k++)
        for (int i = 0; i < 4; i++) {
            out[i][0] += x[i * xs + k] * (float)w0[k];
            out[i][1] += x[i * xs + k] * (float)w1[k];
        }
}

void int8_gemm_f32(const float* x, const int8_t* w, const float* scale, float* y,
                   int64_t M, int64_t N, int64_t K, int64_t x_stride, int64_t y_stride, int threads) {
    const int64_t m4 = M & ~(int64_t)3;
    const int64_t pairs = (N + 1) / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t n0 = 2 * p;
        const int both = n0 + 1 < N;
        const int8_t* w0 = w + n0 * K;
        const int8_t* w1 = both ? w0 + K : w0;
        for (int64_t m = 0; m < m4; m += 4) {
            float out[4][2];
            tile_4x2(x + m * x_stride, x_stride, w0, w1, K, out);
            for (int i = 0; i < 4; i++) {
                y[(m + i) * y_stride + n0] = out[i][0] * scale[n0];
                if (both) y[(m + i) * y_stride + n0 + 1] = out[i][1] * scale[n0 + 1];
            }
        }
        for (int64_t m = m4; m < M; m++) {
            const float* xr = x + m * x_stride;
            y[m * y_stride + n0] = dot_row(xr, w0, K) * scale[n0];
            if (both) y[m * y_stride + n0 + 1] = dot_row(xr, w1, K) * scale[n0 + 1];
        }
    }
}

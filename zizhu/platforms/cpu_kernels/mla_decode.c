/* Weight-absorbed MLA decode over the paged latent cache, one new query token per sequence, fp32.
 *
 * out[b, h] = W_UV[h] . softmax(scale * [W_UK[h]^T q_nope[b, h] | q_pe[b, h]] . rows^T) . c_kv rows
 *
 * In torch this is ~12 operators per layer (two einsums, a gather that copies the whole context,
 * two bmms, mask, softmax); at batch 1 their dispatch costs more than their arithmetic. Three
 * phases share one parallel region:
 * 1. absorb q: per head, so each W_UK[h] row is read from memory once for the whole batch;
 * 2. attend: per (sequence, group of heads), so each cached row is read once for the group;
 * 3. project out: per head, W_UV[h] rows read once for the whole batch.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static void axpy(float a, const float* x, float* y, int64_t n) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* bf16 weights (the absorbed W_UK / W_UV when bf16 holds them exactly, as it does for bf16
 * checkpoints) widen to fp32 by a shift: half the bytes of the fp32 copy, the same products. */
static inline __m256 load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static void axpy_bf16(float a, const uint16_t* x, float* y, int64_t n) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load_bf16(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) {
        const uint32_t bits = (uint32_t)x[i] << 16;
        float v;
        memcpy(&v, &bits, sizeof v);
        y[i] += a * v;
    }
}

/* dot_f32 with one bf16 operand, in the same order of operations */
static float dot_bf16(const uint16_t* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(load_bf16(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(load_bf16(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load_bf16(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) {
        const uint32_t bits = (uint32_t)a[i] << 16;
        float v;
        memcpy(&v, &bits, sizeof v);
        s += v * b[i];
    }
    return s;
}

/* dot_f32 of four query rows (q + i * qs) with one cache row, sharing its loads: each sum in
 * exactly dot_f32's order, so a head's score does not depend on which heads share the call. */
static void dot4_f32(const float* q, int64_t qs, const float* row, int64_t n, float out[4]) {
    __m256 s0[4], s1[4];
    for (int i = 0; i < 4; i++) s0[i] = s1[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m256 r0 = _mm256_loadu_ps(row + k), r1 = _mm256_loadu_ps(row + k + 8);
        for (int i = 0; i < 4; i++) {
            s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * qs + k), r0, s0[i]);
            s1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * qs + k + 8), r1, s1[i]);
        }
    }
    for (; k + 8 <= n; k += 8) {
        const __m256 r0 = _mm256_loadu_ps(row + k);
        for (int i = 0; i < 4; i++) s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * qs + k), r0, s0[i]);
    }
    for (int i = 0; i < 4; i++) {
        float t = hsum8(_mm256_add_ps(s0[i], s1[i]));
        for (int64_t j = k; j < n; j++) t += q[i * qs + j] * row[j];
        out[i] = t;
    }
}

/* Attention of heads [h0, h1) of sequence b; q_lat rows are [B, H, R], o_lat likewise. */
static void attend(int64_t b, int64_t h0, int64_t h1, const float* q_lat, const float* q_pe, int64_t qp_sb,
                   int64_t qp_sh, const float* cache, const int64_t* tables, int64_t table_stride, int64_t len,
                   float* o_lat, float* scores, int64_t H, int64_t R, int64_t P, int64_t block_size, float scale) {
    const int64_t W = R + P, nh = h1 - h0;
    const int64_t* table = tables + b * table_stride;
    for (int64_t j = 0; j < len; j++) {
        const float* row = cache + (table[j / block_size] * block_size + j % block_size) * W;
        int64_t h = h0;
        for (; h + 4 <= h1; h += 4) {
            float lat[4], pe[4];
            dot4_f32(q_lat + (b * H + h) * R, R, row, R, lat);
            dot4_f32(q_pe + b * qp_sb + h * qp_sh, qp_sh, row + R, P, pe);
            for (int i = 0; i < 4; i++) scores[(h - h0 + i) * len + j] = (lat[i] + pe[i]) * scale;
        }
        for (; h < h1; h++) {
            const float s = dot_f32(q_lat + (b * H + h) * R, row, R) + dot_f32(q_pe + b * qp_sb + h * qp_sh, row + R, P);
            scores[(h - h0) * len + j] = s * scale;
        }
    }
    for (int64_t i = 0; i < nh; i++) {
        float* s = scores + i * len;
        float m = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < len; j++) m = s[j] > m ? s[j] : m;
        for (int64_t j = 0; j < len; j++) total += (s[j] = expf(s[j] - m));
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < len; j++) s[j] *= inv;
        float* o = o_lat + (b * H + h0 + i) * R;
        for (int64_t r = 0; r < R; r++) o[r] = 0.0f;
    }
    /* out[i] += p[i, j] * row[j], heads in the inner loop so each row chunk is loaded once */
    for (int64_t j = 0; j < len; j++) {
        const float* row = cache + (table[j / block_size] * block_size + j % block_size) * W;
        int64_t r = 0;
        for (; r + 8 <= R; r += 8) {
            const __m256 v = _mm256_loadu_ps(row + r);
            for (int64_t i = 0; i < nh; i++) {
                float* o = o_lat + (b * H + h0 + i) * R + r;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(scores[i * len + j]), v, _mm256_loadu_ps(o)));
            }
        }
        for (; r < R; r++)
            for (int64_t i = 0; i < nh; i++) o_lat[(b * H + h0 + i) * R + r] += scores[i * len + j] * row[r];
    }
}

void mla_decode_f32(const float* q_nope, int64_t qn_sb, int64_t qn_sh,  /* [B, H, Dn], last dim dense */
                    const float* q_pe, int64_t qp_sb, int64_t qp_sh,    /* [B, H, P], last dim dense */
                    const void* w_uk, const void* w_uv, int w_bf16,    /* [H, Dn, R], [H, Dv, R]: fp32 or bf16 */
                    const float* cache, const int64_t* tables, int64_t table_stride, const int64_t* seq_lens,
                    float* q_lat, float* o_lat, float* out,            /* scratch [B, H, R] x2, out [B, H, Dv] */
                    int64_t B, int64_t H, int64_t Dn, int64_t Dv, int64_t R, int64_t P, int64_t block_size,
                    float scale, int threads) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    /* enough (sequence, head group) items to keep every thread busy, in groups that divide H */
    int64_t groups = 1;
    while (groups < H && (B * groups < 2 * threads || H % groups != 0)) groups++;
    const int64_t per_group = H / groups;

#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t b = 0; b < B; b++) {
                float* q = q_lat + (b * H + h) * R;
                for (int64_t r = 0; r < R; r++) q[r] = 0.0f;
            }
            for (int64_t n = 0; n < Dn; n++) {
                const int64_t row = (h * Dn + n) * R;
                for (int64_t b = 0; b < B; b++) {
                    const float a = q_nope[b * qn_sb + h * qn_sh + n];
                    if (w_bf16)
                        axpy_bf16(a, (const uint16_t*)w_uk + row, q_lat + (b * H + h) * R, R);
                    else
                        axpy(a, (const float*)w_uk + row, q_lat + (b * H + h) * R, R);
                }
            }
        }
        float* scores = malloc(sizeof(float) * per_group * (max_len > 0 ? max_len : 1));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * groups; item++) {
            const int64_t b = item / groups, h0 = (item % groups) * per_group;
            attend(b, h0, h0 + per_group, q_lat, q_pe, qp_sb, qp_sh, cache, tables, table_stride, seq_lens[b], o_lat,
                   scores, H, R, P, block_size, scale);
        }
        free(scores);
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            for (int64_t v = 0; v < Dv; v++) {
                const int64_t row = (h * Dv + v) * R;
                for (int64_t b = 0; b < B; b++) {
                    const float* o = o_lat + (b * H + h) * R;
                    out[(b * H + h) * Dv + v] =
                        w_bf16 ? dot_bf16((const uint16_t*)w_uv + row, o, R) : dot_f32((const float*)w_uv + row, o, R);
                }
            }
    }
}

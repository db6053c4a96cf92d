/* Weight-absorbed MLA decode over the paged latent cache, one new query token per sequence, summed
 * in fp32: the absorbed weights fp32 or bf16, the cached rows fp32 or bf16 (a bf16 model's).
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

#include "mla.h"
#include "simd.h"

/* W_UV rows per block of the output projection (bf16: 8 KB at R = 256) */
#define V_BLOCK 16

/* The dot products of up to four rows a + i * as with one row w (fp32 or bf16), sharing w's loads.
 * Every sum runs in one fixed order (two 8-wide accumulators over 16-element steps, then the tail),
 * whatever the number of rows, so a result does not depend on which rows share the call. */
static inline __attribute__((always_inline)) void dots(const float* a, int64_t as, const int rows, const void* w,
                                                       int bf16, int64_t n, float* out, int64_t out_stride) {
    __m256 s0[4], s1[4];
    for (int i = 0; i < rows; i++) s0[i] = s1[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m256 w0 = load_w(w, k, bf16), w1 = load_w(w, k + 8, bf16);
        for (int i = 0; i < rows; i++) {
            s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * as + k), w0, s0[i]);
            s1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * as + k + 8), w1, s1[i]);
        }
    }
    for (; k + 8 <= n; k += 8) {
        const __m256 w0 = load_w(w, k, bf16);
        for (int i = 0; i < rows; i++) s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * as + k), w0, s0[i]);
    }
    for (int i = 0; i < rows; i++) {
        float t = hsum8(_mm256_add_ps(s0[i], s1[i]));
        for (int64_t j = k; j < n; j++) t += a[i * as + j] * scalar_w(w, j, bf16);
        out[i * out_stride] = t;
    }
}

/* Scores of four heads against up to three cached rows: out[i][j] = q_lat_i . row_j[0..R) +
 * q_pe_i . row_j[R..R+P), for the query rows q_lat + i * qls and q_pe + i * qps. Each cached vector
 * feeds four FMAs and each query vector up to three, twelve independent sums. One row against four
 * heads at a time (dots) scored 32 sequences x 190 tokens at 3-4 multiply-adds a cycle; this tile
 * takes the whole decode from 2.48 to 2.22 ms there, 105 to 94 us at batch 1 (alternating, best
 * of 40 / 200). Every sum runs over k in 8-wide steps into one accumulator, then across its lanes,
 * the same for any number of heads or rows in the call, so a score does not depend on the batch. */
static inline __attribute__((always_inline)) void scores4(const float* ql, int64_t qls, const float* qp, int64_t qps,
                                                          const int nh, const void* const* row, const int nr,
                                                          const int cbf16, int64_t R, int64_t P, float out[4][3]) {
    __m256 acc[4][3];
    for (int i = 0; i < nh; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t R8 = R & ~(int64_t)7, P8 = P & ~(int64_t)7;
    for (int64_t k = 0; k < R8; k += 8) {
        __m256 c[3];
        for (int j = 0; j < nr; j++) c[j] = load_w(row[j], k, cbf16);
        for (int i = 0; i < nh; i++) {
            const __m256 q = _mm256_loadu_ps(ql + i * qls + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(q, c[j], acc[i][j]);
        }
    }
    for (int64_t k = 0; k < P8; k += 8) {
        __m256 c[3];
        for (int j = 0; j < nr; j++) c[j] = load_w(row[j], R + k, cbf16);
        for (int i = 0; i < nh; i++) {
            const __m256 q = _mm256_loadu_ps(qp + i * qps + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(q, c[j], acc[i][j]);
        }
    }
    for (int i = 0; i < nh; i++)
        for (int j = 0; j < nr; j++) {
            float t = hsum8(acc[i][j]);
            for (int64_t k = R8; k < R; k++) t += ql[i * qls + k] * scalar_w(row[j], k, cbf16);
            for (int64_t k = P8; k < P; k++) t += qp[i * qps + k] * scalar_w(row[j], R + k, cbf16);
            out[i][j] = t;
        }
}

/* scores4 for nh heads (a constant where inlined) and nr = 1-3 rows, each row count compiled apart. */
static inline __attribute__((always_inline)) void scores_rows(const float* ql, int64_t qls, const float* qp, int64_t qps,
                                                              const int nh, const void* const* row, int nr,
                                                              const int cbf16, int64_t R, int64_t P, float out[4][3]) {
    if (nr == 3) scores4(ql, qls, qp, qps, nh, row, 3, cbf16, R, P, out);
    else if (nr == 2) scores4(ql, qls, qp, qps, nh, row, 2, cbf16, R, P, out);
    else scores4(ql, qls, qp, qps, nh, row, 1, cbf16, R, P, out);
}

/* Sums y_i[8v..8v+8) = sum_j c[i * cs + j] * x_j[offset + 8v..offset + 8v + 8), x_j = src[j] (fp32 or,
 * with cbf16, bf16 rows), for up to four i and three v, in order of j from zero: each loaded vector
 * of x_j feeds four FMAs and each broadcast coefficient three (eight coefficients per vector of x_j
 * needed nine loads per eight FMAs, and loads, not FMAs, set the pace on this CPU). */
static inline __attribute__((always_inline)) void weighted_tile(const float* c, int64_t cs, const int nh,
                                                                const void* const* src, int64_t offset, const int nv,
                                                                const int cbf16, int64_t len, float* y, int64_t ys) {
    __m256 acc[4][3];
    for (int i = 0; i < nh; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        __m256 x[3];
        for (int v = 0; v < nv; v++) x[v] = load_w(src[j], offset + 8 * v, cbf16);
        for (int i = 0; i < nh; i++) {
            const __m256 p = _mm256_broadcast_ss(c + i * cs + j);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm256_fmadd_ps(p, x[v], acc[i][v]);
        }
    }
    for (int i = 0; i < nh; i++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(y + i * ys + 8 * v, acc[i][v]);
}

/* weighted_tile for nh sums (a constant where inlined) and the widest of 24, 16 or 8 of the `left`
 * columns from `offset`; returns the columns done. */
static inline __attribute__((always_inline)) int64_t weighted_cols(const float* c, int64_t cs, const int nh,
                                                                   const void* const* src, int64_t offset,
                                                                   int64_t left, const int cbf16, int64_t len,
                                                                   float* y, int64_t ys) {
    if (left >= 24) { weighted_tile(c, cs, nh, src, offset, 3, cbf16, len, y, ys); return 24; }
    if (left >= 16) { weighted_tile(c, cs, nh, src, offset, 2, cbf16, len, y, ys); return 16; }
    weighted_tile(c, cs, nh, src, offset, 1, cbf16, len, y, ys);
    return 8;
}

/* weighted_tile over `count` sums and the columns [0, R8) of every x_j, R8 a multiple of 8: four
 * sums at a time, then one. */
static inline __attribute__((always_inline)) void weighted(const float* c, int64_t cs, int64_t count,
                                                           const void* const* src, int64_t R8, const int cbf16,
                                                           int64_t len, float* y, int64_t ys) {
    for (int64_t i = 0; i < count;) {
        const int four = count - i >= 4;
        for (int64_t r = 0; r < R8;)
            r += four ? weighted_cols(c + i * cs, cs, 4, src, r, R8 - r, cbf16, len, y + i * ys + r, ys)
                      : weighted_cols(c + i * cs, cs, 1, src, r, R8 - r, cbf16, len, y + i * ys + r, ys);
        i += four ? 4 : 1;
    }
}

/* The absorbed query of one row: y = sum_n q[n] * W[n], the running sums kept in y (in L1) rather
 * than in registers, so that each of the head's weight rows W[n] is read whole and in turn. Sums in
 * registers need passes over a few columns of every row, a strided walk that the prefetchers follow
 * badly once the weights come from DRAM: at batch 1 with cold weights (a model's step), a small
 * layer's decode took 197 us, 166 us this way. The same fused multiply-adds in the same order of n
 * as absorb4, so a row's result does not depend on the batch. */
static inline __attribute__((always_inline)) void absorb_row(const float* q, const void* w, const int bf16, int64_t base, int64_t Dn, int64_t R, float* y) {
    const int64_t R8 = R & ~(int64_t)7;
    for (int64_t r = 0; r < R; r++) y[r] = 0.0f;
    for (int64_t n = 0; n < Dn; n++) {
        const __m256 qn = _mm256_set1_ps(q[n]);
        const int64_t row = base + n * R;
        for (int64_t r = 0; r < R8; r += 8)
            _mm256_storeu_ps(y + r, _mm256_fmadd_ps(qn, load_w(w, row + r, bf16), _mm256_loadu_ps(y + r)));
        for (int64_t r = R8; r < R; r++) y[r] = fmaf(q[n], scalar_w(w, row + r, bf16), y[r]);
    }
}

/* y_i = sum_n q_i[n] * W[n] for four query rows q_i = q + i * qs and one head's absorbed weight rows
 * W[n] = w + base + n * R, the sums in registers, each in order of n from zero, as absorb_row's:
 * four rows of sixteen columns, so eight FMA chains hide the FMA latency (with four, of eight
 * columns, 32 sequences' absorption ran at a third of the FMA rate). */
static inline __attribute__((always_inline)) void absorb4(const float* q, int64_t qs, const void* w, const int bf16, int64_t base, int64_t Dn, int64_t R, float* y,
                    int64_t ys) {
    int64_t r = 0;
    for (; r + 16 <= R; r += 16) {
        __m256 acc[4][2];
        for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t n = 0; n < Dn; n++) {
            const __m256 w0 = load_w(w, base + n * R + r, bf16), w1 = load_w(w, base + n * R + r + 8, bf16);
            for (int i = 0; i < 4; i++) {
                const __m256 qi = _mm256_set1_ps(q[i * qs + n]);
                acc[i][0] = _mm256_fmadd_ps(qi, w0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(qi, w1, acc[i][1]);
            }
        }
        for (int i = 0; i < 4; i++) {
            _mm256_storeu_ps(y + i * ys + r, acc[i][0]);
            _mm256_storeu_ps(y + i * ys + r + 8, acc[i][1]);
        }
    }
    for (; r + 8 <= R; r += 8) {
        __m256 acc[4];
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t n = 0; n < Dn; n++) {
            const __m256 wv = load_w(w, base + n * R + r, bf16);
            for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(q[i * qs + n]), wv, acc[i]);
        }
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + i * ys + r, acc[i]);
    }
    for (; r < R; r++)
        for (int i = 0; i < 4; i++) {
            float t = 0.0f;
            for (int64_t n = 0; n < Dn; n++) t = fmaf(q[i * qs + n], scalar_w(w, base + n * R + r, bf16), t);
            y[i * ys + r] = t;
        }
}

/* softmax of s[0..n) in place */
static void softmax(float* s, int64_t n) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; j < n; j++) {
        float tail[8] = {s[j] - m};
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        total += (s[j] = tail[0]);
    }
    const float inv = 1.0f / total;
    for (j = 0; j < n; j++) s[j] *= inv;
}

/* Attention of heads [h0, h1) of sequence b over its cached rows (row pointers in `rows`, fp32 or,
 * with cbf16, bf16 rows: a bf16 model's cache); q_lat and o_lat are [B, H, R]. */
static inline __attribute__((always_inline)) void attend(int64_t b, int64_t h0, int64_t h1, const float* q_lat,
                                                         const float* q_pe, int64_t qp_sb, int64_t qp_sh,
                                                         const void* const* rows, const int cbf16, int64_t len,
                                                         float* o_lat, float* scores, int64_t H, int64_t R, int64_t P,
                                                         float scale) {
    const int64_t nh = h1 - h0, row_bytes = (R + P) * (cbf16 ? 2 : 4);
    for (int64_t j = 0; j < len; j += 3) {
        const int nr = len - j < 3 ? (int)(len - j) : 3;
        /* the next group's rows, ahead of use: rows sit in scattered blocks, out of the prefetchers' sight */
        for (int64_t n = j + 3; n < j + 6 && n < len; n++)
            for (int64_t at = 0; at < row_bytes; at += 64) _mm_prefetch((const char*)rows[n] + at, _MM_HINT_T0);
        for (int64_t h = h0; h < h1;) {
            const int four = h1 - h >= 4;  /* four heads at a time, then one */
            const float* ql = q_lat + (b * H + h) * R;
            const float* qp = q_pe + b * qp_sb + h * qp_sh;
            float s[4][3];
            if (four) scores_rows(ql, R, qp, qp_sh, 4, rows + j, nr, cbf16, R, P, s);
            else scores_rows(ql, R, qp, qp_sh, 1, rows + j, nr, cbf16, R, P, s);
            for (int i = 0; i < (four ? 4 : 1); i++)
                for (int n = 0; n < nr; n++) scores[(h - h0 + i) * len + j + n] = s[i][n] * scale;
            h += four ? 4 : 1;
        }
    }
    for (int64_t i = 0; i < nh; i++) softmax(scores + i * len, len);
    /* o[i] = sum_j p[i, j] * c_kv_j, the heads' sums in registers */
    float* o = o_lat + (b * H + h0) * R;
    const int64_t R8 = R & ~(int64_t)7;
    weighted(scores, len, nh, rows, R8, cbf16, len, o, R);
    for (int64_t r = R8; r < R; r++)
        for (int64_t i = 0; i < nh; i++) {
            float t = 0.0f;
            for (int64_t j = 0; j < len; j++) t += scores[i * len + j] * scalar_w(rows[j], r, cbf16);
            o[i * R + r] = t;
        }
}

/* The whole decode for one weight type and one cache type, bf16 and cbf16 constants where this is
 * inlined, so every inner loop is compiled for them without a branch per load. */
static inline __attribute__((always_inline)) void decode(
    const float* q_nope, int64_t qn_sb, int64_t qn_sh, const float* q_pe, int64_t qp_sb, int64_t qp_sh,
    const void* w_uk, const void* w_uv, const int bf16, const void* cache, const int cbf16, const int64_t* tables,
    int64_t table_stride, const int64_t* seq_lens, float* q_lat, float* o_lat, float* out, int64_t B, int64_t H,
    int64_t Dn, int64_t Dv, int64_t R, int64_t P, int64_t block_size, float scale, int threads) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    /* enough (sequence, head group) items to keep every thread busy, in groups that divide H: a
     * whole number of items per thread, or at least two each. Groups no smaller than needed: a
     * group's heads share each cached row's loads, and eight of them fill the FMA pipes (at batch 1,
     * two groups of eight against four of four: 117 -> 107 us per layer at 190 cached tokens) */
    int64_t groups = 1;
    while (groups < H && (((B * groups) % threads != 0 && B * groups < 2 * threads) || H % groups != 0)) groups++;
    const int64_t per_group = H / groups;
    const int64_t W = R + P;

#pragma omp parallel num_threads(threads)
    {
        /* 1. absorb: q_lat[b, h] = sum_n q_nope[b, h, n] * W_UK[h, n], four sequences per pass over
         *    the head's weight rows, the sums in registers (in order of n, as the sequences apart) */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            for (int64_t b0 = 0; b0 < B; b0 += 4) {
                const float* q = q_nope + b0 * qn_sb + h * qn_sh;
                float* y = q_lat + (b0 * H + h) * R;
                if (B - b0 >= 4)
                    absorb4(q, qn_sb, w_uk, bf16, h * Dn * R, Dn, R, y, H * R);
                else
                    for (int64_t b = b0; b < B; b++)
                        absorb_row(q + (b - b0) * qn_sb, w_uk, bf16, h * Dn * R, Dn, R, y + (b - b0) * H * R);
            }
        /* 2. attend, per (sequence, group of heads) */
        float* scores = malloc(sizeof(float) * per_group * (max_len > 0 ? max_len : 1));
        const void** rows = malloc(sizeof(void*) * (max_len > 0 ? max_len : 1));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * groups; item++) {
            const int64_t b = item / groups, h0 = (item % groups) * per_group, len = seq_lens[b];
            const int64_t* table = tables + b * table_stride;
            for (int64_t j = 0; j < len; j++) rows[j] = w_at(cache, (table[j / block_size] * block_size + j % block_size) * W, cbf16);
            attend(b, h0, h0 + per_group, q_lat, q_pe, qp_sb, qp_sh, rows, cbf16, len, o_lat, scores, H, R, P, scale);
        }
        free(scores);
        free(rows);
        /* 3. project out: out[b, h, v] = W_UV[h, v] . o_lat[b, h], four sequences per weight row, in
         *    blocks of V_BLOCK weight rows that stay in L1 while every sequence passes (row by row,
         *    a head's 32 sequences re-read 32 KB of o_lat from L2 for each weight row) */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            for (int64_t v0 = 0; v0 < Dv; v0 += V_BLOCK) {
                const int64_t v1 = v0 + V_BLOCK < Dv ? v0 + V_BLOCK : Dv;
                for (int64_t b = 0; b < B;) {
                    const int four = B - b >= 4; /* four sequences at a time, then one */
                    for (int64_t v = v0; v < v1; v++) {
                        const int64_t row = (h * Dv + v) * R;
                        const void* w = w_at(w_uv, row, bf16);
                        const float* a = o_lat + (b * H + h) * R;
                        float* y = out + (b * H + h) * Dv + v;
                        if (four) dots(a, H * R, 4, w, bf16, R, y, H * Dv);
                        else dots(a, H * R, 1, w, bf16, R, y, H * Dv);
                    }
                    b += four ? 4 : 1;
                }
            }
    }
}

void mla_decode_f32(const float* q_nope, int64_t qn_sb, int64_t qn_sh,  /* [B, H, Dn], last dim dense */
                    const float* q_pe, int64_t qp_sb, int64_t qp_sh,    /* [B, H, P], last dim dense */
                    const void* w_uk, const void* w_uv, int w_bf16,    /* [H, Dn, R], [H, Dv, R]: fp32 or bf16 */
                    const void* cache, int cache_bf16,                 /* [blocks, block_size, R + P]: fp32 or bf16 */
                    const int64_t* tables, int64_t table_stride, const int64_t* seq_lens,
                    float* q_lat, float* o_lat, float* out,            /* scratch [B, H, R] x2, out [B, H, Dv] */
                    int64_t B, int64_t H, int64_t Dn, int64_t Dv, int64_t R, int64_t P, int64_t block_size,
                    float scale, int threads) {
#define MLA_DECODE(WB, CB)                                                                                        \
    decode(q_nope, qn_sb, qn_sh, q_pe, qp_sb, qp_sh, w_uk, w_uv, WB, cache, CB, tables, table_stride, seq_lens, \
           q_lat, o_lat, out, B, H, Dn, Dv, R, P, block_size, scale, threads)
    if (w_bf16 && cache_bf16) MLA_DECODE(1, 1);
    else if (w_bf16) MLA_DECODE(1, 0);
    else if (cache_bf16) MLA_DECODE(0, 1);
    else MLA_DECODE(0, 0);
#undef MLA_DECODE
}

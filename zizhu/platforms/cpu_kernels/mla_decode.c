/* Weight-absorbed MLA decode over the paged latent cache, one new query token per sequence, summed
 * in fp32: the absorbed weights fp32 or bf16, the cached rows fp32 or bf16 (a bf16 model's).
 *
 * out[b, h] = W_UV[h] . softmax(scale * [W_UK[h]^T q_nope[b, h] | q_pe[b, h]] . rows^T) . c_kv rows
 *
 * In torch this is ~12 operators per layer (two einsums, a gather that copies the whole context,
 * two bmms, mask, softmax); at batch 1 their dispatch costs more than their arithmetic. Three
 * phases share one parallel region:
 * 1. absorb q: per head, so each W_UK[h] row is read from memory once for the whole batch;
 * 2. attend: per sequence and panel of 16 heads, so each cached row is read once for the panel;
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

/* The attention products are panel products (as gemm_packed.c's) with a group's heads as the panel's
 * columns, 16 (or 8 when a group has no more heads): the sequence's queries, transposed to
 * qt[k][16], are the panel, so a score tile is six cached rows against the group's heads, per k six
 * broadcasts of the rows and two panel vectors into twelve sums; the weighted sum of c_kv rows is
 * four heads against 24 latent columns, per cached row three vectors of it and four broadcast
 * probabilities. Each score and each output sums in one fixed order (k, then cached row j, from
 * zero), each head in a lane of its own, whatever the batch, the width of the panel or the split
 * across threads, so a sequence's result does not depend on its neighbours. Against four heads x
 * three rows then four heads x 24 columns over rows scored apart, alternating, one layer of the
 * small benchmark model at 192 cached tokens (cold cache): 64 sequences 0.82x the time (fp32 cache)
 * and 0.89x (bf16), 8 sequences 0.83x, one 0.98x; at 2,000 tokens 8 sequences 0.66x, one 0.91x
 * (bf16 1.01x); a 64-sequence fp32 decode step 0.97x. */
#define HEAD_PANEL 16
#define TILE 6

/* s[i][c] = scale * row_i . qt[., c] for `nr` (1..TILE) fp32 rows and the 8 * nv columns of qt
 * [W][8 nv]. The `nn` rows of the next tile are prefetched meanwhile, a line of each every 16 k:
 * cached rows sit in scattered blocks, out of the hardware prefetchers' sight, and a step reads
 * them from DRAM. */
static inline __attribute__((always_inline)) void score_tile(const float* const* row, const int nr, const float* qt,
                                                             const int nv, int64_t W, float scale, float* s,
                                                             const void* const* next, int nn, int64_t row_bytes) {
    const int pw = 8 * nv;
    __m256 c0[TILE], c1[TILE];
    for (int i = 0; i < nr; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < W; k++) {
        if ((k & 15) == 0 && k * 4 < row_bytes)
            for (int i = 0; i < nn; i++) _mm_prefetch((const char*)next[i] + k * 4, _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(qt + k * pw);
        const __m256 w1 = nv == 2 ? _mm256_loadu_ps(qt + k * pw + 8) : w0;
        for (int i = 0; i < nr; i++) {
            const __m256 b = _mm256_broadcast_ss(row[i] + k);
            c0[i] = _mm256_fmadd_ps(b, w0, c0[i]);
            if (nv == 2) c1[i] = _mm256_fmadd_ps(b, w1, c1[i]);
        }
    }
    const __m256 sv = _mm256_set1_ps(scale);
    for (int i = 0; i < nr; i++) {
        _mm256_storeu_ps(s + i * pw, _mm256_mul_ps(c0[i], sv));
        if (nv == 2) _mm256_storeu_ps(s + i * pw + 8, _mm256_mul_ps(c1[i], sv));
    }
}

/* Scores of a sequence's `len` cached rows against a panel of 8 * nv heads, into s[j][8 nv]; a bf16
 * cache's rows are widened to `wide` (TILE x W floats) first, since a broadcast from bf16 costs
 * four instructions. */
static inline __attribute__((always_inline)) void score_rows(const void* const* rows, int64_t len, const int cbf16,
                                                             const float* qt, const int nv, int64_t W, float scale,
                                                             float* s, float* wide) {
    const int64_t W8 = W & ~(int64_t)7, row_bytes = W * (cbf16 ? 2 : 4);
    for (int64_t j = 0; j < len; j += TILE) {
        const int nr = len - j < TILE ? (int)(len - j) : TILE;
        const float* r[TILE];
        for (int i = 0; i < nr; i++) {
            if (cbf16) {
                const uint16_t* src = rows[j + i];
                float* dst = wide + i * W;
                for (int64_t k = 0; k < W8; k += 8) _mm256_storeu_ps(dst + k, load_bf16(src + k));
                for (int64_t k = W8; k < W; k++) dst[k] = bf16_to_f32(src[k]);
                r[i] = dst;
            } else {
                r[i] = (const float*)rows[j + i];
            }
        }
        float* out = s + j * 8 * nv;
        const int nn = len - j - nr < TILE ? (int)(len - j - nr) : TILE;
        const void* const* next = rows + j + nr;
        switch (nr) {
            case 6: score_tile(r, 6, qt, nv, W, scale, out, next, nn, row_bytes); break;
            case 5: score_tile(r, 5, qt, nv, W, scale, out, next, nn, row_bytes); break;
            case 4: score_tile(r, 4, qt, nv, W, scale, out, next, nn, row_bytes); break;
            case 3: score_tile(r, 3, qt, nv, W, scale, out, next, nn, row_bytes); break;
            case 2: score_tile(r, 2, qt, nv, W, scale, out, next, nn, row_bytes); break;
            default: score_tile(r, 1, qt, nv, W, scale, out, next, nn, row_bytes); break;
        }
    }
}

/* In place over s[len][8 nv]: each column's exp(s - max) (softmax without the division); inv[c]
 * gets 1 / the column's sum. The columns are the panel's heads, nv vectors per cached row, each
 * lane on its own, so a head's result does not depend on the panel's width. */
static inline __attribute__((always_inline)) void exp_columns(float* s, int64_t len, const int nv, float* inv) {
    for (int v = 0; v < nv; v++) {
        float* col = s + 8 * v;
        __m256 m = _mm256_set1_ps(-INFINITY), t = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; j++) m = _mm256_max_ps(m, _mm256_loadu_ps(col + j * 8 * nv));
        for (int64_t j = 0; j < len; j++) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(col + j * 8 * nv), m));
            _mm256_storeu_ps(col + j * 8 * nv, e);
            t = _mm256_add_ps(t, e);
        }
        _mm256_storeu_ps(inv + 8 * v, _mm256_div_ps(_mm256_set1_ps(1.0f), t));
    }
}

/* o[i][c] = inv[i] * sum_j p[j][i] * row_j[r0 + c] for `nh` (1..4) heads (columns of p, rows of p ps apart)
 * and 8 * nv (8, 16 or 24) columns of the cached rows (fp32 or bf16) from r0, summed over j in
 * order: per cached row nv vectors of it and nh broadcast probabilities feed nh * nv sums (four
 * heads of 24 columns: twelve sums for seven loads). */
static inline __attribute__((always_inline)) void value_tile(const float* p, int64_t ps, const float* inv, const int nh,
                                                             const void* const* rows, const int cbf16, int64_t len,
                                                             int64_t r0, const int nv, float* o, int64_t os) {
    __m256 acc[4][3];
    for (int i = 0; i < nh; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        __m256 x[3];
        for (int v = 0; v < nv; v++) x[v] = load_w(rows[j], r0 + 8 * v, cbf16);
        for (int i = 0; i < nh; i++) {
            const __m256 b = _mm256_broadcast_ss(p + j * ps + i);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm256_fmadd_ps(b, x[v], acc[i][v]);
        }
    }
    for (int i = 0; i < nh; i++) {
        const __m256 scale = _mm256_set1_ps(inv[i]);
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(o + i * os + 8 * v, _mm256_mul_ps(acc[i][v], scale));
    }
}

/* value_tile for nh heads (a constant where inlined) and the widest of 24, 16 or 8 of the `left`
 * columns from r0; returns the columns done. */
static inline __attribute__((always_inline)) int64_t value_cols(const float* p, int64_t ps, const float* inv, const int nh,
                                                                const void* const* rows, const int cbf16, int64_t len,
                                                                int64_t r0, int64_t left, float* o, int64_t os) {
    if (left >= 24) { value_tile(p, ps, inv, nh, rows, cbf16, len, r0, 3, o, os); return 24; }
    if (left >= 16) { value_tile(p, ps, inv, nh, rows, cbf16, len, r0, 2, o, os); return 16; }
    value_tile(p, ps, inv, nh, rows, cbf16, len, r0, 1, o, os);
    return 8;
}

/* The attended latent of `nh` heads of a panel: o[h][r] for h < nh and r < R, rows of o R apart;
 * four heads at a time over the columns in tiles of 24, then the heads left, then the last R % 8
 * columns one by one. */
static void values(const float* p, int64_t ps, const float* inv, int64_t nh, const void* const* rows, const int cbf16,
                   int64_t len, int64_t R, float* o) {
    const int64_t R8 = R & ~(int64_t)7;
    for (int64_t h = 0; h < nh;) {
        const int64_t n = nh - h < 4 ? nh - h : 4;
        for (int64_t r = 0; r < R8;) {
            float* oh = o + h * R + r;
            switch (n) {
                case 4: r += value_cols(p + h, ps, inv + h, 4, rows, cbf16, len, r, R8 - r, oh, R); break;
                case 3: r += value_cols(p + h, ps, inv + h, 3, rows, cbf16, len, r, R8 - r, oh, R); break;
                case 2: r += value_cols(p + h, ps, inv + h, 2, rows, cbf16, len, r, R8 - r, oh, R); break;
                default: r += value_cols(p + h, ps, inv + h, 1, rows, cbf16, len, r, R8 - r, oh, R); break;
            }
        }
        h += n;
    }
    for (int64_t i = 0; i < nh; i++)
        for (int64_t r = R8; r < R; r++) {
            float t = 0.0f;
            for (int64_t j = 0; j < len; j++) t = fmaf(p[j * ps + i], scalar_w(rows[j], r, cbf16), t);
            o[i * R + r] = t * inv[i];
        }
}

/* The attention of one sequence's `nh` heads (at most 8 nv) from h0: transposed queries into qt,
 * scores, exponentials, then the weighted c_kv rows (which the scores left in L2) into o_lat. */
static inline __attribute__((always_inline)) void attend(int64_t b, int64_t h0, int64_t nh, const int nv,
                                                         const float* q_lat, const float* q_pe, int64_t qp_sb,
                                                         int64_t qp_sh, const void* const* rows, const int cbf16,
                                                         int64_t len, float* o_lat, int64_t H, int64_t R, int64_t P,
                                                         float scale, float* qt, float* st, float* wide) {
    const int pw = 8 * nv;
    float inv[HEAD_PANEL];
    for (int64_t k = 0; k < R + P; k++)
        for (int64_t c = 0; c < pw; c++)
            qt[k * pw + c] = c >= nh ? 0.0f
                             : k < R ? q_lat[(b * H + h0 + c) * R + k]
                                     : q_pe[b * qp_sb + (h0 + c) * qp_sh + k - R];
    score_rows(rows, len, cbf16, qt, nv, R + P, scale, st, wide);
    exp_columns(st, len, nv, inv);
    values(st, pw, inv, nh, rows, cbf16, len, R, o_lat + (b * H + h0) * R);
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

/* The whole decode for one weight type and one cache type, bf16 and cbf16 constants where this is
 * inlined, so every inner loop is compiled for them without a branch per load. */
static inline __attribute__((always_inline)) void decode(
    const float* q_nope, int64_t qn_sb, int64_t qn_sh, const float* q_pe, int64_t qp_sb, int64_t qp_sh,
    const void* w_uk, const void* w_uv, const int bf16, const void* cache, const int cbf16, const int64_t* tables,
    int64_t table_stride, const int64_t* seq_lens, float* q_lat, float* o_lat, float* out, int64_t B, int64_t H,
    int64_t Dn, int64_t Dv, int64_t R, int64_t P, int64_t block_size, float scale, int threads) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    /* enough (sequence, head group) items to keep every thread busy, in groups of at most a panel's
     * 16 heads that divide H: a whole number of items per thread, or at least two each, and no more
     * groups than that, since a group's heads share each cached row's loads */
    int64_t groups = 1;
    while (groups < H && (((B * groups) % threads != 0 && B * groups < 2 * threads) || H % groups != 0
                          || H / groups > HEAD_PANEL))
        groups++;
    const int64_t per_group = H / groups, W = R + P;

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
        /* 2. attend, per (sequence, group of heads): the group's queries transposed into a panel,
         *    the scores of every cached row, their exponentials, the weighted c_kv rows (which the
         *    scores left in L2) */
        float* qt = malloc(sizeof(float) * W * HEAD_PANEL);
        float* st = malloc(sizeof(float) * (max_len + 1) * HEAD_PANEL);
        const void** rows = malloc(sizeof(void*) * (max_len + 1));
        float* wide = cbf16 ? malloc(sizeof(float) * TILE * W) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * groups; item++) {
            const int64_t b = item / groups, h0 = item % groups * per_group, len = seq_lens[b];
            if (len <= 0) {  /* nothing cached: nothing attended */
                memset(o_lat + (b * H + h0) * R, 0, sizeof(float) * per_group * R);
                continue;
            }
            const int64_t* table = tables + b * table_stride;
            for (int64_t j = 0, blk = 0; j < len; blk++)
                for (int64_t i = 0; i < block_size && j < len; i++, j++)
                    rows[j] = w_at(cache, (table[blk] * block_size + i) * W, cbf16);
            if (per_group > 8)
                attend(b, h0, per_group, 2, q_lat, q_pe, qp_sb, qp_sh, rows, cbf16, len, o_lat, H, R, P, scale, qt, st, wide);
            else
                attend(b, h0, per_group, 1, q_lat, q_pe, qp_sb, qp_sh, rows, cbf16, len, o_lat, H, R, P, scale, qt, st, wide);
        }
        free(qt); free(st); free(rows); free(wide);
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

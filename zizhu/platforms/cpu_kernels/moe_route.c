/* DeepSeek MoE routing in one call: router logits, scores, group limiting, top-k and weights.
 *
 * In torch a router is ~15 small operators per layer (linear, sigmoid, view, topk twice, sum,
 * scatter, repeat, masked_fill, gather, normalise), and at batch 1 their dispatch costs far more
 * than the arithmetic. Semantics follow zizhu.ops.route_experts exactly, in fp32; among equal
 * scores the lower expert index wins.
 *   scoring: 0 softmax, 1 sigmoid;  method: 0 greedy, 1 group_limited_greedy, 2 noaux_tc.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "moe.h"
#include "simd.h"

/* index of the largest of v[0..n) not yet taken, lowest index among equals; -1 if none */
static int64_t argmax_free(const float* v, const char* taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

void moe_route_f32(const float* x, int64_t x_stride, const float* w, const float* bias, int64_t T, int64_t D,
                   int64_t E, int scoring, int method, int64_t n_group, int64_t topk_group, int64_t K,
                   int norm, float scaling, float* logits, int64_t* ids, float* weights, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * E * D >= 32768)
    for (int64_t j = 0; j < T * E; j++) logits[j] = dot_f32(x + (j / E) * x_stride, w + (j % E) * D, D);

    float* scores = malloc(sizeof(float) * E);
    float* choice = malloc(sizeof(float) * E);
    float* group_score = malloc(sizeof(float) * (n_group > 0 ? n_group : 1));
    char* taken = malloc(E > n_group ? E : n_group);
    const int64_t per_group = n_group > 0 ? E / n_group : E;
    for (int64_t t = 0; t < T; t++) {
        const float* l = logits + t * E;
        if (scoring == 1) {
            for (int64_t e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-l[e]));
        } else {
            float m = l[0], total = 0.0f;
            for (int64_t e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
            for (int64_t e = 0; e < E; e++) total += (scores[e] = expf(l[e] - m));
            for (int64_t e = 0; e < E; e++) scores[e] /= total;
        }
        for (int64_t e = 0; e < E; e++) choice[e] = method == 2 && bias ? scores[e] + bias[e] : scores[e];
        if (method != 0 && n_group > 1) {
            for (int64_t g = 0; g < n_group; g++) {
                const float* c = choice + g * per_group;
                if (method == 2) { /* sum of the group's two best */
                    float a = -INFINITY, b = -INFINITY;
                    for (int64_t i = 0; i < per_group; i++) {
                        if (c[i] > a) { b = a; a = c[i]; } else if (c[i] > b) b = c[i];
                    }
                    group_score[g] = per_group > 1 ? a + b : a;
                } else { /* the group's best */
                    float a = -INFINITY;
                    for (int64_t i = 0; i < per_group; i++) a = c[i] > a ? c[i] : a;
                    group_score[g] = a;
                }
            }
            for (int64_t g = 0; g < n_group; g++) taken[g] = 0;
            for (int64_t k = 0; k < topk_group; k++) {
                const int64_t g = argmax_free(group_score, taken, n_group);
                if (g >= 0) taken[g] = 1;
            }
            const float fill = method == 2 ? -INFINITY : 0.0f;
            for (int64_t g = 0; g < n_group; g++)
                if (!taken[g])
                    for (int64_t i = 0; i < per_group; i++) choice[g * per_group + i] = fill;
        }
        for (int64_t e = 0; e < E; e++) taken[e] = 0;
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const int64_t e = argmax_free(choice, taken, E);
            taken[e] = 1;
            ids[t * K + k] = e;
            weights[t * K + k] = method == 2 ? scores[e] : choice[e];
            sum += weights[t * K + k];
        }
        for (int64_t k = 0; k < K; k++) {
            if (norm) weights[t * K + k] /= sum + 1e-20f;
            weights[t * K + k] *= scaling;
        }
    }
    free(scores); free(choice); free(group_score); free(taken);
}

/* A whole MoE block: with norm_weight, RMS-normalise x first (rms_norm_row, as rms_norm_f32 does);
 * route each token (as moe_route_f32), append the S shared experts (stacked after the E routed
 * ones, weight 1), run every chosen expert (moe_f32); with add_input, return x + that, the
 * decoder layer's residual add. One call instead of five, and no tensors built in between. */
void moe_routed_f32(const float* x, float* out, int64_t T, int64_t D, const float* norm_weight, float eps,
                    int add_input, const float* router, const float* bias, int64_t E, int scoring, int method,
                    int64_t n_group, int64_t topk_group, int64_t K, int norm, float scaling, int64_t S,
                    const void* w13, const float* s13, const void* w2, const float* s2, int w_bf16, int w_packed,
                    int64_t I, int threads) {
    float* logits = malloc(sizeof(float) * (T * E + 1));
    int64_t* routed_ids = malloc(sizeof(int64_t) * (T * K + 1));
    float* routed_weights = malloc(sizeof(float) * (T * K + 1));
    int64_t* ids = malloc(sizeof(int64_t) * (T * (K + S) + 1));
    float* weights = malloc(sizeof(float) * (T * (K + S) + 1));
    float* normed = norm_weight ? malloc(sizeof(float) * (T * D + 1)) : NULL;
    const float* in = x;
    if (normed) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * D >= 65536)
        for (int64_t t = 0; t < T; t++) rms_norm_row(x + t * D, norm_weight, normed + t * D, D, eps);
        in = normed;
    }
    if (E > 0)  /* E = 0 (and K = 0): no router, a dense MLP as S always-chosen experts */
        moe_route_f32(in, D, router, bias, T, D, E, scoring, method, n_group, topk_group, K, norm, scaling, logits,
                      routed_ids, routed_weights, threads);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k++) {
            ids[t * (K + S) + k] = routed_ids[t * K + k];
            weights[t * (K + S) + k] = routed_weights[t * K + k];
        }
        for (int64_t s = 0; s < S; s++) {
            ids[t * (K + S) + K + s] = E + s;
            weights[t * (K + S) + K + s] = 1.0f;
        }
    }
    moe_f32(in, out, ids, weights, T, K + S, E + S, w13, s13, w2, s2, w_bf16, w_packed, D, I, threads);
    if (add_input)
        for (int64_t j = 0; j < T * D; j++) out[j] = x[j] + out[j];
    free(logits); free(routed_ids); free(routed_weights); free(ids); free(weights); free(normed);
}

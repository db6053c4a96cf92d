/* Every decoder layer of a decode-only step in one call: for each layer, the fused MLA layer
 * (mla_layer.c) and then the MoE block (moe_route.c), each with its norm and residual add.
 *
 * At batch 1 the kernels of a small model's step take about 18 ms and the Python that called them
 * layer by layer (module calls, argument checks, tensor allocation, two ctypes calls per layer)
 * another 2-4 ms: more the colder the caches the weight streams leave behind. The per-layer
 * arguments are fixed once the model is loaded, so the platform builds this table once
 * (cpu_kernels.decode_stack_table) and each step passes only what changes: the hidden rows, the
 * positions' cos / sin and the paged cache's tables. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mla.h"
#include "moe.h"

/* One decoder layer's decode weights: MLADecodeLayer's fields, then MoEBlock's (zizhu/ops). The
 * field order and types are mirrored by the ctypes Structure in cpu_kernels/__init__.py. */
typedef struct {
    const float* input_norm;
    float input_eps;
    const void* q_kv_a;
    const float* q_kv_a_scale; /* NULL: fp32 or (proj_bf16) bf16 projections */
    int64_t q_lora;
    const float* q_a_norm;
    float q_a_eps;
    const void* q_b;
    const float* q_b_scale;
    const float* kv_a_norm;
    float kv_a_eps;
    const void* w_uk;
    const void* w_uv;
    int w_bf16;
    const void* o;
    const float* o_scale;
    int proj_bf16;
    int int8_panels; /* int8 projections in int8 panels */
    const void* q_kv_a_tail; /* non-NULL: that projection packed by pack_panels, this its tail panel */
    const void* q_b_tail;
    const void* o_tail;
    int64_t heads, nope, rope, v_dim, rank;
    float scale;
    const float* ffn_norm;
    float ffn_eps;
    const float* router; /* NULL with experts = 0: a dense MLP, its `shared` experts only */
    const float* bias;
    int64_t experts;
    int scoring, method;
    int64_t n_group, topk_group, top_k;
    int norm_topk;
    float scaling;
    int64_t shared;
    const void* w13;
    const float* s13; /* NULL: fp32 or (experts_bf16) bf16 experts */
    const void* w2;
    const float* s2;
    int experts_bf16;
    int experts_packed; /* which of w13 (bit 0) and w2 (bit 1) are in panels (moe_f32) */
    int64_t inter;
} DecodeLayer;

/* h, out [B, D]: out = the hidden rows after every layer; caches[l] is layer l's paged latent cache. */
void decode_stack_f32(const DecodeLayer* layers, int64_t L, const float* h, float* out, int64_t B, int64_t D,
                      const float* cos, const float* sin, int interleaved, void* const* caches, int cache_bf16,
                      const int64_t* slots, const int64_t* tables, int64_t table_stride, const int64_t* seq_lens,
                      int64_t block_size, int threads) {
    float* attended = malloc(sizeof(float) * (B * D + 1));
    if (L == 0) memcpy(out, h, sizeof(float) * B * D);
    for (int64_t l = 0; l < L; l++) {
        const DecodeLayer* y = layers + l;
        mla_decode_layer_f32(l == 0 ? h : out, attended, B, D, y->input_norm, y->input_eps, y->q_kv_a,
                             y->q_kv_a_scale, y->q_lora, y->q_a_norm, y->q_a_eps, y->q_b, y->q_b_scale, y->kv_a_norm,
                             y->kv_a_eps, y->w_uk, y->w_uv, y->w_bf16, y->o, y->o_scale, y->proj_bf16, y->int8_panels,
                             y->q_kv_a_tail,
                             y->q_b_tail, y->o_tail, y->heads,
                             y->nope, y->rope, y->v_dim, y->rank, y->scale, cos, sin, interleaved, caches[l],
                             cache_bf16, slots, tables, table_stride, seq_lens, block_size, threads);
        moe_routed_f32(attended, out, B, D, y->ffn_norm, y->ffn_eps, 1, y->router, y->bias, y->experts, y->scoring,
                       y->method, y->n_group, y->topk_group, y->top_k, y->norm_topk, y->scaling, y->shared, y->w13,
                       y->s13, y->w2, y->s2, y->experts_bf16, y->experts_packed, y->inter, threads);
    }
    free(attended);
}

"""ctypes entries of whole layer pieces: the MoE block, MLA decode and its latent write, and the
decode stack (decode_stack.c) with the per-layer table it reads."""

from __future__ import annotations

import ctypes

import torch

from zizhu.ops.moe import Routing
from zizhu.platforms.cpu_kernels.layout import Int8Panels, PackedWeight, bf16_flag, expert_rows, packed_flags, stored
from zizhu.platforms.cpu_kernels.products import kernel_rows


def moe(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, D] fp32
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    w13: torch.Tensor, s13: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None,
) -> torch.Tensor:
    """All routed experts of a layer, grouping and weighted sum included, in one native call.
    Weights are int8 with per-row scales, or fp32 or bf16 with both scales None, `[E, N, K]` or as
    pack_experts left them."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape[0], expert_rows(w13), x.shape[-1]
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    lib.moe_f32(
        x.data_ptr(), out.data_ptr(), ids.data_ptr(), weights.data_ptr(), num_tokens, top_k, num_experts,
        w13.data_ptr(), None if s13 is None else s13.data_ptr(), w2.data_ptr(), None if s2 is None else s2.data_ptr(),
        bf16_flag(w13), packed_flags(w13, w2), hidden, two_inter // 2, torch.get_num_threads(),
    )
    return out


def mla_decode(
    lib: ctypes.CDLL,
    q_nope: torch.Tensor,  # [B, H, Dn] fp32
    q_pe: torch.Tensor,  # [B, H, P] fp32, roped
    w_uk: torch.Tensor,  # [H, Dn, R] fp32 or bf16
    w_uv: torch.Tensor,  # [H, Dv, R], the same dtype
    cache: torch.Tensor,  # [num_blocks, block_size, R + P] fp32 or bf16
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    seq_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode for one query token per sequence: `[B, H, Dv]` fp32."""
    batch, heads, nope = q_nope.shape
    _, value, rank = w_uv.shape
    rope = q_pe.shape[-1]
    if q_nope.stride(-1) != 1:
        q_nope = q_nope.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    tables = block_tables.contiguous()
    lens = seq_lens.contiguous()
    scratch = torch.empty(2 * batch * heads * rank, dtype=torch.float32)  # absorbed q, then attended latent
    out = torch.empty(batch, heads, value, dtype=torch.float32)
    lib.mla_decode_f32(
        q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1), q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1),
        w_uk.data_ptr(), w_uv.data_ptr(), bf16_flag(w_uk), cache.data_ptr(),
        bf16_flag(cache), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        scratch.data_ptr(), scratch.data_ptr() + 4 * batch * heads * rank, out.data_ptr(),
        batch, heads, nope, value, rank, rope, cache.shape[1], scale, torch.get_num_threads(),
    )
    return out


def mla_decode_layer(lib: ctypes.CDLL, h: torch.Tensor, layer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
    """`Platform.mla_decode_layer` in one native call (mla_layer.c): `h [B, D]` contiguous fp32, the
    projections int8 or full precision (fp32 or bf16), the cache fp32 or bf16."""
    tokens, hidden = h.shape
    rank = layer.kv_a_norm.shape[0]
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(h)
    lib.mla_decode_layer_f32(
        h.data_ptr(), out.data_ptr(), tokens, hidden, layer.input_norm.data_ptr(), layer.input_eps,
        _ptr(layer.q_kv_a), _ptr(layer.q_kv_a_scale), layer.q_lora_rank,
        layer.q_a_norm.data_ptr(), layer.q_a_eps, _ptr(layer.q_b), _ptr(layer.q_b_scale),
        layer.kv_a_norm.data_ptr(), layer.kv_a_eps,
        layer.w_uk.data_ptr(), layer.w_uv.data_ptr(), bf16_flag(layer.w_uk),
        _ptr(layer.o), _ptr(layer.o_scale), bf16_flag(layer.o), int(isinstance(layer.o, Int8Panels)),
        _tail(layer.q_kv_a), _tail(layer.q_b), _tail(layer.o),
        layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, rank, layer.scale,
        cos.data_ptr(), sin.data_ptr(), int(interleaved), cache.data_ptr(), bf16_flag(cache),
        slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), cache.shape[1], torch.get_num_threads(),
    )
    return out


def mla_write_latent(lib, q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping) -> None:
    """`ops.mla_write_latent` in one native call (q's rope dims rotated in place): fp32 inputs, an fp32
    or bf16 cache."""
    tokens, heads, head_dim = q.shape
    rank = norm_weight.shape[0]
    rope = kv_a.shape[-1] - rank
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    lib.mla_write_latent_f32(
        q.data_ptr(), q.stride(0), q.stride(1), heads, head_dim - rope, kv_a.data_ptr(), kv_a.stride(0),
        norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(), int(interleaved), cache.data_ptr(),
        bf16_flag(cache), slots.data_ptr(), tokens, rank, rope, torch.get_num_threads(),
    )


SCORING = {"softmax": 0, "sigmoid": 1}


METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def route_experts(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.route_experts` in one native call: (ids [T, K] int64, weights [T, K] fp32)."""
    x2 = kernel_rows(x)
    tokens, hidden = x2.shape
    experts = weight.shape[0]
    logits = torch.empty(tokens, experts, dtype=torch.float32)
    ids = torch.empty(tokens, routing.top_k, dtype=torch.int64)
    weights = torch.empty(tokens, routing.top_k, dtype=torch.float32)
    lib.moe_route_f32(
        x2.data_ptr(), x2.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(), tokens, hidden, experts,
        SCORING[routing.scoring], METHODS[routing.method], routing.n_group, routing.topk_group, routing.top_k,
        int(routing.norm_topk_prob), routing.scaling, logits.data_ptr(), ids.data_ptr(), weights.data_ptr(),
        torch.get_num_threads(),
    )
    return ids, weights


def moe_routed(
    lib: ctypes.CDLL, x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, routing, num_shared: int,
    w13: torch.Tensor, s13: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, add_input: bool = False,
) -> torch.Tensor:
    """The MoE block in one native call (moe_route.c): `[T, D]` fp32 `(x if add_input else 0) +
    MoE(rms_norm(x) if norm_weight is given else x)`."""
    x = x.contiguous()
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    lib.moe_routed_f32(
        x.data_ptr(), out.data_ptr(), tokens, hidden, None if norm_weight is None else norm_weight.data_ptr(), eps,
        int(add_input), router.data_ptr(), None if bias is None else bias.data_ptr(),
        router.shape[0], SCORING[routing.scoring], METHODS[routing.method], routing.n_group, routing.topk_group,
        routing.top_k, int(routing.norm_topk_prob), routing.scaling, num_shared,
        w13.data_ptr(), None if s13 is None else s13.data_ptr(), w2.data_ptr(), None if s2 is None else s2.data_ptr(),
        bf16_flag(w13), packed_flags(w13, w2), expert_rows(w13) // 2, torch.get_num_threads(),
    )
    return out


class DecodeLayerArgs(ctypes.Structure):
    """decode_stack.c's DecodeLayer: the same fields, in the same order and C types."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p), ("input_eps", ctypes.c_float),
        ("q_kv_a", ctypes.c_void_p), ("q_kv_a_scale", ctypes.c_void_p), ("q_lora", ctypes.c_int64),
        ("q_a_norm", ctypes.c_void_p), ("q_a_eps", ctypes.c_float),
        ("q_b", ctypes.c_void_p), ("q_b_scale", ctypes.c_void_p),
        ("kv_a_norm", ctypes.c_void_p), ("kv_a_eps", ctypes.c_float),
        ("w_uk", ctypes.c_void_p), ("w_uv", ctypes.c_void_p), ("w_bf16", ctypes.c_int),
        ("o", ctypes.c_void_p), ("o_scale", ctypes.c_void_p), ("proj_bf16", ctypes.c_int), ("int8_panels", ctypes.c_int),
        ("q_kv_a_tail", ctypes.c_void_p), ("q_b_tail", ctypes.c_void_p), ("o_tail", ctypes.c_void_p),
        ("heads", ctypes.c_int64), ("nope", ctypes.c_int64), ("rope", ctypes.c_int64), ("v_dim", ctypes.c_int64),
        ("rank", ctypes.c_int64), ("scale", ctypes.c_float),
        ("ffn_norm", ctypes.c_void_p), ("ffn_eps", ctypes.c_float),
        ("router", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("experts", ctypes.c_int64),
        ("scoring", ctypes.c_int), ("method", ctypes.c_int),
        ("n_group", ctypes.c_int64), ("topk_group", ctypes.c_int64), ("top_k", ctypes.c_int64),
        ("norm_topk", ctypes.c_int), ("scaling", ctypes.c_float), ("shared", ctypes.c_int64),
        ("w13", ctypes.c_void_p), ("s13", ctypes.c_void_p), ("w2", ctypes.c_void_p), ("s2", ctypes.c_void_p),
        ("experts_bf16", ctypes.c_int), ("experts_packed", ctypes.c_int), ("inter", ctypes.c_int64),
    ]


def _ptr(t: "torch.Tensor | PackedWeight | Int8Panels | None") -> int | None:
    return None if t is None else stored(t).data_ptr()


def _tail(w) -> int | None:
    """A packed projection's tail panel, which also tells the kernels it is packed; None for a row-major one."""
    return w.tail.data_ptr() if isinstance(w, PackedWeight) else None


# what a block without a router (a dense MLP) passes for routing: no routed experts
_NO_ROUTING = Routing(top_k=0)


def decode_stack_table(stack) -> ctypes.Array:
    """The per-layer arguments of decode_stack_f32 for an `ops.DecodeStack`, built once: they point
    into the model's weights, which stay where they are."""
    rows = []
    for layer in stack.layers:
        a, f = layer.attention, layer.ffn
        r = f.routing or _NO_ROUTING
        rows.append(DecodeLayerArgs(
            _ptr(a.input_norm), a.input_eps, _ptr(a.q_kv_a), _ptr(a.q_kv_a_scale), a.q_lora_rank,
            _ptr(a.q_a_norm), a.q_a_eps, _ptr(a.q_b), _ptr(a.q_b_scale), _ptr(a.kv_a_norm), a.kv_a_eps,
            _ptr(a.w_uk), _ptr(a.w_uv), bf16_flag(a.w_uk), _ptr(a.o), _ptr(a.o_scale),
            bf16_flag(a.o), int(isinstance(a.o, Int8Panels)), _tail(a.q_kv_a), _tail(a.q_b), _tail(a.o),
            a.num_heads, a.nope_dim, a.rope_dim, a.v_dim, a.kv_a_norm.shape[0], a.scale,
            _ptr(f.norm), f.eps, _ptr(f.router), _ptr(f.bias), 0 if f.router is None else f.router.shape[0],
            SCORING[r.scoring], METHODS[r.method], r.n_group, r.topk_group, r.top_k, int(r.norm_topk_prob), r.scaling,
            f.num_shared, _ptr(f.w13), _ptr(f.w13_scale), _ptr(f.w2), _ptr(f.w2_scale), bf16_flag(f.w13),
            packed_flags(f.w13, f.w2), expert_rows(f.w13) // 2,
        ))
    return (DecodeLayerArgs * len(rows))(*rows)


def decode_stack(lib: ctypes.CDLL, h: torch.Tensor, table: ctypes.Array, cos, sin, interleaved, caches, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
    """`Platform.decode_layers` in one native call (decode_stack.c): `h [B, D]` contiguous fp32."""
    tokens, hidden = h.shape
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    cache_ptrs = (ctypes.c_void_p * len(caches))(*[c.data_ptr() for c in caches])
    out = torch.empty_like(h)
    lib.decode_stack_f32(
        table, len(table), h.data_ptr(), out.data_ptr(), tokens, hidden, cos.data_ptr(), sin.data_ptr(), int(interleaved),
        cache_ptrs, bf16_flag(caches[0]), slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), caches[0].shape[1],
        torch.get_num_threads(),
    )
    return out

"""The platform seam: everything device-specific that the engine and models need.

A vendor adds a chip by subclassing `Platform` and overriding what its hardware does better:
the hot ops (paged MLA decode, absorbed or not, MLA prefill, the latent write with RoPE, MoE
routing and experts, full-precision and int8 projections and the layout of the weight they read,
RMSNorm, KV-cache writes, greedy argmax and greedy tokens from the head), the KV-cache layout and
allocation, memory queries, graph capture and the torch.distributed backend. Every default here is a correct reference, so
a new platform works first and gets fast second. Prove a platform with
`tests/platforms/test_conformance.py`, which checks its ops against the references.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from zizhu import ops


class Platform:
    name: str = "base"
    device_type: str = "cpu"
    distributed_backend: str = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        """Whether this platform's device exists on this machine (used for auto-detection)."""
        return False

    # ------------------------------------------------------------------ device and memory
    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def default_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype when the user asks for "auto"."""
        return checkpoint_dtype or torch.float32

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the hidden states between operators for a model whose weights are in
        `weight_dtype`: the weights' own by default. A platform without arithmetic in that dtype
        may keep activations wider; then every hook receives them with the narrower weights."""
        return weight_dtype

    def supports_fp8_matmul(self) -> bool:
        """False: FP8 checkpoints are dequantized at load to the compute dtype."""
        return False

    def available_memory(self) -> int:
        """Bytes free for the KV cache after the weights are loaded."""
        raise NotImplementedError

    def configure(self) -> None:
        """Process-wide settings (threads, allocator) applied once before the model loads."""

    def place_weights(self, model: torch.nn.Module) -> None:
        """Called once the weights are final (loaded, quantized, prepared), before the first step:
        a platform may move or advise their memory (pin it, back it with large pages), in place,
        for it must not change where a tensor's data lives. Default: nothing."""

    def synchronize(self) -> None:
        """Wait for queued device work; a no-op for synchronous devices."""

    # ------------------------------------------------------------------ KV cache layout
    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, width: int, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """One `[num_blocks, block_size, width]` tensor per layer (width = kv_lora_rank + rope dim)."""
        return [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=self.device) for _ in range(num_layers)]

    # ------------------------------------------------------------------ hot ops
    rms_norm = staticmethod(ops.rms_norm)
    write_kv_cache = staticmethod(ops.write_kv_cache)
    paged_mla_decode = staticmethod(ops.paged_mla_decode)
    mla_prefill = staticmethod(ops.mla_prefill)
    route_experts = staticmethod(ops.route_experts)
    moe_experts = staticmethod(ops.moe_experts)
    # int8 weights (int8_linear, int8 experts in moe_experts) may meet activations rounded per row to
    # int16, largest |x| to 32767, so integer multiply-adds can do the work: each output then moves by
    # at most sum(|w|) * max|x| / 65534, far below the weights' own rounding, and a row's result still
    # depends on that row alone. The conformance tests allow exactly that much.
    int8_linear = staticmethod(ops.int8_linear)
    linear = staticmethod(F.linear)  # the model's full-precision projections

    def route_and_run_experts(
        self, x, router_weight, bias, routing, num_shared, w13, w2, w13_scale=None, w2_scale=None,
        norm_weight=None, eps=0.0, add_input=False,
    ) -> torch.Tensor:
        """A decoder layer's MoE block: with `norm_weight`, x is RMS-normalised first; then
        `route_experts`, and `moe_experts` over the chosen experts and the `num_shared` shared experts
        stacked after the routed ones in w13 / w2 (always chosen, weight 1); with `add_input`, x (as
        given) is added to the result, the layer's residual. A platform may run it all as one call:
        at batch-1 decode the steps apart cost more in dispatch than the routing itself."""
        h = x if norm_weight is None else self.rms_norm(x, norm_weight, eps)
        ids, weights = self.route_experts(h, router_weight, bias, routing)
        if num_shared:
            tokens, routed = x.shape[0], router_weight.shape[0]
            shared = torch.arange(routed, routed + num_shared, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, shared.expand(tokens, -1)], dim=1)
            weights = torch.cat([weights, weights.new_ones(tokens, num_shared)], dim=1)
        out = self.moe_experts(h, ids, weights, w13, w2, w13_scale, w2_scale)
        return x + out if add_input else out

    def rms_norm_int8_linear(self, x, norm_weight, eps, qweight, scale) -> torch.Tensor:
        """`int8_linear(rms_norm(x))`, for a norm whose output feeds only this projection; a
        platform may fuse the two (decode runs two such pairs per layer)."""
        return self.int8_linear(self.rms_norm(x, norm_weight, eps), qweight, scale)

    def prepare_linear(self, weight: torch.Tensor):
        """The form in which `linear` (or `int8_linear`, for an int8 weight) will receive this
        projection weight, chosen once after loading: a platform may repack it for its kernels, in
        the weight's own storage, so the caller must not read `weight` afterwards. Default: the
        weight itself."""
        return weight

    def prepare_experts(self, weight: torch.Tensor) -> torch.Tensor:
        """The form in which the expert hooks (`moe_experts`, `route_and_run_experts`,
        `decode_layers`) will receive a layer's stacked experts (`w13` or `w2`, `[E, N, K]`, full
        precision, or int8 whose per-row scales stay as they are), chosen once after loading, shared
        experts folded in: a platform may repack them for its kernels, in their own storage, so the
        caller must not read `weight` afterwards. The hooks must still accept unprepared `[E, N, K]`
        stacks. Default: the weight itself."""
        return weight

    def prepare_absorbed(self, weight: torch.Tensor) -> torch.Tensor:
        """The form in which `mla_decode` will receive an absorbed up-projection (W_UK or W_UV,
        `[H, D, R]` fp32), chosen once after loading: a platform may store it narrower when that
        loses nothing. Default: as is."""
        return weight

    def folds_shared_experts(self, dtype: torch.dtype) -> bool:
        """Whether a model in `dtype` should stack its shared experts after the routed ones
        (MoE.fold_shared_experts), which is exact only where `moe_experts` sums the experts' outputs
        in fp32. The reference rounds each expert's output to the model's dtype before the sum, so a
        shared MLP split into slices would be rounded slice by slice: fp32 only, by default."""
        return dtype == torch.float32

    def mla_write_latent(self, q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping) -> None:
        """Normalise c_kv, rotate k_pe and q's rope dims (in place), store the latent (see
        `ops.mla_write_latent`); by default through this platform's rms_norm and write_kv_cache."""
        ops.mla_write_latent(
            q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping,
            rms_norm=self.rms_norm, write=self.write_kv_cache,
        )

    def mla_decode(self, q_nope, q_pe, w_uk, w_uv, cache, block_tables, seq_lens, scale) -> torch.Tensor:
        """Absorbed MLA decode, `[B, H, D_v]` fp32 (see `ops.mla_decode`). By default the query
        absorption and output projection run in torch around `paged_mla_decode`; override to fuse."""
        return ops.mla_decode(
            q_nope, q_pe, w_uk, w_uv, cache, block_tables, seq_lens, scale, paged_attention=self.paged_mla_decode
        )

    def mla_decode_layer(
        self, h, layer: ops.MLADecodeLayer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens
    ) -> torch.Tensor:
        """`h + o_proj(attention(input_norm(h)))` for one new token per sequence `h [B, D]`: a whole
        MLA layer of a decode step, int8 or full-precision projections (the latent written to `cache`
        as `mla_write_latent` does). By default the hooks above in turn; a platform may run it as one
        call, which at batch 1 saves more than any of its kernels."""
        tokens, ql = h.shape[0], layer.q_lora_rank
        q_kv_a = self._project(h, layer.q_kv_a, layer.q_kv_a_scale, layer.input_norm, layer.input_eps)
        q = self._project(q_kv_a[:, :ql], layer.q_b, layer.q_b_scale, layer.q_a_norm, layer.q_a_eps)
        q = q.view(tokens, layer.num_heads, layer.nope_dim + layer.rope_dim)
        self.mla_write_latent(
            q, q_kv_a[:, ql:], layer.kv_a_norm, layer.kv_a_eps, cos, sin, interleaved, cache, slot_mapping
        )
        out = self.mla_decode(
            q[..., : layer.nope_dim], q[..., layer.nope_dim :], layer.w_uk, layer.w_uv, cache, block_tables, seq_lens,
            layer.scale,
        )
        return h + self._project(out.to(h.dtype).reshape(tokens, -1), layer.o, layer.o_scale)

    def _project(self, x, weight, scale, norm=None, eps=0.0) -> torch.Tensor:
        """`norm(x) @ weight^T` for a decode bundle's projection: int8 with `scale`, or full precision."""
        if scale is not None:
            if norm is None:
                return self.int8_linear(x, weight, scale)
            return self.rms_norm_int8_linear(x, norm, eps, weight, scale)
        return self.linear(x if norm is None else self.rms_norm(x, norm, eps), weight)

    def moe_block(self, h: torch.Tensor, block: ops.MoEBlock) -> torch.Tensor:
        """`h + FFN(norm(h))` for a decoder layer's feed-forward bundle: `route_and_run_experts`, or
        for a dense MLP (no router) `moe_experts` over its always-chosen experts."""
        if block.router is not None:
            return self.route_and_run_experts(
                h, block.router, block.bias, block.routing, block.num_shared, block.w13, block.w2,
                block.w13_scale, block.w2_scale, block.norm, block.eps, add_input=True,
            )
        tokens = h.shape[0]
        ids = torch.arange(block.num_shared, device=h.device).expand(tokens, -1)
        weights = torch.ones(tokens, block.num_shared, dtype=torch.float32, device=h.device)
        normed = self.rms_norm(h, block.norm, block.eps)
        return h + self.moe_experts(normed, ids, weights, block.w13, block.w2, block.w13_scale, block.w2_scale)

    def decode_layers(
        self, h, stack: ops.DecodeStack, cos, sin, interleaved, caches, slot_mapping, block_tables, seq_lens
    ) -> torch.Tensor:
        """Every decoder layer of a decode-only step, `h [B, D]` in, the last layer's output out
        (before the final norm); `caches[i]` is layer i's cache. By default `mla_decode_layer` and
        `moe_block` in turn; a platform may run the whole stack as one call: at batch 1 the host
        code between per-layer calls costs a tenth of the step."""
        for layer, cache in zip(stack.layers, caches):
            h = self.mla_decode_layer(h, layer.attention, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens)
            h = self.moe_block(h, layer.ffn)
        return h

    def prepare_greedy_head(self, weight: torch.Tensor):
        """What `greedy_head` needs besides the prepared head: built from the vocabulary head
        `weight [V, D]` after loading, before `prepare_linear` takes it. None (the default) when the
        platform finds greedy tokens as the argmax of the full logits."""
        return None

    def greedy_head(self, hidden: torch.Tensor, weight, screen) -> torch.Tensor:
        """Greedy tokens `[B]` of `hidden [B, D]` against the head `weight` (as `prepare_linear`
        left it): exactly `argmax(linear(hidden, weight))`, bit for bit. Only greedy rows without
        logprobs or logit processors come here, so a platform with a `screen` from
        `prepare_greedy_head` may find the argmax without forming every logit."""
        return self.argmax(self.linear(hidden, weight).float())

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy tokens of `[B, V]` logits: each row's first index of its maximum, a NaN counting as
        the maximum (torch's rule). Over a large vocabulary at many rows this is a visible part of a
        decode step, so a platform may scan rows its own way."""
        return logits.argmax(dim=-1)

    # ------------------------------------------------------------------ graphs
    def capture_graph(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Return a faster callable for a fixed-shape step (CUDA graphs, compiled kernels); default as is."""
        return fn

    def __repr__(self) -> str:
        return f"<Platform {self.name} on {self.device}>"

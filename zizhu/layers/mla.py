"""Multi-head Latent Attention over the paged latent cache.

Per token only `[c_kv (kv_lora_rank) | k_pe (rope dim)]` is cached. Decode absorbs W_UK into the
query and W_UV into the output so attention runs directly on the latent rows; prefill decompresses
K/V once per sequence and attends at head width (cheaper when there are many queries).
"""

from __future__ import annotations

import torch
from torch import nn

from zizhu.config import ModelConfig
from zizhu.layers.batch import AttentionBatch
from zizhu.layers.linear import Linear
from zizhu.layers.norm import RMSNorm
from zizhu.layers.rope import RotaryEmbedding
from zizhu.layers.quant import Int8Linear
from zizhu.ops.attention import MLADecodeLayer, gather_context

# Context rows one grouped prefill call decompresses (64 new 128-token prompts fit in one call).
PREFILL_GROUP_ROWS = 8192


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, platform, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.platform = platform
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.scale = cfg.softmax_scale
        q_out = self.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype, platform, cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, platform, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, dtype, platform)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_out, dtype, platform)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_latent_dim, dtype, platform, cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, platform, dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), dtype, platform)
        self.o_proj = Linear(self.num_heads * self.v_dim, cfg.hidden_size, dtype, platform, cfg.attention_bias)
        self.rotary = rotary  # shared by all layers: cos/sin are computed once per step
        self.w_uk: torch.Tensor | None = None  # [H, nope, R], derived from kv_b_proj after loading
        self.w_uv: torch.Tensor | None = None  # [H, v, R] (fp32, or narrower: Platform.prepare_absorbed)
        self.decode_layer: MLADecodeLayer | None = None  # set by prepare_decode_layer when it applies

    def fuse_input_projections(self) -> None:
        """One matmul for q_a_proj and kv_a_proj_with_mqa: both read the same normalised input, so
        decode streams the two weights in one pass and pays one dispatch."""
        if not hasattr(self, "q_a_proj"):
            return
        q_a, kv_a = self.q_a_proj, self.kv_a_proj_with_mqa
        fused = Linear(
            q_a.in_features, q_a.out_features + kv_a.out_features, q_a.weight.dtype, self.platform, q_a.bias is not None
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q_a.weight, kv_a.weight]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([q_a.bias, kv_a.bias]))
        self.q_kv_a_proj = fused
        del self.q_a_proj, self.kv_a_proj_with_mqa

    def absorb(self) -> None:
        """Split kv_b_proj into the per-head up-projections that decode folds into q and o."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = self.platform.prepare_absorbed(w[:, : self.nope_dim].float().contiguous())
        self.w_uv = self.platform.prepare_absorbed(w[:, self.nope_dim :].float().contiguous())

    def prepare_decode_layer(self, input_norm: RMSNorm) -> None:
        """With a q LoRA and the projections all int8 or all full precision (and no bias), bundle
        the weights a decode step reads, so that decode-only steps run the whole layer as one
        platform call (`Platform.mla_decode_layer`). The projections are handed to the platform
        first (`Linear.prepare`, `Int8Linear.prepare`): the bundle and the prefill then read its
        layout of them."""
        projections = [getattr(self, name, None) for name in ("q_kv_a_proj", "q_b_proj", "o_proj")]
        if not self.q_lora_rank or any(p is None or p.bias is not None for p in projections):
            return
        if all(isinstance(p, Int8Linear) for p in projections):
            for p in projections:
                p.prepare()
            (q_kv_a, q_kv_a_scale), (q_b, q_b_scale), (o, o_scale) = [(p.qweight, p.scale) for p in projections]
        elif all(type(p) is Linear for p in projections):
            for p in projections:
                p.prepare()
            (q_kv_a, q_kv_a_scale), (q_b, q_b_scale), (o, o_scale) = [(p.weight, None) for p in projections]
        else:
            return
        self.decode_layer = MLADecodeLayer(
            input_norm.weight, input_norm.eps, q_kv_a, q_kv_a_scale, self.q_a_layernorm.weight,
            self.q_a_layernorm.eps, q_b, q_b_scale, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
            self.w_uk, self.w_uv, o, o_scale, self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.scale,
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor, input_norm: RMSNorm,
        add_input: bool = False,
    ):
        """`(x if add_input else 0) + attention(input_norm(x))`: the layer's input norm and residual
        add come in unapplied, so that an int8 projection can fuse the norm (as q_b_proj fuses
        q_a_layernorm) and a decode-only step can run as one platform call. Slices rather than
        split(), and no hasattr(): at batch-1 decode each torch call costs microseconds."""
        num_tokens = x.shape[0]
        if self.decode_layer is not None and add_input and batch.num_decodes == num_tokens:
            cos, sin = self.rotary.cos_sin(positions, x.dtype)
            return self.platform.mla_decode_layer(
                x, self.decode_layer, cos, sin, self.rotary.interleaved, cache, batch.slot_mapping,
                batch.block_tables, batch.seq_lens,
            )
        if not self.q_lora_rank:
            normed = input_norm(x)  # two projections read it
            q = self.q_proj(normed)
            kv_a = self.kv_a_proj_with_mqa(normed)
        else:
            # q_a_proj and kv_a_proj_with_mqa, fused when the layer finished loading
            q_kv_a = self.q_kv_a_proj(x, norm=input_norm)
            q = self.q_b_proj(q_kv_a[:, : self.q_lora_rank], norm=self.q_a_layernorm)
            kv_a = q_kv_a[:, self.q_lora_rank :]
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        self.platform.mla_write_latent(
            q, kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin, self.rotary.interleaved,
            cache, batch.slot_mapping,
        )
        q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]  # q_pe is rotated now

        n_dec = batch.num_decodes
        if n_dec == num_tokens:  # decode only: no slicing, no copy
            out = self.platform.mla_decode(
                q_nope, q_pe, self.w_uk, self.w_uv, cache, batch.block_tables, batch.seq_lens, self.scale
            ).to(x.dtype)
        else:
            out = x.new_empty(num_tokens, self.num_heads, self.v_dim)
            if n_dec:
                out[:n_dec] = self.platform.mla_decode(
                    q_nope[:n_dec], q_pe[:n_dec], self.w_uk, self.w_uv, cache,
                    batch.block_tables[:n_dec], batch.seq_lens[:n_dec], self.scale,
                ).to(out.dtype)
            self._prefill(q, batch, cache, out)
        out = self.o_proj(out.reshape(num_tokens, -1))  # a platform's decode may return a strided view
        return x + out if add_input else out

    def _prefill(self, q: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor, out: torch.Tensor) -> None:
        """Prefill attention, one call per group of sequences with the same query and context lengths
        (new prompts of one length are one call, not one each). A group decompresses K and V for all
        its contexts at once, so it is cut to PREFILL_GROUP_ROWS context rows: long cached prefixes
        go a few at a time, as they did one by one."""
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for s, start, end, length in batch.prefills():
            groups.setdefault((end - start, length), []).append((s, start))
        for (num_q, length), same in groups.items():
            per_call = max(1, PREFILL_GROUP_ROWS // length)
            for i in range(0, len(same), per_call):
                self._prefill_group(q, batch, cache, out, num_q, length, same[i : i + per_call])

    def _prefill_group(self, q, batch, cache, out, num_q: int, length: int, members: list[tuple[int, int]]) -> None:
        seqs = [s for s, _ in members]
        context = gather_context(cache, batch.block_tables[seqs], length)
        queries = torch.stack([q[start : start + num_q] for _, start in members])
        result = self.platform.mla_prefill(
            queries, context, self.kv_b_proj.weight, self.num_heads, self.nope_dim, self.v_dim, self.scale,
        )
        for (_, start), rows in zip(members, result):
            out[start : start + num_q] = rows

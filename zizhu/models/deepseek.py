"""DeepSeek-V2 / V2-Lite / V3 / R1 / V3.1: MLA attention, DeepSeekMoE, pre-norm decoder.

Parameter names follow the HF checkpoints, so loading is a name match; the only translation is
stacking per-expert weights into `experts.w13` / `experts.w2`, done in `load_weights`.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

import torch
from torch import nn

from zizhu import ops
from zizhu.config import ModelConfig
from zizhu.errors import CheckpointError
from zizhu.layers.batch import AttentionBatch
from zizhu.layers.linear import Linear
from zizhu.layers.mla import MLAttention
from zizhu.layers.moe import MLP, MoE
from zizhu.layers.norm import RMSNorm
from zizhu.layers.quant import Int8MLP
from zizhu.layers.rope import RotaryEmbedding

logger = logging.getLogger(__name__)

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, platform, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform, dtype)
        self.self_attn = MLAttention(cfg, platform, dtype, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform, dtype)
        self.moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg, platform, dtype) if self.moe else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, platform)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor):
        h = self.self_attn(h, positions, batch, cache, self.input_layernorm, add_input=True)
        if self.moe:  # norm, experts and residual add in one platform call
            return self.mlp(h, norm=self.post_attention_layernorm, add_input=True)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode_bundle(self) -> ops.DecodeLayer | None:
        """What a decode-only step reads of this layer, for `Platform.decode_layers`; None when the
        attention has no decode bundle (see MLAttention.prepare_decode_layer) or the feed-forward
        block is not one platform call (a full-precision dense MLP, unfolded shared experts)."""
        attention = self.self_attn.decode_layer
        ffn = self.mlp.decode_block(self.post_attention_layernorm)
        return None if attention is None or ffn is None else ops.DecodeLayer(attention, ffn)


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, platform, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, platform, dtype, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, platform, dtype)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, platform, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekModel(cfg, platform, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype, platform)
        self.platform = platform
        self.activation_dtype = platform.activation_dtype(dtype)
        self.decode_stack: ops.DecodeStack | None = None  # prepare_weights
        self.head_screen = None  # prepare_weights: the platform's aid to greedy_tokens

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm for the flattened batch of new tokens."""
        h = self.model.embed_tokens(input_ids).to(self.activation_dtype)
        if self.decode_stack is not None and batch.num_decodes == input_ids.shape[0]:
            rotary = self.model.rotary
            cos, sin = rotary.cos_sin(positions, h.dtype)
            h = self.platform.decode_layers(
                h, self.decode_stack, cos, sin, rotary.interleaved, kv_caches, batch.slot_mapping, batch.block_tables,
                batch.seq_lens,
            )
        else:
            for layer, cache in zip(self.model.layers, kv_caches):
                h = layer(h, positions, batch, cache)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """`compute_logits(hidden).argmax(-1)`, exactly, without forming every logit where the
        platform screens the head (Platform.greedy_head)."""
        if self.head_screen is not None:
            return self.platform.greedy_head(hidden, self.lm_head.weight, self.head_screen)
        return self.platform.argmax(self.compute_logits(hidden))

    def prepare_weights(self) -> None:
        """After loading (and quantizing): let the platform lay out the weights that only the
        forward pass reads: the vocabulary head (full precision or int8), the largest one, unless
        the embedding shares it, and a full-precision one's screen for greedy tokens
        (Platform.prepare_greedy_head); the stacked experts, and a dense layer's int8 MLP, which is
        stacked as one expert; the MLA layers' decode bundles
        (MLADecodeLayer), and with one for every layer, the whole stack's (DecodeStack), so a
        decode-only step runs all its layers as one platform call."""
        if not self.cfg.tie_word_embeddings:
            if isinstance(self.lm_head, Linear):  # not an int8 head, which is its own screen
                self.head_screen = self.platform.prepare_greedy_head(self.lm_head.weight)
            self.lm_head.prepare()
        for layer in self.model.layers:
            layer.self_attn.prepare_decode_layer(layer.input_layernorm)
            if layer.moe:
                layer.mlp.experts.prepare(self.platform)
            elif isinstance(layer.mlp, Int8MLP):  # a dense layer, one always-chosen int8 expert
                layer.mlp.prepare()
        bundles = [layer.decode_bundle() for layer in self.model.layers]
        self.decode_stack = ops.DecodeStack(tuple(bundles)) if bundles and all(bundles) else None

    # ------------------------------------------------------------------ loading
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], on_layer_loaded: Callable[[nn.Module], None] | None = None
    ) -> None:
        """Copy checkpoint tensors in; raise CheckpointError naming any missing or mis-shaped tensor.

        A decoder layer is finished (absorbed MLA weights derived, projections and experts fused, then
        `on_layer_loaded`) as soon as its last tensor arrives, so a caller that quantizes there
        frees each layer's full-precision weights before the next one is read: peak memory stays
        near the quantized size instead of the full-precision one.
        """
        params = dict(self.named_parameters())
        expected = set(params)
        loaded: set[str] = set()
        expert_parts: dict[str, set[tuple[int, str]]] = {}
        skipped: list[str] = []
        num_layers = self.cfg.num_hidden_layers
        pending = {i: {n for n in params if n.startswith(f"model.layers.{i}.")} for i in range(num_layers)}
        experts_per_layer = 3 * self.cfg.n_routed_experts

        def finish(i: int) -> None:
            attn = self.model.layers[i].self_attn
            attn.absorb()
            attn.fuse_input_projections()
            if self.model.layers[i].moe:
                self.model.layers[i].mlp.fold_shared_experts()
            if on_layer_loaded is not None:
                on_layer_loaded(self.model.layers[i])
            del pending[i]
            for n in [n for n in params if n.startswith(f"model.layers.{i}.")]:
                params.pop(n)  # drop these references, so weights replaced by the callback are freed now

        def mark(i: int | None, *names: str) -> None:
            if i is None or i not in pending:
                return
            pending[i].difference_update(names)
            if not pending[i]:
                finish(i)

        for name, tensor in weights:
            layer = _LAYER_KEY.match(name)
            index = int(layer.group(1)) if layer else None
            if index is not None and index >= num_layers:
                continue  # multi-token-prediction layers: kept for speculative decoding, unused here
            if index is not None and index not in pending:
                skipped.append(name)  # a repeat of a tensor whose layer is already finished
                continue
            if m := _EXPERT_KEY.match(name):
                prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
                self._load_expert(params, prefix, expert, part, name, tensor)
                parts = expert_parts.setdefault(prefix, set())
                parts.add((expert, part))
                if len(parts) == experts_per_layer:
                    mark(index, f"{prefix}.w13", f"{prefix}.w2")
                continue
            if m := _FUSED_EXPERT_KEY.match(name):
                prefix = m.group(1)
                target = f"{prefix}.w13" if m.group(2) == "gate_up_proj" else f"{prefix}.w2"
                _copy(params, target, name, tensor)
                names = ("gate", "up") if m.group(2) == "gate_up_proj" else ("down",)
                parts = expert_parts.setdefault(prefix, set())
                parts.update((e, p) for e in range(self.cfg.n_routed_experts) for p in names)
                mark(index, target)
                continue
            if name not in params:
                skipped.append(name)
                continue
            _copy(params, name, name, tensor)
            loaded.add(name)
            mark(index, name)
        if self.cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        for prefix, parts in expert_parts.items():
            if len(parts) != experts_per_layer:
                raise CheckpointError(f"{prefix}: found {len(parts)} of {experts_per_layer} expert weight tensors")
            loaded.update({f"{prefix}.w13", f"{prefix}.w2"})
        missing = sorted(expected - loaded)
        if missing:
            raise CheckpointError(f"checkpoint is missing tensor {_checkpoint_name(missing[0])!r} ({len(missing)} missing in all)")
        if skipped:
            logger.warning("ignored %d unexpected tensors, e.g. %s", len(skipped), skipped[:3])
        for i in sorted(pending):
            finish(i)

    def _load_expert(self, params, prefix: str, expert: int, part: str, name: str, tensor: torch.Tensor) -> None:
        w13, w2 = params[f"{prefix}.w13"], params[f"{prefix}.w2"]
        if expert >= w13.shape[0]:
            raise CheckpointError(f"{name}: expert index {expert} out of range (n_routed_experts={w13.shape[0]})")
        inter = w2.shape[-1]
        target = {"gate": w13[expert, :inter], "up": w13[expert, inter:], "down": w2[expert]}[part]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(target.shape)}")
        target.copy_(tensor)


def _checkpoint_name(param: str) -> str:
    if param.endswith(".experts.w13") or param.endswith(".experts.w2"):
        return param.rsplit(".", 1)[0] + ".0.gate_proj.weight"
    return param


def _copy(params: dict[str, nn.Parameter], target: str, source: str, tensor: torch.Tensor) -> None:
    param = params[target]
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(f"tensor {source!r} has shape {list(tensor.shape)}, expected {list(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)

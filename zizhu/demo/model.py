"""A compact DeepSeek-V3 for training the demo model, in plain PyTorch.

Parameter names follow the HuggingFace checkpoint layout, so `state_dict()` is the checkpoint: it loads
in transformers' DeepseekV3ForCausalLM and in zizhu with no renaming. The math follows DeepSeek-V3:

- MLA attention with a q LoRA: q = W_qb RMSNorm(W_qa x); [c_kv | k_pe] = W_kva x; the latent c_kv is
  normalised and expanded per head by W_kvb into [k_nope | v]; k_pe is one head shared by all heads;
  RoPE on the interleaved pairs of q_pe and k_pe, with YaRN frequencies and the YaRN mscale^2 on the
  softmax scale.
- Layer 0 has a dense SwiGLU MLP; later layers are MoE: sigmoid router in fp32, e_score_correction_bias
  added for expert *selection* only, group-limited top-k, weights normalised and scaled by
  routed_scaling_factor, plus one shared expert.
- One MTP module (stored as layer `num_hidden_layers`): h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]),
  one MoE decoder layer, shared_head.norm, shared_head.head; it predicts t_{i+2}. h_i is the main
  model's final hidden state after model.norm, as transformers' MTP drafting uses it.

Training uses full causal attention on right-padded batches, so real tokens never see padding.
The rope part of the scores is computed separately (q_pe . k_pe), as in DeepSeek's reference code.
Expert load is balanced without an auxiliary loss: `update_router_biases` nudges each bias by
gamma * sign(mean load - load) after every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 256  # dense MLP of the first layer
    moe_intermediate_size: int = 96  # each routed expert and the shared expert
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    q_lora_rank: int = 64
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32  # wide, with a small rope_theta below: sharp positions for copying
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1
    rope_theta: float = 100.0
    rope_factor: float = 4.0
    original_max_position_embeddings: int = 128
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2

    @property
    def max_position_embeddings(self) -> int:
        return int(self.original_max_position_embeddings * self.rope_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_hf_config(self) -> dict:
        """config.json as DeepSeek ships it (legacy `rope_scaling`, routing keys spelled out)."""
        c = asdict(self)
        rope = {
            "type": "yarn",
            "factor": c.pop("rope_factor"),
            "original_max_position_embeddings": c.pop("original_max_position_embeddings"),
            "beta_fast": c.pop("beta_fast"),
            "beta_slow": c.pop("beta_slow"),
            "mscale": c.pop("mscale"),
            "mscale_all_dim": c.pop("mscale_all_dim"),
        }
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **c,
            "num_key_value_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_scaling": rope,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": "float32",
        }


def yarn_inv_freq(cfg: DemoConfig) -> torch.Tensor:
    """YaRN frequencies: original ones above the fast boundary, divided by `factor` below the slow one,
    a linear ramp in between (boundaries from beta_fast/beta_slow at the original context length)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers. x: [B, H, T, rd]; freqs_cis: [T, rd/2]."""
    pairs = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))  # [B, H, T, rd/2]
    return torch.view_as_real(pairs * freqs_cis).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class MLA(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.num_attention_heads
        self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = linear(cfg.q_lora_rank, h * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = linear(h * cfg.v_head_dim, cfg.hidden_size)
        self.scale = cfg.qk_head_dim**-0.5 * yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        h, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, h, nope + rope).transpose(1, 2)
        q_nope, q_pe = q.split([nope, rope], dim=-1)  # [B, H, T, nope], [B, H, T, rope]
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, t, h, nope + cfg.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)  # [B, H, T, nope], [B, H, T, v]
        q_pe = apply_rope(q_pe, freqs_cis)
        k_pe = apply_rope(k_pe.unsqueeze(1), freqs_cis)  # [B, 1, T, rope]: one rope key for all heads
        scores = q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)  # [B, H, T, T]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        probs = (scores * self.scale).masked_fill(causal, float("-inf")).softmax(dim=-1)
        out = probs @ v  # [B, H, T, v]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * cfg.v_head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = linear(hidden, inter)
        self.up_proj = linear(hidden, inter)
        self.down_proj = linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """noaux_tc: sigmoid scores; the correction bias steers which experts are picked, not their weights."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = scores + self.e_score_correction_bias
        groups = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1).bool(), float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [N, k]
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
        return idx, w.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        idx, w = self.gate(x)  # [N, k] each
        flat = idx.flatten()
        if self.training:
            counted = flat if valid is None else flat[valid.reshape(-1).repeat_interleave(idx.shape[1])]
            self.load += torch.bincount(counted, minlength=self.cfg.n_routed_experts).float()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.cfg.n_routed_experts).tolist()
        token = order // idx.shape[1]
        weight = w.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                rows = token[start : start + n]
                out.index_add_(0, rows, expert(x[rows]) * weight[start : start + n])
            start += n
        return (out + self.shared_experts(x)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DemoConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if layer_idx < cfg.first_k_dense_replace else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, freqs_cis, valid):
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, valid) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP output norm; its `head` is the main lm_head (added to the checkpoint as a copy)."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """A decoder layer plus the MTP glue; checkpoint keys `model.layers.{num_hidden_layers}.*`.

    The embedding and output head are shared with the main model, as in DeepSeek-V3.
    """

    def __init__(self, cfg: DemoConfig):
        super().__init__(cfg, layer_idx=cfg.num_hidden_layers)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, next_embeds, freqs_cis, valid):
        """h: [B, T, D] previous depth's hidden states; next_embeds: [B, T, D] embeddings of the tokens
        one step ahead. Returns this depth's normed hidden states [B, T, D]."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h)], dim=-1))
        return self.shared_head.norm(super().forward(x, freqs_cis, valid))


class Backbone(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        layers += [MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DemoModel(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("inv_freq", yarn_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=std)

    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.cfg.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.cfg.num_hidden_layers :])

    def rope(self, t: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)  # [T, rope/2]
        return torch.polar(torch.ones_like(freqs), freqs)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids: [B, T]. Returns next-token logits [B, T, V] and, per MTP depth k, logits [B, T-1-k, V]
        where position i predicts token i+1+k+1 (depth 1: i+2)."""
        freqs_cis = self.rope(ids.shape[1])
        x = self.model.embed_tokens(ids)
        for layer in self.main_layers:
            x = layer(x, freqs_cis, valid)
        h = self.model.norm(x)
        logits = self.lm_head(h)
        mtp_logits = []
        for k, mtp in enumerate(self.mtp_layers, start=1):
            t = ids.shape[1] - k  # pair h_i with the embedding of t_{i+k}
            v = None if valid is None else valid[:, k:]
            h = mtp(h[:, :t], self.model.embed_tokens(ids[:, k:]), freqs_cis[:t], v)
            mtp_logits.append(self.lm_head(h))
        return logits, mtp_logits

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_biases(self, gamma: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of underloaded experts, lower
        the overloaded ones, by a fixed step; then reset the load counters."""
        for moe in self.moe_layers():
            load = moe.load
            if load.sum() > 0:
                moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
            load.zero_()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The HF checkpoint. Each MTP layer also stores copies of the shared embedding and head, as
        DeepSeek's checkpoints do."""
        state = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}
        for i in range(self.cfg.num_hidden_layers, len(self.model.layers)):
            state[f"model.layers.{i}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
            state[f"model.layers.{i}.shared_head.head.weight"] = state["lm_head.weight"].clone()
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `checkpoint_state`: the MTP layers' copies of the embedding and head are
        dropped (the model shares the originals), everything else must match exactly."""
        copies = {
            f"model.layers.{i}.{name}.weight"
            for i in range(self.cfg.num_hidden_layers, len(self.model.layers))
            for name in ("embed_tokens", "shared_head.head")
        }
        self.load_state_dict({k: v for k, v in state.items() if k not in copies})

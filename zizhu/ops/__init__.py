"""Reference PyTorch implementations of the hot ops.

They are correct on any device and define the semantics a platform's own kernels must match
(the conformance tests compare against them). Platforms pick them up through `Platform`.
"""

from zizhu.ops.attention import MLADecodeLayer, mla_decode, mla_prefill, mla_write_latent, paged_mla_decode, write_kv_cache
from zizhu.ops.decoder import DecodeLayer, DecodeStack, MoEBlock
from zizhu.ops.linear import int8_linear
from zizhu.ops.moe import Routing, moe_experts, route_experts
from zizhu.ops.norm import rms_norm
from zizhu.ops.rope import apply_rotary

__all__ = ["DecodeLayer", "DecodeStack", "MLADecodeLayer", "MoEBlock", "apply_rotary", "int8_linear", "mla_decode", "mla_prefill", "mla_write_latent", "paged_mla_decode", "write_kv_cache", "moe_experts", "rms_norm", "route_experts", "Routing"]

"""What a decode-only step reads of each decoder layer, bundled for `Platform.decode_layers`.

The tensors are the model's own, not copies, and fixed once the model is loaded: a platform may
check a bundle, or build its own form of a whole stack, once (bundles compare and hash by
identity)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zizhu.ops.attention import MLADecodeLayer
from zizhu.ops.moe import Routing


@dataclass(frozen=True, eq=False)
class MoEBlock:
    """A decoder layer's feed-forward block: RMSNorm, then routed experts chosen by `router` plus
    `num_shared` always-chosen experts (weight 1) stacked after them in w13 / w2. A dense MLP is a
    block with no router and one shared expert."""

    norm: torch.Tensor  # [D], the post-attention RMSNorm
    eps: float
    router: torch.Tensor | None  # [E, D] fp32; None: no routed experts
    bias: torch.Tensor | None  # [E] e_score_correction_bias (noaux_tc)
    routing: Routing | None
    num_shared: int
    w13: torch.Tensor  # [E + num_shared, 2 * I, D]
    w2: torch.Tensor  # [E + num_shared, D, I]
    w13_scale: torch.Tensor | None  # int8 weights: per-row scales
    w2_scale: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    attention: MLADecodeLayer
    ffn: MoEBlock


@dataclass(frozen=True, eq=False)
class DecodeStack:
    """Every decoder layer of a model, in order."""

    layers: tuple[DecodeLayer, ...]

"""model_type -> model class. New families register here."""

from __future__ import annotations

from torch import nn

from zizhu.config import ModelConfig
from zizhu.errors import UnsupportedModelError
from zizhu.models.deepseek import DeepseekForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return MODELS[cfg.model_type]
    except KeyError:
        raise UnsupportedModelError(f"no model implementation for model_type {cfg.model_type!r}") from None

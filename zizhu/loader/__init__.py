"""Build a model from a checkpoint directory on a platform."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from zizhu.config import ModelConfig
from zizhu.host_memory import release_freed_memory
from zizhu.layers.quant import check_method, quantize_model
from zizhu.loader.checkpoint import iter_weights
from zizhu.loader.resolve import resolve_model_path
from zizhu.models.registry import model_class

logger = logging.getLogger(__name__)


def load_model(
    model_dir: Path, cfg: ModelConfig, platform, dtype: torch.dtype, quantization: str | None = None
) -> torch.nn.Module:
    """The model with its weights; with `quantization`, each decoder layer is quantized as soon as
    it is loaded, so the full-precision model never exists in memory all at once."""
    start = time.perf_counter()
    if quantization:
        check_method(quantization)
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg, platform, dtype)
    model = model.to_empty(device=platform.device)
    block = cfg.quantization.weight_block_size if cfg.quantization else None
    with torch.no_grad():
        if quantization:

            def quantize(module: torch.nn.Module) -> None:
                quantize_model(module, method=quantization, platform=platform)
                release_freed_memory()

            model.load_weights(iter_weights(model_dir, fp8_block=block), on_layer_loaded=quantize)
            quantize(model)  # what lies outside the layers: lm_head
        else:
            model.load_weights(iter_weights(model_dir, fp8_block=block))
        model.prepare_weights()
    release_freed_memory()
    platform.place_weights(model)
    model.eval()
    logger.info("loaded %s in %.1fs", model_dir, time.perf_counter() - start)
    return model


__all__ = ["load_model", "resolve_model_path"]

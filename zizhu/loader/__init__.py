"""Build a model from a checkpoint directory on a platform."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from functools import lru_cache
from pathlib import Path

import torch

from zizhu.config import ModelConfig
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
    model.eval()
    logger.info("loaded %s in %.1fs", model_dir, time.perf_counter() - start)
    return model


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS. glibc keeps freed heap memory for reuse, and
    loading frees a layer's worth of full-precision weights at every step (conversions, fused and
    quantized copies): loading the small benchmark model with int8 quantization grew RSS by about
    twice the int8 size of each layer, 1.3 to 2.5 GB over its 12 layers, without this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["load_model", "resolve_model_path"]

"""Build a model from a checkpoint directory on a platform."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from zizhu.config import ModelConfig
from zizhu.loader.checkpoint import iter_weights
from zizhu.loader.resolve import resolve_model_path
from zizhu.models.registry import model_class

logger = logging.getLogger(__name__)


def load_model(model_dir: Path, cfg: ModelConfig, platform, dtype: torch.dtype) -> torch.nn.Module:
    start = time.perf_counter()
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg, platform, dtype)
    model = model.to_empty(device=platform.device)
    block = cfg.quantization.weight_block_size if cfg.quantization else None
    with torch.no_grad():
        model.load_weights(iter_weights(model_dir, fp8_block=block))
    model.eval()
    logger.info("loaded %s in %.1fs", model_dir, time.perf_counter() - start)
    return model


__all__ = ["load_model", "resolve_model_path"]

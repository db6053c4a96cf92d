"""Read safetensors checkpoints: sharded or single, memory-mapped, FP8 blocks dequantized on the fly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from zizhu.errors import CheckpointError

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"


def checkpoint_files(model_dir: Path) -> list[Path]:
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file} is malformed: {e}") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                example = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"shard {name!r} listed in {index_file.name} is missing (it holds {example!r})")
        return [model_dir / name for name in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights found in {model_dir}")
    return files


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = W_fp8 * scale_inv per (block x block) tile; edge tiles are partial."""
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"FP8 scale shape {list(scale_inv.shape)} does not match weight {list(weight.shape)} in {block} blocks")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def iter_weights(model_dir: Path, fp8_block: tuple[int, int] | None = None, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight; `*_scale_inv` siblings are folded into their weights."""
    files = checkpoint_files(model_dir)
    handles = []
    for path in files:
        try:
            handles.append(safe_open(str(path), framework="pt", backend="pread"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path.name}: {e}") from e
    location = {key: handle for handle in handles for key in handle.keys()}
    names = [k for k in location if not k.endswith(SCALE_SUFFIX)]
    bar = tqdm(names, desc="Loading weights", unit="tensor", disable=None if progress else True, leave=False)
    for name in bar:
        tensor = location[name].get_tensor(name)
        scale_name = name + SCALE_SUFFIX
        if scale_name in location:
            tensor = dequantize_fp8_blocks(tensor, location[scale_name].get_tensor(scale_name), fp8_block or (128, 128))
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r} beside it")
        yield name, tensor

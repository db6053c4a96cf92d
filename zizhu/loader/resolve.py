"""Turn a model argument (local directory or Hugging Face repo id) into a local directory."""

from __future__ import annotations

import os
from pathlib import Path

from zizhu.errors import ModelNotFoundError


def resolve_model_path(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception as cached_error:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ModelNotFoundError(
                f"{name!r} is not a local directory and is not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so it was not downloaded): {cached_error}"
            ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(
            f"{name!r} is not a local directory, not in the Hugging Face cache, and could not be downloaded: {e}"
        ) from None

"""Server test fixtures: the tiny DeepSeek-V3 checkpoint with its tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_deepseek_v3"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from zizhu.tokenizer import Tokenizer

    return Tokenizer(tiny_checkpoint, "deepseek_v3")

"""Server test fixtures: the tiny DeepSeek-V3 checkpoint with its tokenizer, and a `zizhu serve`
process on it with default settings, each built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.servers import SERVED_NAMES, start_server
from tests.server.tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_deepseek_v3"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from zizhu.tokenizer import Tokenizer

    return Tokenizer(tiny_checkpoint, "deepseek_v3")


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    """`zizhu serve` on the tiny checkpoint, answering to the names in SERVED_NAMES."""
    running = start_server(tiny_checkpoint, tmp_path_factory, "--served-model-name", *SERVED_NAMES)
    yield running
    running.stop()

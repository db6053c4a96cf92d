import pytest
import torch

from tests.checkpoints import ENGINE_CONFIGS, build_hf_model, build_tokenizer, save_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    # The models under test are tiny: one thread avoids OpenMP overhead dominating every op.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, HF reference model), built once per session."""
    built = {}
    for name in ENGINE_CONFIGS:
        model = build_hf_model(name)
        out = save_checkpoint(model, tmp_path_factory.mktemp(name))
        built[name] = (out, model)
    return built


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A V3 tiny checkpoint with a vocabulary wide enough for a byte-level tokenizer."""
    model = build_hf_model("tiny_deepseek_v3", vocab_size=384)
    path = save_checkpoint(model, tmp_path_factory.mktemp("text_v3"))
    build_tokenizer(path, 384)
    return path, model


@pytest.fixture(autouse=True)
def every_kv_block_freed(monkeypatch):
    """After each test, every engine it built must hold no KV blocks and no unfinished requests."""
    from zizhu.engine.llm_engine import LLMEngine

    engines = []
    original = LLMEngine.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(LLMEngine, "__init__", tracking_init)
    yield
    for engine in engines:
        stats = engine.stats()
        assert stats.num_blocks_used == 0, f"{stats.num_blocks_used} KV blocks leaked"
        assert not engine.has_unfinished_requests(), "requests left unfinished"

"""Every kind of bad input fails with its own exception type and a message that names the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zizhu import LLM, SamplingParams
from zizhu.errors import (
    CheckpointError,
    ConfigError,
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
    UnsupportedModelError,
)


@pytest.fixture
def checkpoint_copy(tiny_checkpoints, tmp_path):
    src, _ = tiny_checkpoints["tiny_deepseek_v3"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    return LLM(path, dtype="float32", block_size=4, max_model_len=64, kv_cache_memory=1 << 20)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(checkpoint_copy):
    _edit_config(checkpoint_copy, model_type="llama_v9")
    with pytest.raises(UnsupportedModelError, match="llama_v9"):
        LLM(checkpoint_copy)


def test_missing_kv_lora_rank(checkpoint_copy):
    _edit_config(checkpoint_copy, kv_lora_rank=None)
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        LLM(checkpoint_copy)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(tmp_path / "nowhere")


def test_missing_shard(checkpoint_copy):
    weights = load_file(str(checkpoint_copy / "model.safetensors"))
    (checkpoint_copy / "model.safetensors").unlink()
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:10]}, str(checkpoint_copy / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        LLM(checkpoint_copy)


def test_wrong_tensor_shape(checkpoint_copy):
    weights = load_file(str(checkpoint_copy / "model.safetensors"))
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 1)
    save_file(weights, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*shape"):
        LLM(checkpoint_copy)


@pytest.mark.parametrize("missing", ["model.layers.2.mlp.experts.5.up_proj.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"])
def test_missing_tensor(checkpoint_copy, missing):
    weights = load_file(str(checkpoint_copy / "model.safetensors"))
    del weights[missing]
    save_file(weights, str(checkpoint_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing|expert weight"):
        LLM(checkpoint_copy)


def test_no_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLM(checkpoint_copy)


def test_empty_prompt(llm):
    with pytest.raises(EmptyPromptError):
        llm.generate([[]])
    with pytest.raises(EmptyPromptError):
        llm.generate([""])


def test_prompt_over_max_model_len(llm):
    with pytest.raises(PromptTooLongError, match="64") as info:
        llm.generate([[5] * 64], SamplingParams(max_tokens=1))
    assert info.value.prompt_tokens == 64 and info.value.limit == 64
    with pytest.raises(PromptTooLongError):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    assert llm.engine.stats().num_blocks_used == 0


def test_token_outside_vocabulary(llm):
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 2, 10_000]])


def test_rejected_batch_leaves_nothing_behind(llm):
    with pytest.raises(EmptyPromptError):
        llm.generate([[1, 2, 3], []])
    assert not llm.engine.has_unfinished_requests()


def test_max_model_len_beyond_positions(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        LLM(path, max_model_len=10**6)


def test_cache_too_small_for_max_model_len(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        LLM(path, max_model_len=600, kv_cache_memory=4096)


def test_unknown_dtype(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    with pytest.raises(ConfigError, match="dtype"):
        LLM(path, dtype="float13")


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_values(kwargs, param):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_default_cache_holds_a_max_length_sequence(tiny_checkpoints):
    """Sized by default, the cache rounds each sequence up to whole blocks (100 tokens -> 7 blocks of 16)."""
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    llm = LLM(path, dtype="float32", max_model_len=100, max_num_seqs=1)
    assert llm.engine.max_model_len == 100
    assert llm.engine.block_manager.num_blocks * 16 >= 100


def test_failed_step_leaves_nothing_behind(llm, monkeypatch):
    """A step that raises (an interrupt, a kernel error) ends the call's requests: their cache blocks
    come back, and the next call neither resumes them nor waits for them."""
    run, calls = llm.engine.runner.run, []

    def failing(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", failing)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert llm.engine.stats().num_blocks_used == 0
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4

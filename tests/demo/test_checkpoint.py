"""The shipped demo checkpoint: DeepSeek-V3 config, size, and exact agreement with transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zizhu.demo import DEMO_MODEL_DIR, tasks
from zizhu.demo.model import DemoConfig, DemoModel, yarn_inv_freq
from zizhu.demo.tokenizer import prompt_text

transformers = pytest.importorskip("transformers")

SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO_MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_model():
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL_DIR, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def demo_model(config) -> DemoModel:
    """The training model rebuilt from the shipped files."""
    fields = DemoConfig.__dataclass_fields__
    rope = config["rope_scaling"]
    cfg = DemoConfig(
        **{k: v for k, v in config.items() if k in fields},
        rope_factor=rope["factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
        beta_fast=rope["beta_fast"],
        beta_slow=rope["beta_slow"],
        mscale=rope["mscale"],
        mscale_all_dim=rope["mscale_all_dim"],
    )
    model = DemoModel(cfg)
    state = load_file(DEMO_MODEL_DIR / "model.safetensors")
    mtp = cfg.num_hidden_layers
    model.load_checkpoint_state(state)
    assert torch.equal(state[f"model.layers.{mtp}.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(state[f"model.layers.{mtp}.shared_head.head.weight"], state["lm_head.weight"])
    return model.eval()


def test_shipped_files_fit_the_budget():
    sizes = {name: (DEMO_MODEL_DIR / name).stat().st_size for name in SHIPPED}
    assert sum(sizes.values()) < 20 * 2**20, sizes


def test_config_is_a_deepseek_v3(config):
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    assert config["q_lora_rank"] and config["kv_lora_rank"]
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] == 1
    assert config["n_group"] > 1 and config["topk_group"] < config["n_group"]
    assert config["num_nextn_predict_layers"] == 1
    rope = config["rope_scaling"]
    assert rope["type"] == "yarn" and rope["factor"] > 1 and rope["mscale_all_dim"]


def test_checkpoint_has_trained_router_biases_and_an_mtp_layer(config):
    state = load_file(DEMO_MODEL_DIR / "model.safetensors")
    mtp = config["num_hidden_layers"]
    assert {f"model.layers.{mtp}.{k}.weight" for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm")} <= set(state)
    for layer in range(config["first_k_dense_replace"], mtp + 1):
        bias = state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().max() > 0  # balancing moved it


def test_transformers_loads_everything_but_the_mtp_layer(hf_model, config):
    model, info = hf_model
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    assert info["unexpected_keys"] and all(k.startswith(mtp_prefix) for k in info["unexpected_keys"])


def test_yarn_frequencies_match_transformers(hf_model, demo_model):
    model, _ = hf_model
    assert torch.allclose(model.model.rotary_emb.inv_freq, yarn_inv_freq(demo_model.cfg))
    assert model.model.layers[0].self_attn.scaling == pytest.approx(demo_model.model.layers[0].self_attn.scale)


def test_logits_match_transformers(hf_model, demo_model):
    model, _ = hf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    problems = tasks.held_out_set(12)
    texts = [prompt_text(p.prompt) + p.completion for p in problems]
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ours, _ = demo_model(ids)
            theirs = model(ids).logits
        assert (ours - theirs).abs().max() < 1e-4


def test_mtp_layer_matches_transformers(hf_model, demo_model, config):
    """transformers drafts with the MTP layer once its key pattern names this checkpoint's layer."""
    from transformers.modeling_layers import MtpModel

    model, _ = hf_model
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{config['num_hidden_layers']}\..*"]
    mtp = MtpModel.from_pretrained(model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    p = tasks.held_out_set(1)[0]
    ids = tokenizer(prompt_text(p.prompt) + p.completion, return_tensors="pt", add_special_tokens=False)["input_ids"]
    t = ids.shape[1]
    with torch.no_grad():
        _, (ours,) = demo_model(ids)
        h = model.model(ids).last_hidden_state
        out = mtp.forward_layer(0, h[:, :-1], torch.arange(1, t)[None], None, input_ids=ids[:, 1:])
        theirs = mtp._project_to_logits(out)
    assert (ours - theirs).abs().max() < 1e-4
    # A trained MTP layer predicts the token after next on its own training distribution.
    target = ids[0, 2:]
    n_prompt = len(tokenizer(prompt_text(p.prompt), add_special_tokens=False)["input_ids"])
    agree = (ours[0, :-1].argmax(-1) == target)[n_prompt:].float().mean()
    assert agree > 0.8


def test_greedy_answers_through_transformers():
    from zizhu.demo.evaluate import generate_hf, score

    problems = tasks.held_out_set(24)
    completions = generate_hf(DEMO_MODEL_DIR, [prompt_text(p.prompt) for p in problems], batch_size=24)
    scores = score(problems, completions)
    assert sum(s.correct for s in scores.values()) >= 23, scores

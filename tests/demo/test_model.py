"""The training model against transformers' DeepseekV3 on random weights, and the bias balancing rule."""

import json

import pytest
import torch
from safetensors.torch import save_file

from zizhu.demo.model import DemoConfig, DemoModel

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, original_max_position_embeddings=16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A randomly initialised DemoModel (norms and router biases randomised too) and its HF twin."""
    torch.manual_seed(0)
    model = DemoModel(DemoConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    out = tmp_path_factory.mktemp("tiny")
    save_file(model.checkpoint_state(), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_config()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), hf.eval()


def test_logits_match_transformers_past_the_original_context(pair):
    model, hf = pair
    ids = torch.randint(0, TINY["vocab_size"], (2, 3 * TINY["original_max_position_embeddings"]))
    with torch.no_grad():
        ours, _ = model(ids)
        assert (ours - hf(ids).logits).abs().max() < 1e-5


def test_mtp_matches_transformers(pair):
    from transformers.modeling_layers import MtpModel

    model, hf = pair
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{TINY['num_hidden_layers']}\..*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        _, (ours,) = model(ids)
        h = hf.model(ids).last_hidden_state
        positions = torch.arange(1, ids.shape[1]).expand(2, -1)
        theirs = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:]))
    assert (ours - theirs).abs().max() < 1e-5


def test_padding_does_not_change_real_positions(pair):
    model, _ = pair
    ids = torch.randint(3, TINY["vocab_size"], (1, 10))
    padded = torch.cat([ids, torch.full((1, 5), 2)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], model(padded)[0][:, :10], atol=1e-6)


def test_bias_balancing_raises_underloaded_experts():
    torch.manual_seed(0)
    model = DemoModel(DemoConfig(**TINY)).train()
    model(torch.randint(0, TINY["vocab_size"], (4, 16)))
    moe = model.moe_layers()[0]
    load = moe.load.clone()
    assert load.sum() == 4 * 16 * model.cfg.num_experts_per_tok
    model.update_router_biases(gamma=0.01)
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(moe.gate.e_score_correction_bias, expected)
    assert moe.load.sum() == 0


def test_bias_steers_selection_not_weights():
    torch.manual_seed(0)
    model = DemoModel(DemoConfig(**TINY)).eval()
    router = model.moe_layers()[0].gate
    x = torch.randn(5, TINY["hidden_size"])
    idx, w = router(x)
    router.e_score_correction_bias[idx[0, 0]] = -10.0  # never pick that expert again
    idx2, w2 = router(x)
    assert not (idx2[0] == idx[0, 0]).any()
    assert torch.allclose(w2.sum(-1), torch.full((5,), model.cfg.routed_scaling_factor))

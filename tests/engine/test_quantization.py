"""Weight-only int8 stays close to the unquantized model."""

import pytest
import torch

from zizhu import LLM, SamplingParams
from zizhu.errors import ConfigError
from zizhu.layers.quant import quantize_int8_rows


def test_int8_rows_round_trip():
    w = torch.randn(64, 96) * 0.05
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int8_model_stays_close(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    full = LLM(path, dtype="float32", kv_cache_memory=1 << 20)
    quant = LLM(path, dtype="float32", kv_cache_memory=1 << 20, quantization="int8")
    assert any(b.dtype == torch.int8 for b in quant.engine.model.buffers())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 11, 17, 23)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    a = full.generate(prompts, params)
    b = quant.generate(prompts, params)
    agree = sum(x == y for o1, o2 in zip(a, b) for x, y in zip(o1.outputs[0].token_ids, o2.outputs[0].token_ids))
    assert agree / (16 * len(prompts)) >= 0.9
    # the first generated token's logprob moves only a little
    for o1, o2 in zip(a, b):
        t = o1.outputs[0].token_ids[0]
        if o2.outputs[0].token_ids[0] == t:
            assert abs(o1.outputs[0].logprobs[0][t].logprob - o2.outputs[0].logprobs[0][t].logprob) < 0.05


def test_unknown_quantization(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    with pytest.raises(ConfigError, match="quantization"):
        LLM(path, kv_cache_memory=1 << 20, quantization="int3")



def test_layers_quantize_while_loading(tiny_checkpoints, monkeypatch):
    """Each decoder layer is quantized as soon as its last tensor is read, while later layers are
    still unloaded (so full-precision weights never all exist at once), and the result equals
    quantizing after a full-precision load."""
    import zizhu.loader as loader
    from zizhu.config import ModelConfig
    from zizhu.layers.quant import quantize_model
    from zizhu.platforms import get_platform

    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    cfg = ModelConfig.from_dir(path)
    platform = get_platform()
    calls = []

    def recording(module, method, platform):
        calls.append(type(module).__name__)
        if calls[-1] == "DecoderLayer":
            later_loaded = [layer.self_attn.w_uk is not None for layer in model_layers[0]]
            calls[-1] += f" ({sum(later_loaded)} layers loaded)"
        quantize_model(module, method, platform)

    model_layers = []
    original_load = loader.model_class

    def model_class(config):
        cls = original_load(config)

        class Recorded(cls):
            def load_weights(self, weights, on_layer_loaded=None):
                model_layers.append(self.model.layers)
                return super().load_weights(weights, on_layer_loaded)

        return Recorded

    monkeypatch.setattr(loader, "quantize_model", recording)
    monkeypatch.setattr(loader, "model_class", model_class)
    during = loader.load_model(path, cfg, platform, torch.float32, "int8")
    layers = cfg.num_hidden_layers
    assert calls == [f"DecoderLayer ({i + 1} layers loaded)" for i in range(layers)] + ["Recorded"]
    monkeypatch.undo()
    # quantized after loading: from the checkpoint's weights, not a platform's layout of them
    monkeypatch.setattr(platform, "prepare_experts", lambda weight: weight)
    monkeypatch.setattr(platform, "prepare_linear", lambda weight: weight)
    after = loader.load_model(path, cfg, platform, torch.float32)
    quantize_model(after, "int8", platform)
    monkeypatch.undo()
    after.prepare_weights()  # then laid out as load_model lays out the model it quantized (int8 experts in panels)
    a, b = during.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_quantizing_prepared_weights_is_refused(tiny_checkpoints):
    """A loaded model's weights may be in its platform's layout (Platform.prepare_*, packed panels on
    a CPU): quantizing them then would round the wrong rows, so it raises instead."""
    from zizhu.layers.quant import PREPARED, quantize_model

    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    model = LLM(path, dtype="float32", kv_cache_memory=1 << 20).engine.model
    prepared = model.model.layers[1].mlp.experts.w13.dim() != 3 or not isinstance(model.lm_head.weight, torch.Tensor)
    if not prepared:
        pytest.skip("this platform keeps the loaded layout")
    with pytest.raises(ValueError, match=PREPARED):
        quantize_model(model, "int8", model.platform)

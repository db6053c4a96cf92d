from zizhu.config import ModelConfig

# DeepSeek-V3's released config.json (the fields that shape the model)
V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}


def test_v3_latent_cache_bytes_per_token():
    cfg = ModelConfig.from_dict(V3)
    assert cfg.kv_latent_dim == 576
    assert cfg.kv_bytes_per_token(2) == 70_272  # bf16: (512 + 64) x 61 layers x 2 bytes
    # HF's expanded cache holds K (192) and V (128) for each of 128 heads
    expanded = (128 * (192 + 128)) * 61 * 2
    assert round(expanded / cfg.kv_bytes_per_token(2)) == 71


def test_v3_softmax_scale_and_defaults():
    cfg = ModelConfig.from_dict(V3)
    assert abs(cfg.softmax_scale - 0.13523) < 1e-4
    stripped = {k: v for k, v in V3.items() if k not in ("topk_method", "scoring_func")}
    cfg = ModelConfig.from_dict(stripped)
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")
    assert cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    assert cfg.quantization.weight_block_size == (128, 128)


def test_v2_scale():
    v2 = dict(V3, model_type="deepseek_v2", rope_scaling=dict(V3["rope_scaling"], mscale=0.707, mscale_all_dim=0.707))
    cfg = ModelConfig.from_dict(v2)
    assert abs(cfg.softmax_scale - 0.11472) < 1e-4
    assert cfg.scoring_func == "softmax"


def test_generation_config_supplies_sampling_defaults():
    # DeepSeek-V3's generation_config.json: sampling with the recommended temperature and top_p
    cfg = ModelConfig.from_dict(V3, generation_config={"do_sample": True, "temperature": 0.6, "top_p": 0.95})
    assert cfg.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
    greedy = ModelConfig.from_dict(V3, generation_config={"do_sample": False, "temperature": 0.6})
    assert greedy.generation_defaults == {"temperature": 0.0}
    assert ModelConfig.from_dict(V3).generation_defaults == {}

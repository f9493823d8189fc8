"""ModelConfig.from_hf: fields, switches and errors that name the field."""

import json

import pytest

from opsd_jax.models import ConfigError, ModelConfig
from opsd_jax.testing import tiny_hf_config


def _hf_dict(name, **overrides):
    return tiny_hf_config(name, **overrides).to_dict()


def test_switches_per_architecture():
    qwen = ModelConfig.from_hf(_hf_dict("qwen3"))
    olmo3 = ModelConfig.from_hf(_hf_dict("olmo3"))
    olmo2 = ModelConfig.from_hf(_hf_dict("olmo2"))
    assert (qwen.norm_placement, qwen.qk_norm, qwen.norm_weight_in_fp32) == ("pre", "per_head", False)
    assert (olmo2.norm_placement, olmo2.qk_norm, olmo2.norm_weight_in_fp32) == ("post", "full", True)
    assert qwen.head_dim == 24 and qwen.hidden_size // qwen.num_heads == 16
    assert olmo3.layer_types == ("sliding_attention",) * 3 + ("full_attention",)
    assert olmo3.sliding_window == 6
    assert olmo2.layer_types == ("full_attention",) * 3 and olmo2.sliding_window is None


def test_config_is_hashable_and_keeps_the_hf_config():
    hf = _hf_dict("qwen3-tied")
    config = ModelConfig.from_hf(hf)
    assert hash(config) == hash(ModelConfig.from_hf(hf))
    assert config.hf_config["vocab_size"] == 997 and config.tie_word_embeddings


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ConfigError, match=r"unsupported model_type 'llama'.*qwen3, olmo2, olmo3"):
        ModelConfig.from_hf({**_hf_dict("qwen3"), "model_type": "llama"})


def test_missing_config_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        ModelConfig.from_hf(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "'hidden_act' must be 'silu'"),
        ({"layer_types": ["full_attention"]}, "'layer_types' has 1 entries for 4 layers"),
        ({"layer_types": ["full_attention"] * 3 + ["chunked"]}, r"layer_types\[3\] is 'chunked'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "unsupported rope_type 'longrope'"),
    ],
)
def test_bad_fields_are_named(change, message, tmp_path):
    hf = {**_hf_dict("olmo3"), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(tmp_path)

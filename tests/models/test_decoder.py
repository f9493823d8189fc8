"""Decoder logits against transformers' PyTorch models on tiny random checkpoints."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import opsd_jax
from opsd_jax import forward, load_hf
from opsd_jax.models import ModelConfig, forward_hidden
from opsd_jax.parallel import make_mesh
from opsd_jax.testing import hf_logits, left_padded_batch, save_tiny_hf_model

ARCHITECTURES = ["qwen3", "qwen3-tied", "olmo2", "olmo3"]
FLOAT32_TOLERANCE = 1e-4

jitted_forward = jax.jit(forward, static_argnums=1)


def _seed(rng):
    return int(rng.integers(2**31))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_transformers_float32(name, tmp_path, rng):
    model = save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    # 20 tokens: longer than OLMo-3's sliding window (6) and YaRN's original context (32) is not
    # needed for YaRN to act, since its frequencies differ from default RoPE at every position.
    tokens = rng.integers(0, config.vocab_size, (2, 20))
    ours = np.asarray(jitted_forward(params, config, tokens))
    reference = hf_logits(model, tokens)
    assert ours.shape == reference.shape == (2, 20, config.vocab_size)
    assert np.abs(ours - reference).max() <= FLOAT32_TOLERANCE


# The real models' RoPE (head_dim 128): Qwen3-8B's theta, the 2507 models', OLMo-3's YaRN x8 over
# 8,192 original positions with plain RoPE on its sliding layers.
REAL_ROPE = {
    "qwen3": dict(head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40_960),
    "qwen3-2507": dict(head_dim=128, rope_theta=5_000_000.0, max_position_embeddings=262_144),
    "olmo3": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1, rope_theta=500_000.0,
                  max_position_embeddings=65_536, sliding_window=4_096,
                  rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8_192,
                                "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1}),
}


@pytest.mark.parametrize("rope", list(REAL_ROPE))
def test_long_positions_match_transformers(rope, tmp_path, rng):
    """Rows placed at the paper's evaluation lengths (up to 38,912 and past it): a rounding in the
    RoPE frequencies grows with the position, so parity at position 20 says nothing about 38,912
    (the float64 frequencies were 7e-4 to 2e-3 off there)."""
    name = "olmo3" if rope == "olmo3" else "qwen3"
    model = save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng), **REAL_ROPE[rope])
    config, params = load_hf(tmp_path, progress=False)
    starts = (0, 8_192, 32_768, 38_912) + ((60_000,) if rope == "olmo3" else (40_944,))
    positions = np.stack([np.arange(p, p + 16) for p in starts])
    tokens = rng.integers(0, config.vocab_size, positions.shape)
    ours = np.asarray(jitted_forward(params, config, tokens, positions=positions))
    reference = hf_logits(model, tokens, positions=positions)
    assert np.abs(ours - reference).max() <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_left_padded_batch_matches_transformers(name, tmp_path, rng):
    model = save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    tokens, mask, positions = left_padded_batch(rng, [19, 7, 13], config.vocab_size)
    ours = np.asarray(jitted_forward(params, config, tokens, attention_mask=mask))
    reference = hf_logits(model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - reference[real]).max() <= FLOAT32_TOLERANCE
    # Each left-padded row equals the same prompt run alone.
    for row in range(tokens.shape[0]):
        alone = hf_logits(model, tokens[row : row + 1, real[row]])
        assert np.abs(ours[row][real[row]] - alone[0]).max() <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("name", ["qwen3", "olmo3"])
def test_packed_segments_equal_separate_sequences(name, tmp_path, rng):
    model = save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    lengths = [9, 5, 10]
    tokens = rng.integers(0, config.vocab_size, (1, sum(lengths) + 2))
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2, int)])[None]
    ours = np.asarray(jitted_forward(params, config, tokens, segment_ids=segment_ids))
    start = 0
    for length in lengths:
        alone = hf_logits(model, tokens[:, start : start + length])
        assert np.abs(ours[:, start : start + length] - alone).max() <= FLOAT32_TOLERANCE
        start += length


@pytest.mark.parametrize("name", ["qwen3", "olmo3"])
def test_bfloat16_compute_within_stated_tolerance(name, tmp_path, rng):
    """bf16 activations: our error against float32 transformers is at most twice (plus 0.02)
    the error of transformers' own bf16 forward on the same bf16-rounded weights."""
    save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng))
    model32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    config, params = load_hf(tmp_path, dtype="bfloat16", compute_dtype="bfloat16", progress=False)
    tokens = rng.integers(0, config.vocab_size, (2, 16))
    # The float32 reference uses the same bf16-rounded weights, so only compute precision differs.
    with torch.no_grad():
        for p32, p16 in zip(model32.parameters(), model16.parameters()):
            p32.copy_(p16.float())
    reference = hf_logits(model32, tokens)
    ours_error = np.abs(np.asarray(jitted_forward(params, config, tokens)) - reference).max()
    torch_error = np.abs(hf_logits(model16, tokens) - reference).max()
    assert ours_error <= 2 * torch_error + 0.02, (ours_error, torch_error)


@pytest.mark.parametrize("name", ["qwen3", "olmo3"])
def test_sharded_mesh_gives_unsharded_logits(name, tmp_path, rng):
    save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng))
    config, single = load_hf(tmp_path, progress=False)
    mesh = make_mesh(2, 2, 2)
    _, sharded = load_hf(tmp_path, mesh=mesh, progress=False)
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded))
    tokens, mask, _ = left_padded_batch(rng, [16, 11, 16, 5], config.vocab_size)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens_sharded = jax.device_put(np.asarray(tokens, np.int32), batch_sharding)
    mask_sharded = jax.device_put(np.asarray(mask, np.int32), batch_sharding)
    expected = np.asarray(jitted_forward(single, config, tokens, attention_mask=mask))
    got = np.asarray(jitted_forward(sharded, config, tokens_sharded, attention_mask=mask_sharded))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_hidden_states_times_head_are_the_logits(tmp_path, rng):
    save_tiny_hf_model("qwen3-tied", str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    tokens = rng.integers(0, config.vocab_size, (2, 8))
    hidden, head = forward_hidden(params, config, tokens)
    assert hidden.shape == (2, 8, config.hidden_size) and head.shape == (config.hidden_size, config.vocab_size)
    np.testing.assert_array_equal(np.asarray(head), np.asarray(params["embedding"]).T)
    np.testing.assert_allclose(
        np.asarray(hidden) @ np.asarray(head), np.asarray(forward(params, config, tokens)), atol=1e-5
    )


def test_rematerialized_layers_give_the_same_values_and_gradients(tmp_path, rng):
    save_tiny_hf_model("olmo3", str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    tokens = rng.integers(0, config.vocab_size, (2, 12))

    def loss(params, config):
        return forward(params, config, tokens).std()

    plain = jax.value_and_grad(loss)(params, config)
    remat = jax.value_and_grad(loss)(params, config.replace(remat=True))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_legacy_top_level_rope_fields_are_read(tmp_path, rng):
    """Hub OLMo-3 configs carry rope_theta / rope_scaling at the top level; YaRN goes to the
    full-attention layers only."""
    model = save_tiny_hf_model("olmo3", str(tmp_path), seed=_seed(rng), rope_theta=500_000.0)
    config_path = tmp_path / "config.json"
    hf = json.loads(config_path.read_text())
    nested = ModelConfig.from_hf(hf)
    full = hf["rope_parameters"]["full_attention"]
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy["rope_theta"] = full["rope_theta"]
    legacy["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    config_path.write_text(json.dumps(legacy))
    config = ModelConfig.from_hf(tmp_path)
    assert config.rope == nested.rope
    assert config.rope["full_attention"].rope_type == "yarn"
    assert config.rope["sliding_attention"].rope_type == "default"
    legacy_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _, params = load_hf(tmp_path, progress=False)
    tokens = rng.integers(0, config.vocab_size, (1, 14))
    ours = np.asarray(jitted_forward(params, config, tokens))
    assert np.abs(ours - hf_logits(legacy_model, tokens)).max() <= FLOAT32_TOLERANCE
    assert np.abs(ours - hf_logits(model, tokens)).max() <= FLOAT32_TOLERANCE


def test_positions_default_to_segment_positions(tmp_path, rng):
    save_tiny_hf_model("qwen3", str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    tokens, mask, positions = left_padded_batch(rng, [10, 4], config.vocab_size)
    implicit = forward(params, config, tokens, attention_mask=mask)
    explicit = forward(params, config, tokens, attention_mask=mask, positions=positions)
    np.testing.assert_array_equal(np.asarray(implicit), np.asarray(explicit))


def test_bad_forward_inputs_are_named(tmp_path, rng):
    save_tiny_hf_model("qwen3", str(tmp_path), seed=_seed(rng))
    config, params = load_hf(tmp_path, progress=False)
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="attention_mask/segment_ids shape"):
        forward(params, config, tokens, attention_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="positions shape"):
        forward(params, config, tokens, positions=np.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
        forward(params, config, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="not both"):
        forward(params, config, tokens, attention_mask=np.ones((2, 5)), segment_ids=np.ones((2, 5)))


MODEL_CONFIGS = os.path.join(os.path.dirname(opsd_jax.__file__), "plan", "model_configs")


def _shrunk(real: dict) -> dict:
    """A real config.json at toy sizes: every field kept but the widths, depths, vocabulary and
    window, which shrink in proportion (GQA stays GQA, OLMo-3's layer pattern keeps its order)."""
    tiny = dict(real, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4 if real["num_key_value_heads"] == real["num_attention_heads"] else 2,
                vocab_size=1000)
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        tiny.pop(key, None)
    if "head_dim" in real:
        tiny["head_dim"] = 16
    if real.get("layer_types"):
        tiny["layer_types"] = real["layer_types"][:4]
    if real.get("sliding_window"):
        tiny["sliding_window"] = 6
    if "max_window_layers" in real:
        tiny["max_window_layers"] = min(real["max_window_layers"], 4)
    return tiny


@pytest.mark.parametrize("name", sorted(os.listdir(MODEL_CONFIGS)))
def test_every_shipped_model_config_matches_transformers(name, tmp_path, rng):
    """Each real config.json the plans compile (the paper's models), shrunk: loaded from the
    checkpoint transformers writes, the logits match and the export is bit-exact."""
    from safetensors.numpy import load_file

    from opsd_jax import save_hf

    with open(os.path.join(MODEL_CONFIGS, name, "config.json")) as f:
        real = json.load(f)
    hf_config = transformers.AutoConfig.for_model(**_shrunk(real))
    torch.manual_seed(_seed(rng))
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # norm weights away from 1, so each one counts
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(tmp_path / "hf", progress=False)
    assert (config.tie_word_embeddings, config.num_layers) == (bool(real.get("tie_word_embeddings")), 4)
    tokens = rng.integers(0, config.vocab_size, (2, 20))
    assert np.abs(np.asarray(jitted_forward(params, config, tokens)) - hf_logits(model, tokens)).max() \
        <= FLOAT32_TOLERANCE
    save_hf(params, config, tmp_path / "out")
    theirs, ours = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in theirs)

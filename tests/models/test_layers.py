"""Layer functions against float64 oracles and transformers' own RoPE code."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from opsd_jax.models import layers
from opsd_jax.models.config import RopeConfig


def _yarn_reference(theta, head_dim, rope_parameters):
    config = transformers.Qwen3Config(
        head_dim=head_dim, hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": theta, **rope_parameters},
    )
    inverse_frequencies, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    return inverse_frequencies.numpy(), attention_factor


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"factor": 4.0, "original_max_position_embeddings": 1024},
        {"factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2},
        {"factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False},
        {"factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3},
        {"factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
)
def test_yarn_frequencies_match_transformers(rope_parameters, rng):
    theta = float(rng.choice([10_000.0, 500_000.0, 1_000_000.0]))
    head_dim = int(rng.choice([32, 64, 128]))
    expected, expected_factor = _yarn_reference(theta, head_dim, rope_parameters)
    rope = RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=rope_parameters["factor"],
        original_max_position_embeddings=rope_parameters["original_max_position_embeddings"],
        beta_fast=rope_parameters.get("beta_fast", 32.0),
        beta_slow=rope_parameters.get("beta_slow", 1.0),
        attention_factor=rope_parameters.get("attention_factor"),
        mscale=rope_parameters.get("mscale"),
        mscale_all_dim=rope_parameters.get("mscale_all_dim"),
        truncate=rope_parameters.get("truncate", True),
    )
    got, got_factor = layers.rope_inverse_frequencies(rope, head_dim)
    assert _ulps(got, expected) <= 1  # torch's float32 pow is within an ulp of a correctly rounded one
    assert got_factor == pytest.approx(expected_factor, rel=1e-12)


def _ulps(a, b) -> int:
    return int(np.abs(np.asarray(a, np.float32).view(np.int32) - np.asarray(b, np.float32).view(np.int32)).max())


@pytest.mark.parametrize("theta", [10_000.0, 150_000.0, 500_000.0, 1_000_000.0, 5_000_000.0])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_default_frequencies_match_transformers_to_an_ulp(theta, head_dim):
    """Float32 arithmetic as transformers': an error here is multiplied by the position (38,912
    in the paper's evaluation)."""
    config = transformers.Qwen3Config(head_dim=head_dim, hidden_size=64, num_attention_heads=4,
                                      max_position_embeddings=40_960, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": theta})
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    expected = Qwen3RotaryEmbedding(config).inv_freq
    got, factor = layers.rope_inverse_frequencies(RopeConfig(theta=theta), head_dim)
    assert got.dtype == np.float32 and factor == 1.0
    # torch's float32 pow is within an ulp of the correctly rounded one computed here; the
    # float64 frequencies differed by an ulp in 16 to 24 of 64 entries (BUILD_NOTES).
    assert _ulps(got, expected.numpy()) <= 1


def test_default_rope_rotates_pairs_half_a_head_apart(rng):
    """Float64 oracle: dims i and i + Dh/2 rotate together by position * theta^(-2i/Dh)."""
    head_dim, theta = 16, 10_000.0
    x = rng.normal(size=(2, 5, 3, head_dim))
    positions = rng.integers(0, 1000, (2, 5))
    frequencies, scale = layers.rope_inverse_frequencies(RopeConfig(theta=theta), head_dim)
    cos, sin = layers.rope_tables(jnp.asarray(positions), frequencies, scale)
    got = np.asarray(layers.apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
    half = head_dim // 2
    angle = positions[..., None, None] * theta ** (-np.arange(half) * 2.0 / head_dim)
    first, second = x[..., :half], x[..., half:]
    expected = np.concatenate(
        [first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)], -1
    )
    np.testing.assert_allclose(got, expected, atol=5e-4)  # float32 angles at positions up to 1000


def test_rms_norm_matches_float64_oracle(rng):
    x = rng.normal(size=(3, 7, 10)) * 3
    weight = rng.normal(size=(10,))
    expected = weight * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    for weight_in_fp32 in (True, False):
        got = layers.rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32), 1e-6,
                              weight_in_fp32=weight_in_fp32)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_attention_mask_sliding_window_and_segments():
    segments = jnp.asarray([[0, 0, 1, 1, 1, 1, 2, 2]])
    mask = np.asarray(layers.attention_mask(segments, sliding_window=2))[0]
    expected = np.zeros((8, 8), bool)
    for q in range(8):
        for k in range(8):
            same = int(segments[0, q]) == int(segments[0, k]) != 0
            expected[q, k] = same and k <= q and q - k < 2
    np.testing.assert_array_equal(mask, expected)


def test_grouped_query_attention_matches_float64_oracle(rng):
    batch, length, heads, kv_heads, head_dim = 2, 6, 4, 2, 8
    q = rng.normal(size=(batch, length, heads, head_dim))
    k = rng.normal(size=(batch, length, kv_heads, head_dim))
    v = rng.normal(size=(batch, length, kv_heads, head_dim))
    segments = np.ones((batch, length), int)
    segments[1, :2] = 0
    mask = np.asarray(layers.attention_mask(jnp.asarray(segments), None))
    got = np.asarray(layers.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask))
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = q[b, :, h] @ k[b, :, g].T / math.sqrt(head_dim)
            scores = np.where(mask[b], scores, -np.inf)
            for t in range(length):
                if not mask[b, t].any():
                    continue
                p = np.exp(scores[t] - scores[t].max())
                p /= p.sum()
                np.testing.assert_allclose(got[b, t, h], p @ v[b, :, g], atol=1e-5)
    assert np.isfinite(got).all()  # fully masked padding queries stay finite


def test_segment_positions_restart_per_segment():
    segments = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [3, 3, 3, 0, 0]])
    np.testing.assert_array_equal(
        np.asarray(layers.segment_positions(segments)),
        [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]],
    )

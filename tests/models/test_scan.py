"""The scanned decoder: stacked parameters over repeating layer patterns, per-layer (sampler)
layout, remat policies, and a program whose size does not grow with depth."""

import jax
import numpy as np
import pytest

from opsd_jax import forward, load_hf
from opsd_jax.models import (
    ModelConfig,
    forward_hidden,
    init_params,
    layer_period,
    stack_layers,
    unstack_layers,
)
from opsd_jax.testing import (
    hf_logits,
    left_padded_batch,
    save_tiny_hf_model,
    tiny_hf_config,
)

jitted_forward = jax.jit(forward, static_argnums=1)


def _seed(rng):
    return int(rng.integers(2**31))


def _config(name, **overrides):
    return ModelConfig.from_hf(tiny_hf_config(name, **overrides).to_dict())


def test_layer_period_is_the_repeating_pattern():
    assert layer_period(_config("qwen3")) == 1
    assert layer_period(_config("olmo3", num_hidden_layers=12)) == 4
    # No pattern repeats through the depth: one block of every layer (the unrolled model).
    irregular = ["full_attention"] * 5 + ["sliding_attention"]
    assert layer_period(_config("olmo3", num_hidden_layers=6, layer_types=irregular)) == 6


@pytest.mark.parametrize("name, layers", [("olmo3", 8), ("qwen3", 5)])
def test_several_blocks_match_transformers(name, layers, tmp_path, rng):
    """OLMo-3 with 8 layers scans 2 blocks of (3 sliding + 1 full); Qwen3 5 blocks of 1."""
    model = save_tiny_hf_model(name, str(tmp_path), seed=_seed(rng), num_hidden_layers=layers)
    config, params = load_hf(tmp_path, progress=False)
    period = layer_period(config)
    for leaf in jax.tree.leaves(params["layers"]):
        assert leaf.shape[0] == layers // period
    tokens, mask, positions = left_padded_batch(rng, [17, 9], config.vocab_size)
    ours = np.asarray(jitted_forward(params, config, tokens, attention_mask=mask))
    reference = hf_logits(model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - reference[real]).max() <= 1e-4


def test_per_layer_layout_gives_the_same_hidden_states_and_round_trips(rng):
    config = _config("olmo3", num_hidden_layers=8)
    params = init_params(config, jax.random.key(_seed(rng)))
    per_layer = unstack_layers(params, config)
    assert len(per_layer["layers"]) == 8
    # Layer 5 is block 1 of pattern member 1.
    np.testing.assert_array_equal(per_layer["layers"][5]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["layers_1"]["mlp"]["up_proj"]["kernel"][1])
    tokens = rng.integers(0, config.vocab_size, (2, 11))
    scanned, _ = forward_hidden(params, config, tokens)
    looped, _ = forward_hidden(per_layer, config, tokens)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-5)
    back = stack_layers(per_layer, config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["full", "dots", "offload"])
def test_remat_policies_give_the_same_values_and_gradients(policy, tmp_path, rng):
    save_tiny_hf_model("olmo3", str(tmp_path), seed=_seed(rng), num_hidden_layers=8)
    config, params = load_hf(tmp_path, progress=False)
    tokens = rng.integers(0, config.vocab_size, (2, 12))

    def loss(params, config):
        return forward(params, config, tokens).std()

    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config.replace(remat=True, remat_policy=policy))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_program_size_does_not_grow_with_depth():
    """Compile time follows program size: the scanned train-style program of a 24-layer model
    is the 3-layer one's (the loop's trip count changes, its body does not)."""
    sizes = {}
    for layers in (3, 24):
        config = _config("qwen3", num_hidden_layers=layers).replace(remat=True)
        params = jax.eval_shape(lambda c=config: init_params(c, jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((2, 16), np.int32)
        grad = jax.jit(jax.grad(lambda p, t, c=config: forward(p, c, t).std()))
        sizes[layers] = len(grad.lower(params, tokens).as_text())
    assert sizes[24] <= 1.02 * sizes[3], sizes


@pytest.mark.parametrize("remat", [False, True])
def test_unrolled_layers_over_the_same_parameters_give_the_same_values_and_gradients(remat, tmp_path, rng):
    save_tiny_hf_model("olmo3", str(tmp_path), seed=_seed(rng), num_hidden_layers=8)
    config, params = load_hf(tmp_path, progress=False)
    config = config.replace(remat=remat)
    tokens = rng.integers(0, config.vocab_size, (2, 12))

    def loss(params, config):
        return forward(params, config, tokens).std()

    scanned = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    unrolled = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config.replace(scan_layers=False))
    np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-6)
    assert jax.tree.structure(scanned[1]) == jax.tree.structure(unrolled[1])
    for a, b in zip(jax.tree.leaves(scanned[1]), jax.tree.leaves(unrolled[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)

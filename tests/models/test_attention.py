"""Attention backends against the dense oracle: values and gradients on fresh random inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import load_hf
from opsd_jax.models import (
    ConfigError,
    ModelConfig,
    attention,
    forward,
    init_params,
    layers,
)
from opsd_jax.models.decoder import forward_with_cache, init_cache
from opsd_jax.testing import (
    TINY_ARCHITECTURES,
    hf_logits,
    left_padded_batch,
    save_tiny_hf_model,
)

FLOAT32_TOLERANCE = 1e-5
on_gpu = jax.default_backend() == "gpu"


def _segments(rng, kind: str, batch: int, length: int) -> np.ndarray:
    """int32[B, T] segment ids: "none" (all 1), "right" / "left" padding, "packed" (+ padding)."""
    segments = np.ones((batch, length), np.int32)
    for row in range(batch):
        real = int(rng.integers(1, length + 1))
        if kind == "right":
            segments[row, real:] = 0
        elif kind == "left":
            segments[row, : length - real] = 0
        elif kind == "packed":
            cuts = np.sort(rng.choice(np.arange(1, length), 2, replace=False))
            segments[row] = np.searchsorted(cuts, np.arange(length), side="right") + 1
            segments[row, real:] = 0
    return segments


def _values_and_gradients(implementation, q, k, v, weights, **mask):
    """attend's output and the gradients of sum(output * weights) with respect to q, k, v."""

    def loss(q, k, v):
        out = attention.attend(q, k, v, implementation=implementation, **mask)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_matches_dense(implementation, q, k, v, tolerance, **mask):
    weights = jnp.asarray(np.random.default_rng(0).normal(size=q.shape), jnp.float32)
    expected, expected_grads = _values_and_gradients("dense", q, k, v, weights, **mask)
    got, got_grads = _values_and_gradients(implementation, q, k, v, weights, **mask)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=tolerance, rtol=0)
    for name, g, e in zip("qkv", got_grads, expected_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tolerance, rtol=0,
                                   err_msg=f"d{name}")


def _random(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


@pytest.mark.parametrize("padding", ["none", "right", "left", "packed"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_chunked_matches_dense_self_attention(padding, window, heads, kv_heads, rng):
    """Query and key lengths not multiples of the block, several query and key blocks."""
    batch, length, head_dim, block = 3, int(rng.integers(17, 40)), 16, 8
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, padding, batch, length))
    _assert_matches_dense("chunked", q, k, v, FLOAT32_TOLERANCE, query_segment_ids_BxT=segments,
                          key_segment_ids_BxS=segments, sliding_window=window, block_size=block)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("queries", [1, 11])
def test_chunked_matches_dense_against_a_cache(window, queries, rng):
    """The sampler's chunked prefill and decode: queries at their positions against cache rows,
    rows past each query's position hold garbage; each batch row starts at its own offset."""
    batch, cache_length, heads, kv_heads, head_dim = 3, 45, 4, 2, 8
    q = _random(rng, batch, queries, heads, head_dim)
    k, v = (_random(rng, batch, cache_length, kv_heads, head_dim) for _ in range(2))
    starts = rng.integers(0, cache_length - queries + 1, batch)
    rows = jnp.asarray(starts[:, None] + np.arange(queries), jnp.int32)
    _assert_matches_dense("chunked", q, k, v, FLOAT32_TOLERANCE, query_rows_BxT=rows, sliding_window=window,
                          block_size=16)


@pytest.mark.parametrize("mesh_shape,batch,kv_heads,window,split", [
    ((1, 8, 1), 2, 4, 13, ("pairs", ("fsdp",))),  # 8 (sequence, kv head) pairs, one per chip
    # 4 pairs: split by pair, tensor would hold copies, so the queries split over all 8 chips
    ((2, 2, 2), 2, 2, 13, ("queries", ("data", "fsdp", "tensor"))),
    ((1, 8, 1), 1, 2, 13, ("queries", ("fsdp",))),  # 2 pairs on 8 chips: no axis divides them
    ((1, 8, 1), 1, 2, None, ("queries", ("fsdp",))),  # causal: mirror chips trade half-slices
])
def test_chunked_under_a_mesh_splits_the_work(mesh_shape, batch, kv_heads, window, split, rng):
    """Inputs split by position, as the trainer splits a microbatch smaller than the mesh: the
    chunked loops then run on (sequence, kv head) pairs or on query slices split over the mesh
    (values and gradients still the dense oracle's), and each chip's compiled program does its
    share of the tiles: for query slices under a window, the share of the chip whose queries see
    the most keys; causal, an even share, mirror chips having traded half their queries."""
    from jax.sharding import NamedSharding, PartitionSpec

    from opsd_jax.parallel import make_mesh
    from opsd_jax.plan import hlo_flops

    length, heads, head_dim, block = 40 if window else 64, 2 * kv_heads, 8, 8
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, "packed", batch, length))
    mask = dict(query_segment_ids_BxT=segments, key_segment_ids_BxS=segments, sliding_window=window, block_size=block)

    def forward(q, k, v):
        return attention.attend(q, k, v, implementation="chunked", **mask)

    single_chip = hlo_flops.count(jax.jit(forward).lower(q, k, v).compile().as_text()).flops
    mesh = make_mesh(*mesh_shape)
    by_position = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    q, k, v = (jax.device_put(x, by_position) for x in (q, k, v))
    with jax.set_mesh(mesh):
        assert attention._chunked_split(batch, kv_heads, length, length, block, window) == split
        _assert_matches_dense("chunked", q, k, v, FLOAT32_TOLERANCE, **mask)
        per_chip = hlo_flops.count(jax.jit(forward).lower(q, k, v).compile().as_text()).flops
    kind, axes = split
    shards = int(np.prod([dict(mesh.shape)[a] for a in axes]))
    whole = attention._busiest_chip_tiles(length, length, block, window, 1)
    busiest = attention._busiest_chip_tiles(length, length, block, window, shards)
    share = 1 / shards if kind == "pairs" else busiest / whole
    # the tiles split as `share` says; the values' mean (2 S K D per sequence) may stay whole
    assert per_chip <= single_chip * share + 2 * batch * length * kv_heads * head_dim
    assert per_chip >= single_chip * share - 2 * batch * length * kv_heads * head_dim
    assert per_chip < single_chip / 2  # no chip repeats the whole attention
    if window is None:  # the mirrored halves visit fewer tiles than the last contiguous slice would
        assert attention._mirrored(length, shards, window, block)
        last_slice = attention.mean_key_blocks(length // shards, length, block, block, None, True,
                                               first_row=length - length // shards)
        assert busiest < last_slice * (length // shards) * block * 0.7


def test_a_batch_the_mesh_can_split_keeps_whole_sequences_on_each_chip():
    from opsd_jax.parallel import make_mesh

    with jax.set_mesh(make_mesh(1, 8, 1)):
        assert attention._chunked_split(8, 2, 40, 40, 8, None) == ("", ())
        assert attention._chunked_split(4, 2, 40, 40, 8, None) == ("pairs", ("fsdp",))
    with jax.set_mesh(make_mesh(2, 2, 2)):
        assert attention._chunked_split(8, 2, 40, 40, 8, None) == ("", ())
        assert attention._chunked_split(4, 2, 40, 40, 8, None) == ("pairs", ("data", "fsdp", "tensor"))


def test_query_slices_sum_the_key_gradients_in_float32(rng):
    """bfloat16 inputs on 8 chips: each chip's partial key gradients are summed in float32, so the
    gradients are as close to the float32 oracle (on the same rounded inputs) as one device's
    bfloat16 chunked attention."""
    from jax.sharding import NamedSharding, PartitionSpec

    from opsd_jax.parallel import make_mesh

    batch, length, heads, kv_heads, head_dim, block = 1, 512, 4, 2, 16, 16
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    _, expected = _values_and_gradients("dense", *(x.astype(jnp.float32) for x in low), weights, block_size=block)
    _, one_device = _values_and_gradients("chunked", *low, weights, block_size=block)
    mesh = make_mesh(1, 8, 1)
    low = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "fsdp"))) for x in low]
    with jax.set_mesh(mesh):
        assert attention._chunked_split(batch, kv_heads, length, length, block, None)[0] == "queries"
        _, split = _values_and_gradients("chunked", *low, weights, block_size=block)
    # Mean errors: bfloat16 partials summed over the 8 chips raise dK's and dV's by about 15%.
    for name, e, one, got in zip("qkv", expected, one_device, split):
        error_one = np.mean(np.abs(np.asarray(one, np.float32) - np.asarray(e)))
        error_split = np.mean(np.abs(np.asarray(got, np.float32) - np.asarray(e)))
        assert error_split <= 1.03 * error_one, name


# Splash (TPU interpret mode here) tiles in 128-row blocks, so its case is longer.
@pytest.mark.parametrize("implementation, length, block_size", [("chunked", 50, 16), ("splash", 140, 128)])
def test_matches_dense_in_bfloat16(implementation, length, block_size, rng):
    batch, heads, kv_heads, head_dim = 2, 4, 2, 32
    q, k, v = (_random(rng, batch, length, n, head_dim, dtype=jnp.bfloat16) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, "right", batch, length))
    _assert_matches_dense(implementation, q, k, v, 0.05, query_segment_ids_BxT=segments,
                          key_segment_ids_BxS=segments, block_size=block_size)


def test_mask_rule_is_the_layers_masks(rng):
    """The integer rule reproduces both masks the decoder used before: segments and cache rows."""
    segments = jnp.asarray(_segments(rng, "packed", 3, 20))
    rows = jnp.broadcast_to(jnp.arange(20), (3, 20))
    for window in (None, 4):
        np.testing.assert_array_equal(
            attention.attention_mask(rows, segments, segments, window), layers.attention_mask(segments, window)
        )
        positions = jnp.asarray(rng.integers(0, 30, (3, 5)), jnp.int32)
        np.testing.assert_array_equal(
            attention.attention_mask(positions, jnp.ones((3, 5), jnp.int32), jnp.ones((3, 30), jnp.int32), window),
            layers.cache_attention_mask(positions, 30, window),
        )


def test_auto_is_chunked_on_cpu(rng):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    q, k, v = (_random(rng, 2, 24, 2, 8) for _ in range(3))
    auto = attention.attend(q, k, v, block_size=8)
    chunked = attention.attend(q, k, v, implementation="chunked", block_size=8)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(chunked))


def test_chunked_backward_stores_no_scores():
    """Compiled temporaries of forward + backward stay far below one float32 [H, T, S] tensor."""
    length, heads, head_dim = 2048, 2, 64
    shapes = [jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)] * 3

    def temp_bytes(implementation):
        def loss(q, k, v):
            return attention.attend(q, k, v, implementation=implementation, block_size=256).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores_bytes = heads * length * length * 4
    assert temp_bytes("dense") >= scores_bytes
    assert temp_bytes("chunked") < scores_bytes / 4


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="'flash'.*splash"):
        attention.attend(*(jnp.zeros((1, 4, 1, 8)),) * 3, implementation="flash")


# ---- through the model ---------------------------------------------------------------------


def _tiny_config(name, **runtime):
    return ModelConfig.from_hf(TINY_ARCHITECTURES[name], **runtime)


def test_model_config_field_is_validated_and_not_exported():
    config = _tiny_config("olmo3", attention_implementation="dense", attention_block_size=64)
    assert config.attention_implementation == "dense" and config.attention_block_size == 64
    assert "attention_implementation" not in config.hf_config_json
    assert _tiny_config("olmo3").attention_implementation == "auto"
    hash(config)
    with pytest.raises(ConfigError, match="attention_implementation"):
        config.replace(attention_implementation="flash")
    with pytest.raises(ConfigError, match="attention_block_size"):
        config.replace(attention_block_size=0)
    assert json.loads(config.hf_config_json) == config.hf_config


@pytest.mark.parametrize("name", ["qwen3", "olmo3"])
def test_decoder_logits_and_gradients_chunked_equal_dense(name, rng):
    """Small blocks so every layer crosses several query and key blocks, sliding layers included."""
    dense = _tiny_config(name, attention_implementation="dense")
    chunked = dense.replace(attention_implementation="chunked", attention_block_size=4)
    params = init_params(dense, jax.random.key(int(rng.integers(2**31))))
    tokens, mask, _ = left_padded_batch(rng, [19, 7, 13], dense.vocab_size)

    def loss(params, config):
        logits = forward(params, config, tokens, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1000.0, logits

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, expected), expected_grads = value_and_grad(params, dense)
    (_, got), got_grads = value_and_grad(params, chunked)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4, rtol=0)
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-4, rtol=1e-4)


def test_small_blocks_match_transformers_left_padded(tmp_path, rng):
    """OLMo-3 (sliding window 6) with 4-token blocks against transformers on a left-padded batch."""
    model = save_tiny_hf_model("olmo3", str(tmp_path), seed=int(rng.integers(2**31)))
    config, params = load_hf(tmp_path, progress=False)
    config = config.replace(attention_implementation="chunked", attention_block_size=4)
    tokens, mask, positions = left_padded_batch(rng, [19, 7, 13], config.vocab_size)
    ours = np.asarray(jax.jit(forward, static_argnums=1)(params, config, tokens, attention_mask=mask))
    reference = hf_logits(model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - reference[real]).max() <= 1e-4


def test_cached_prefill_chunks_equal_dense(rng):
    """Prefill in two chunks and one decode step through the cache: chunked equals dense."""
    dense = _tiny_config("olmo3", attention_implementation="dense")
    chunked = dense.replace(attention_implementation="chunked", attention_block_size=4)
    params = init_params(dense, jax.random.key(int(rng.integers(2**31))))
    tokens = rng.integers(0, dense.vocab_size, (2, 21))
    step = jax.jit(forward_with_cache, static_argnums=1)
    results = {}
    for config in (dense, chunked):
        cache, outputs = init_cache(config, 2, 24), []
        for start, stop in ((0, 10), (10, 20), (20, 21)):
            positions = np.broadcast_to(np.arange(start, stop), (2, stop - start))
            logits, cache = step(params, config, tokens[:, start:stop], positions, cache)
            outputs.append(np.asarray(logits))
        results[config.attention_implementation] = np.concatenate(outputs, axis=1)
    np.testing.assert_allclose(results["chunked"], results["dense"], atol=1e-4, rtol=0)


# ---- cuDNN (GPU only) ------------------------------------------------------------------------


@pytest.mark.skipif(not on_gpu, reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("padding,window", [("right", None), ("right", 64), ("left", None), ("packed", None)])
def test_cudnn_matches_dense_in_bfloat16(padding, window, rng):
    """Right padding runs cuDNN; left padding and packing take the chunked branch at run time."""
    batch, length, heads, kv_heads, head_dim = 2, 256, 8, 2, 128
    q, k, v = (_random(rng, batch, length, n, head_dim, dtype=jnp.bfloat16) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, padding, batch, length))
    _assert_matches_dense("cudnn", q, k, v, 0.05, query_segment_ids_BxT=segments, key_segment_ids_BxS=segments,
                          sliding_window=window)

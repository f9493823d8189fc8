"""Splash attention (Pallas TPU) against the dense oracle, in TPU interpret mode on this CPU, and
compiled ahead of time for real TPU topologies inside the decoder's sharded forward and backward."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from opsd_jax.models import attention
from opsd_jax.parallel import make_mesh

from .test_attention import FLOAT32_TOLERANCE, _assert_matches_dense, _random, _segments

ROOT = Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu absent: install the [tpu] extra")


def _uses_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# Interpret mode runs every grid step on the host, so the cases are chosen rather than crossed:
# each padding layout once, windows and GQA spread over them.
@pytest.mark.parametrize("padding,window,heads,kv_heads", [
    ("none", None, 4, 4),
    ("right", 37, 6, 2),
    ("left", None, 6, 2),
    ("packed", 37, 4, 2),
    ("packed", None, 4, 1),
])
def test_splash_matches_dense(padding, window, heads, kv_heads, rng):
    """Lengths between one and three 128-blocks, never a multiple: the padded tail of keys is seen
    by nobody, padding queries get the mean of all values as in dense."""
    batch, length, head_dim = 2, int(rng.integers(129, 300)), 16
    if length % 128 == 0:
        length += 1
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, padding, batch, length))
    _assert_matches_dense("splash", q, k, v, FLOAT32_TOLERANCE, query_segment_ids_BxT=segments,
                          key_segment_ids_BxS=segments, sliding_window=window, block_size=128)


def test_splash_without_segments_or_padding(rng):
    """T a multiple of the block and no segment ids: the kernel runs without segment ids at all."""
    batch, length, heads, kv_heads, head_dim = 2, 256, 4, 2, 16
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    _assert_matches_dense("splash", q, k, v, FLOAT32_TOLERANCE, block_size=128)


@pytest.mark.parametrize("padding", ["right", "none"])
def test_splash_flops_equal_the_interpreted_kernels_matmuls(padding, rng):
    """One tile per head (T <= 128): the interpreter runs each kernel's matmuls as plain dots, so
    the compiled CPU program's dots under each kernel's name are what the kernel computes on a TPU.
    The estimate scope around the call must name exactly those, forward and backward, and the
    plan's counter must read them off the kernels' names."""
    from opsd_jax.plan import hlo_flops

    batch, length, heads, kv_heads, head_dim = 2, int(rng.integers(60, 129)), 4, 2, 32
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, padding, batch, length)) if padding != "none" else None

    def loss(q, k, v):
        return attention.splash_attention(q, k, v, segments, None, 128).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    kernels = ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")
    in_scope = hlo_flops.estimate_scope_prefix(attention.SPLASH_SCOPE)
    counted = hlo_flops.count(text, (*kernels, in_scope))
    tile = batch * heads * 128 * 128 * head_dim
    assert {name: counted.by_scope[name] for name in kernels} == dict(zip(kernels, (4 * tile, 6 * tile, 8 * tile)))
    scope = hlo_flops.estimate_scope(attention.SPLASH_SCOPE, {"fwd": 4 * tile, "dq": 6 * tile, "dkv": 8 * tile})
    assert scope in text
    assert counted.flops == counted.by_scope[in_scope] == 18 * tile


@pytest.mark.parametrize("window", [None, 200])
def test_splash_flops_count_the_tiles_the_mask_leaves(window, rng):
    """Against the tiles of the dense [T, T] mask that hold any allowed pair: causal over 5 blocks
    is 15 of 25; a 200-token window drops the far-off tiles too."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block, blocks, heads, batch, head_dim = 128, 5, 3, int(rng.integers(1, 4)), 64
    length = block * blocks
    if window is None:
        head_mask, allowed = splash.CausalMask((length, length)), np.tri(length, dtype=bool)
    else:
        head_mask = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
        rows, cols = np.indices((length, length))
        allowed = (cols <= rows) & (cols > rows - window)
    tiles = int(allowed.reshape(blocks, block, blocks, block).any(axis=(1, 3)).sum())
    assert (tiles == 15) if window is None else (tiles < 15)
    flops = attention.splash_flops(splash.MultiHeadMask([head_mask] * heads), batch, head_dim, block)
    pairs = batch * heads * tiles * block * block * head_dim
    assert flops == {"fwd": 4 * pairs, "dq": 6 * pairs, "dkv": 8 * pairs}


@pytest.mark.parametrize("mesh_shape,batch,kv_heads", [
    ((2, 2, 2), 4, 2),  # batch over data and fsdp, heads over tensor
    ((2, 2, 2), 2, 4),  # batch over data; fsdp left to the heads, with tensor
])
def test_splash_under_a_mesh_matches_dense(mesh_shape, batch, kv_heads, rng):
    """With a context mesh the kernel sits in a shard_map over the 8 CPU devices; values and
    gradients equal the dense path's, computed without a mesh."""
    length, head_dim, group = 150, 16, 2
    q, k, v = (_random(rng, batch, length, n, head_dim) for n in (kv_heads * group, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, "packed", batch, length))
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(q, k, v, implementation):
        out = attention.attend(q, k, v, query_segment_ids_BxT=segments, key_segment_ids_BxS=segments,
                               sliding_window=41, implementation=implementation, block_size=128)
        return jnp.sum(out * weights), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, expected), expected_grads = jax.jit(grad, static_argnums=3)(q, k, v, "dense")
    with jax.set_mesh(make_mesh(*mesh_shape)):
        assert "shard_map" in str(jax.make_jaxpr(lambda *a: loss(*a, "splash"))(q, k, v))
        (_, got), got_grads = jax.jit(grad, static_argnums=3)(q, k, v, "splash")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=FLOAT32_TOLERANCE, rtol=0)
    for name, g, e in zip("qkv", got_grads, expected_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=FLOAT32_TOLERANCE, rtol=0, err_msg=f"d{name}")


def test_splash_partition_follows_the_logical_rules():
    def mesh(data, fsdp, tensor):
        return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))

    # (batch axes, head axes, idle axes)
    assert attention._splash_partition(mesh(1, 8, 1), 8, 8) == (("fsdp",), (), ())
    # The trainer's dense microbatch, 4 sequences on 8 chips: split by heads, not repeated.
    assert attention._splash_partition(mesh(1, 8, 1), 4, 8) == ((), ("fsdp",), ())
    assert attention._splash_partition(mesh(2, 2, 2), 4, 2) == (("data", "fsdp"), ("tensor",), ())
    assert attention._splash_partition(mesh(2, 2, 2), 2, 4) == (("data",), ("tensor", "fsdp"), ())
    # Nothing divides: fsdp would hold copies, so "auto" stays chunked there.
    assert attention._splash_partition(mesh(1, 4, 2), 2, 2) == ((), ("tensor",), ("fsdp",))


def test_splash_falls_back_to_chunked_where_it_does_not_apply(rng):
    """Queries against a cache, and query / key segment ids given as different arrays, take the
    chunked path (no Pallas kernel) and still equal dense; "auto" on CPU never takes splash."""
    batch, heads, kv_heads, head_dim = 2, 4, 2, 8
    q = _random(rng, batch, 3, heads, head_dim)
    k, v = (_random(rng, batch, 40, kv_heads, head_dim) for _ in range(2))
    rows = jnp.asarray([[10, 11, 12], [30, 31, 32]], jnp.int32)
    cached = lambda q, k, v: attention.attend(q, k, v, query_rows_BxT=rows, implementation="splash")
    assert not _uses_pallas(cached, q, k, v)
    _assert_matches_dense("splash", q, k, v, FLOAT32_TOLERANCE, query_rows_BxT=rows, block_size=16)

    q, k, v = (_random(rng, batch, 40, n, head_dim) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_segments(rng, "packed", batch, 40))
    key_segments = jnp.asarray(np.array(segments))
    separate = lambda q, k, v: attention.attend(
        q, k, v, query_segment_ids_BxT=segments, key_segment_ids_BxS=key_segments, implementation="splash")
    assert not _uses_pallas(separate, q, k, v)
    shared = lambda q, k, v: attention.attend(
        q, k, v, query_segment_ids_BxT=segments, key_segment_ids_BxS=segments, implementation="splash")
    assert _uses_pallas(shared, q, k, v)
    auto = lambda q, k, v: attention.attend(q, k, v, query_segment_ids_BxT=segments,
                                            key_segment_ids_BxS=segments)
    assert not _uses_pallas(auto, q, k, v)
    with jax.set_mesh(make_mesh(2, 2, 2)):
        assert not _uses_pallas(auto, q, k, v)


def _tpu_compile(accelerator: str, *args) -> dict:
    # A fresh process: conftest pins this one to 8 CPU devices, and libtpu reads the accelerator
    # type when it loads. Compiling needs no chip, so libtpu's per-host lock is skipped.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               TPU_ACCELERATOR_TYPE=accelerator, TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", "tests.models.splash_aot_compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    line = done.stdout.strip().splitlines()[-1]
    print(line)
    return json.loads(line)


@needs_libtpu
@pytest.mark.parametrize("arch,topology,accelerator", [
    ("qwen3", "v5p:2x2x1", "v5p-8"),
    ("olmo3", "v5e:2x2", "v5litepod-4"),
])
def test_decoder_compiles_with_splash_for_a_tpu_mesh(arch, topology, accelerator):
    """The decoder's forward and backward, attention "auto", traced under a (1, 2, 2) mesh of TPU
    devices from this CPU host: every layer runs splash as a Mosaic kernel (forward, its remat
    recomputation, dQ, dK/dV), none is left to XLA's partitioner (which refuses Mosaic calls); the
    scanned program holds one block of layers.
    The sequence (300) is not a multiple of the 128-block; OLMo-3 has a sliding layer."""
    report = _tpu_compile(accelerator, "decoder", topology, "--mesh", "1,2,2", "--arch", arch,
                          "--batch", "4", "--length", "300", "--block-size", "128")
    assert report["device_kind"].startswith("TPU")
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    layers = report["layers_per_block"]
    assert report["splash_kernels"] == sorted(["fwd", "fwd", "dq", "dkv"] * layers)
    assert report["mosaic_custom_calls"] == 4 * layers
    assert 0 < report["temp_bytes"] < 64 * 2**20
    # The plan counts every kernel from its estimate scope, none as 0: per chip 2 sequences x 2
    # heads, 6 of the 9 [128, 128] tiles (causal over 3 blocks; OLMo's 160-token window keeps all
    # 6 at this length), and per tile the forward twice (remat), dQ and dK/dV: 4 + 4 + 6 + 8
    # matmul FLOPs per (query, key) pair and unit of head width, for each of the model's layers.
    assert report["opaque_kernels"] == []
    assert report["splash_flops"] == report["layers"] * 2 * 2 * 6 * 128 * 128 * 128 * (4 + 4 + 6 + 8)

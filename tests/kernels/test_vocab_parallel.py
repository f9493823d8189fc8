"""The vocabulary-parallel (shard_map) form on the 8-device CPU mesh, against the float64 oracle;
ignored rows holding NaN; the trainer's step with and without its mesh; VMEM block choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opsd_jax import kernels
from opsd_jax.kernels import pallas_tpu, tpu_vmem, vocab_parallel
from opsd_jax.parallel import make_mesh
from tests.kernels import oracle

N, HS, HT = 32, 8, 6
# 1040 = 8 x 130: on 8 vocabulary shards each slice is 130 columns, which a 128-column block does
# not divide (a padded tail block inside every shard); with valid_vocab 900 the seventh shard is
# partly padding and the eighth entirely (it contributes nothing to any row).
V, VALID = 1040, 900
BLOCKS = {"xla": {"token_block": 8}, "pallas_tpu": {"token_block": 8, "vocab_block": 128},
          "pallas_gpu": {"token_block": 8, "vocab_block": 64}, "reference": {}}


def _inputs(rng, hs=HS, ht=HT):
    h_s = rng.normal(size=(N, hs)).astype(np.float32)
    w_s = rng.normal(size=(hs, V)).astype(np.float32)
    h_t = rng.normal(size=(N, ht)).astype(np.float32)
    w_t = rng.normal(size=(ht, V)).astype(np.float32)
    mask = rng.random(N) > 0.25
    mask[:2] = True
    targets = rng.integers(0, VALID, size=N).astype(np.int32)
    targets[:2] = (VALID - 1, 0)  # the last allowed column (shard 6 of 8) and the first
    return h_s, w_s, h_t, w_t, mask, targets


def _cotangents(rng):
    return {k: rng.normal(size=N).astype(np.float32) for k in ("divergence", "student_entropy", "student_logprob")}


def _value_and_grads(impl, mesh, beta, h_s, w_s, h_t, w_t, mask, targets, cot, temperature=1.3, gather=None):
    def loss(a, b):
        out = kernels.fused_linear_divergence(
            a, b, jnp.asarray(h_t), jnp.asarray(w_t), beta=beta, temperature=temperature, mask=jnp.asarray(mask),
            valid_vocab=VALID, targets=jnp.asarray(targets), impl=impl, mesh=mesh, gather_token_rows=gather,
            **BLOCKS[impl],
        )
        return sum(jnp.sum(jnp.asarray(cot[k]) * getattr(out, k)) for k in cot), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (g_h, g_w) = fn(jnp.asarray(h_s), jnp.asarray(w_s))
    return out, np.asarray(g_h), np.asarray(g_w)


@pytest.mark.parametrize("impl,mesh_shape,beta,widths,gather", [
    # On an fsdp mesh: the heads gathered over fsdp, or the token rows (the vocabulary then
    # splits over tensor and fsdp: 4 slices on 2,2,2, 8 on 1,8,1); xla here, the Pallas kernels below.
    ("xla", (2, 2, 2), 0.5, (HS, HT), False), ("xla", (2, 2, 2), 0.5, (HS, HT), True),
    ("xla", (1, 8, 1), 0.0, (HS, HT), True), ("xla", (2, 2, 2), 1.0, (HS, HT), True),
    ("xla", (1, 1, 8), 0.0, (HS, HT), None), ("xla", (1, 1, 8), 1.0, (HS, HT), None),
    ("pallas_tpu", (2, 2, 2), 0.5, (HS, HT), False), ("pallas_tpu", (1, 1, 8), 1.0, (HS, HT), None),
    ("pallas_tpu", (2, 2, 2), 0.5, (HS, HT), True), ("pallas_tpu", (1, 8, 1), 0.0, (HS, HT), True),
    # 520-column slices of 128-wide heads: read vocabulary-major ([v, H] tiles, d/dW [v, H]), as
    # Qwen3's 37,984-column slices are on TPU; the teacher's 6-wide head stays hidden-major. Two
    # devices: at H=128 the TPU interpreter's cross-device barrier deadlocks on 8 CPU devices in
    # either orientation (XLA's CPU thread pool is held by the callbacks waiting at it).
    ("pallas_tpu", (1, 1, 2), 0.5, (128, HT), None), ("pallas_tpu", (1, 1, 2), 0.0, (128, 128), None),
    # Triton tiles: hidden widths that are powers of two.
    ("pallas_gpu", (2, 2, 2), 0.5, (HS, 8), False), ("pallas_gpu", (2, 2, 2), 0.0, (HS, 8), True),
    ("pallas_gpu", (1, 1, 8), 1.0, (HS, 8), None),
    ("reference", (2, 2, 2), 0.5, (HS, HT), None),  # no slice statistics: token-parallel, heads replicated
])
def test_vocab_parallel_matches_oracle(rng, impl, mesh_shape, beta, widths, gather):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
    token_axes, vocab_axes = vocab_parallel.mesh_axes(mesh, N, V)
    assert vocab_axes == (("tensor",) if mesh_shape[2] > 1 else ())
    assert len(token_axes) == sum(s > 1 for s in mesh_shape[:2])
    gathered = vocab_parallel.row_gather_axes(mesh, N, V, widths, impl, row_bytes=4, choice=gather)
    assert gathered == (("fsdp",) if gather else ())
    h_s, w_s, h_t, w_t, mask, targets = _inputs(rng, *widths)
    cot = _cotangents(rng)
    out, g_h, g_w = _value_and_grads(impl, mesh, beta, h_s, w_s, h_t, w_t, mask, targets, cot, gather=gather)
    s64 = h_s.astype(np.float64) @ w_s.astype(np.float64)
    t64 = h_t.astype(np.float64) @ w_t.astype(np.float64)
    okw = dict(temperature=1.3, mask=mask, valid_vocab=VALID, targets=targets)
    expected = oracle.outputs(s64, t64, beta, **okw)
    for name in expected:
        np.testing.assert_allclose(np.asarray(getattr(out, name)), expected[name], atol=5e-5, rtol=5e-5, err_msg=name)
    g_logits = oracle.student_grad(s64, t64, beta, {k: x.astype(np.float64) for k, x in cot.items()}, **okw)
    exp_h = g_logits @ w_s.astype(np.float64).T
    exp_w = h_s.astype(np.float64).T @ g_logits
    np.testing.assert_allclose(g_h, exp_h, atol=1e-5 * max(1.0, np.abs(exp_h).max()))
    np.testing.assert_allclose(g_w, exp_w, atol=1e-5 * max(1.0, np.abs(exp_w).max()))
    assert np.all(g_h[~mask] == 0.0) and np.all(g_w[:, VALID:] == 0.0)


@pytest.mark.parametrize("impl,mesh_shape,padded_chunk", [
    ("xla", None, False), ("xla", (2, 2, 2), False), ("pallas_tpu", (2, 2, 2), False),
    # Rows gathered over fsdp in 4 chunks of 2 rows per shard: the last two chunks of every shard
    # are padding, so the group skips them in xla's remainder sweep and every kernel skips their
    # blocks.
    ("xla", (2, 2, 2), True), ("pallas_tpu", (2, 2, 2), True), ("pallas_gpu", (2, 2, 2), True),
])
def test_nan_in_ignored_rows_reaches_no_output_or_gradient(rng, impl, mesh_shape, padded_chunk):
    """NaN hidden states in ignored rows: every output and gradient is finite and equals the
    result of the kept rows alone (the oracle on them)."""
    h_s, w_s, h_t, w_t, mask, targets = _inputs(rng, HS, 8 if impl == "pallas_gpu" else HT)
    if padded_chunk:
        mask[np.arange(N) % (N // 4) >= N // 8] = False
    cot = _cotangents(rng)  # nonzero for ignored rows too: the kernel must drop them itself
    poisoned_s, poisoned_t = h_s.copy(), h_t.copy()
    poisoned_s[~mask] = np.nan
    poisoned_t[~mask] = np.nan
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    out, g_h, g_w = _value_and_grads(impl, mesh, 0.5, poisoned_s, w_s, poisoned_t, w_t, mask, targets, cot)
    kept = np.flatnonzero(mask)
    s64 = h_s[kept].astype(np.float64) @ w_s.astype(np.float64)
    t64 = h_t[kept].astype(np.float64) @ w_t.astype(np.float64)
    okw = dict(temperature=1.3, valid_vocab=VALID, targets=targets[kept])
    expected = oracle.outputs(s64, t64, 0.5, **okw)
    g_logits = oracle.student_grad(s64, t64, 0.5, {k: x[kept].astype(np.float64) for k, x in cot.items()}, **okw)
    exp_h = g_logits @ w_s.astype(np.float64).T
    exp_w = h_s[kept].astype(np.float64).T @ g_logits
    assert np.all(np.isfinite(g_h)) and np.all(np.isfinite(g_w))
    np.testing.assert_allclose(g_w, exp_w, atol=1e-5 * max(1.0, np.abs(exp_w).max()))
    np.testing.assert_allclose(g_h[kept], exp_h, atol=1e-5 * max(1.0, np.abs(exp_h).max()))
    assert np.all(g_h[~mask] == 0.0)
    for name in out._fields:
        got = np.asarray(getattr(out, name))
        assert np.all(got[~mask] == 0.0), name
        np.testing.assert_allclose(got[kept], expected[name], atol=5e-5, rtol=5e-5, err_msg=name)


def _all_gathers(jaxpr):
    """Output shapes of every floating-point all_gather in a jaxpr and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        aval = eqn.outvars[0].aval if eqn.outvars else None
        if eqn.primitive.name == "all_gather" and jnp.issubdtype(aval.dtype, jnp.floating):
            shapes.append(aval.shape)
        for sub in pallas_tpu.sub_jaxprs(eqn):
            shapes += _all_gathers(sub)
    return shapes


@pytest.mark.parametrize("impl,mesh_shape,shard_rows,chunk_rows", [
    ("xla", (2, 2, 2), 8, 2), ("xla", (1, 8, 1), 4, 1), ("pallas_tpu", (2, 2, 2), 8, 2),
    ("pallas_gpu", (1, 8, 1), 4, 1),
])
def test_token_rows_are_gathered_a_chunk_at_a_time(rng, impl, mesh_shape, shard_rows, chunk_rows):
    """With the token rows gathered over fsdp, both forms gather one chunk at a time, forward and
    backward: 2 f chunks of n / (2 f) rows from each of the f shards on 2,2,2 (half the rows a
    shard holds), one row from each on 1,8,1 (n = 4 < 2 f); the rows reach the shard_map split
    over fsdp, not gathered whole."""
    ht = 16 if impl == "pallas_gpu" else HT  # Triton: a power of two, and unlike HS
    assert vocab_parallel.row_gather_axes(make_mesh(*mesh_shape), N, V, (HS, ht), impl, row_bytes=4,
                                          choice=True) == ("fsdp",)
    from opsd_jax.kernels import xla

    group = mesh_shape[1]
    assert xla.gather_chunks(shard_rows, group) * chunk_rows == shard_rows
    h_s, w_s, h_t, w_t, mask, targets = _inputs(rng, HS, ht)
    cot = _cotangents(rng)
    mesh = make_mesh(*mesh_shape)

    def loss(a, b):
        out = kernels.fused_linear_divergence(a, b, jnp.asarray(h_t), jnp.asarray(w_t), beta=0.5, mask=jnp.asarray(mask),
                                              valid_vocab=VALID, targets=jnp.asarray(targets), impl=impl, mesh=mesh,
                                              gather_token_rows=True, **BLOCKS[impl])
        return sum(jnp.sum(jnp.asarray(cot[k]) * getattr(out, k)) for k in cot)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(h_s), jnp.asarray(w_s)).jaxpr
    row_gathers = [shape for shape in _all_gathers(jaxpr) if len(shape) == 2]
    # Rows of both models (HS, ht wide) forward, and again in the backward (xla: its remainder
    # sweep; the Pallas kernels: their gradient sweep).
    assert sorted({shape for shape in row_gathers}) == sorted([(group * chunk_rows, ht), (group * chunk_rows, HS)])
    assert len(row_gathers) == 4
    shard_map = next(e for e in jaxpr.eqns if e.primitive.name == "shard_map")
    row_specs = [spec for spec in shard_map.params["in_specs"] if len(spec) == 2 and spec[1] is None]
    assert len(row_specs) == 2 and all("fsdp" in str(spec[0]) for spec in row_specs), row_specs


def test_gather_chunks_divides_a_shards_rows():
    from opsd_jax.kernels import xla

    cases = [(8192, 4), (8192, 8), (2048, 8), (24, 8), (24, 4), (10, 4), (6, 4), (2, 8), (7, 2)]
    assert [xla.gather_chunks(n, f) for n, f in cases] == [8, 16, 16, 24, 8, 10, 6, 2, 7]


def test_mesh_must_be_the_trainers(rng):
    h_s, w_s, h_t, w_t, _, _ = _inputs(rng)
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(ValueError, match=r"mesh axes must be \('data', 'fsdp', 'tensor'\)"):
        kernels.fused_linear_divergence(h_s, w_s, h_t, w_t, beta=0.5, mesh=mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        kernels.fused_linear_divergence(h_s, w_s, h_t, w_t, beta=0.5, mesh="1,1,8")


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_no_shard_holds_the_whole_vocabulary(rng, impl):
    """Compiled per-device program on 8 vocabulary shards: no array anywhere has V columns (no
    gathered head, no [N, V] logits), only V / 8. (pallas_gpu: its interpreter's program.)"""
    mesh = make_mesh(1, 1, 8)
    h_s, w_s, h_t, w_t, mask, targets = _inputs(rng, HS, 8)
    head = NamedSharding(mesh, P(None, "tensor"))

    def loss(a, b, c, d):
        out = kernels.fused_linear_divergence(a, b, c, d, beta=0.5, mask=jnp.asarray(mask), valid_vocab=VALID,
                                              targets=jnp.asarray(targets), impl=impl, mesh=mesh, **BLOCKS[impl])
        return jnp.sum(out.divergence) + jnp.sum(out.student_logprob)

    args = (jnp.asarray(h_s), jax.device_put(w_s, head), jnp.asarray(h_t), jax.device_put(w_t, head))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    assert f",{V // 8}]" in hlo
    assert f"{V}]" not in hlo and f"{V}," not in hlo


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_train_step_gradients_are_the_same_with_the_mesh(rng, impl):
    """The trainer's loss through the sharded kernel (mesh 2,2,2: vocabulary over tensor) gives
    the gradients the single-device kernel gives (pallas_gpu: in its interpreter)."""
    from opsd_jax.config import ObjectiveSection
    from opsd_jax.distill.train_step import Batch, StepSettings, accumulated_gradients
    from opsd_jax.models import ModelConfig, init_params

    config = ModelConfig.from_hf(dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32"))
    mesh = make_mesh(2, 2, 2)
    key = jax.random.key(int(rng.integers(2**31)))
    params, teacher = (init_params(config, k, mesh) for k in jax.random.split(key))
    B, L, T = 4, 12, 6
    tokens = jnp.asarray(rng.integers(3, 500, (B, L)), jnp.int32)
    index = jnp.broadcast_to(jnp.arange(L - T - 1, L - 1, dtype=jnp.int32), (B, T))
    batch = Batch(tokens, jnp.ones((B, L), jnp.int32), tokens, jnp.ones((B, L), jnp.int32), index, index,
                  tokens[:, L - T:], jnp.asarray([6, 4, 5, 3], jnp.int32), jnp.full((B, T), -3.0, jnp.float32))
    objective = ObjectiveSection(kind="jsd", beta=0.5)
    results = []
    for step_mesh in (None, mesh):
        settings = StepSettings(student=config, teacher=config, objective=objective, kernel_impl=impl,
                                valid_vocab=500, mesh=step_mesh)
        results.append(jax.jit(functools.partial(accumulated_gradients, settings=settings))(params, teacher, batch))
    (grads1, metrics1), (grads2, metrics2) = results
    assert float(metrics1["loss"]) > 0.0
    assert float(metrics1["loss"]) == pytest.approx(float(metrics2["loss"]), rel=1e-5)
    assert np.abs(np.asarray(grads1["lm_head"])).max() > 0
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


# ---------------------------------------------------------------------------- VMEM budget


def test_vmem_table_matches_jax_tpu_info():
    info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    chips = {"v4": "TPU_V4", "v5e": "TPU_V5E", "v5p": "TPU_V5P", "v6e": "TPU_V6E", "v7x": "TPU_7X"}
    for generation, name in chips.items():
        got = info.get_tpu_info_for_chip(info.ChipVersion[name], 1).vmem_capacity_bytes
        assert got == tpu_vmem.PHYSICAL_VMEM[generation], generation


@pytest.mark.parametrize("device_kind,generation", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
    ("TPU v6 lite", "v6e"), ("TPU7x", "v7x"), ("cpu", None), ("NVIDIA H200", None),
])
def test_generation_from_device_kind(device_kind, generation):
    assert tpu_vmem.generation_of(device_kind) == generation


def test_blocks_fit_every_generation_at_qwen3_8b_widths():
    """H=4096, bf16 hidden states, float32 master heads, 8,192 tokens and the whole 151,936-column
    vocabulary on one chip (the largest slice a shard can get)."""
    ops = tpu_vmem.Operands(True, 4096, 4096, 2, 2, 4, 4)
    for generation in ("v5e", "v5p", "v6e", "v7x"):
        budget = tpu_vmem.budget(generation)
        assert budget.block_bytes < budget.limit_bytes < tpu_vmem.PHYSICAL_VMEM[generation]
        for kernel in ("stats", "jsd", "grad"):
            r, c = tpu_vmem.choose_blocks(kernel, 8192, 151_936, ops, generation)
            assert r % 8 == 0 and c % 128 == 0 and r >= 128 and c >= 128, (generation, kernel, r, c)
            assert tpu_vmem.estimate(kernel, r, c, ops) <= budget.block_bytes
    # v4's 16 MiB: H=4096 fits only in small blocks (the head tiles and d/dW block are single-
    # buffered), H=8192 not at all.
    assert tpu_vmem.choose_blocks("grad", 8192, 151_936, ops, "v4")[1] == 128
    with pytest.raises(ValueError, match="over the .* MiB budget of v4"):
        tpu_vmem.choose_blocks("grad", 8192, 151_936, tpu_vmem.Operands(True, 8192, 8192, 2, 2, 4, 4), "v4")
    # Explicit blocks are honoured (rounded to what Mosaic accepts), whatever the budget.
    assert tpu_vmem.choose_blocks("grad", 9, 300, ops, "v4", token_block=8, vocab_block=200) == (8, 128)

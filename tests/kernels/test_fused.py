"""fused_linear_divergence against the oracle applied to float64 logits h @ W."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import kernels
from tests.kernels import oracle

IMPL_SHAPES = {
    "reference": [(7, 8, 6, 50)],
    "xla": [(7, 8, 6, 50), (21, 16, 12, 203)],
    # 128-wide heads with 300 columns are read vocabulary-major ([V, H] tiles: pallas_tpu.vocab_major),
    # the 72-wide ones hidden-major: one case with each head in each orientation.
    "pallas_tpu": [(9, 8, 8, 300), (9, 128, 72, 300), (9, 72, 128, 300)],
    "pallas_gpu": [(9, 8, 8, 300)],
}
BLOCKS = {"reference": {}, "xla": {"token_block": 8}, "pallas_tpu": {"token_block": 8, "vocab_block": 128}, "pallas_gpu": {"token_block": 8, "vocab_block": 128}}
CASES = [(impl, shape) for impl, shapes in IMPL_SHAPES.items() for shape in shapes]


def _inputs(rng, n, hs, ht, v):
    h_s = rng.normal(size=(n, hs)).astype(np.float32)
    w_s = rng.normal(size=(hs, v)).astype(np.float32)
    h_t = rng.normal(size=(n, ht)).astype(np.float32)
    w_t = rng.normal(size=(ht, v)).astype(np.float32)
    mask = rng.random(n) > 0.25
    mask[0] = True
    valid_vocab = int(rng.integers(v // 2, v))
    targets = rng.integers(0, valid_vocab, size=n).astype(np.int32)
    temperature = float(rng.choice([0.8, 1.5]))
    return h_s, w_s, h_t, w_t, mask, valid_vocab, targets, temperature


def _check(rng, impl, shape, beta, general_cotangents):
    n, hs, ht, v = shape
    h_s, w_s, h_t, w_t, mask, valid_vocab, targets, temperature = _inputs(rng, n, hs, ht, v)
    kw = dict(beta=beta, temperature=temperature, mask=jnp.asarray(mask), valid_vocab=valid_vocab)
    kw["targets"] = jnp.asarray(targets)
    if general_cotangents:
        cot = {k: rng.normal(size=n).astype(np.float32) for k in ("divergence", "student_entropy", "student_logprob")}
    else:
        # A mean over kept tokens: the path that reuses the gradient formed in the forward pass.
        cot = {"divergence": np.full(n, 1.0 / mask.sum(), np.float32), "student_entropy": np.zeros(n, np.float32),
               "student_logprob": np.zeros(n, np.float32)}

    def loss(a, b):
        out = kernels.fused_linear_divergence(
            a, b, jnp.asarray(h_t), jnp.asarray(w_t), impl=impl, **BLOCKS[impl], **kw
        )
        total = sum(jnp.sum(jnp.asarray(cot[k]) * getattr(out, k)) for k in cot)
        return total, out

    (_, out), (g_h, g_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(h_s), jnp.asarray(w_s))
    s64 = h_s.astype(np.float64) @ w_s.astype(np.float64)
    t64 = h_t.astype(np.float64) @ w_t.astype(np.float64)
    okw = dict(temperature=temperature, mask=mask, valid_vocab=valid_vocab, targets=targets)
    expected = oracle.outputs(s64, t64, beta, **okw)
    for name in expected:
        np.testing.assert_allclose(np.asarray(getattr(out, name)), expected[name], atol=5e-5, rtol=5e-5, err_msg=name)
    g_logits = oracle.student_grad(s64, t64, beta, {k: x.astype(np.float64) for k, x in cot.items()}, **okw)
    exp_h = g_logits @ w_s.astype(np.float64).T
    exp_w = h_s.astype(np.float64).T @ g_logits
    # float32 logits of size ~sqrt(H) * 4 over V columns: about 1e-5 of the largest entry is the
    # rounding floor (seed 1474613346 reaches 1.05e-5 on xla, beta=1), so the bound is 3e-5.
    np.testing.assert_allclose(np.asarray(g_h), exp_h, atol=3e-5 * max(1.0, np.abs(exp_h).max()))
    np.testing.assert_allclose(np.asarray(g_w), exp_w, atol=3e-5 * max(1.0, np.abs(exp_w).max()))
    assert np.all(np.asarray(g_h)[~mask] == 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("impl,shape", CASES)
def test_fused_mean_loss_matches_oracle(rng, impl, shape, beta):
    _check(rng, impl, shape, beta, general_cotangents=False)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl,shape", CASES)
def test_fused_general_cotangents_match_oracle(rng, impl, shape, beta):
    _check(rng, impl, shape, beta, general_cotangents=True)


def test_fused_teacher_gets_no_gradient(rng):
    h_s, w_s, h_t, w_t, *_ = _inputs(rng, 5, 4, 4, 30)

    def loss(a, b, c, d):
        return jnp.sum(kernels.fused_linear_divergence(a, b, c, d, beta=0.5, impl="xla").divergence)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (h_s, w_s, h_t, w_t)))
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((4, 8), (7, 10), (4, 6), (6, 10)), "student_head has 7 rows but student_hidden has width 8"),
        (((4, 8), (8, 10), (4, 6), (5, 10)), "teacher_head has 5 rows but teacher_hidden has width 6"),
        (((4, 8), (8, 10), (3, 6), (6, 10)), "teacher_hidden has 3 tokens but student_hidden has 4"),
        (((4, 8), (8, 10), (4, 6), (6, 12)), "student_head vocabulary 10 differs from teacher_head vocabulary 12"),
        (((4, 8, 1), (8, 10), (4, 6), (6, 10)), "student_hidden must have 2 dimensions"),
    ],
)
def test_fused_bad_shapes_are_named(shapes, message):
    arrays = [jnp.zeros(s, jnp.float32) for s in shapes]
    with pytest.raises(ValueError, match=message):
        kernels.fused_linear_divergence(*arrays, beta=0.0)


def test_pallas_gpu_names_a_width_triton_cannot_tile():
    arrays = [jnp.zeros(s, jnp.float32) for s in ((4, 8), (8, 16), (4, 6), (6, 16))]
    with pytest.raises(ValueError, match="teacher_hidden has 6"):
        kernels.fused_linear_divergence(*arrays, beta=0.0, impl="pallas_gpu")


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
def test_fused_bf16_inputs_accumulate_in_float32(rng, impl):
    n, hs, ht, v = 9, 8, 8, 300
    h_s, w_s, h_t, w_t, mask, valid_vocab, targets, temperature = _inputs(rng, n, hs, ht, v)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (h_s, w_s, h_t, w_t)]
    seen = [np.asarray(x.astype(jnp.float32), np.float64) for x in bf]
    kw = dict(beta=0.5, temperature=temperature, mask=jnp.asarray(mask), valid_vocab=valid_vocab)

    def loss(a, b):
        out = kernels.fused_linear_divergence(a, b, bf[2], bf[3], impl=impl, **BLOCKS[impl], **kw)
        return jnp.sum(out.divergence) / mask.sum(), out

    (_, out), (g_h, g_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(bf[0], bf[1])
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
    s64, t64 = seen[0] @ seen[1], seen[2] @ seen[3]
    okw = dict(temperature=temperature, mask=mask, valid_vocab=valid_vocab)
    expected = oracle.outputs(s64, t64, 0.5, **okw)["divergence"]
    # Logits are exact float32 products of bf16 values, so only accumulation order differs.
    np.testing.assert_allclose(np.asarray(out.divergence), expected, rtol=1e-4, atol=1e-4)
    cot = {"divergence": np.full(n, 1.0 / mask.sum()), "student_entropy": np.zeros(n)}
    g_logits = oracle.student_grad(s64, t64, 0.5, cot, **okw)
    exp_w = seen[0].T @ g_logits
    # The per-logit gradient is rounded to bf16 before the products, as for the forward's inputs.
    np.testing.assert_allclose(np.asarray(g_w, np.float32), exp_w, atol=2e-2 * np.abs(exp_w).max())

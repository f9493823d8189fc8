"""Parity with TRL's ChunkedDivergenceFunction on identical inputs (torch CPU path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax import kernels

torch = pytest.importorskip("torch")
chunked = pytest.importorskip("trl.kernels.chunked_divergence")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_chunked_divergence(rng, beta):
    n, hs, ht, v = 13, 16, 12, 397
    h_s = rng.normal(size=(n, hs)).astype(np.float32)
    w_s = (rng.normal(size=(hs, v)) / 2).astype(np.float32)
    h_t = rng.normal(size=(n, ht)).astype(np.float32)
    w_t = (rng.normal(size=(ht, v)) / 2).astype(np.float32)
    temperature = float(rng.choice([1.0, 0.9, 1.4]))
    upstream = rng.normal(size=n).astype(np.float32)

    th_s = torch.tensor(h_s, dtype=torch.float64, requires_grad=True)
    tw_s = torch.tensor(w_s.T, dtype=torch.float64, requires_grad=True)  # TRL's head is [V, H]
    div, entropy = chunked.ChunkedDivergenceFunction.apply(
        th_s, tw_s, None, torch.tensor(h_t, dtype=torch.float64), torch.tensor(w_t.T, dtype=torch.float64),
        None, beta, temperature,
    )
    (div * torch.tensor(upstream, dtype=torch.float64)).sum().backward()

    def loss(a, b):
        out = kernels.fused_linear_divergence(
            a, b, jnp.asarray(h_t), jnp.asarray(w_t), beta=beta, temperature=temperature, impl="xla"
        )
        return jnp.sum(jnp.asarray(upstream) * out.divergence), out

    (_, out), (g_h, g_w) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(h_s), jnp.asarray(w_s))
    np.testing.assert_allclose(np.asarray(out.divergence), div.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.student_entropy), entropy.detach().numpy(), rtol=1e-5, atol=1e-5)
    exp_h = th_s.grad.numpy()
    exp_w = tw_s.grad.numpy().T
    np.testing.assert_allclose(np.asarray(g_h), exp_h, atol=1e-5 * np.abs(exp_h).max())
    np.testing.assert_allclose(np.asarray(g_w), exp_w, atol=1e-5 * np.abs(exp_w).max())

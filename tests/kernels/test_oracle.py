"""The oracle must be right before anything is compared with it."""

import numpy as np
import pytest

from tests.kernels import oracle


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_oracle_gradient_matches_finite_differences(rng, beta):
    n, v = 3, 11
    s = rng.normal(size=(n, v)) * 2
    t = rng.normal(size=(n, v)) * 2
    targets = rng.integers(0, 9, size=n)
    temperature = 1.3
    cot = {k: rng.normal(size=n) for k in ("divergence", "student_entropy", "student_logprob")}

    def f(x):
        out = oracle.outputs(x, t, beta, temperature, valid_vocab=9, targets=targets)
        return sum(np.dot(cot[k], out[k]) for k in cot)

    g = oracle.student_grad(s, t, beta, cot, temperature, valid_vocab=9, targets=targets)
    oracle.assert_matches_finite_differences(f, g, s, rng)
    assert np.all(g[:, 9:] == 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_topk_oracle_gradient_matches_finite_differences(rng, beta):
    n, v, k = 3, 13, 4
    s = rng.normal(size=(n, v)) * 2
    teacher = oracle._log_softmax(oracle.scaled(rng.normal(size=(n, v)) * 2, 1.3, 10))
    ids = np.argsort(-teacher, axis=-1)[:, :k]
    lt_k = np.take_along_axis(teacher, ids, -1)
    weights = rng.normal(size=n)

    def f(x):
        return np.dot(weights, oracle.topk_divergence(x, ids, lt_k, beta, 1.3, valid_vocab=10))

    g = weights[:, None] * oracle.topk_student_grad(s, ids, lt_k, beta, 1.3, valid_vocab=10)
    oracle.assert_matches_finite_differences(f, g, s, rng)
    assert np.all(g[:, 10:] == 0.0)


def test_oracle_known_values(rng):
    v = 7
    same = rng.normal(size=(2, v))
    for beta in (0.0, 0.5, 1.0):
        out = oracle.outputs(same, same, beta)
        np.testing.assert_allclose(out["divergence"], 0.0, atol=1e-12)
    uniform = np.zeros((1, v))
    np.testing.assert_allclose(oracle.outputs(uniform, uniform, 0.0)["student_entropy"], np.log(v))
    # Two point masses on different tokens: forward KL is +inf, JSD with beta=0.5 is log 2.
    a = np.full((1, v), -np.inf)
    b = np.full((1, v), -np.inf)
    a[0, 0] = 0.0
    b[0, 1] = 0.0
    assert np.isinf(oracle.outputs(a, b, 0.0)["divergence"][0])
    np.testing.assert_allclose(oracle.outputs(a, b, 0.5)["divergence"], np.log(2.0))

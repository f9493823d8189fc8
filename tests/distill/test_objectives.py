"""Objectives against float64 NumPy and closed-form gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.distill import objectives


def test_completion_mask_skip_and_windows():
    lengths = np.array([6, 2, 0])
    first = np.asarray(objectives.completion_mask(lengths, 8, skip_first=1, window=3, window_from="first"))
    np.testing.assert_array_equal(first[0], [0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(first[1], [0, 1, 0, 0, 0, 0, 0, 0])
    assert not first[2].any()
    last = np.asarray(objectives.completion_mask(lengths, 8, skip_first=0, window=2, window_from="last"))
    np.testing.assert_array_equal(last[0], [0, 0, 0, 0, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="window_from"):
        objectives.completion_mask(lengths, 8, window=2, window_from="middle")


def test_discounted_returns_match_brute_force(rng):
    advantage = rng.normal(size=(3, 7))
    mask = rng.random((3, 7)) > 0.3
    for discount in (0.0, 0.5, 1.0):
        got = np.asarray(objectives.discounted_returns(jnp.asarray(advantage), jnp.asarray(mask), discount))
        expected = np.zeros_like(advantage)
        for b in range(3):
            for t in range(7):
                if mask[b, t]:
                    expected[b, t] = sum(discount ** (u - t) * advantage[b, u] for u in range(t, 7) if mask[b, u])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sampled_reverse_kl_gradient_is_the_policy_gradient(rng):
    """d loss / d student logits = -R_t r_t (onehot(y_t) - softmax(z_t)) on each loss token."""
    B, T, V = 2, 5, 7
    student_logits = rng.normal(size=(B, T, V))
    teacher_logprob = np.log(rng.dirichlet(np.ones(V), size=(B, T)))
    tokens = rng.integers(0, V, (B, T))
    sampler_logprob = rng.normal(size=(B, T)) - 2
    mask = np.ones((B, T), bool)
    mask[1, 3:] = False
    discount = 0.7

    def loss(z):
        log_p = jax.nn.log_softmax(z, -1)
        student_lp = jnp.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
        teacher_lp = jnp.take_along_axis(teacher_logprob, tokens[..., None], -1)[..., 0]
        return objectives.sampled_reverse_kl_loss(student_lp, teacher_lp, sampler_logprob, mask,
                                                  discount=discount).sum()

    got = np.asarray(jax.grad(loss)(jnp.asarray(student_logits)))
    log_p = student_logits - np.log(np.exp(student_logits).sum(-1, keepdims=True))
    student_lp = np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    teacher_lp = np.take_along_axis(teacher_logprob, tokens[..., None], -1)[..., 0]
    advantage = teacher_lp - student_lp
    ratio = np.exp(student_lp - sampler_logprob)
    expected = np.zeros_like(student_logits)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            returns = sum(discount ** (u - t) * advantage[b, u] for u in range(t, T) if mask[b, u])
            onehot = np.eye(V)[tokens[b, t]]
            expected[b, t] = -returns * ratio[b, t] * (onehot - np.exp(log_p[b, t]))
    # float32 against a float64 oracle: the ratio exp(student - sampler log-prob) reaches ~50 at
    # some seeds, where a few float32 ulps exceed any absolute tolerance.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sequence_importance_is_the_capped_mean_ratio(rng):
    student, sampler = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    mask = rng.random((4, 6)) > 0.2
    mask[3] = False
    got = np.asarray(objectives.sequence_importance(student, sampler, mask, cap=2.0))
    for b in range(3):
        expected = np.exp(student[b] - sampler[b])[mask[b]].mean() if mask[b].any() else 0.0
        assert got[b] == pytest.approx(min(expected, 2.0), rel=1e-5)
    assert got[3] == 0.0


def test_paper_importance_caps_each_token_then_averages():
    """The two modes on a hand-made batch against their closed forms: ratios (4, 1, 0.5) over the
    loss tokens; the masked ratio (e^3) must not count."""
    student = np.log(np.array([[0.8, 0.5, 0.25, 0.9], [0.5, 0.5, 0.5, 0.5]], np.float32))
    sampler = np.log(np.array([[0.2, 0.5, 0.5, 0.9 / np.e**3], [0.5, 0.5, 0.5, 0.5]], np.float32))
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)
    paper = np.asarray(objectives.sequence_importance(student, sampler, mask, cap=2.0, clamp="token"))
    sequence = np.asarray(objectives.sequence_importance(student, sampler, mask, cap=2.0, clamp="sequence"))
    np.testing.assert_allclose(paper, [(2.0 + 1.0 + 0.5) / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sequence, [min((4.0 + 1.0 + 0.5) / 3, 2.0), 0.0], rtol=1e-6)
    uncapped = np.asarray(objectives.sequence_importance(student, sampler, mask, cap=None, clamp="token"))
    np.testing.assert_allclose(uncapped[0], (4.0 + 1.0 + 0.5) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="clamp must be"):
        objectives.sequence_importance(student, sampler, mask, cap=2.0, clamp="batch")


def test_reductions(rng):
    per_token = rng.normal(size=(3, 5))
    weights = rng.random((3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    scale = np.array([0.5, 2.0, 3.0])
    sequence = float(objectives.reduce_loss(per_token, weights, mask, scale, "sequence_mean"))
    # The third sequence has no loss tokens: it adds 0 and still counts (the paper's
    # `(sum / count.clamp(min=1)).mean()`).
    expected = ((per_token[0, :3] * weights[0, :3]).mean() * 0.5 + per_token[1, 0] * weights[1, 0] * 2.0) / 3
    assert sequence == pytest.approx(expected, rel=1e-5)
    token = float(objectives.reduce_loss(per_token, weights, mask, scale, "token_mean"))
    expected = ((per_token * weights)[0, :3].sum() * 0.5 + per_token[1, 0] * weights[1, 0] * 2.0) / 4
    assert token == pytest.approx(expected, rel=1e-5)


def test_sequence_mean_of_equal_microbatches_is_the_batch_mean(rng):
    """A sequence without loss tokens in one microbatch must not reweight that microbatch's
    sequences against the others': the trainer averages the microbatches' losses."""
    B, T = 8, 6
    per_token, weights, scale = rng.normal(size=(B, T)), rng.random((B, T)), rng.random(B) + 0.5
    lengths = rng.integers(4, T + 1, size=B)
    lengths[rng.integers(B)] = 2  # no loss token after skip_first=3
    mask = np.asarray(objectives.completion_mask(lengths, T, skip_first=3))
    whole = float(objectives.reduce_loss(per_token, weights, mask, scale, "sequence_mean"))
    halves = [float(objectives.reduce_loss(per_token[rows], weights[rows], mask[rows], scale[rows], "sequence_mean"))
              for rows in (slice(0, B, 2), slice(1, B, 2))]
    assert np.mean(halves) == pytest.approx(whole, rel=1e-5)


def test_token_weights_pick_high_entropy_forks(rng):
    entropy = rng.random((4, 10))
    mask = np.ones((4, 10), bool)
    mask[:, 8:] = False
    forks = np.asarray(objectives.token_weights(mask, entropy, "top_student_entropy", top_rho=0.25))
    threshold = np.quantile(entropy[mask], 0.75)
    np.testing.assert_array_equal(forks.astype(bool), (entropy >= threshold) & mask)
    down = np.asarray(objectives.token_weights(mask, entropy, "downweight_teacher_at_forks", top_rho=0.25,
                                               fork_weight=0.1))
    np.testing.assert_allclose(down, np.where(forks > 0, 0.1, mask.astype(float)))


@pytest.mark.parametrize("steps, warmup", [(234, 8), (459, 14), (10, 1)])
def test_schedule_is_transformers_cosine_with_ceil_warmup(steps, warmup):
    """The paper's schedule (transformers' get_cosine_schedule_with_warmup, warmup = ceil(0.03 S))
    in closed form, at every step."""
    import math

    from opsd_jax.config import OptimizerSection
    from opsd_jax.distill.train_step import learning_rate_schedule

    section = OptimizerSection(learning_rate=5e-6, warmup_ratio=0.03)
    schedule = learning_rate_schedule(section, steps)
    for s in range(steps + 1):
        if s < warmup:
            expected = 5e-6 * s / warmup
        else:
            expected = 5e-6 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert float(schedule(s)) == pytest.approx(expected, rel=1e-5, abs=1e-13), s

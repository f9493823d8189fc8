"""Sampling filters and draws against NumPy, transformers' logits warpers and a chi-square test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from opsd_jax.sampler.sampling import SamplingParams, filtered_logits, sample_tokens


def _transformers_filtered(logits, temperature, top_k, top_p):
    scores = torch.tensor(logits, dtype=torch.float32)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 0.95), (1.3, 50, 1.0), (0.7, 20, 0.8),
                                                       (1.0, 1, 0.5), (0.9, 0, 0.01)])
def test_filtered_logits_keep_what_transformers_keeps(temperature, top_k, top_p, rng):
    logits = rng.normal(size=(4, 300)) * 3
    ours = np.asarray(filtered_logits(jnp.asarray(logits, jnp.float32), jnp.full(4, temperature),
                                      jnp.full(4, top_k, jnp.int32), jnp.full(4, top_p)))
    theirs = _transformers_filtered(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    kept = np.isfinite(ours)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_per_row_parameters_differ_within_one_call(rng):
    logits = rng.normal(size=(3, 50))
    temperature, top_k, top_p = np.array([1.0, 0.5, 2.0]), np.array([0, 5, 0]), np.array([0.9, 1.0, 0.3])
    ours = np.asarray(filtered_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32),
                                      jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))
    for row in range(3):
        theirs = _transformers_filtered(logits[row : row + 1], temperature[row], int(top_k[row]), top_p[row])[0]
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(theirs))


def test_sampled_frequencies_match_the_filtered_distribution(rng):
    """20,000 seeded draws; chi-square against softmax(filtered logits) at significance 1e-4, and
    nothing drawn outside what top-k / top-p keep."""
    vocab, draws = 16, 20_000
    logits = rng.normal(size=vocab) * 1.5
    temperature, top_k, top_p = 0.8, 10, 0.9
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), draws)
    ones = jnp.ones(draws)
    tokens, sampled_logprob, _, _, _, _ = jax.jit(sample_tokens)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, vocab)), keys, temperature * ones,
        jnp.full(draws, top_k, jnp.int32), top_p * ones,
    )
    expected_logits = _transformers_filtered(logits[None], temperature, top_k, top_p)[0]
    expected = np.exp(expected_logits - expected_logits[np.isfinite(expected_logits)].max())
    expected[~np.isfinite(expected_logits)] = 0
    expected /= expected.sum()
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    if kept.sum() > 1:  # a draw whose top-p keeps one token is checked in full by the line above
        statistic = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
        assert statistic < scipy.stats.chi2.ppf(1 - 1e-4, df=kept.sum() - 1)
    np.testing.assert_allclose(np.asarray(sampled_logprob), np.log(expected[np.asarray(tokens)]), atol=1e-5)


def test_greedy_and_model_statistics(rng):
    logits = rng.normal(size=(5, 40)) * 2
    keys = jax.random.split(jax.random.key(0), 5)
    token, sampled_logprob, model_logprob, entropy, top_ids, top_logprobs = sample_tokens(
        jnp.asarray(logits, jnp.float32), keys, jnp.zeros(5), jnp.zeros(5, jnp.int32), jnp.ones(5)
    )
    np.testing.assert_array_equal(np.asarray(token), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(sampled_logprob), 0.0)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(model_logprob), log_p[np.arange(5), logits.argmax(-1)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), -(np.exp(log_p) * log_p).sum(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-logits, -1)[:, :20])
    np.testing.assert_allclose(np.asarray(top_logprobs), np.sort(log_p, -1)[:, ::-1][:, :20], atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [({"temperature": -0.1}, "temperature must be"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
     ({"top_p": 1.5}, "top_p must be"), ({"top_k": -1}, "top_k must be"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"temperature": float("nan")}, "temperature must be"), ({"seed": -3}, "seed must be")],
)
def test_sampling_params_name_the_bad_field(change, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**change).validate()


def test_rows_sample_the_same_alone_or_in_any_batch(rng):
    """sample_tokens takes rows in blocks (padding the last): every output of a row, bit for bit,
    is what sampling that row alone gives, for a row count that is not a multiple of the block."""
    rows, vocab = 9, 700
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), rows)
    temperature = jnp.asarray(rng.choice([0.0, 0.6, 1.0], rows), jnp.float32)
    top_k = jnp.asarray(rng.choice([0, 5, 50], rows), jnp.int32)
    top_p = jnp.asarray(rng.choice([1.0, 0.9, 0.5], rows), jnp.float32)
    together = jax.jit(sample_tokens, static_argnums=5)(logits, keys, temperature, top_k, top_p, 3)
    unblocked = jax.jit(sample_tokens, static_argnums=(5, 6))(logits, keys, temperature, top_k, top_p, 3, None)
    # All rows at once, as accelerators run it: the same tokens, values to the last bits (XLA
    # vectorizes a 9-row reduction differently from a 4-row one).
    np.testing.assert_array_equal(np.asarray(unblocked[0]), np.asarray(together[0]))
    np.testing.assert_array_equal(np.asarray(unblocked[4]), np.asarray(together[4]))
    for got, expected in zip(unblocked[1:], together[1:]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-6, atol=1e-6)
    for row in range(rows):
        alone = jax.jit(sample_tokens, static_argnums=5)(logits[row:row + 1], keys[row:row + 1], temperature[row:row + 1],
                                                         top_k[row:row + 1], top_p[row:row + 1], 3)
        for got, expected in zip(together, alone):
            np.testing.assert_array_equal(np.asarray(got)[row], np.asarray(expected)[0])


def test_two_level_draw_is_the_inverse_cdf_of_the_filtered_distribution(rng):
    """The block-then-token draw picks the token whose float64 cumulative probability first
    exceeds the same uniform (except within rounding of a boundary), never a filtered token,
    with a vocabulary that is not a multiple of the block and kept tokens at block edges."""
    draws, vocab = 3000, 1000
    logits = rng.normal(size=vocab) * 2
    logits[[127, 128, 255, 999]] += 6  # likely draws on both sides of block edges and the last token
    temperature, top_k, top_p = 0.9, 40, 0.95
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), draws)
    ones = jnp.ones(draws)
    tokens = np.asarray(jax.jit(sample_tokens, static_argnums=5)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, vocab)), keys, temperature * ones,
        jnp.full(draws, top_k, jnp.int32), top_p * ones, 0)[0])
    kept = np.isfinite(_transformers_filtered(logits[None], temperature, top_k, top_p)[0])
    assert kept[tokens].all()
    filtered = np.where(kept, logits / temperature, -np.inf)
    cdf = np.cumsum(np.exp(filtered - filtered.max()))
    cdf /= cdf[-1]
    uniforms = np.asarray(jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys), np.float64)
    expected = np.searchsorted(cdf, uniforms, side="right")
    near_boundary = np.min(np.abs(uniforms[:, None] - cdf[None, kept]), axis=1) < 1e-5
    assert (tokens == expected)[~near_boundary].all()


@pytest.mark.parametrize("scale, temperature, top_k, top_p", [
    (0.05, 0.6, 0, 0.95),  # nearly flat, as a random model's: the cut is deep in the vocabulary
    (3.0, 0.6, 0, 0.95),  # peaked
    (1.0, 1.0, 5000, 1.0),
    (2.0, 0.7, 2000, 0.9),
    (None, 1.0, 0, 0.9),  # logits on a 0.1 grid: ties spread over every block (whole-vocabulary fallback)
])
def test_full_vocabulary_cut_equals_the_whole_vocabulary_bisection(rng, monkeypatch, scale, temperature, top_k, top_p):
    """At V = 151,936 the later halvings pass over the gathered blocks only; the kept sets must be
    those of halving over the whole vocabulary every time."""
    from opsd_jax.sampler import sampling

    logits = rng.normal(size=(4, 151_936))
    logits = np.round(logits, 1) if scale is None else logits * scale
    args = (jnp.asarray(logits, jnp.float32), jnp.full(4, temperature), jnp.full(4, top_k, jnp.int32),
            jnp.full(4, top_p))
    gathered = np.asarray(jax.jit(filtered_logits)(*args))
    monkeypatch.setattr(sampling, "_FULL_STEPS", sampling._BISECTION_STEPS)
    whole = np.asarray(jax.jit(filtered_logits)(*args))
    np.testing.assert_array_equal(np.isfinite(gathered), np.isfinite(whole))
    kept = np.isfinite(whole)
    assert 0 < kept.sum(axis=1).min() and kept.sum(axis=1).max() < 151_936
    if scale == 3.0:  # a nucleus far from float32 rounding: transformers' warpers keep the same set
        theirs = _transformers_filtered(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(kept, np.isfinite(theirs))


def test_first_argmax_is_argmax_ties_and_empty_rows_included(rng):
    from opsd_jax.sampler.sampling import first_argmax

    values = rng.normal(size=(6, 1000)).astype(np.float32)
    values[1, [17, 400, 999]] = 50.0  # a tie: the first wins
    values[2] = -np.inf  # nothing allowed: index 0
    values[3, -1] = 60.0
    values[4] = np.round(values[4])  # many ties everywhere
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(values))), np.argmax(values, axis=-1))
    assert list(np.asarray(first_argmax(jnp.asarray(values)))[[1, 2, 3]]) == [17, 0, 999]

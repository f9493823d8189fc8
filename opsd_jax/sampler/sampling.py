"""Per-request sampling: temperature, top-k, top-p, seeded keys, greedy.

Shape letters: S slots (rows sampled at once), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 disable those
    filters; `seed` makes a request reproducible whatever slot or batch it runs in."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    # Alternatives reported per generated token (the raw model's most likely); 0 computes none.
    top_logprobs: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the field."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.top_logprobs!r}")


def request_key(seed: int, sample_index: int):
    """The PRNG key of one sample of one request; per-token keys fold in the token's position."""
    return jax.random.fold_in(jax.random.key(seed), sample_index)


# Bisection steps for the top-k / top-p cut-offs: 40 halvings of the logit range separate any two
# distinct float32 logits of a realistic range, so the kept set is exact up to ties.
_BISECTION_STEPS = 40


def _largest_cut(values_SxV, low_S, high_S, satisfied):
    """Largest c in [low, high] with satisfied(values >= c) per row, by bisection.

    `satisfied(mask_SxV) -> bool[S]` must be monotone (true for every c below the answer).
    """

    def step(_, bounds):
        low_S, high_S = bounds
        middle_S = (low_S + high_S) / 2
        ok_S = satisfied(values_SxV >= middle_S[:, None])
        return jnp.where(ok_S, middle_S, low_S), jnp.where(ok_S, high_S, middle_S)

    low_S, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (low_S, high_S))
    return low_S


def filtered_logits(logits_SxV, temperature_S, top_k_S, top_p_S):
    """Logits of the distribution actually sampled from: scaled by 1/temperature, then only the
    top_k highest and then the smallest top set holding top_p of the remaining probability kept
    (-inf elsewhere), as transformers' temperature, top-k and top-p warpers do in that order.

    The cut-offs are found by bisection over values (linear passes) instead of a full sort of the
    vocabulary, which on CPU costs ~15x more. The top token always survives; ties at a cut-off
    are kept together. Rows with temperature 0 are returned unscaled (the caller takes argmax).
    """
    safe_temperature_S = jnp.where(temperature_S > 0, temperature_S, 1.0)
    scaled_SxV = logits_SxV.astype(jnp.float32) / safe_temperature_S[:, None]
    vocab = scaled_SxV.shape[-1]
    high_S = jnp.max(scaled_SxV, axis=-1)
    low_S = jnp.min(jnp.where(jnp.isfinite(scaled_SxV), scaled_SxV, high_S[:, None]), axis=-1)
    k_S = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, vocab), vocab)

    def top_k_cut(_):
        return _largest_cut(scaled_SxV, low_S, high_S, lambda kept: jnp.sum(kept, axis=-1) >= k_S)

    k_cut_S = jax.lax.cond(jnp.any(k_S < vocab), top_k_cut, lambda _: jnp.full_like(high_S, -jnp.inf), None)
    after_k_SxV = jnp.where(scaled_SxV >= k_cut_S[:, None], scaled_SxV, -jnp.inf)

    def top_p_cut(_):
        probs_SxV = jax.nn.softmax(after_k_SxV, axis=-1)
        return _largest_cut(
            after_k_SxV, jnp.maximum(low_S, k_cut_S), high_S,
            lambda kept: jnp.sum(jnp.where(kept, probs_SxV, 0.0), axis=-1) >= top_p_S,
        )

    p_cut_S = jax.lax.cond(jnp.any(top_p_S < 1), top_p_cut, lambda _: jnp.full_like(high_S, -jnp.inf), None)
    p_cut_S = jnp.where(top_p_S < 1, p_cut_S, -jnp.inf)
    return jnp.where(after_k_SxV >= p_cut_S[:, None], after_k_SxV, -jnp.inf)


def _inverse_cdf_sample(key, logits_V):
    """One draw from softmax(logits) with a single uniform (cheaper than Gumbel noise over V)."""
    cdf_V = jnp.cumsum(jax.nn.softmax(logits_V))
    u = jax.random.uniform(key, dtype=jnp.float32) * cdf_V[-1]
    # Token i is drawn when cdf[i-1] <= u < cdf[i], so a zero-probability token never is; the
    # fallback covers u rounding up to the total.
    index = jnp.sum(cdf_V <= u)
    return jnp.where(index < logits_V.shape[0], index, jnp.argmax(logits_V))


# Alternatives reported per token (OpenAI's chat API allows up to 20).
TOP_LOGPROBS = 20


def sample_tokens(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S, alternatives: int = TOP_LOGPROBS):
    """Samples one token per row.

    Returns (token int32[S], logprob under the sampled distribution float32[S] (0 for greedy),
    logprob under the raw model distribution float32[S], entropy of the raw model distribution
    float32[S] in nats, the raw model's top alternatives: ids int32[S, A] and logprobs
    float32[S, A], A = min(alternatives, V)). `alternatives` is static; 0 skips the top-k pass.
    """
    logits_SxV = logits_SxV.astype(jnp.float32)
    model_logprobs_SxV = jax.nn.log_softmax(logits_SxV, axis=-1)
    # Masked (padded-vocabulary) entries have log-prob -inf and contribute 0, not 0 * -inf.
    entropy_S = -jnp.sum(jnp.where(jnp.isfinite(model_logprobs_SxV),
                                   jnp.exp(model_logprobs_SxV) * model_logprobs_SxV, 0.0), axis=-1)
    sampling_logits_SxV = filtered_logits(logits_SxV, temperature_S, top_k_S, top_p_S)
    drawn_S = jax.vmap(_inverse_cdf_sample)(keys_S, sampling_logits_SxV)
    greedy_S = jnp.argmax(logits_SxV, axis=-1)
    is_greedy_S = temperature_S <= 0
    token_S = jnp.where(is_greedy_S, greedy_S, drawn_S).astype(jnp.int32)
    sampled_logprobs_SxV = jax.nn.log_softmax(sampling_logits_SxV, axis=-1)
    sampled_logprob_S = jnp.take_along_axis(sampled_logprobs_SxV, token_S[:, None], axis=-1)[:, 0]
    sampled_logprob_S = jnp.where(is_greedy_S, 0.0, sampled_logprob_S)
    model_logprob_S = jnp.take_along_axis(model_logprobs_SxV, token_S[:, None], axis=-1)[:, 0]
    count = min(alternatives, logits_SxV.shape[-1])
    if count:
        top_logprobs_SxA, top_ids_SxA = jax.lax.top_k(model_logprobs_SxV, count)
    else:
        top_logprobs_SxA, top_ids_SxA = jnp.zeros((token_S.shape[0], 0), jnp.float32), jnp.zeros((token_S.shape[0], 0))
    return token_S, sampled_logprob_S, model_logprob_S, entropy_S, top_ids_SxA.astype(jnp.int32), top_logprobs_SxA

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


def request_key(seed: int, sample_index: int):
    """The PRNG key of one sample of one request; per-token keys fold in the token's position."""
    return jax.random.fold_in(jax.random.key(seed), sample_index)


def filtered_logits(logits_SxV, temperature_S, top_k_S, top_p_S):
    """Logits of the distribution actually sampled from: scaled by 1/temperature, then only the
    top_k highest and the smallest top set holding top_p of the probability kept (-inf elsewhere).

    The top token always survives. Ties at a cut-off are kept together. Rows with temperature 0
    are returned unscaled (the caller takes their argmax).
    """
    safe_temperature_S = jnp.where(temperature_S > 0, temperature_S, 1.0)
    scaled_SxV = logits_SxV.astype(jnp.float32) / safe_temperature_S[:, None]
    # Ascending order, as transformers' top-p warper accumulates: the small tail's mass is summed
    # first, so rounding near 1 cannot drop tokens that top_p = 1 must keep.
    ascending_SxV = jnp.sort(scaled_SxV, axis=-1)
    vocab = logits_SxV.shape[-1]
    ranks_V = jnp.arange(vocab)
    k_S = jnp.clip(jnp.where(top_k_S > 0, top_k_S, vocab), 1, vocab)
    kth_value_S = jnp.take_along_axis(ascending_SxV, (vocab - k_S)[:, None], axis=-1)[:, 0]
    kept_by_k_SxV = ranks_V[None, :] >= (vocab - k_S)[:, None]
    probs_SxV = jax.nn.softmax(jnp.where(kept_by_k_SxV, ascending_SxV, -jnp.inf), axis=-1)
    removed_SxV = (jnp.cumsum(probs_SxV, axis=-1) <= (1.0 - top_p_S)[:, None]) & (ranks_V < vocab - 1)[None, :]
    first_kept_S = jnp.sum(removed_SxV, axis=-1)
    cut_value_S = jnp.take_along_axis(ascending_SxV, first_kept_S[:, None], axis=-1)[:, 0]
    cut_value_S = jnp.maximum(cut_value_S, kth_value_S)
    return jnp.where(scaled_SxV >= cut_value_S[:, None], scaled_SxV, -jnp.inf)


# Alternatives reported per token (OpenAI's chat API allows up to 20).
TOP_LOGPROBS = 20


def sample_tokens(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S):
    """Samples one token per row.

    Returns (token int32[S], logprob under the sampled distribution float32[S] (0 for greedy),
    logprob under the raw model distribution float32[S], entropy of the raw model distribution
    float32[S] in nats, the raw model's top alternatives: ids int32[S, A] and logprobs
    float32[S, A], A = min(TOP_LOGPROBS, V)).
    """
    logits_SxV = logits_SxV.astype(jnp.float32)
    model_logprobs_SxV = jax.nn.log_softmax(logits_SxV, axis=-1)
    entropy_S = -jnp.sum(jnp.exp(model_logprobs_SxV) * model_logprobs_SxV, axis=-1)
    sampling_logits_SxV = filtered_logits(logits_SxV, temperature_S, top_k_S, top_p_S)
    drawn_S = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_S, sampling_logits_SxV)
    greedy_S = jnp.argmax(logits_SxV, axis=-1)
    is_greedy_S = temperature_S <= 0
    token_S = jnp.where(is_greedy_S, greedy_S, drawn_S).astype(jnp.int32)
    sampled_logprobs_SxV = jax.nn.log_softmax(sampling_logits_SxV, axis=-1)
    sampled_logprob_S = jnp.take_along_axis(sampled_logprobs_SxV, token_S[:, None], axis=-1)[:, 0]
    sampled_logprob_S = jnp.where(is_greedy_S, 0.0, sampled_logprob_S)
    model_logprob_S = jnp.take_along_axis(model_logprobs_SxV, token_S[:, None], axis=-1)[:, 0]
    top_logprobs_SxA, top_ids_SxA = jax.lax.top_k(model_logprobs_SxV, min(TOP_LOGPROBS, logits_SxV.shape[-1]))
    return token_S, sampled_logprob_S, model_logprob_S, entropy_S, top_ids_SxA.astype(jnp.int32), top_logprobs_SxA

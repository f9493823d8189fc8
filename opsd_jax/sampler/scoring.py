"""Log-probabilities of given tokens under the model (prompt scoring, as OpenAI's `echo` with
`logprobs` reports them, and as lm-evaluation-harness's loglikelihood requests need).

One full forward pass per sequence, padded on the right to a length bucket so that every length
in a bucket shares one compiled program; padding never reaches a real token (causal attention).
Shape letters: T padded length, V vocabulary, A alternatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models import ModelConfig, forward

# Alternatives computed when any are asked for (OpenAI's chat API allows up to 20); fewer are
# sliced off on the host, so asking for 1 or 20 runs the same program.
MAX_TOP_LOGPROBS = 20


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up, ending at `max_length` itself."""
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    buckets.append(max_length)
    return tuple(buckets)


class PromptScorer:
    """Scores token sequences of up to `max_length` tokens with one model.

    `valid_vocab_size` masks embedding rows past the tokenizer (as the engine does), so prompt and
    generated log-probs are normalized over the same vocabulary.
    """

    def __init__(self, config: ModelConfig, max_length: int, valid_vocab_size: int | None = None,
                 buckets: tuple[int, ...] | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.config = config
        self.max_length = max_length
        self.valid_vocab_size = valid_vocab_size
        self.buckets = tuple(sorted(buckets)) if buckets else length_buckets(max_length)
        if self.buckets[-1] < max_length:
            raise ValueError(f"largest bucket {self.buckets[-1]} is shorter than max_length {max_length}")
        self._score = jax.jit(self._score_fn, static_argnames=("top",))

    def bucket(self, length: int) -> int:
        for size in self.buckets:
            if length <= size:
                return size
        raise ValueError(f"{length} tokens are more than the scorer's max_length {self.max_length}")

    def _score_fn(self, params, tokens_1xT, length, *, top: int):
        positions_T = jnp.arange(tokens_1xT.shape[1])
        mask_1xT = (positions_T < length)[None].astype(jnp.int32)
        logits_TxV = forward(params, self.config, tokens_1xT, attention_mask=mask_1xT)[0].astype(jnp.float32)
        valid = self.valid_vocab_size
        if valid is not None and valid < logits_TxV.shape[-1]:
            logits_TxV = jnp.where(jnp.arange(logits_TxV.shape[-1]) < valid, logits_TxV, -jnp.inf)
        logprobs_TxV = jax.nn.log_softmax(logits_TxV, axis=-1)
        # Row t predicts token t + 1.
        targets_T = jnp.concatenate([tokens_1xT[0, 1:], jnp.zeros(1, tokens_1xT.dtype)])
        chosen_T = jnp.take_along_axis(logprobs_TxV, targets_T[:, None], axis=-1)[:, 0]
        if not top:
            return chosen_T, None, None
        top_logprobs_TxA, top_ids_TxA = jax.lax.top_k(logprobs_TxV, top)
        return chosen_T, top_ids_TxA.astype(jnp.int32), top_logprobs_TxA

    def score(self, params, token_ids, top_logprobs: int = 0):
        """Log-probs of token_ids[1:] each given the tokens before it: (list of len(token_ids) - 1
        floats, and for top_logprobs > 0 a list of that length of [(token id, logprob)] of the
        model's most likely tokens at each of those positions, else None)."""
        tokens = np.asarray(token_ids, np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("token_ids must be a non-empty list of token ids")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        length = tokens.size
        padded = np.zeros((1, self.bucket(length)), np.int32)
        padded[0, :length] = tokens
        top = min(MAX_TOP_LOGPROBS, self.config.vocab_size) if top_logprobs else 0
        chosen_T, top_ids_TxA, top_logprobs_TxA = jax.device_get(self._score(params, padded, np.int32(length), top=top))
        logprobs = chosen_T[: length - 1].tolist()
        if not top_logprobs:
            return logprobs, None
        alternatives = [
            list(zip(ids[:top_logprobs].tolist(), lps[:top_logprobs].tolist()))
            for ids, lps in zip(top_ids_TxA[: length - 1], top_logprobs_TxA[: length - 1])
        ]
        return logprobs, alternatives

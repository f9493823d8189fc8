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
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0 disables it), got {self.top_k!r}")
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
# The first halvings pass over the whole vocabulary; by then few values lie inside a row's
# interval (about 40 of the 1,187 blocks of 128 at V = 151,936 after 12 halvings of a flat
# distribution, fewer in a peaked one's tail; 13 leave margin), and the rest of
# the halvings pass over only the `_CUT_BLOCKS` blocks of `_CUT_BLOCK_WIDTH` values that hold them.
# A row whose interval still spans more blocks falls back to whole-vocabulary passes.
_FULL_STEPS = 13
_CUT_BLOCKS = 64
_CUT_BLOCK_WIDTH = 128


def _largest_cut(values_SxV, low_S, high_S, weights_SxV, target_S):
    """Largest c in [low, high] with measure(values >= c) >= target per row, by bisection, where
    measure sums `weights` over the kept values (None: counts them).

    Every step halves every row's interval with one compare-select-sum pass. After `_FULL_STEPS`
    passes over the whole vocabulary, the values inside the interval are gathered with their
    blocks, the measure of the values at or above the interval's top is kept as a constant, and the
    remaining steps pass over the gathered blocks alone: the same halvings, and the same answer up
    to the order of a float sum. Stopping once no value lies inside the interval and regula falsi
    were tried before and were slower: their stopping test is a second reduction in every pass.
    """
    rows, vocab = values_SxV.shape
    if weights_SxV is None:
        weights_SxV = jnp.ones_like(values_SxV)

    def measure(kept_SxV, weights_SxV):
        return jnp.sum(jnp.where(kept_SxV, weights_SxV, 0.0), axis=-1)

    def halve(values_SxV, weights_SxV, base_S=None, top_S=None):
        """One bisection step; values at or above top_S (if given) are already in base_S."""

        def step(_, bounds):
            low_S, high_S = bounds
            middle_S = (low_S + high_S) / 2
            kept_SxV = values_SxV >= middle_S[:, None]
            if top_S is None:
                ok_S = measure(kept_SxV, weights_SxV) >= target_S
            else:
                ok_S = base_S + measure(kept_SxV & (values_SxV < top_S[:, None]), weights_SxV) >= target_S
            return jnp.where(ok_S, middle_S, low_S), jnp.where(ok_S, high_S, middle_S)

        return step

    blocks = -(-vocab // _CUT_BLOCK_WIDTH)
    if blocks <= 2 * _CUT_BLOCKS:  # a small vocabulary: gathering would save nothing
        return jax.lax.fori_loop(0, _BISECTION_STEPS, halve(values_SxV, weights_SxV), (low_S, high_S))[0]
    low_S, high_S = jax.lax.fori_loop(0, _FULL_STEPS, halve(values_SxV, weights_SxV), (low_S, high_S))
    # Values at or above high count at every later middle; values below low never do.
    base_S = measure(values_SxV >= high_S[:, None], weights_SxV)
    # One more block than the vocabulary needs, all -inf: what the list of holding blocks is
    # filled up with (it never counts).
    pad = (blocks + 1) * _CUT_BLOCK_WIDTH - vocab
    values_SxBxW = jnp.pad(values_SxV, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(
        rows, blocks + 1, _CUT_BLOCK_WIDTH)
    weights_SxBxW = jnp.pad(weights_SxV, ((0, 0), (0, pad))).reshape(rows, blocks + 1, _CUT_BLOCK_WIDTH)
    inside_SxBxW = (values_SxBxW >= low_S[:, None, None]) & (values_SxBxW < high_S[:, None, None])
    holding_SxB = jnp.any(inside_SxBxW, axis=-1)
    index_SxM = jax.vmap(lambda holding_B: jnp.nonzero(holding_B, size=_CUT_BLOCKS, fill_value=blocks)[0])(
        holding_SxB)
    gathered_values = jnp.take_along_axis(values_SxBxW, index_SxM[:, :, None], axis=1).reshape(rows, -1)
    gathered_weights = jnp.take_along_axis(weights_SxBxW, index_SxM[:, :, None], axis=1).reshape(rows, -1)
    fits = jnp.all(jnp.sum(holding_SxB, axis=-1) <= _CUT_BLOCKS)
    rest = _BISECTION_STEPS - _FULL_STEPS

    def on_gathered(bounds):
        return jax.lax.fori_loop(0, rest, halve(gathered_values, gathered_weights, base_S, high_S), bounds)

    def on_everything(bounds):
        return jax.lax.fori_loop(0, rest, halve(values_SxV, weights_SxV), bounds)

    return jax.lax.cond(fits, on_gathered, on_everything, (low_S, high_S))[0]


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
        return _largest_cut(scaled_SxV, low_S, high_S, None, k_S.astype(jnp.float32))

    k_cut_S = jax.lax.cond(jnp.any(k_S < vocab), top_k_cut, lambda _: jnp.full_like(high_S, -jnp.inf), None)
    after_k_SxV = jnp.where(scaled_SxV >= k_cut_S[:, None], scaled_SxV, -jnp.inf)

    def top_p_cut(_):
        probs_SxV = jax.nn.softmax(after_k_SxV, axis=-1)
        return _largest_cut(after_k_SxV, jnp.maximum(low_S, k_cut_S), high_S, probs_SxV, top_p_S)

    p_cut_S = jax.lax.cond(jnp.any(top_p_S < 1), top_p_cut, lambda _: jnp.full_like(high_S, -jnp.inf), None)
    p_cut_S = jnp.where(top_p_S < 1, p_cut_S, -jnp.inf)
    return jnp.where(after_k_SxV >= p_cut_S[:, None], after_k_SxV, -jnp.inf)


def first_argmax(values_SxV):
    """jnp.argmax over the last axis (the first index of the largest value; int32 [S]) as a max
    and a min over indices: XLA's CPU argmax, a reduction over (value, index) pairs, runs 3x
    slower over a 151,936-wide row than these two vectorized reductions (5.5 ms against 1.7 for
    16 rows). Rows without NaN; an all -inf row gives 0, as jnp.argmax does."""
    max_Sx1 = jnp.max(values_SxV, axis=-1, keepdims=True)
    index_SxV = jax.lax.broadcasted_iota(jnp.int32, values_SxV.shape, values_SxV.ndim - 1)
    return jnp.min(jnp.where(values_SxV == max_Sx1, index_SxV, values_SxV.shape[-1]), axis=-1)


# Rows of the vocabulary summed together by the two-level inverse-CDF draw.
_CDF_BLOCK = 128


def _inverse_cdf_sample(keys_S, logits_SxV):
    """One draw per row from softmax(logits) with a single uniform each (cheaper than Gumbel
    noise over V), and log-softmax(logits) at the drawn token.

    Two levels instead of a cumulative sum over V: the uniform picks a block of `_CDF_BLOCK`
    tokens by the running sum of block masses, then a token inside it by the running sum of its
    weights. Token i is drawn when its running sum first exceeds the uniform, and only tokens of
    positive weight qualify, so a zero-probability (filtered) token never is; the fallback (the
    argmax) covers the uniform rounding up to the total.
    """
    rows, vocab = logits_SxV.shape
    max_S = jnp.max(logits_SxV, axis=-1)
    weights_SxV = jnp.exp(logits_SxV - max_S[:, None])
    total_S = jnp.sum(weights_SxV, axis=-1)
    blocks = -(-vocab // _CDF_BLOCK)
    padded_SxV = jnp.pad(weights_SxV, ((0, 0), (0, blocks * _CDF_BLOCK - vocab)))
    weights_SxBxR = padded_SxV.reshape(rows, blocks, _CDF_BLOCK)
    mass_SxB = jnp.sum(weights_SxBxR, axis=-1)
    running_SxB = jnp.cumsum(mass_SxB, axis=-1)
    u_S = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys_S) * running_SxB[:, -1]
    block_ok_SxB = (running_SxB > u_S[:, None]) & (mass_SxB > 0)
    block_S = jnp.argmax(block_ok_SxB, axis=-1)
    found_S = jnp.take_along_axis(block_ok_SxB, block_S[:, None], axis=-1)[:, 0]
    before_S = jnp.where(block_S > 0, jnp.take_along_axis(running_SxB, jnp.maximum(block_S - 1, 0)[:, None],
                                                          axis=-1)[:, 0], 0.0)
    inner_SxR = jnp.take_along_axis(weights_SxBxR, block_S[:, None, None], axis=1)[:, 0]
    inner_ok_SxR = (jnp.cumsum(inner_SxR, axis=-1) > (u_S - before_S)[:, None]) & (inner_SxR > 0)
    # Rounding can leave the inner running sum short of the block's mass: the block's last
    # token of positive weight then.
    last_S = _CDF_BLOCK - 1 - jnp.argmax((inner_SxR > 0)[:, ::-1], axis=-1)
    inner_S = jnp.where(jnp.any(inner_ok_SxR, axis=-1), jnp.argmax(inner_ok_SxR, axis=-1), last_S)
    token_S = jnp.where(found_S, block_S * _CDF_BLOCK + inner_S, first_argmax(logits_SxV))
    logit_S = jnp.take_along_axis(logits_SxV, token_S[:, None], axis=-1)[:, 0]
    return token_S, logit_S - max_S - jnp.log(total_S)


# Alternatives reported per token (OpenAI's chat API allows up to 20).
TOP_LOGPROBS = 20


# Rows sampled together on CPU (see sample_tokens).
CPU_ROW_BLOCK = 4


def sample_tokens(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S, alternatives: int = TOP_LOGPROBS,
                  row_block: int | None = CPU_ROW_BLOCK):
    """Samples one token per row.

    Returns (token int32[S], logprob under the sampled distribution float32[S] (0 for greedy),
    logprob under the raw model distribution float32[S], entropy of the raw model distribution
    float32[S] in nats, the raw model's top alternatives: ids int32[S, A] and logprobs
    float32[S, A], A = min(alternatives, V)). `alternatives` is static; 0 skips the top-k pass.

    Rows go through in blocks of `row_block` (a loop over blocks; None: all at once, as an
    accelerator wants): on CPU the top-p bisection makes 40 passes over its rows, and a block's
    logits and probabilities (4 x 151,936 x 8 bytes) stay in cache between passes where all 16
    slots' do not. Every row's result is the same either way (each is computed from its own row).
    """
    rows = logits_SxV.shape[0]
    if row_block is None or rows <= row_block:
        return _sample_rows(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S, alternatives)
    blocks = -(-rows // row_block)
    # Pad by repeating the last row (any valid row will do; its results are dropped).
    index_N = jnp.minimum(jnp.arange(blocks * row_block), rows - 1)
    inputs = tuple(x[index_N].reshape(blocks, row_block, *x.shape[1:])
                   for x in (logits_SxV, keys_S, temperature_S, top_k_S, top_p_S))
    outputs = jax.lax.map(lambda block: _sample_rows(*block, alternatives), inputs)
    return tuple(x.reshape(blocks * row_block, *x.shape[2:])[:rows] for x in outputs)


def _model_statistics(logits_SxV):
    """(row max, log of the sum of exp(logits - max), entropy in nats) of softmax(logits), float32
    [S] each, from one pass of exponentials: the [S, V] log-probabilities are never formed (a
    decode step reads the logits once for these instead of twice). A log-prob is then
    (logit - max) - log sum, rounded as log_softmax rounds it. Masked (-inf) entries add 0."""
    max_S = jnp.max(logits_SxV, axis=-1)
    shifted_SxV = logits_SxV - max_S[:, None]
    weights_SxV = jnp.exp(shifted_SxV)
    total_S = jnp.sum(weights_SxV, axis=-1)
    # H = log Z - E[z - max] with Z the sum of the shifted weights.
    mean_shift_S = jnp.sum(jnp.where(weights_SxV > 0, weights_SxV * shifted_SxV, 0.0), axis=-1) / total_S
    log_total_S = jnp.log(total_S)
    return max_S, log_total_S, log_total_S - mean_shift_S


def _sample_rows(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S, alternatives: int):
    logits_SxV = logits_SxV.astype(jnp.float32)
    max_S, log_total_S, entropy_S = _model_statistics(logits_SxV)
    sampling_logits_SxV = filtered_logits(logits_SxV, temperature_S, top_k_S, top_p_S)
    drawn_S, drawn_logprob_S = _inverse_cdf_sample(keys_S, sampling_logits_SxV)
    greedy_S = first_argmax(logits_SxV)
    is_greedy_S = temperature_S <= 0
    token_S = jnp.where(is_greedy_S, greedy_S, drawn_S).astype(jnp.int32)
    sampled_logprob_S = jnp.where(is_greedy_S, 0.0, drawn_logprob_S)
    model_logprob_S = (jnp.take_along_axis(logits_SxV, token_S[:, None], axis=-1)[:, 0] - max_S) - log_total_S
    count = min(alternatives, logits_SxV.shape[-1])
    if count:
        # The log-softmax is the logits shifted by one constant per row: same order.
        top_logits_SxA, top_ids_SxA = jax.lax.top_k(logits_SxV, count)
        top_logprobs_SxA = (top_logits_SxA - max_S[:, None]) - log_total_S[:, None]
    else:
        top_logprobs_SxA, top_ids_SxA = (jnp.zeros((token_S.shape[0], 0), jnp.float32),
                                         jnp.zeros((token_S.shape[0], 0), jnp.int32))
    return token_S, sampled_logprob_S, model_logprob_S, entropy_S, top_ids_SxA.astype(jnp.int32), top_logprobs_SxA

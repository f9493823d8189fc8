"""Attention with backends behind one function: dense (the oracle), chunked (online softmax over
key/value blocks, any platform) and cuDNN flash attention on GPU.

Shape letters: B batch, T queries, S keys, H query heads, K kv heads, G query heads per kv head
(H = K * G), D head width; bq / bk query / key block lengths, nq / nk block counts.

Who may attend to whom is described by integers, never by a [T, S] mask, so the chunked backend can
build each [bq, bk] tile of the mask on the fly and skip tiles that are entirely masked:

    query t may attend key s  iff  s <= row[t]                      (causal)
                                   and s > row[t] - sliding_window  (sliding layers only)
                                   and segment[t] == key_segment[s] != 0

`row[t]` is the key index the query sits at: t itself for self-attention over the given tokens,
its position for queries against a KV cache (cache row = position). Segment 0 is padding: a query
there attends nowhere, and, as in the dense path, its output is the mean of all values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from opsd_jax.models import layers
from opsd_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

DEFAULT_BLOCK_SIZE = 512


def attend(
    q_BxTxHxD,
    k_BxSxKxD,
    v_BxSxKxD,
    *,
    query_rows_BxT=None,
    query_segment_ids_BxT=None,
    key_segment_ids_BxS=None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """Grouped-query attention; returns [B, T, H, D] in v's dtype.

    query_rows_BxT: int32, default arange(T) (self-attention). Segment ids: int32, default all 1
    (no padding). `implementation`: "auto" (cuDNN on GPU where it applies, else chunked),
    "dense" (materializes float32 [B, K, G, T, S] scores: the oracle), "chunked", "cudnn" (falls
    back to chunked where cuDNN's constraints do not hold). `block_size` bounds the chunked
    backend's tiles.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")
    batch, length = q_BxTxHxD.shape[:2]
    keys = k_BxSxKxD.shape[1]
    self_attention = query_rows_BxT is None
    if self_attention:
        query_rows_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if query_segment_ids_BxT is None:
        query_segment_ids_BxT = jnp.ones((batch, length), jnp.int32)
    if key_segment_ids_BxS is None:
        key_segment_ids_BxS = jnp.ones((batch, keys), jnp.int32)
    inputs = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, query_rows_BxT, query_segment_ids_BxT, key_segment_ids_BxS)

    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "chunked"
    if implementation == "cudnn" and _cudnn_applies(q_BxTxHxD, k_BxSxKxD, self_attention):
        return _cudnn_or_chunked(*inputs, sliding_window, block_size)
    if implementation == "dense":
        return dense_attention(*inputs, sliding_window)
    return chunked_attention(*inputs, sliding_window, block_size)


def attention_mask(query_rows_BxT, query_segment_ids_BxT, key_segment_ids_BxS, sliding_window, key_start=0):
    """bool[B, T, S]: the rule in the module docstring for keys key_start .. key_start + S - 1."""
    key_index_S = key_start + jnp.arange(key_segment_ids_BxS.shape[1])
    rows_BxTx1 = query_rows_BxT[:, :, None]
    allowed_BxTxS = key_index_S <= rows_BxTx1
    if sliding_window is not None:
        allowed_BxTxS &= key_index_S > rows_BxTx1 - sliding_window
    same_segment_BxTxS = query_segment_ids_BxT[:, :, None] == key_segment_ids_BxS[:, None, :]
    return allowed_BxTxS & same_segment_BxTxS & (key_segment_ids_BxS != 0)[:, None, :]


def dense_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window):
    """The oracle: the whole [B, T, S] mask and float32 scores."""
    mask_BxTxS = attention_mask(rows_BxT, segments_BxT, key_segments_BxS, sliding_window)
    return layers.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)


# ---- chunked: online softmax over key blocks, flash-attention backward -------------------------


def chunked_attention(
    q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window,
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """Online softmax over [bq, bk] tiles; memory O(T * bk) per head, never [T, S].

    Tiles no query of a query block can see (future keys, keys behind every sliding window) are
    not computed, so causal attention does about half the work of the dense path. The backward
    recomputes each tile's probabilities from the saved log-sum-exp and stores no scores.
    """
    batch, length, heads, head_dim = q_BxTxHxD.shape
    keys, kv_heads = k_BxSxKxD.shape[1:3]
    q_BxTxKxGxD = q_BxTxHxD.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    block_q, block_k = min(block_size, length), min(block_size, keys)
    pad_t = -length % block_q
    # Padded queries copy the last row so they widen no block's visible key range. Keys are never
    # padded: against a KV cache that would copy the whole cache every step; the last key block
    # is shifted back to end at S instead, its keys already seen masked out (_key_block).
    q_pad = jnp.pad(q_BxTxKxGxD, ((0, 0), (0, pad_t), (0, 0), (0, 0), (0, 0)))
    rows_pad = jnp.pad(rows_BxT.astype(jnp.int32), ((0, 0), (0, pad_t)), mode="edge")
    segments_pad = jnp.pad(segments_BxT.astype(jnp.int32), ((0, 0), (0, pad_t)))

    out_pad, lse_pad = _flash(
        q_pad, k_BxSxKxD, v_BxSxKxD, rows_pad, segments_pad, key_segments_BxS.astype(jnp.int32), sliding_window,
        block_q, block_k,
    )
    out_BxTxKxGxD, lse_BxTxKxG = out_pad[:, :length], lse_pad[:, :length]
    # A query that sees no key gets the mean of all values, exactly as the dense softmax over
    # all-masked scores does; it is differentiated here, outside the kernel. The sum is a matmul
    # accumulating in float32, so no float32 copy of the values (of a whole KV cache) appears in
    # any program, optimized or not.
    ones_S = jnp.ones((keys,), v_BxSxKxD.dtype)
    mean_v_BxKxD = jnp.einsum("bskd,s->bkd", v_BxSxKxD, ones_S, preferred_element_type=jnp.float32) / keys
    mean_v_Bx1xKx1xD = mean_v_BxKxD[:, None, :, None, :]
    empty_BxTxKxGx1 = jnp.isneginf(jax.lax.stop_gradient(lse_BxTxKxG))[..., None]
    out_BxTxKxGxD = jnp.where(empty_BxTxKxGx1, mean_v_Bx1xKx1xD.astype(v_BxSxKxD.dtype), out_BxTxKxGxD)
    return out_BxTxKxGxD.reshape(batch, length, heads, head_dim)


def _key_block_range(rows_BxT, query_block: int, block_q: int, block_k: int, num_key_blocks: int, window):
    """[first, last) key blocks that any query of query block `query_block` may see."""
    rows = jax.lax.dynamic_slice_in_dim(rows_BxT, query_block * block_q, block_q, axis=1)
    last = jnp.clip(jnp.max(rows) // block_k + 1, 0, num_key_blocks)
    if window is None:
        return jnp.int32(0), last
    first = jnp.clip((jnp.min(rows) - window + 1) // block_k, 0, num_key_blocks)
    return first, last


def _tile_scores(q_BxTxKxGxD, k_BxSxKxD, head_dim: int):
    """float32[B, K, G, bq, bk], scaled as the dense path scales them."""
    return jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) / math.sqrt(head_dim)


def _slice_block(x, index, size):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window):
    """(k_j, v_j, mask bool[B, bq, bk], start) of key block j. Blocks are ceil(S / bk); the last
    one starts at S - bk so it stays inside the keys, and its keys before j * bk (already in
    block j - 1) are masked out."""
    keys = k.shape[1]
    start = jnp.minimum(j * block_k, keys - block_k)
    k_j = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=1)
    key_segments_j = jax.lax.dynamic_slice_in_dim(key_segments, start, block_k, axis=1)
    mask_BxTxS = attention_mask(rows_i, segments_i, key_segments_j, window, key_start=start)
    fresh_S = start + jnp.arange(block_k) >= j * block_k
    return k_j, v_j, mask_BxTxS & fresh_S, start


def _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k):
    """(out [B, T, K, G, D] in v's dtype (0 where a query sees no key), lse float32[B, T, K, G]
    (-inf there)). T is a multiple of block_q; S is at least block_k."""
    batch, length, kv_heads, group, head_dim = q.shape
    num_query_blocks, num_key_blocks = length // block_q, -(-k.shape[1] // block_k)

    def query_block(i, carry):
        out, lse = carry
        q_i = _slice_block(q, i, block_q)
        rows_i, segments_i = _slice_block(rows, i, block_q), _slice_block(segments, i, block_q)

        def key_block(j, state):
            max_BxKxGxT, sum_BxKxGxT, acc_BxKxGxTxD = state
            k_j, v_j, mask_BxTxS, _ = _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window)
            scores = jnp.where(mask_BxTxS[:, None, None], _tile_scores(q_i, k_j, head_dim), -jnp.inf)
            # The running max starts finite, so masked scores give exp(-inf) = 0, never NaN.
            new_max = jnp.maximum(max_BxKxGxT, jnp.max(scores, axis=-1))
            correction = jnp.exp(max_BxKxGxT - new_max)
            probs = jnp.exp(scores - new_max[..., None])
            acc_BxKxGxTxD = acc_BxKxGxTxD * correction[..., None] + jnp.einsum(
                "bkgts,bskd->bkgtd", probs.astype(v.dtype), v_j, preferred_element_type=jnp.float32
            )
            return new_max, sum_BxKxGxT * correction + jnp.sum(probs, axis=-1), acc_BxKxGxTxD

        stats_shape = (batch, kv_heads, group, block_q)
        init = (
            jnp.full(stats_shape, layers.MASKED_SCORE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        first, last = _key_block_range(rows, i, block_q, block_k, num_key_blocks, window)
        running_max, running_sum, acc = jax.lax.fori_loop(first, last, key_block, init)
        seen = running_sum > 0
        out_i = acc / jnp.where(seen, running_sum, 1.0)[..., None]
        lse_i = jnp.where(seen, running_max + jnp.log(jnp.where(seen, running_sum, 1.0)), -jnp.inf)
        out = jax.lax.dynamic_update_slice_in_dim(
            out, jnp.einsum("bkgtd->btkgd", out_i).astype(out.dtype), i * block_q, axis=1
        )
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.einsum("bkgt->btkg", lse_i), i * block_q, axis=1)
        return out, lse

    init = (jnp.zeros(q.shape, v.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
    return jax.lax.fori_loop(0, num_query_blocks, query_block, init)


def _flash_backward(window, block_q, block_k, residuals, cotangents):
    """Gradients by recomputing each visible tile's probabilities from the saved log-sum-exp;
    dK and dV accumulate in float32 buffers of the keys' size."""
    q, k, v, rows, segments, key_segments, out, lse = residuals
    d_out, _ = cotangents  # lse is returned only to mark empty rows; it is never differentiated
    length, head_dim = q.shape[1], q.shape[-1]
    num_query_blocks, num_key_blocks = length // block_q, -(-k.shape[1] // block_k)
    delta_BxTxKxG = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    finite_lse = jnp.where(jnp.isneginf(lse), 0.0, lse)

    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, d_out_i = _slice_block(q, i, block_q), _slice_block(d_out, i, block_q)
        rows_i, segments_i = _slice_block(rows, i, block_q), _slice_block(segments, i, block_q)
        lse_BxKxGxT = jnp.einsum("btkg->bkgt", _slice_block(finite_lse, i, block_q))
        delta_BxKxGxT = jnp.einsum("btkg->bkgt", _slice_block(delta_BxTxKxG, i, block_q))

        def key_block(j, state):
            dq_i, dk, dv = state
            k_j, v_j, mask_BxTxS, start = _key_block(k, v, rows_i, segments_i, key_segments, j, block_k, window)
            scores = _tile_scores(q_i, k_j, head_dim)
            probs = jnp.where(mask_BxTxS[:, None, None], jnp.exp(scores - lse_BxKxGxT[..., None]), 0.0)
            dv_j = jnp.einsum("bkgts,btkgd->bskd", probs.astype(d_out.dtype), d_out_i,
                              preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_i, v_j, preferred_element_type=jnp.float32)
            d_scores = (probs * (d_probs - delta_BxKxGxT[..., None]) / math.sqrt(head_dim)).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bkgts,bskd->btkgd", d_scores, k_j, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgts,btkgd->bskd", d_scores, q_i, preferred_element_type=jnp.float32)
            # Masked keys of a shifted last block get exactly zero, so adding the whole block is exact.
            return dq_i, _add_block(dk, dk_j, start), _add_block(dv, dv_j, start)

        first, last = _key_block_range(rows, i, block_q, block_k, num_key_blocks, window)
        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        dq_i, dk, dv = jax.lax.fori_loop(first, last, key_block, (dq_i, dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block_q, axis=1), dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, num_query_blocks, query_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


def _add_block(total, block, start):
    current = jax.lax.dynamic_slice_in_dim(total, start, block.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, current + block, start, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, rows, segments, key_segments, window, block_q, block_k):
    return _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k)


def _flash_fwd(q, k, v, rows, segments, key_segments, window, block_q, block_k):
    out, lse = _flash_forward(q, k, v, rows, segments, key_segments, window, block_q, block_k)
    return (out, lse), (q, k, v, rows, segments, key_segments, out, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


# ---- cuDNN flash attention (GPU) ---------------------------------------------------------------


def _cudnn_applies(q_BxTxHxD, k_BxSxKxD, self_attention: bool) -> bool:
    """What can be decided at trace time: cuDNN's dtypes and head widths, and self-attention
    (its causal mask is aligned at the top-left corner, so queries at cache offsets fall back)."""
    head_dim = q_BxTxHxD.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and self_attention
        and q_BxTxHxD.shape[1] == k_BxSxKxD.shape[1]
        and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def _right_padded_single_segment(segments_BxT, key_segments_BxS):
    """bool scalar: every row is 1 ... 1 0 ... 0 with the same ids for queries and keys, the only
    segment layout cuDNN's per-row lengths can express (left padding and packing cannot)."""
    ones_or_zeros = jnp.all((segments_BxT == 0) | (segments_BxT == 1))
    non_increasing = jnp.all(segments_BxT[:, 1:] <= segments_BxT[:, :-1])
    return ones_or_zeros & non_increasing & jnp.all(segments_BxT == key_segments_BxS)


def _cudnn_or_chunked(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS, sliding_window,
                      block_size):
    """cuDNN where the segment layout allows it, chosen at run time (both branches compile)."""
    inputs = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, rows_BxT, segments_BxT, key_segments_BxS)

    def cudnn(q, k, v, rows, segments, key_segments):
        lengths_B = jnp.sum(segments != 0, axis=1).astype(jnp.int32)
        # cuDNN zeroes padding queries; the dense path gives them the mean of all values.
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn",
        )
        mean_v = jnp.mean(v.astype(jnp.float32), axis=1)
        mean_v_Bx1xHxD = jnp.repeat(mean_v, q.shape[2] // v.shape[2], axis=1)[:, None].astype(out.dtype)
        return jnp.where((segments == 0)[:, :, None, None], mean_v_Bx1xHxD, out)

    def chunked(*args):
        return chunked_attention(*args, sliding_window, block_size)

    return jax.lax.cond(_right_padded_single_segment(segments_BxT, key_segments_BxS), cudnn, chunked, *inputs)


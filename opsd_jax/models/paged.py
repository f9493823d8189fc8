"""Attention against a paged KV cache: the sampler's prefill and decode read only the pages a
sequence holds, never a full-length contiguous row.

The cache of one layer is a pool of pages shared by every sequence, `[P, N, K, D]` (P pages of N
rows), and each sequence has a page table row: its cache row r lives at page
`page_table[r // N]`, offset `r % N`. Page 0 is the null page: table entries a sequence does not
hold point there, so writes of idle slots and padded prompt tails land in it and reads of it are
always masked (they lie past the query's row).

Shape letters: B sequences, T queries each, H query heads, K kv heads, G = H / K, D head width,
P pages, N rows per page, M table entries per sequence, R key rows per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NULL_PAGE = 0
PAGED_IMPLEMENTATIONS = ("auto", "gather", "pallas_tpu")


def physical_rows(page_table_BxM, rows_BxT, page_size: int):
    """(page int32[B, T], offset int32[B, T]) of logical cache rows; rows past the table map to
    the null page."""
    page_BxT = jnp.take_along_axis(page_table_BxM, rows_BxT // page_size, axis=1, mode="fill",
                                   fill_value=NULL_PAGE)
    return page_BxT, rows_BxT % page_size


def write_pages(pool_PxNxKxD, values_BxTxKxD, page_table_BxM, rows_BxT):
    """Writes each token's keys or values at its cache row; returns the new pool."""
    page_BxT, offset_BxT = physical_rows(page_table_BxM, rows_BxT, pool_PxNxKxD.shape[1])
    return pool_PxNxKxD.at[page_BxT, offset_BxT].set(values_BxTxKxD.astype(pool_PxNxKxD.dtype))


def paged_attention(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM, rows_BxT, *,
                    sliding_window: int | None = None, block_rows: int = 256, implementation: str = "auto"):
    """Causal grouped-query attention of queries at cache rows `rows` over the paged cache.

    A query at row r sees rows <= r (and > r - sliding_window on sliding layers). Keys are read a
    block of whole pages at a time, only blocks between the lowest visible row and the highest
    query row: the work and the bytes read follow the live length, not the table's length. Online
    softmax in float32; returns [B, T, H, D] in the pool's dtype. Every query must see at least
    its own row (the caller writes it first).

    `implementation`: "gather" (this function's loop, any platform), "pallas_tpu" (the Mosaic
    kernel of `opsd_jax.models.paged_tpu`, reading the pools in place; Pallas' interpreter off
    TPU), or "auto": pallas_tpu when compiling for TPU (the context mesh's or the pool's mesh's
    devices, else the default backend) and the kernel takes the shapes, else gather.
    """
    if implementation not in PAGED_IMPLEMENTATIONS:
        raise ValueError(f"paged attention implementation {implementation!r}; supported: "
                         f"{', '.join(PAGED_IMPLEMENTATIONS)}")
    if implementation != "gather":
        from opsd_jax.models import paged_tpu

        if implementation == "pallas_tpu" or paged_tpu.applies(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD):
            return paged_tpu.paged_attention(q_BxTxHxD, k_pool_PxNxKxD, v_pool_PxNxKxD, page_table_BxM,
                                             rows_BxT, sliding_window=sliding_window, block_rows=block_rows)
    batch, length, heads, head_dim = q_BxTxHxD.shape
    page_size, kv_heads = k_pool_PxNxKxD.shape[1], k_pool_PxNxKxD.shape[2]
    groups = heads // kv_heads
    pages_per_block = max(1, block_rows // page_size)
    block = pages_per_block * page_size
    table_pages = page_table_BxM.shape[1]
    pad = -table_pages % pages_per_block
    page_table_BxM = jnp.pad(page_table_BxM, ((0, 0), (0, pad)), constant_values=NULL_PAGE)

    q_BxTxKxGxD = (q_BxTxHxD.astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim))).reshape(
        batch, length, kv_heads, groups, head_dim)
    rows_BxT = rows_BxT.astype(jnp.int32)
    last_block = jnp.max(rows_BxT) // block + 1
    first_block = jnp.int32(0)
    if sliding_window is not None:
        first_block = jnp.maximum(jnp.min(rows_BxT) - sliding_window + 1, 0) // block

    def key_block(j, carry):
        max_BxTxKxG, sum_BxTxKxG, acc_BxTxKxGxD = carry
        pages_BxQ = jax.lax.dynamic_slice_in_dim(page_table_BxM, j * pages_per_block, pages_per_block, axis=1)
        k_BxRxKxD = k_pool_PxNxKxD[pages_BxQ].reshape(batch, block, kv_heads, head_dim)
        v_BxRxKxD = v_pool_PxNxKxD[pages_BxQ].reshape(batch, block, kv_heads, head_dim)
        scores = jnp.einsum("btkgd,brkd->btkgr", q_BxTxKxGxD, k_BxRxKxD, preferred_element_type=jnp.float32)
        key_row_R = j * block + jnp.arange(block, dtype=jnp.int32)
        visible_BxTxR = key_row_R <= rows_BxT[:, :, None]
        if sliding_window is not None:
            visible_BxTxR &= key_row_R > rows_BxT[:, :, None] - sliding_window
        visible = visible_BxTxR[:, :, None, None, :]
        scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(max_BxTxKxG, jnp.max(scores, axis=-1))
        # Both -inf only for a query that has seen nothing yet; keep its sums at zero.
        safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
        correction = jnp.exp(max_BxTxKxG - safe_max)
        probs = jnp.where(visible, jnp.exp(scores - safe_max[..., None]), 0.0)
        sum_BxTxKxG = sum_BxTxKxG * correction + jnp.sum(probs, axis=-1)
        acc_BxTxKxGxD = acc_BxTxKxGxD * correction[..., None] + jnp.einsum(
            "btkgr,brkd->btkgd", probs, v_BxRxKxD.astype(jnp.float32))
        return new_max, sum_BxTxKxG, acc_BxTxKxGxD

    stats_shape = (batch, length, kv_heads, groups)
    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))
    _, sum_BxTxKxG, acc_BxTxKxGxD = jax.lax.fori_loop(first_block, last_block, key_block, init)
    out = acc_BxTxKxGxD / jnp.maximum(sum_BxTxKxG, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.reshape(batch, length, heads, head_dim).astype(v_pool_PxNxKxD.dtype)

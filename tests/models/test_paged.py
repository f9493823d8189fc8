"""Paged attention against the dense oracle over the same keys laid out contiguously."""

import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.models import attention, paged

FLOAT32_TOLERANCE = 1e-5


def _scatter_into_pages(rng, k_BxSxKxD, page_size: int, num_pages: int):
    """A pool holding each sequence's rows in randomly chosen, non-contiguous pages, and the
    page table that maps them back; unused pool pages hold noise."""
    batch, length, kv_heads, head_dim = k_BxSxKxD.shape
    table_pages = -(-length // page_size)
    pool = rng.normal(size=(num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    chosen = rng.permutation(np.arange(1, num_pages))[: batch * table_pages].reshape(batch, table_pages)
    padded = np.zeros((batch, table_pages * page_size, kv_heads, head_dim), np.float32)
    padded[:, :length] = k_BxSxKxD
    for b in range(batch):
        for m in range(table_pages):
            pool[chosen[b, m]] = padded[b, m * page_size:(m + 1) * page_size]
    return pool, chosen.astype(np.int32)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("page_size,block_rows", [(4, 8), (3, 3), (16, 64)])
def test_paged_attention_equals_dense(rng, window, page_size, block_rows):
    """Decode (T=1) and chunked-prefill (T=5) queries at arbitrary rows, GQA groups of 3, pages
    scattered through a pool, sliding windows, blocks of several pages and of one."""
    batch, length, kv_heads, groups, head_dim = 3, 37, 2, 3, 8
    k = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
    num_pages = batch * (-(-length // page_size)) + 5
    k_pool, table = _scatter_into_pages(np.random.default_rng(1), k, page_size, num_pages)
    v_pool, _ = _scatter_into_pages(np.random.default_rng(1), v, page_size, num_pages)
    for queries in (1, 5):
        q = rng.normal(size=(batch, queries, kv_heads * groups, head_dim)).astype(np.float32)
        last = rng.integers(queries - 1, length, batch)
        rows = (last[:, None] - np.arange(queries)[::-1]).astype(np.int32)
        expected = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), query_rows_BxT=jnp.asarray(rows),
                                    sliding_window=window, implementation="dense")
        got = paged.paged_attention(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(table),
                                    jnp.asarray(rows), sliding_window=window, block_rows=block_rows)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=FLOAT32_TOLERANCE, rtol=0)


def test_write_pages_lands_at_the_row_and_drops_rows_past_the_table(rng):
    page_size, kv_heads, head_dim = 4, 2, 3
    pool = np.zeros((6, page_size, kv_heads, head_dim), np.float32)
    table = np.array([[3, 1, 0]], np.int32)  # rows 0-3 -> page 3, 4-7 -> page 1, the rest -> null
    values = rng.normal(size=(1, 3, kv_heads, head_dim)).astype(np.float32)
    rows = np.array([[5, 2, 40]], np.int32)
    out = np.asarray(paged.write_pages(jnp.asarray(pool), jnp.asarray(values), jnp.asarray(table), jnp.asarray(rows)))
    np.testing.assert_array_equal(out[1, 1], values[0, 0])
    np.testing.assert_array_equal(out[3, 2], values[0, 1])
    untouched = np.ones(6, bool)
    untouched[[0, 1, 3]] = False
    assert not out[untouched].any()
    assert not np.delete(out[1], 1, axis=0).any() and not np.delete(out[3], 2, axis=0).any()

"""Pure layer functions of the decoder.

Shape letters: B batch, T query positions, S key positions, D model width, H query heads,
K kv heads, G query heads per kv head (H = K * G), Dh head width, F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models.config import RopeConfig

# A finite "minus infinity": a fully masked row (a padding query) then softmaxes to a uniform
# distribution instead of NaN, and NaN can never leak into the gradients of real tokens.
MASKED_SCORE = -1e30


def rms_norm(x, weight, eps: float, *, weight_in_fp32: bool, axes=(-1,)):
    """RMSNorm over `axes`, statistics in float32.

    x: [..., features]; weight broadcastable to the normalized trailing dims. Qwen3 casts the
    normalized value back to the input dtype before multiplying the weight; OLMo multiplies the
    weight in float32 first. In float32 the two agree; in bf16 they round differently.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    if weight_in_fp32:
        return (weight.astype(jnp.float32) * normed).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """float32[head_dim // 2] inverse frequencies and the cos/sin scale for one RoPE config.

    In float32, step for step as transformers (and vLLM) compute them: exponents rounded to
    float32, the reciprocal and YaRN's mixing in float32. A position multiplies a frequency's
    rounding error, so computing them more exactly (float64, rounded once) put the angles 2e-3
    rad off transformers' at 38,912 tokens and the logits 7e-4 (Qwen3-8B) to 2e-3 (OLMo-3) off
    in float32 (BUILD_NOTES, "RoPE frequencies at long positions"). The power itself is
    correctly rounded here; torch's float32 pow is within an ulp of it, so a few frequencies
    differ by one ulp. YaRN follows the paper as transformers implements it: a linear ramp
    between extrapolated (high-frequency) and interpolated (low-frequency) bands bounded by
    beta_fast / beta_slow rotations over the original context, and an attention factor
    0.1 ln(factor) + 1 applied to cos and sin.
    """
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
    powers = (float(rope.theta) ** exponents.astype(np.float64)).astype(f32)
    base_frequencies = f32(1.0) / powers
    if rope.rope_type == "default":
        return base_frequencies, 1.0
    if rope.rope_type == "linear":
        return base_frequencies / f32(rope.factor), 1.0
    if rope.rope_type != "yarn":
        raise ValueError(f"unsupported rope_type {rope.rope_type!r}")

    def mscale(scale: float, multiplier: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(rope.factor)

    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0.0), f32(1.0))
    extrapolation_weight = f32(1.0) - ramp
    interpolated = f32(1.0) / (f32(rope.factor) * powers)
    frequencies = interpolated * (f32(1.0) - extrapolation_weight) + base_frequencies * extrapolation_weight
    return frequencies.astype(f32), attention_factor


def rope_tables(positions_BxT, inverse_frequencies, attention_factor: float):
    """cos and sin, float32[B, T, Dh], NeoX layout (the half-width table repeated twice)."""
    angles_BxTxHalf = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(
        inverse_frequencies, jnp.float32
    )
    angles_BxTxDh = jnp.concatenate([angles_BxTxHalf, angles_BxTxHalf], axis=-1)
    return jnp.cos(angles_BxTxDh) * attention_factor, jnp.sin(angles_BxTxDh) * attention_factor


def apply_rope(x_BxTxNxDh, cos_BxTxDh, sin_BxTxDh):
    """Rotate-half RoPE computed in float32; returns x's dtype. N is any head count."""
    x32 = x_BxTxNxDh.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    cos, sin = cos_BxTxDh[:, :, None, :], sin_BxTxDh[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x_BxTxNxDh.dtype)


def attention_mask(segment_ids_BxT, sliding_window: int | None, segment_ids_BxS=None):
    """bool[B, T, S]: query t may attend key s.

    Keys must be in the query's segment (segment 0 is padding and attends nowhere), not in the
    future, and, for sliding-window layers, fewer than `sliding_window` positions back (a token
    sees itself and the window-1 before it, as transformers does).
    """
    segment_ids_BxS = segment_ids_BxT if segment_ids_BxS is None else segment_ids_BxS
    query_index_T = jnp.arange(segment_ids_BxT.shape[1])[:, None]
    key_index_S = jnp.arange(segment_ids_BxS.shape[1])[None, :]
    allowed_TxS = key_index_S <= query_index_T
    if sliding_window is not None:
        allowed_TxS &= key_index_S > query_index_T - sliding_window
    same_segment_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxS[:, None, :]
    real_key_BxS = segment_ids_BxS != 0
    return allowed_TxS[None] & same_segment_BxTxS & real_key_BxS[:, None, :]


def cache_attention_mask(positions_BxT, cache_length: int, sliding_window: int | None):
    """bool[B, T, S] over cache rows: a query at position p sees rows <= p (the cache holds one
    sequence per batch row, row index = position), and for sliding layers rows > p - window."""
    row_S = jnp.arange(cache_length)[None, None, :]
    position_BxTx1 = positions_BxT[:, :, None]
    allowed_BxTxS = row_S <= position_BxTx1
    if sliding_window is not None:
        allowed_BxTxS &= row_S > position_BxTx1 - sliding_window
    return allowed_BxTxS


def write_kv_cache(cache, k_BxTxKxDh, v_BxTxKxDh, positions_BxT):
    """Writes each token's keys/values at cache row = its position; returns the new cache.

    Positions at or past the cache length are dropped (a padded prefill tail), never wrapped.
    """
    batch_Bx1 = jnp.arange(k_BxTxKxDh.shape[0])[:, None]
    dtype = cache["k"].dtype
    return {
        "k": cache["k"].at[batch_Bx1, positions_BxT].set(k_BxTxKxDh.astype(dtype), mode="drop"),
        "v": cache["v"].at[batch_Bx1, positions_BxT].set(v_BxTxKxDh.astype(dtype), mode="drop"),
    }


def dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxTxS):
    """Grouped-query attention; scores and softmax in float32, values in the input dtype.

    Returns [B, T, H, Dh].
    """
    batch, length, num_heads, head_dim = q_BxTxHxDh.shape
    num_kv_heads = k_BxSxKxDh.shape[2]
    group = num_heads // num_kv_heads
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(batch, length, num_kv_heads, group, head_dim)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh, preferred_element_type=jnp.float32
    ) / math.sqrt(head_dim)
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, MASKED_SCORE)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxDh)
    return out_BxTxKxGxDh.reshape(batch, length, num_heads, head_dim)


def swiglu_mlp(x_BxTxD, gate_DxF, up_DxF, down_FxD):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x))."""
    hidden_BxTxF = jax.nn.silu(x_BxTxD @ gate_DxF) * (x_BxTxD @ up_DxF)
    return hidden_BxTxF @ down_FxD


def segment_positions(segment_ids_BxT):
    """int32[B, T]: each token's position inside its segment (0 at a segment's first token).

    With an attention mask as segment ids (left padding: 0 ... 0 1 ... 1) real tokens count
    from 0, as transformers' generate does; packed segments each restart at 0.
    """
    length = segment_ids_BxT.shape[1]
    index_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BxT.shape)
    starts_BxT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BxT[:, :1], dtype=bool),
            segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1],
        ],
        axis=1,
    )
    start_index_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
    return index_BxT - start_index_BxT

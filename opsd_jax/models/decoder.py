"""One decoder for Qwen3, OLMo-2 and OLMo-3, written as Flax modules and used as pure functions.

The student and the teacher are `forward` over two parameter pytrees. Shape letters as in
layers.py; V vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from opsd_jax.models import attention, layers, paged
from opsd_jax.models.config import ModelConfig
from opsd_jax.parallel import constrain

# The residual stream between layers on the context mesh (if any): sequences over the batch axes,
# positions over the axes they leave (parallel.LOGICAL_AXIS_RULES).
RESIDUAL_AXES = ("batch", "activation_seq", None)


def _param(module: nn.Module, name: str, shape, logical_axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, dtype)


_normal = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    config: ModelConfig
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]

    @nn.compact
    def __call__(self, x):
        scale = _param(
            self, "scale", self.shape, self.logical_axes, nn.initializers.ones, self.config.param_dtype
        )
        normalized_axes = tuple(range(-len(self.shape), 0))
        return layers.rms_norm(
            x,
            scale.astype(self.config.compute_dtype),
            self.config.rms_norm_eps,
            weight_in_fp32=self.config.norm_weight_in_fp32,
            axes=normalized_axes,
        )


class Projection(nn.Module):
    """A linear map whose kernel keeps heads as their own dimension ([D, H, Dh] or [H, Dh, D])."""

    config: ModelConfig
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    contract_dims: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        dtype = self.config.compute_dtype
        kernel = _param(self, "kernel", self.shape, self.logical_axes, _normal, self.config.param_dtype)
        x_axes = tuple(range(x.ndim - self.contract_dims, x.ndim))
        y = jax.lax.dot_general(
            x.astype(dtype), kernel.astype(dtype), ((x_axes, tuple(range(self.contract_dims))), ((), ()))
        )
        if self.use_bias:
            out_shape = self.shape[self.contract_dims :]
            out_axes = self.logical_axes[self.contract_dims :]
            bias = _param(self, "bias", out_shape, out_axes, nn.initializers.zeros, self.config.param_dtype)
            y = y + bias.astype(dtype)
        return y


class Attention(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None):
        c = self.config
        D, H, K, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        bias = c.attention_bias
        q = Projection(c, (D, H, Dh), ("embed", "heads", "head_dim"), use_bias=bias, name="q_proj")(x_BxTxD)
        k = Projection(c, (D, K, Dh), ("embed", "kv_heads", "head_dim"), use_bias=bias, name="k_proj")(x_BxTxD)
        v = Projection(c, (D, K, Dh), ("embed", "kv_heads", "head_dim"), use_bias=bias, name="v_proj")(x_BxTxD)
        if c.qk_norm == "per_head":
            q = RMSNorm(c, (Dh,), ("head_dim",), name="q_norm")(q)
            k = RMSNorm(c, (Dh,), ("head_dim",), name="k_norm")(k)
        elif c.qk_norm == "full":
            q = RMSNorm(c, (H, Dh), ("heads", "head_dim"), name="q_norm")(q)
            k = RMSNorm(c, (K, Dh), ("kv_heads", "head_dim"), name="k_norm")(k)

        layer_type = c.layer_types[self.layer_index]
        inverse_frequencies, attention_factor = layers.rope_inverse_frequencies(c.rope[layer_type], Dh)
        cos, sin = layers.rope_tables(positions_BxT, inverse_frequencies, attention_factor)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)

        window = c.sliding_window if layer_type == "sliding_attention" else None
        attend = functools.partial(
            attention.attend, sliding_window=window, implementation=c.attention_implementation,
            block_size=c.attention_block_size,
        )
        if cache is None:
            out_BxTxHxDh = attend(q, k, v, query_segment_ids_BxT=segment_ids_BxT, key_segment_ids_BxS=segment_ids_BxT)
        elif "page_table" in cache:
            table = cache["page_table"]
            cache = {**cache, "k": paged.write_pages(cache["k"], k, table, positions_BxT),
                     "v": paged.write_pages(cache["v"], v, table, positions_BxT)}
            out_BxTxHxDh = paged.paged_attention(q, cache["k"], cache["v"], table, positions_BxT,
                                                 sliding_window=window, block_rows=c.attention_block_size)
        else:
            # Cache row = position: a query sits at its position's row and sees the rows up to it.
            cache = layers.write_kv_cache(cache, k, v, positions_BxT)
            out_BxTxHxDh = attend(q, cache["k"], cache["v"], query_rows_BxT=positions_BxT)
        out = Projection(
            c, (H, Dh, D), ("heads", "head_dim", "embed"), contract_dims=2, use_bias=bias, name="o_proj"
        )(out_BxTxHxDh)
        return out, cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        D, F = c.hidden_size, c.intermediate_size
        gate = Projection(c, (D, F), ("embed", "mlp"), name="gate_proj")
        up = Projection(c, (D, F), ("embed", "mlp"), name="up_proj")
        down = Projection(c, (F, D), ("mlp", "embed"), name="down_proj")
        return down(jax.nn.silu(gate(x_BxTxD)) * up(x_BxTxD))


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None):
        c = self.config
        norm = functools.partial(RMSNorm, c, (c.hidden_size,), ("norm",))
        attention = Attention(c, self.layer_index, name="attention")
        mlp = MLP(c, name="mlp")
        if c.norm_placement == "pre":
            attended, cache = attention(norm(name="pre_attention_norm")(x_BxTxD), positions_BxT, segment_ids_BxT, cache)
            x_BxTxD = x_BxTxD + attended
            return x_BxTxD + mlp(norm(name="pre_mlp_norm")(x_BxTxD)), cache
        attended, cache = attention(x_BxTxD, positions_BxT, segment_ids_BxT, cache)
        x_BxTxD = x_BxTxD + norm(name="post_attention_norm")(attended)
        return x_BxTxD + norm(name="post_mlp_norm")(mlp(x_BxTxD)), cache


def layer_period(config: ModelConfig) -> int:
    """The length of the shortest pattern of layer types that repeats through the model (OLMo-3:
    3 sliding + 1 full = 4; Qwen3: 1). The scan runs over blocks of this many layers, so each
    layer inside a block knows its window and RoPE statically (the attention kernels need them
    static); a model with no repeating pattern is one block, which is the unrolled model."""
    types = config.layer_types
    for period in range(1, len(types) + 1):
        if len(types) % period == 0 and all(types[i] == types[i % period] for i in range(len(types))):
            return period
    return len(types)


def num_blocks(config: ModelConfig) -> int:
    return config.num_layers // layer_period(config)


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat policy {name!r}; supported: full, dots, offload")


class LayerBlock(nn.Module):
    """`layer_period` consecutive layers: the body of the scan over the model's depth.

    Its parameters are `layers_j` for j < period; scanned, each leaf gains a leading
    [num_blocks] dimension, and global layer i is block i // period, member i % period.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        c = self.config
        # Remat per layer, not per block: a block's backward then holds one layer's recomputed
        # activations at a time (OLMo-3's 4-layer blocks rematerialized whole needed 8 GiB more
        # per v5p chip in the dense plan), and the scan saves each layer's input as the unrolled
        # model did.
        layer_class = (nn.remat(DecoderLayer, policy=_remat_policy(c.remat_policy), prevent_cse=False)
                       if c.remat else DecoderLayer)
        for j in range(layer_period(c)):
            x_BxTxD, _ = layer_class(c, j, name=f"layers_{j}")(x_BxTxD, positions_BxT, segment_ids_BxT)
            x_BxTxD = constrain(x_BxTxD, RESIDUAL_AXES)
        return x_BxTxD, None


def _embed(module: nn.Module, c: ModelConfig, tokens_BxT):
    embedding_VxD = _param(module, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"), _normal,
                           c.param_dtype)
    return embedding_VxD, constrain(jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(c.compute_dtype),
                                    RESIDUAL_AXES)


def _final_norm_and_head(module: nn.Module, c: ModelConfig, x_BxTxD, embedding_VxD):
    x_BxTxD = RMSNorm(c, (c.hidden_size,), ("norm",), name="final_norm")(x_BxTxD)
    if c.tie_word_embeddings:
        return x_BxTxD, embedding_VxD.T
    return x_BxTxD, _param(module, "lm_head", (c.hidden_size, c.vocab_size), ("head_embed", "head_vocab"), _normal,
                           c.param_dtype)


class Decoder(nn.Module):
    """tokens -> (final hidden states [B, T, D] in compute dtype, lm_head [D, V]).

    The layers are one `nn.scan` over `num_blocks` blocks of `layer_period` layers: compile time
    does not grow with depth, and parameters are stacked (`params["layers"]["layers_j"]`, leading
    dimension num_blocks, logical axis "layers"). With `config.remat`, each layer is
    rematerialized under `config.remat_policy`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        c = self.config
        embedding_VxD, x_BxTxD = _embed(self, c, tokens_BxT)
        scanned = nn.scan(
            LayerBlock, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
            length=num_blocks(c), metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BxTxD, _ = scanned(c, name="layers")(x_BxTxD, positions_BxT, segment_ids_BxT)
        return _final_norm_and_head(self, c, x_BxTxD, embedding_VxD)


class Embed(nn.Module):
    """The decoder's embedding alone (same parameter name), for the per-layer cache paths."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT):
        return _embed(self, self.config, tokens_BxT)


class FinalNormAndHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, embedding_VxD):
        return _final_norm_and_head(self, self.config, x_BxTxD, embedding_VxD)


def unstack_layers(params, config: ModelConfig):
    """params with `layers` as a tuple of num_layers per-layer trees (no leading dimension).

    Decoding reads every weight every step; a sampler keeps this layout so each layer's matmuls
    read their weights where they lie, where slicing a stacked array inside the step could copy
    it first (XLA on CPU and GPU materializes such slices).
    """
    if isinstance(params["layers"], (tuple, list)):
        return params
    return {**params, "layers": tuple(_layer_params(params, config, i) for i in range(config.num_layers))}


def stack_layers(params, config: ModelConfig):
    """The inverse of `unstack_layers`: the training (scanned) layout."""
    layers_ = params["layers"]
    if not isinstance(layers_, (tuple, list)):
        return params
    period = layer_period(config)
    stacked = {f"layers_{j}": jax.tree.map(lambda *xs: jnp.stack(xs), *layers_[j::period]) for j in range(period)}
    return {**params, "layers": stacked}


def _layer_params(params, config: ModelConfig, i: int):
    layers_ = params["layers"]
    if isinstance(layers_, (tuple, list)):
        return layers_[i]
    period = layer_period(config)
    return jax.tree.map(lambda a: a[i // period], layers_[f"layers_{i % period}"])


def _forward_layer_by_layer(params, config: ModelConfig, tokens_BxT, positions_BxT, segment_ids_BxT, cache):
    """The cache paths (prefill, chunked prefill, decode): layer i reads and writes cache[i].
    Returns (hidden [B, T, D], head [D, V], new cache list)."""
    c = config
    period = layer_period(c)
    embedding_VxD, x_BxTxD = Embed(c).apply({"params": {"embedding": params["embedding"]}}, tokens_BxT)
    new_cache = []
    for i in range(c.num_layers):
        # DecoderLayer's index only selects the layer type, which repeats with the period.
        apply_layer = functools.partial(DecoderLayer(c, i % period).apply, positions_BxT=positions_BxT,
                                        segment_ids_BxT=segment_ids_BxT)
        if c.remat and cache[i] is None:
            apply_layer = jax.checkpoint(apply_layer, policy=_remat_policy(c.remat_policy))
        x_BxTxD, layer_cache = apply_layer({"params": _layer_params(params, c, i)}, x_BxTxD, cache=cache[i])
        x_BxTxD = constrain(x_BxTxD, RESIDUAL_AXES)
        new_cache.append(layer_cache)
    head_params = {k: params[k] for k in ("final_norm", "lm_head") if k in params}
    x_BxTxD, head_DxV = FinalNormAndHead(c).apply({"params": head_params}, x_BxTxD, embedding_VxD)
    return x_BxTxD, head_DxV, new_cache


def _segments_and_positions(tokens_BxT, positions_BxT, attention_mask_BxT, segment_ids_BxT):
    if attention_mask_BxT is not None and segment_ids_BxT is not None:
        raise ValueError("pass attention_mask or segment_ids, not both")
    if segment_ids_BxT is None:
        if attention_mask_BxT is None:
            segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        else:
            segment_ids_BxT = jnp.asarray(attention_mask_BxT).astype(jnp.int32)
    segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
    if segment_ids_BxT.shape != tokens_BxT.shape:
        raise ValueError(
            f"attention_mask/segment_ids shape {segment_ids_BxT.shape} must equal tokens shape "
            f"{tokens_BxT.shape}"
        )
    if positions_BxT is None:
        positions_BxT = layers.segment_positions(segment_ids_BxT)
    positions_BxT = jnp.asarray(positions_BxT, jnp.int32)
    if positions_BxT.shape != tokens_BxT.shape:
        raise ValueError(f"positions shape {positions_BxT.shape} must equal tokens shape {tokens_BxT.shape}")
    return positions_BxT, segment_ids_BxT


def forward_hidden(
    params, config: ModelConfig, tokens, *, positions=None, attention_mask=None, segment_ids=None
):
    """Final hidden states and the output head, so a loss never needs full logits.

    tokens: int32[batch, seq]. positions: int32[batch, seq] (default: position inside the
    segment, so left-padded rows start at 0). attention_mask: {0,1}[batch, seq] (0 = padding) or
    segment_ids: int32[batch, seq] (packed sequences, 0 = padding). Returns
    (hidden: compute_dtype[batch, seq, hidden_size], head: param_dtype[hidden_size, vocab]).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    positions, segment_ids = _segments_and_positions(tokens, positions, attention_mask, segment_ids)
    if isinstance(params["layers"], (tuple, list)) or not config.scan_layers:  # a sampler's copy, or unrolled
        cache = [None] * config.num_layers
        hidden, head, _ = _forward_layer_by_layer(params, config, tokens, positions, segment_ids, cache)
        return hidden, head
    return Decoder(config).apply({"params": params}, tokens, positions, segment_ids)


def forward_hidden_with_cache(params, config: ModelConfig, tokens, positions, cache):
    """Runs `tokens` against a KV cache: the prefill, chunked-prefill and decode step of a sampler.

    tokens, positions: int32[batch, seq]; each token's keys/values go to cache row = its position,
    and it attends to rows <= its position (and within the sliding window on sliding layers).
    cache: list over layers of {"k", "v": compute_dtype[batch, cache_len, kv_heads, head_dim]}.
    Returns (hidden compute_dtype[batch, seq, hidden_size], head [hidden_size, vocab], new cache).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    return _forward_layer_by_layer(params, config, tokens, positions, jnp.ones_like(tokens), cache)


def forward_with_cache(params, config: ModelConfig, tokens, positions, cache):
    """As `forward_hidden_with_cache`, returning (logits float32[batch, seq, vocab], new cache)."""
    hidden, head, cache = forward_hidden_with_cache(params, config, tokens, positions, cache)
    return logits_from_hidden(hidden, head, config), cache


def forward_hidden_with_pages(params, config: ModelConfig, tokens, positions, pools, page_table,
                              window_page_table=None):
    """As `forward_hidden_with_cache` over a paged cache (`opsd_jax.models.paged`).

    pools: list over layers of {"k", "v": compute_dtype[pages, page_size, kv_heads, head_dim]};
    page_table: int32[batch, table_pages], row b mapping sequence b's cache rows to pages.
    window_page_table: the same for sliding-window layers, whose pools are their own (pages
    behind the window released and mapped to the null page); default: page_table.
    Returns (hidden [batch, seq, hidden_size], head, new pools).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if window_page_table is None:
        window_page_table = page_table
    cache = [{**layer, "page_table": window_page_table if kind == "sliding_attention" else page_table}
             for layer, kind in zip(pools, config.layer_types)]
    hidden, head, cache = _forward_layer_by_layer(params, config, tokens, positions, jnp.ones_like(tokens), cache)
    return hidden, head, [{"k": layer["k"], "v": layer["v"]} for layer in cache]


def init_page_pools(config: ModelConfig, pages: int, page_size: int, window_pages: int | None = None):
    """An all-zero paged cache: list over layers of {"k", "v": [pages, page_size, kv_heads, head_dim]},
    with `window_pages` pages (default: pages) on sliding-window layers."""
    def pool(count):
        shape = (count, page_size, config.num_kv_heads, config.head_dim)
        return {"k": jnp.zeros(shape, config.compute_dtype), "v": jnp.zeros(shape, config.compute_dtype)}

    window_pages = pages if window_pages is None else window_pages
    return [pool(window_pages if kind == "sliding_attention" else pages) for kind in config.layer_types]


PAGE_POOL_LOGICAL_AXES = (None, None, "kv_heads", "head_dim")


def init_cache(config: ModelConfig, batch: int, length: int):
    """An all-zero KV cache: list over layers of {"k", "v": [batch, length, kv_heads, head_dim]}."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    return [
        {"k": jnp.zeros(shape, config.compute_dtype), "v": jnp.zeros(shape, config.compute_dtype)}
        for _ in range(config.num_layers)
    ]


CACHE_LOGICAL_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


def logits_from_hidden(hidden_BxTxD, head_DxV, config: ModelConfig):
    """float32 logits [..., vocab] from hidden states [..., hidden_size] in the compute dtype."""
    dtype = config.compute_dtype
    return jnp.einsum(
        "...d,dv->...v", hidden_BxTxD.astype(dtype), head_DxV.astype(dtype), preferred_element_type=jnp.float32
    )


def forward(params, config: ModelConfig, tokens, *, positions=None, attention_mask=None, segment_ids=None):
    """Logits float32[batch, seq, vocab]; arguments as in `forward_hidden`."""
    hidden_BxTxD, head_DxV = forward_hidden(
        params, config, tokens, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids
    )
    return logits_from_hidden(hidden_BxTxD, head_DxV, config)


def _dummy_inputs():
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1), jnp.int32)


def abstract_params(config: ModelConfig, *, per_layer: bool = False):
    """(ShapeDtypeStruct pytree, logical-axes pytree) without allocating anything; with
    `per_layer`, in `unstack_layers`' layout (the sampler's)."""
    boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), *_dummy_inputs())["params"])
    logical = nn.get_partition_spec(boxed)
    logical = jax.tree.map(tuple, logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = nn.unbox(boxed)
    if per_layer:
        shapes = jax.eval_shape(functools.partial(unstack_layers, config=config), shapes)
        period = layer_period(config)
        per_layer_axes = [jax.tree.map(lambda axes: axes[1:], logical["layers"][f"layers_{i % period}"],
                                       is_leaf=lambda x: isinstance(x, tuple))
                          for i in range(config.num_layers)]
        logical = {**logical, "layers": tuple(per_layer_axes)}
    return shapes, logical


def param_shardings(config: ModelConfig, mesh, rules=None, *, per_layer: bool = False):
    """NamedSharding pytree for the parameters on `mesh` (from the logical-axis rules; default
    the training rules, `parallel.SERVING_AXIS_RULES` for a sampler), in the stacked layout or,
    with `per_layer`, `unstack_layers`' layout."""
    from opsd_jax.parallel import tree_shardings

    shapes, logical = abstract_params(config, per_layer=per_layer)
    return tree_shardings(mesh, logical, shapes, rules)


def sharded_abstract_params(config: ModelConfig, mesh):
    """ShapeDtypeStruct pytree of the parameters (config.param_dtype) on their NamedShardings over
    `mesh`: a restore target, or the inputs of an ahead-of-time compile. Nothing is allocated."""
    from opsd_jax.parallel import tree_shardings

    shapes, logical = abstract_params(config)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes, tree_shardings(mesh, logical, shapes))


def init_params(config: ModelConfig, key, mesh=None):
    """Random parameters (normal(0.02) matrices, unit norms), created directly in their shards."""

    def init(key):
        return nn.unbox(Decoder(config).init(key, *_dummy_inputs())["params"])

    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=param_shardings(config, mesh))(key)

"""JetStream-shaped sampling engine over a paged KV cache: prefill / insert / generate.

The engine knows nothing about training and keeps no bookkeeping of its own: every jitted
function is pure, the decode state is a pytree that is donated and returned, and which pages a
sequence holds is the caller's page table (`opsd_jax.sampler.pages.PageAllocator` in the
orchestrator). Weights are placed on the sampler's own shardings (`parallel.SERVING_AXIS_RULES`:
heads split over tensor, never over fsdp) in the model's compute dtype, so a decode step gathers
no weight and reads half the bytes of float32 master weights.

Shape letters: S slots, L max sequence length per slot (cache rows), M page-table entries per
sequence (L / page size, rounded up), P pages in the pool, N rows per page, C prefill chunk,
V vocabulary, A reported alternatives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models import (
    PAGE_POOL_LOGICAL_AXES,
    ModelConfig,
    forward_hidden_with_pages,
    init_page_pools,
    logits_from_hidden,
    param_shardings,
    stack_layers,
    unstack_layers,
)
from opsd_jax.models.paged import NULL_PAGE
from opsd_jax.parallel import SERVING_AXIS_RULES, logical_sharding, make_mesh
from opsd_jax.sampler.sampling import (
    CPU_ROW_BLOCK,
    TOP_LOGPROBS,
    SamplingParams,
    request_key,
    sample_tokens,
)


class RequestError(ValueError):
    """A request the engine cannot serve; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """`max_slots` sequences decode together; each holds at most `max_sequence_length` tokens
    (prompt + generated; default: the model's context).

    The KV cache is a pool of `kv_pages` pages of `page_size` rows shared by all slots (default:
    enough for every slot at full length plus one prompt of `max_prompt_length` tokens held for
    its waiting samples, about the memory of a contiguous cache; fewer pages serve a workload
    whose sequences are mostly shorter than L, and the orchestrator preempts and later resumes a
    sequence when the pool runs dry). Prompts are prefilled in chunks: the smallest bucket that
    holds what is left, at most the largest bucket at a time.
    """

    max_slots: int = 8
    max_sequence_length: int | None = None
    # The longest prompt requests bring, when the caller knows it (an evaluation knows its
    # suites'); it sizes the held prompt of the default pools. None: a whole sequence, which at
    # 8 slots of 38,912-token evaluations is 1/9 of the pool spent on a prompt of ~200 tokens.
    # Longer prompts are still served (the pool may then run dry and preempt).
    max_prompt_length: int | None = None
    prefill_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    # Tokens at or past this id (embedding rows padded beyond the tokenizer, e.g. Qwen3's
    # 151669..151935) are never sampled and carry no probability; None keeps the whole vocabulary.
    valid_vocab_size: int | None = None
    page_size: int = 16
    kv_pages: int | None = None
    # Sliding-window layers keep only the pages their window can still see, in a pool of their
    # own of `window_kv_pages` pages (default: every slot's window plus one prompt's).
    window_kv_pages: int | None = None
    # Key rows paged attention reads per block (whole pages, at least one): None picks
    # CPU_PAGED_BLOCK_ROWS on CPU meshes, the model's attention_block_size elsewhere. On CPU a
    # block is gathered into a copy before its matmul, and a short sequence's last block is mostly
    # null pages: 32-64 rows measured fastest for decode (16 slots at 192-300 rows) and for 64-
    # and 128-token prefill chunks, 1.5-4x faster than 512 (issue 14). On TPU each block is a
    # loop iteration, so long sequences want the large blocks.
    paged_block_rows: int | None = None

    def validate(self) -> None:
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if not self.prefill_buckets or any(b < 1 for b in self.prefill_buckets):
            raise ValueError(f"prefill_buckets must be positive sizes, got {self.prefill_buckets}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.paged_block_rows is not None and self.paged_block_rows < 1:
            raise ValueError(f"paged_block_rows must be >= 1, got {self.paged_block_rows}")
        for name in ("kv_pages", "window_kv_pages"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2 (page 0 is the null page), got {value}")


# Paged attention's block on CPU meshes (see SamplerConfig.paged_block_rows).
CPU_PAGED_BLOCK_ROWS = 64


class DecodeState(NamedTuple):
    """Everything on device that changes between decode steps; slot arrays have one row per slot."""

    pools: list  # per layer {"k", "v": [P, N, K, Dh]} (P = window pages on sliding-window layers)
    next_token: jax.Array  # int32[S]: sampled, not yet in the cache
    next_position: jax.Array  # int32[S]: its position (= its cache row)
    keys: jax.Array  # PRNG key[S] of the request sample occupying the slot
    temperature: jax.Array  # float32[S]
    top_k: jax.Array  # int32[S]
    top_p: jax.Array  # float32[S]


class TokenResult(NamedTuple):
    """Per sampled token (arrays over slots or samples)."""

    token: jax.Array  # int32
    sampled_logprob: jax.Array  # float32: under the distribution sampled from (after T/top-k/top-p)
    model_logprob: jax.Array  # float32: under the raw model distribution
    entropy: jax.Array  # float32: entropy of the raw model distribution, nats
    top_ids: jax.Array  # int32[..., A]: the raw model's most likely tokens (A = 0 unless asked)
    top_logprobs: jax.Array  # float32[..., A]: their log-probabilities


def _sampling_arrays(samplings: list[SamplingParams]):
    return (
        jnp.asarray([s.temperature for s in samplings], jnp.float32),
        jnp.asarray([s.top_k for s in samplings], jnp.int32),
        jnp.asarray([s.top_p for s in samplings], jnp.float32),
    )


def alternatives_for(samplings) -> int:
    """The compiled top-logprobs width a set of requests needs: 0, or all TOP_LOGPROBS (two
    programs, not one per width)."""
    return TOP_LOGPROBS if any(s.top_logprobs for s in samplings) else 0


def serving_mesh(config: ModelConfig, devices):
    """The sampler's mesh over `devices`: tensor parallel over as many devices as evenly split the
    KV heads (weights and KV pages divided among them, one all-reduce per layer), data parallel
    over slots for the rest (weights and pages replicated there)."""
    devices = list(devices)
    tensor = max(t for t in range(1, len(devices) + 1) if len(devices) % t == 0 and config.num_kv_heads % t == 0)
    return make_mesh(len(devices) // tensor, 1, tensor, devices=devices)


class Engine:
    """Prefill, insert and generate for one model on one mesh."""

    def __init__(self, config: ModelConfig, sampler_config: SamplerConfig = SamplerConfig(), mesh=None):
        sampler_config.validate()
        self.config = config
        self.sampler_config = sampler_config
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
        on_cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        self._sample_row_block = CPU_ROW_BLOCK if on_cpu else None
        block_rows = sampler_config.paged_block_rows
        if block_rows is None:
            block_rows = CPU_PAGED_BLOCK_ROWS if on_cpu else config.attention_block_size
        # The model as the engine's programs run it (only paged attention reads the block size).
        self._forward_config = config.replace(attention_block_size=block_rows)
        self.max_sequence_length = sampler_config.max_sequence_length or config.max_position_embeddings
        if self.max_sequence_length > config.max_position_embeddings:
            raise ValueError(
                f"max_sequence_length {self.max_sequence_length} exceeds the model's context "
                f"(max_position_embeddings {config.max_position_embeddings})"
            )
        self.buckets = tuple(sorted({min(b, self.max_sequence_length) for b in sampler_config.prefill_buckets}))
        self.page_size = sampler_config.page_size
        self.table_pages = math.ceil(self.max_sequence_length / self.page_size)
        slots = sampler_config.max_slots
        # Default: every slot at full length plus one prompt held for its waiting samples.
        held_pages = min(self.pages_for(sampler_config.max_prompt_length or self.max_sequence_length),
                         self.table_pages)
        self.num_pages = sampler_config.kv_pages or slots * self.table_pages + held_pages + 1
        self.windowed_layers = [kind == "sliding_attention" for kind in config.layer_types]
        window = config.sliding_window
        # A window's own pool pays off only when the window is shorter than a sequence. A sequence
        # never holds more window pages than a prefill chunk plus the window before it spans.
        self.windowed = any(self.windowed_layers) and window is not None and window < self.max_sequence_length
        self.window_pages_per_sequence = (min(self.pages_for(window + self.buckets[-1]) + 1, self.table_pages)
                                          if self.windowed else self.table_pages)
        self.num_window_pages = (sampler_config.window_kv_pages
                                 or slots * self.window_pages_per_sequence
                                 + min(held_pages, self.window_pages_per_sequence) + 1
                                 if self.windowed else self.num_pages)
        # The engine's weights are per layer (`unstack_layers`); what it is given is the training
        # (stacked) layout, placed on `input_param_shardings` on the way.
        self.param_shardings = param_shardings(config, self.mesh, SERVING_AXIS_RULES, per_layer=True)
        self.input_param_shardings = param_shardings(config, self.mesh, SERVING_AXIS_RULES)

        def pool_sharding(pages):
            shape = (pages, self.page_size, config.num_kv_heads, config.head_dim)
            return logical_sharding(self.mesh, PAGE_POOL_LOGICAL_AXES, shape, SERVING_AXIS_RULES)

        slot_sharding = logical_sharding(self.mesh, ("batch",), (slots,), SERVING_AXIS_RULES)
        layer_shardings = [pool_sharding(self.num_window_pages if w else self.num_pages) for w in self.windowed_layers]
        self.state_shardings = DecodeState(
            pools=[{"k": sharding, "v": sharding} for sharding in layer_shardings],
            next_token=slot_sharding, next_position=slot_sharding, keys=slot_sharding,
            temperature=slot_sharding, top_k=slot_sharding, top_p=slot_sharding,
        )
        self._init_state = jax.jit(self._init_state_fn, out_shardings=self.state_shardings)
        self._place = jax.jit(self._place_fn, out_shardings=self.param_shardings)
        self._prefill_chunk = jax.jit(self._prefill_chunk_fn, donate_argnums=(1,),
                                      out_shardings=(self.state_shardings, None))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,), out_shardings=self.state_shardings)
        self._copy_page = jax.jit(self._copy_page_fn, donate_argnums=(0,), static_argnums=(3,),
                                  out_shardings=self.state_shardings)
        self._generate = jax.jit(self._generate_fn, donate_argnums=(1,), static_argnums=(3,),
                                 out_shardings=(self.state_shardings, None))
        self._sample_first = jax.jit(self._sample_first_fn, static_argnums=(6,))

    # ---- sizes and validation -------------------------------------------------------------

    @property
    def serving_dtype(self):
        """Weights are kept in the compute dtype: what every matmul reads anyway."""
        return jnp.dtype(self.config.compute_dtype)

    def _layer_page_bytes(self, layers: int) -> int:
        c = self.config
        return 2 * layers * self.page_size * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_dtype).itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of the full-attention pool, across its layers (keys and values)."""
        return self._layer_page_bytes(self.config.num_layers - sum(self.windowed_layers))

    @property
    def window_page_bytes(self) -> int:
        """Bytes of one page of the sliding-window pool, across its layers."""
        return self._layer_page_bytes(sum(self.windowed_layers))

    @property
    def decode_state_bytes(self) -> int:
        """Bytes of the KV page pools (the slot scalars are negligible)."""
        return self.num_pages * self.page_bytes + self.num_window_pages * self.window_page_bytes

    def pages_for(self, rows: int) -> int:
        """Pages that hold cache rows 0 .. rows - 1."""
        return math.ceil(rows / self.page_size)

    def validate_prompt(self, prompt_ids) -> np.ndarray:
        """The prompt as int32[n], or a RequestError naming what is wrong: empty, not integers, or
        an id the tokenizer does not have (rows past it in a padded embedding are untrained)."""
        if not isinstance(prompt_ids, np.ndarray) and any(isinstance(t, bool) for t in prompt_ids):
            raise RequestError("prompt token ids must be integers, got a boolean")
        try:
            prompt = np.asarray(prompt_ids)
        except (OverflowError, ValueError):
            raise RequestError("prompt must be a flat list of token ids within int64") from None
        if prompt.ndim != 1 or prompt.size == 0:
            raise RequestError("prompt must be a non-empty list of token ids")
        if not np.issubdtype(prompt.dtype, np.integer):
            raise RequestError(f"prompt token ids must be integers, got dtype {prompt.dtype}")
        vocab = self.sampler_config.valid_vocab_size or self.config.vocab_size
        bad = prompt[(prompt < 0) | (prompt >= vocab)]
        if bad.size:
            raise RequestError(f"prompt token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
        return prompt.astype(np.int32)

    def validate_request(self, prompt_ids, sampling: SamplingParams) -> np.ndarray:
        """Returns the prompt as int32[n] or raises RequestError naming what is wrong."""
        try:
            sampling.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        prompt = self.validate_prompt(prompt_ids)
        if prompt.size >= self.max_sequence_length:
            raise RequestError(
                f"prompt has {prompt.size} tokens; the engine holds at most {self.max_sequence_length} "
                "tokens per sequence (prompt + generated), so it cannot generate"
            )
        # The last generated token is never fed back, so it needs no cache row.
        needed = prompt.size + sampling.max_new_tokens - 1
        if needed > self.max_sequence_length:
            raise RequestError(
                f"prompt ({prompt.size} tokens) + max_new_tokens ({sampling.max_new_tokens}) needs "
                f"{needed + 1} tokens, more than max_sequence_length {self.max_sequence_length}"
            )
        # A sequence must fit the pools alone, or it could never be served.
        usable = self.num_pages - 1
        if self.pages_for(needed) > usable:
            raise RequestError(
                f"prompt ({prompt.size} tokens) + max_new_tokens ({sampling.max_new_tokens}) needs "
                f"{self.pages_for(needed)} KV pages of {self.page_size} rows; the pool has {usable} (kv_pages)"
            )
        if self.windowed and self.window_pages_per_sequence > self.num_window_pages - 1:
            raise RequestError(
                f"a sequence needs {self.window_pages_per_sequence} sliding-window KV pages; the window pool has "
                f"{self.num_window_pages - 1} (window_kv_pages)"
            )
        return prompt.astype(np.int32)

    # ---- jitted pure functions --------------------------------------------------------------

    def _init_state_fn(self):
        slots = self.sampler_config.max_slots
        return DecodeState(
            pools=init_page_pools(self.config, self.num_pages, self.page_size, self.num_window_pages),
            next_token=jnp.zeros(slots, jnp.int32),
            next_position=jnp.zeros(slots, jnp.int32),
            keys=jax.random.split(jax.random.key(0), slots),
            temperature=jnp.zeros(slots, jnp.float32),
            top_k=jnp.zeros(slots, jnp.int32),
            top_p=jnp.ones(slots, jnp.float32),
        )

    def _place_fn(self, params):
        return unstack_layers(jax.tree.map(lambda p: p.astype(self.serving_dtype), params), self.config)

    def _prefill_chunk_fn(self, params, state: DecodeState, tables_2xM, tokens_1xC, start, last_index):
        positions_1xC = (start + jnp.arange(tokens_1xC.shape[1], dtype=jnp.int32))[None]
        hidden_1xCxD, head, pools = forward_hidden_with_pages(params, self._forward_config, tokens_1xC,
                                                              positions_1xC, state.pools, tables_2xM[0][None],
                                                              tables_2xM[1][None])
        last_hidden_D = jax.lax.dynamic_index_in_dim(hidden_1xCxD[0], last_index, axis=0, keepdims=False)
        return state._replace(pools=pools), logits_from_hidden(last_hidden_D, head, self.config)

    def _sample_first_fn(self, logits_V, keys_N, positions_N, temperature_N, top_k_N, top_p_N, alternatives):
        token_keys = jax.vmap(jax.random.fold_in)(keys_N, positions_N)
        logits_NxV = self._mask_padded_vocab(jnp.broadcast_to(logits_V, (keys_N.shape[0], logits_V.shape[0])))
        return TokenResult(*sample_tokens(logits_NxV, token_keys, temperature_N, top_k_N, top_p_N, alternatives,
                                          self._sample_row_block))

    def _insert_fn(self, state: DecodeState, slot, next_token, next_position, key, temperature, top_k, top_p):
        return state._replace(
            next_token=state.next_token.at[slot].set(next_token),
            next_position=state.next_position.at[slot].set(next_position),
            keys=state.keys.at[slot].set(key),
            temperature=state.temperature.at[slot].set(temperature),
            top_k=state.top_k.at[slot].set(top_k),
            top_p=state.top_p.at[slot].set(top_p),
        )

    def _copy_page_fn(self, state: DecodeState, source, destination, windowed: bool):
        pools = [{name: pool.at[destination].set(pool[source]) for name, pool in layer.items()}
                 if (self.windowed and is_windowed) == windowed else layer
                 for layer, is_windowed in zip(state.pools, self.windowed_layers)]
        return state._replace(pools=pools)

    def _mask_padded_vocab(self, logits_SxV):
        valid = self.sampler_config.valid_vocab_size
        if valid is None or valid >= logits_SxV.shape[-1]:
            return logits_SxV
        return jnp.where(jnp.arange(logits_SxV.shape[-1]) < valid, logits_SxV, -jnp.inf)

    def _generate_fn(self, params, state: DecodeState, tables_2xSxM, alternatives):
        hidden_Sx1xD, head, pools = forward_hidden_with_pages(
            params, self._forward_config, state.next_token[:, None], state.next_position[:, None], state.pools,
            tables_2xSxM[0], tables_2xSxM[1],
        )
        logits_SxV = self._mask_padded_vocab(logits_from_hidden(hidden_Sx1xD[:, 0], head, self.config))
        sampled_position_S = state.next_position + 1
        token_keys = jax.vmap(jax.random.fold_in)(state.keys, sampled_position_S)
        result = TokenResult(*sample_tokens(logits_SxV, token_keys, state.temperature, state.top_k, state.top_p,
                                            alternatives, self._sample_row_block))
        # Idle slots keep stepping (into the null page); clamp so positions stay in range.
        next_position = jnp.minimum(sampled_position_S, self.max_sequence_length - 1)
        return state._replace(pools=pools, next_token=result.token, next_position=next_position), result

    # ---- public API ---------------------------------------------------------------------------

    def load_params(self, params):
        """The engine's copy of `params` (the training layout, or the engine's own): cast to the
        compute dtype, one array per layer, placed on the sampler's shardings on device (a
        training state's fsdp shards are resharded by one jitted transfer, never through the
        host). Shapes must match, so nothing recompiles."""
        if jax.tree.structure(params) == jax.tree.structure(self.param_shardings):
            leaves, targets = jax.tree.leaves(params), jax.tree.leaves(self.param_shardings)
            if all(isinstance(p, jax.Array) and p.dtype == self.serving_dtype
                   and p.sharding.is_equivalent_to(t, p.ndim) for p, t in zip(leaves, targets)):
                return params  # placed already (WeightSync)
            params = stack_layers(params, self.config)
        if jax.tree.structure(params) != jax.tree.structure(self.input_param_shardings):
            raise ValueError("params do not match the engine's model structure")
        devices = set(self.mesh.devices.flat)
        if all(isinstance(p, jax.Array) and p.sharding.device_set == devices for p in jax.tree.leaves(params)):
            return self._place(params)
        # Elsewhere (host arrays, or another set of devices): cast where they are, then move the
        # smaller copy.
        dtype = self.serving_dtype
        return self._place(jax.device_put(jax.tree.map(lambda p: p.astype(dtype) if isinstance(p, jax.Array)
                                                       else np.asarray(p).astype(dtype), params),
                                          self.input_param_shardings))

    def init_decode_state(self) -> DecodeState:
        return self._init_state()

    def empty_page_tables(self, rows: int) -> np.ndarray:
        """int32[2, rows, M] of null pages: the full-attention pool's table and the sliding-window
        pool's (the same pool when the model has no window shorter than a sequence)."""
        return np.full((2, rows, self.table_pages), NULL_PAGE, np.int32)

    def chunk_size(self, remaining: int) -> int:
        """The prefill chunk for `remaining` prompt tokens: the smallest bucket that holds them,
        else the largest."""
        for bucket in self.buckets:
            if remaining <= bucket:
                return bucket
        return self.buckets[-1]

    def chunk_rows(self, length: int, start: int) -> tuple[int, int]:
        """[start, stop) rows the next prefill chunk of a `length`-token prompt writes (padding
        past the prompt included)."""
        return start, start + self.chunk_size(length - start)

    def prefill_chunk(self, params, state: DecodeState, prompt: np.ndarray, tables_2xM: np.ndarray, start: int):
        """Prefills prompt tokens from `start` (one chunk) into the pages of `tables_2xM`.

        Returns (state, next start, float32[V] logits at the last prompt token once the prompt
        is done, else None). Padded rows past the prompt fall in its last page (overwritten by
        decode before anything reads them) or in the null page.
        """
        length = prompt.size
        chunk = self.chunk_size(length - start)
        tokens = np.zeros((1, chunk), np.int32)
        stop = min(length, start + chunk)
        tokens[0, : stop - start] = prompt[start:stop]
        state, logits_V = self._prefill_chunk(params, state, tables_2xM, tokens, np.int32(start),
                                              np.int32(stop - 1 - start))
        return state, stop, (logits_V if stop == length else None)


    def sample_first(self, logits_V, position: int, samplings: list[SamplingParams],
                     sample_indices: list[int]) -> TokenResult:
        """First generated token (at `position`, the prompt length) of each (sampling, sample
        index) from one prefill: n samples of one prompt share it."""
        keys = jnp.stack([request_key(s.seed, i) for s, i in zip(samplings, sample_indices)])
        positions = jnp.full(len(samplings), position, jnp.int32)
        return self._sample_first(logits_V, keys, positions, *_sampling_arrays(samplings), alternatives_for(samplings))

    def insert(self, state: DecodeState, slot: int, sampling: SamplingParams, next_token: int, next_position: int,
               sample_index: int = 0) -> DecodeState:
        """Makes `slot` decode `next_token` at `next_position` next (its cache rows below that
        already written in the pages the caller's table gives the slot)."""
        if not 0 <= slot < self.sampler_config.max_slots:
            raise ValueError(f"slot {slot} outside [0, {self.sampler_config.max_slots})")
        temperature, top_k, top_p = _sampling_arrays([sampling])
        return self._insert(state, np.int32(slot), np.int32(next_token), np.int32(next_position),
                            request_key(sampling.seed, sample_index), temperature[0], top_k[0], top_p[0])

    def copy_page(self, state: DecodeState, source: int, destination: int, windowed: bool = False) -> DecodeState:
        """Copies one page of the full-attention pool (or of the sliding-window pool) in each of
        its layers: a shared prompt's partly filled last page, before a sample writes into it."""
        return self._copy_page(state, np.int32(source), np.int32(destination), windowed)

    def generate(self, params, state: DecodeState, tables_2xSxM: np.ndarray, alternatives: int = 0):
        """One decode step for every slot; returns the new state and each slot's sampled token.
        Nothing is read back: the caller fetches the result when it needs it."""
        return self._generate(params, state, tables_2xSxM, alternatives)

    def warmup(self, params, state: DecodeState) -> DecodeState:
        """Compiles every program serving can reach (each prefill bucket, insert, page copy, the
        decode step with and without alternatives, first-token sampling) before any request,
        writing only into the null page."""
        tables = self.empty_page_tables(self.sampler_config.max_slots)
        for bucket in self.buckets:
            state, logits_V = self._prefill_chunk(params, state, tables[:, 0], np.zeros((1, bucket), np.int32),
                                                  np.int32(0), np.int32(0))
        state = self.insert(state, 0, SamplingParams(), 0, 0)
        for windowed in (False, True):
            state = self.copy_page(state, NULL_PAGE, NULL_PAGE, windowed)
        for alternatives in (0, TOP_LOGPROBS):
            state, result = self.generate(params, state, tables, alternatives)
            # n = 1 only: other sample counts compile their own (small) sampling program.
            self.sample_first(logits_V, 0, [SamplingParams(top_logprobs=min(alternatives, 1))], [0])
        jax.block_until_ready(result)
        return state

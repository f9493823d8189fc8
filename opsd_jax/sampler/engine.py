"""JetStream-shaped sampling engine: prefill / insert / generate over a sharded KV cache.

The engine knows nothing about training. It holds no parameters of its own between calls except
what `load_params` places; every jitted function is pure and the decode state is a pytree that is
donated and returned.

Shape letters: S slots, L max sequence length per slot (cache rows), P prefix rows, C prefill
chunk, V vocabulary, K kv heads, Dh head width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models import (
    CACHE_LOGICAL_AXES,
    ModelConfig,
    forward_hidden_with_cache,
    init_cache,
    logits_from_hidden,
    param_shardings,
)
from opsd_jax.parallel import logical_sharding, make_mesh
from opsd_jax.sampler.sampling import SamplingParams, request_key, sample_tokens


class RequestError(ValueError):
    """A request the engine cannot serve; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """`max_slots` sequences decode together; each holds at most `max_sequence_length` tokens
    (prompt + generated; default: the model's context). Prompts are padded to the smallest
    bucket that fits; longer prompts are prefilled in chunks of the largest bucket."""

    max_slots: int = 8
    max_sequence_length: int | None = None
    prefill_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    # Tokens at or past this id (embedding rows padded beyond the tokenizer, e.g. Qwen3's
    # 151669..151935) are never sampled and carry no probability; None keeps the whole vocabulary.
    valid_vocab_size: int | None = None

    def validate(self) -> None:
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if not self.prefill_buckets or any(b < 1 for b in self.prefill_buckets):
            raise ValueError(f"prefill_buckets must be positive sizes, got {self.prefill_buckets}")


class DecodeState(NamedTuple):
    """Everything that changes between decode steps, one row per slot."""

    cache: list  # per layer {"k", "v": [S, L, K, Dh]}
    next_token: jax.Array  # int32[S]: sampled, not yet in the cache
    next_position: jax.Array  # int32[S]: its position (= its cache row)
    keys: jax.Array  # PRNG key[S] of the request sample occupying the slot
    temperature: jax.Array  # float32[S]
    top_k: jax.Array  # int32[S]
    top_p: jax.Array  # float32[S]


class Prefix(NamedTuple):
    """A prefilled prompt, ready to be inserted into one or more slots."""

    cache: list  # per layer {"k", "v": [1, P, K, Dh]}
    true_length: int
    logits: jax.Array  # float32[V] at the last prompt token


class TokenResult(NamedTuple):
    """Per sampled token (arrays over slots or samples)."""

    token: jax.Array  # int32
    sampled_logprob: jax.Array  # float32: under the distribution sampled from (after T/top-k/top-p)
    model_logprob: jax.Array  # float32: under the raw model distribution
    entropy: jax.Array  # float32: entropy of the raw model distribution, nats
    top_ids: jax.Array  # int32[..., A]: the raw model's most likely tokens
    top_logprobs: jax.Array  # float32[..., A]: their log-probabilities


def _sampling_arrays(samplings: list[SamplingParams]):
    return (
        jnp.asarray([s.temperature for s in samplings], jnp.float32),
        jnp.asarray([s.top_k for s in samplings], jnp.int32),
        jnp.asarray([s.top_p for s in samplings], jnp.float32),
    )


class Engine:
    """Prefill, insert and generate for one model on one mesh."""

    def __init__(self, config: ModelConfig, sampler_config: SamplerConfig = SamplerConfig(), mesh=None):
        sampler_config.validate()
        self.config = config
        self.sampler_config = sampler_config
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.max_sequence_length = sampler_config.max_sequence_length or config.max_position_embeddings
        if self.max_sequence_length > config.max_position_embeddings:
            raise ValueError(
                f"max_sequence_length {self.max_sequence_length} exceeds the model's context "
                f"(max_position_embeddings {config.max_position_embeddings})"
            )
        self.buckets = tuple(sorted(set(min(b, self.max_sequence_length) for b in sampler_config.prefill_buckets)))
        self.param_shardings = param_shardings(config, self.mesh)
        slots, length = sampler_config.max_slots, self.max_sequence_length
        cache_shape = (slots, length, config.num_kv_heads, config.head_dim)
        cache_sharding = logical_sharding(self.mesh, CACHE_LOGICAL_AXES, cache_shape)
        slot_sharding = logical_sharding(self.mesh, ("batch",), (slots,))
        self.state_shardings = DecodeState(
            cache=[{"k": cache_sharding, "v": cache_sharding} for _ in range(config.num_layers)],
            next_token=slot_sharding, next_position=slot_sharding, keys=slot_sharding,
            temperature=slot_sharding, top_k=slot_sharding, top_p=slot_sharding,
        )
        self._init_state = jax.jit(self._init_state_fn, out_shardings=self.state_shardings)
        self._prefill_chunk = jax.jit(self._prefill_chunk_fn, donate_argnums=(3,))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,), out_shardings=self.state_shardings)
        self._generate = jax.jit(
            self._generate_fn, donate_argnums=(1,), out_shardings=(self.state_shardings, None)
        )
        self._sample_first = jax.jit(self._sample_first_fn)

    # ---- sizes and validation -------------------------------------------------------------

    @property
    def decode_state_bytes(self) -> int:
        """Bytes of the KV cache for all slots (the slot scalars are negligible)."""
        c = self.config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_dtype).itemsize
        return per_token * self.sampler_config.max_slots * self.max_sequence_length

    def validate_request(self, prompt_ids, sampling: SamplingParams) -> np.ndarray:
        """Returns the prompt as int32[n] or raises RequestError naming what is wrong."""
        try:
            sampling.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0:
            raise RequestError("prompt must be a non-empty list of token ids")
        if not np.issubdtype(prompt.dtype, np.integer):
            raise RequestError(f"prompt token ids must be integers, got dtype {prompt.dtype}")
        bad = prompt[(prompt < 0) | (prompt >= self.config.vocab_size)]
        if bad.size:
            raise RequestError(
                f"prompt token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
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
        return prompt.astype(np.int32)

    # ---- jitted pure functions --------------------------------------------------------------

    def _init_state_fn(self):
        slots = self.sampler_config.max_slots
        return DecodeState(
            cache=init_cache(self.config, slots, self.max_sequence_length),
            next_token=jnp.zeros(slots, jnp.int32),
            next_position=jnp.zeros(slots, jnp.int32),
            keys=jax.random.split(jax.random.key(0), slots),
            temperature=jnp.zeros(slots, jnp.float32),
            top_k=jnp.zeros(slots, jnp.int32),
            top_p=jnp.ones(slots, jnp.float32),
        )

    def _prefill_chunk_fn(self, params, tokens_1xC, positions_1xC, cache, last_index):
        hidden_1xCxD, head, cache = forward_hidden_with_cache(params, self.config, tokens_1xC, positions_1xC, cache)
        last_hidden_D = jax.lax.dynamic_index_in_dim(hidden_1xCxD[0], last_index, axis=0, keepdims=False)
        return cache, logits_from_hidden(last_hidden_D, head, self.config)

    def _sample_first_fn(self, logits_V, keys_N, positions_N, temperature_N, top_k_N, top_p_N):
        token_keys = jax.vmap(jax.random.fold_in)(keys_N, positions_N)
        logits_NxV = self._mask_padded_vocab(jnp.broadcast_to(logits_V, (keys_N.shape[0], logits_V.shape[0])))
        return TokenResult(*sample_tokens(logits_NxV, token_keys, temperature_N, top_k_N, top_p_N))

    def _insert_fn(self, state: DecodeState, prefix_cache, slot, next_token, next_position, key, temperature,
                   top_k, top_p):
        cache = [
            {
                name: jax.lax.dynamic_update_slice(layer[name], prefix_layer[name].astype(layer[name].dtype),
                                                   (slot, 0, 0, 0))
                for name in ("k", "v")
            }
            for layer, prefix_layer in zip(state.cache, prefix_cache)
        ]
        return DecodeState(
            cache=cache,
            next_token=state.next_token.at[slot].set(next_token),
            next_position=state.next_position.at[slot].set(next_position),
            keys=state.keys.at[slot].set(key),
            temperature=state.temperature.at[slot].set(temperature),
            top_k=state.top_k.at[slot].set(top_k),
            top_p=state.top_p.at[slot].set(top_p),
        )

    def _mask_padded_vocab(self, logits_SxV):
        valid = self.sampler_config.valid_vocab_size
        if valid is None or valid >= logits_SxV.shape[-1]:
            return logits_SxV
        return jnp.where(jnp.arange(logits_SxV.shape[-1]) < valid, logits_SxV, -jnp.inf)

    def _generate_fn(self, params, state: DecodeState):
        hidden_Sx1xD, head, cache = forward_hidden_with_cache(
            params, self.config, state.next_token[:, None], state.next_position[:, None], state.cache
        )
        logits_SxV = self._mask_padded_vocab(logits_from_hidden(hidden_Sx1xD[:, 0], head, self.config))
        sampled_position_S = state.next_position + 1
        token_keys = jax.vmap(jax.random.fold_in)(state.keys, sampled_position_S)
        result = TokenResult(*sample_tokens(logits_SxV, token_keys, state.temperature, state.top_k, state.top_p))
        # Idle slots keep stepping; clamp so their positions never run past the cache.
        next_position = jnp.minimum(sampled_position_S, self.max_sequence_length - 1)
        return state._replace(cache=cache, next_token=result.token, next_position=next_position), result

    # ---- public API ---------------------------------------------------------------------------

    def load_params(self, params):
        """Places new weights on the engine's shardings; shapes and dtypes must match, so no jitted
        function recompiles."""
        expected = jax.tree.structure(self.param_shardings)
        if jax.tree.structure(params) != expected:
            raise ValueError("params do not match the engine's model structure")
        dtype = self.config.param_dtype
        return jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params), self.param_shardings)

    def init_decode_state(self) -> DecodeState:
        return self._init_state()

    def prefix_length(self, prompt_length: int) -> int:
        """Cache rows a prefix of this prompt occupies: its bucket, or whole chunks."""
        for bucket in self.buckets:
            if prompt_length <= bucket:
                return bucket
        chunk = self.buckets[-1]
        return min(math.ceil(prompt_length / chunk) * chunk, self.max_sequence_length)

    def prefill(self, params, tokens, true_length: int | None = None,
                sampling: SamplingParams = SamplingParams(), sample_index: int = 0):
        """Prefills one prompt; returns (Prefix, TokenResult of its first sampled token)."""
        prefix = self.prefill_prefix(params, tokens, true_length, sampling)
        return prefix, self.sample_first(prefix, [sampling], [sample_index])

    def prefill_prefix(self, params, tokens, true_length: int | None = None,
                       sampling: SamplingParams = SamplingParams()) -> Prefix:
        """Prefills one prompt without sampling: callers that draw several first tokens from one
        prefix (`sample_first`) need no extra draw. `sampling` is validated with the prompt."""
        tokens = np.asarray(tokens)
        true_length = int(tokens.size if true_length is None else true_length)
        prompt = self.validate_request(tokens[:true_length], sampling)
        rows = self.prefix_length(true_length)
        chunk = min(rows, self.buckets[-1])
        padded = np.zeros(rows, np.int32)
        padded[:true_length] = prompt
        cache = init_cache(self.config, 1, rows)
        logits_V = None
        for start in range(0, true_length, chunk):
            stop = start + chunk
            positions = np.arange(start, stop, dtype=np.int32)[None]
            last_index = min(true_length, stop) - 1 - start
            cache, logits_V = self._prefill_chunk(params, padded[None, start:stop], positions, cache,
                                                  np.int32(last_index))
        return Prefix(cache=cache, true_length=true_length, logits=logits_V)

    def sample_first(self, prefix: Prefix, samplings: list[SamplingParams], sample_indices: list[int]) -> TokenResult:
        """First generated token of each (sampling, sample index) from one prefix: n samples of
        one prompt share one prefill."""
        keys = jnp.stack([request_key(s.seed, i) for s, i in zip(samplings, sample_indices)])
        positions = jnp.full(len(samplings), prefix.true_length, jnp.int32)
        return self._sample_first(prefix.logits, keys, positions, *_sampling_arrays(samplings))

    def insert(self, prefix: Prefix, state: DecodeState, slot: int, sampling: SamplingParams,
               first_token: int, sample_index: int = 0) -> DecodeState:
        """Puts a prefix into `slot`; `first_token` (from prefill / sample_first) is decoded next."""
        if not 0 <= slot < self.sampler_config.max_slots:
            raise ValueError(f"slot {slot} outside [0, {self.sampler_config.max_slots})")
        temperature, top_k, top_p = _sampling_arrays([sampling])
        return self._insert(
            state, prefix.cache, np.int32(slot), np.int32(first_token), np.int32(prefix.true_length),
            request_key(sampling.seed, sample_index), temperature[0], top_k[0], top_p[0],
        )

    def bulk_insert(self, prefix: Prefix, state: DecodeState, slots: list[int], samplings: list[SamplingParams],
                    first_tokens: list[int], sample_indices: list[int]) -> DecodeState:
        """Inserts one prefix into several slots (n samples of one prompt)."""
        for slot, sampling, token, index in zip(slots, samplings, first_tokens, sample_indices, strict=True):
            state = self.insert(prefix, state, slot, sampling, token, index)
        return state

    def generate(self, params, state: DecodeState) -> tuple[DecodeState, TokenResult]:
        """One decode step for every slot; returns the new state and each slot's sampled token."""
        return self._generate(params, state)

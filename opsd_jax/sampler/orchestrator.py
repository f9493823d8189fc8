"""Continuous batching over an Engine, in the shape of JetStream's orchestrator.

One loop thread owns the engine and the decode state: it admits requests from a thread-safe queue
into free slots (one prefill per prompt, shared by its n samples), steps every slot at once, and
frees a slot the moment its sequence stops, refilling it on the next turn. Callers get futures;
`generate_batch` returns completions in request order. A request that fails validation fails
alone; an engine failure fails only the requests in flight at that moment.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading

import jax
import numpy as np
from tqdm.auto import tqdm

from opsd_jax.sampler.engine import Engine, RequestError
from opsd_jax.sampler.sampling import SamplingParams


@dataclasses.dataclass
class Completion:
    """One generated sequence. Per-token lists are aligned with `token_ids`."""

    prompt_token_ids: list[int]
    sample_index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    sampled_logprobs: list[float] = dataclasses.field(default_factory=list)
    model_logprobs: list[float] = dataclasses.field(default_factory=list)
    entropies: list[float] = dataclasses.field(default_factory=list)
    # The raw model's most likely alternatives at each position: [(token id, logprob), ...].
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token, included) or "length"


@dataclasses.dataclass
class _Request:
    prompt: np.ndarray
    sampling: SamplingParams
    n: int
    future: concurrent.futures.Future
    completions: list[Completion | None] = dataclasses.field(default_factory=list)
    remaining: int = 0
    on_token: object = None  # called with no arguments after each accepted token (progress)
    should_stop: object = None  # called with the token ids so far; True ends the sequence ("stop")


class Orchestrator:
    """Serves generation requests on an Engine with continuous batching."""

    def __init__(self, engine: Engine, params):
        self.engine = engine
        self._params = engine.load_params(params)
        self._pending_params = None
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        # Decode steps taken and slot-steps that carried a live sequence: utilization = ratio / slots.
        self.stats = {"decode_steps": 0, "active_slot_steps": 0, "prefills": 0}
        self._thread = threading.Thread(target=self._loop, name="opsd-sampler", daemon=True)
        self._thread.start()

    # ---- callers' side ------------------------------------------------------------------------

    def submit(self, prompt_ids, sampling: SamplingParams = SamplingParams(), n: int = 1,
               on_token=None, should_stop=None) -> concurrent.futures.Future:
        """Queues one prompt for n samples; the future resolves to n Completions (or raises
        RequestError for a request the engine cannot serve). `should_stop(token_ids)` lets a
        caller end a sequence early (stop strings); it runs on the sampler thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not isinstance(n, int) or n < 1:
            future.set_exception(RequestError(f"n must be a positive integer, got {n!r}"))
            return future
        with self._lock:
            if self._closed:
                raise RuntimeError("orchestrator is closed")
            self._queue.put(
                _Request(np.asarray(prompt_ids), sampling, n, future, on_token=on_token, should_stop=should_stop)
            )
        return future

    def generate_batch(self, prompts, sampling: SamplingParams | list[SamplingParams] = SamplingParams(),
                       n: int = 1, progress: bool = True, return_exceptions: bool = False):
        """Generates for every prompt; returns one list of n Completions per prompt, in order.

        With `return_exceptions`, a failed request's slot in the result holds its exception
        instead of raising after the others finish.
        """
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise ValueError(f"{len(samplings)} sampling settings for {len(prompts)} prompts")
        total_tokens = sum(s.max_new_tokens for s in samplings) * n
        bar = tqdm(total=total_tokens, desc="sampling", unit="tok", disable=not progress)
        futures = [self.submit(p, s, n, on_token=bar.update) for p, s in zip(prompts, samplings)]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as e:  # noqa: BLE001 - reported per request
                if not return_exceptions:
                    bar.close()
                    raise
                results.append(e)
        bar.close()
        return results

    def load_params(self, params) -> None:
        """New weights, placed on the engine's shardings and used from the next prefill or decode
        step on (sequences in flight continue with them; call between batches for on-policy
        rollouts)."""
        placed = self.engine.load_params(params)
        with self._lock:
            self._pending_params = placed

    def slot_utilization(self) -> float:
        """Share of decode slot-steps that advanced a live sequence (0 before any step)."""
        steps = self.stats["decode_steps"] * self.engine.sampler_config.max_slots
        return self.stats["active_slot_steps"] / steps if steps else 0.0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the loop thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        state = engine.init_decode_state()
        free_slots = collections.deque(range(engine.sampler_config.max_slots))
        active: dict[int, tuple[_Request, int]] = {}  # slot -> (request, sample index)
        # Prefilled prompts whose samples still wait for a slot: (request, prefix, [(index, first token)]).
        waiting: collections.deque = collections.deque()
        stopping = False
        while True:
            self._apply_pending_params()
            while free_slots and (waiting or (not stopping and not self._queue.empty())):
                if not waiting:
                    request = self._queue.get()
                    if request is None:
                        stopping = True
                        break
                    waiting.extend(self._prefill(request))
                    continue
                request, prefix, samples = waiting[0]
                index, first = samples.pop(0)
                if not samples:
                    waiting.popleft()
                slot = free_slots.popleft()
                try:
                    state = engine.insert(prefix, state, slot, request.sampling, int(first.token), index)
                except Exception as e:  # noqa: BLE001 - isolate the failing request
                    free_slots.append(slot)
                    self._fail(request, e)
                    continue
                active[slot] = (request, index)
            if not active:
                if waiting:
                    continue
                if stopping:
                    return
                request = self._queue.get()  # idle: block until there is work
                if request is None:
                    return
                waiting.extend(self._prefill(request))
                continue
            try:
                state, result = engine.generate(self._params, state)
                result = jax.device_get(result)
                self.stats["decode_steps"] += 1
                self.stats["active_slot_steps"] += len(active)
            except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
                for request, _ in active.values():
                    self._fail(request, e)
                free_slots.extend(active)
                active.clear()
                state = engine.init_decode_state()
                continue
            for slot in list(active):
                request, index = active[slot]
                if request.future.done():  # failed elsewhere
                    del active[slot]
                    free_slots.append(slot)
                    continue
                if self._record(request, index, _TokenRow(result, slot)):
                    del active[slot]
                    free_slots.append(slot)

    def _apply_pending_params(self) -> None:
        with self._lock:
            if self._pending_params is not None:
                self._params, self._pending_params = self._pending_params, None

    def _prefill(self, request: _Request):
        """Prefills once for all n samples; samples that finish on their first token never take a
        slot. Returns the waiting entry, or nothing if the request is done or failed."""
        self._apply_pending_params()
        try:
            prefix = self.engine.prefill_prefix(self._params, request.prompt, sampling=request.sampling)
            self.stats["prefills"] += 1
            samplings = [request.sampling] * request.n
            first = jax.device_get(self.engine.sample_first(prefix, samplings, list(range(request.n))))
        except Exception as e:  # noqa: BLE001 - isolate the failing request
            self._fail(request, e)
            return []
        request.completions = [None] * request.n
        request.remaining = request.n
        samples = []
        for index in range(request.n):
            token = _TokenRow(first, index)
            if not self._record(request, index, token):
                samples.append((index, token))
        return [(request, prefix, samples)] if samples else []

    def _record(self, request: _Request, index: int, token) -> bool:
        completion = request.completions[index]
        if completion is None:
            completion = Completion(prompt_token_ids=request.prompt.tolist(), sample_index=index)
            request.completions[index] = completion
        completion.token_ids.append(int(token.token))
        completion.sampled_logprobs.append(float(token.sampled_logprob))
        completion.model_logprobs.append(float(token.model_logprob))
        completion.entropies.append(float(token.entropy))
        completion.top_logprobs.append(list(zip(token.top_ids.tolist(), token.top_logprobs.tolist())))
        if request.on_token is not None:
            request.on_token()
        if int(token.token) in request.sampling.stop_token_ids:
            completion.finish_reason = "stop"
        elif request.should_stop is not None and self._stop_requested(request, completion):
            completion.finish_reason = "stop"
        elif len(completion.token_ids) >= request.sampling.max_new_tokens:
            completion.finish_reason = "length"
        else:
            return False
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            request.future.set_result(request.completions)
        return True

    def _stop_requested(self, request: _Request, completion: Completion) -> bool:
        try:
            return bool(request.should_stop(completion.token_ids))
        except Exception as e:  # noqa: BLE001 - a caller's callback fails only its request
            self._fail(request, e)
            return True

    @staticmethod
    def _fail(request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)


class _TokenRow:
    """Row `index` of a TokenResult (host arrays)."""

    __slots__ = ("token", "sampled_logprob", "model_logprob", "entropy", "top_ids", "top_logprobs")

    def __init__(self, result, index: int):
        self.token = result.token[index]
        self.sampled_logprob = result.sampled_logprob[index]
        self.model_logprob = result.model_logprob[index]
        self.entropy = result.entropy[index]
        self.top_ids = result.top_ids[index]
        self.top_logprobs = result.top_logprobs[index]

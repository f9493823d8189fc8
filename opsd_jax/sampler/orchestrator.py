"""Continuous batching over an Engine, in the shape of JetStream's orchestrator.

One loop thread owns the engine, the decode state and the page pool. Each turn it
- drops cancelled requests (their slots and pages are free before the next step),
- admits waiting sequences into free slots: preempted ones first, then the samples of prefilled
  prompts (the n samples of a prompt share its full pages; each copies only the partly filled
  last one),
- prefills one chunk of the next prompts per free slot (a whole prompt when nothing decodes), so
  empty slots fill before the next step and long prompts interleave with decoding instead of
  stalling it,
- gives every decoding sequence the page its next row needs; when the pool is dry it preempts the
  most recently admitted sequence, whose pages are freed and which later resumes by prefilling
  what it had (its tokens do not change: each token's key depends only on its position),
- dispatches the decode step, and only then reads the previous step's tokens, so the host's
  per-token work overlaps the device's next step.

Callers get futures; `generate_batch` returns completions in request order. A request that fails
validation fails alone. If the loop itself fails, every request queued or in flight fails with
`SamplerCrashed`, `healthy` turns False and later submissions raise: nothing hangs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import queue
import threading

import jax
import numpy as np
from tqdm.auto import tqdm

from opsd_jax.models.paged import NULL_PAGE
from opsd_jax.sampler.engine import Engine, RequestError, alternatives_for
from opsd_jax.sampler.pages import PageAllocator
from opsd_jax.sampler.sampling import SamplingParams


class SamplerCrashed(RuntimeError):
    """The sampler's loop thread died; the message names the cause."""


class OrchestratorClosed(RuntimeError):
    """The orchestrator is draining or closed and admits no new requests."""


@dataclasses.dataclass
class Completion:
    """One generated sequence. Per-token lists are aligned with `token_ids`."""

    prompt_token_ids: list[int]
    sample_index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    sampled_logprobs: list[float] = dataclasses.field(default_factory=list)
    model_logprobs: list[float] = dataclasses.field(default_factory=list)
    entropies: list[float] = dataclasses.field(default_factory=list)
    # With SamplingParams.top_logprobs > 0, the raw model's most likely alternatives at each
    # position: [(token id, logprob), ...]; empty otherwise.
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token, included) or "length"
    # `Orchestrator.weight_version` when the first token was sampled; weights loaded later apply
    # from the next step on, so a sequence in flight across a load spans both.
    weight_version: int = 0


@dataclasses.dataclass
class _Request:
    prompt: np.ndarray
    sampling: SamplingParams
    n: int
    future: concurrent.futures.Future
    completions: list[Completion | None] = dataclasses.field(default_factory=list)
    remaining: int = 0
    on_token: object = None  # called as on_token(sample index, completion) after each token
    should_stop: object = None  # called with the token ids so far; True ends the sequence ("stop")
    sample_seeds: tuple[int, ...] | None = None

    def sample(self, index: int) -> tuple[SamplingParams, int]:
        """(sampling, key index) of sample `index`: sample i of a request draws with
        request_key(seed, i), or, with per-sample seeds, exactly as an n=1 request with seed
        sample_seeds[i] would."""
        if self.sample_seeds is None:
            return self.sampling, index
        return dataclasses.replace(self.sampling, seed=self.sample_seeds[index]), 0


@dataclasses.dataclass
class _Sequence:
    """One sample decoding in a slot (or preempted, waiting to resume)."""

    request: _Request
    index: int
    pages: list[int]  # the slot's page table prefix; one holder each
    next_position: int  # row the next fed token is written at
    admitted: int  # admission order: the newest is preempted first
    finished: bool = False  # done, cancelled or preempted: results for it are ignored
    window: dict = dataclasses.field(default_factory=dict)  # page index -> page of the sliding-window pool

    @property
    def completion(self) -> Completion:
        return self.request.completions[self.index]

    @property
    def last_row(self) -> int:
        """The last cache row this sequence can ever write (its last token is never fed)."""
        return self.request.prompt.size + self.request.sampling.max_new_tokens - 2


@dataclasses.dataclass
class _Prefill:
    """A prompt being prefilled chunk by chunk, or prefilled and waiting for slots."""

    request: _Request
    pages: list[int]
    next_start: int = 0
    samples: list = dataclasses.field(default_factory=list)  # [(index, first token row)] not yet in slots
    window: dict = dataclasses.field(default_factory=dict)  # page index -> page of the sliding-window pool


class Orchestrator:
    """Serves generation requests on an Engine with continuous batching."""

    def __init__(self, engine: Engine, params, *, warmup: bool = True):
        self.engine = engine
        self._params = engine.load_params(params)
        self._pending_params = None
        self.weight_version = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._live: set[concurrent.futures.Future] = set()
        self._draining = False
        self._deadline_passed = threading.Event()
        self.error: BaseException | None = None
        self._warmup = warmup
        # decode_steps and active_slot_steps give utilization; prefills counts prompts prefilled
        # (resumes excluded); preemptions counts sequences evicted for pages.
        # live_token_steps sums the cache rows live sequences hold over decode steps (mean live
        # tokens = live_token_steps / decode_steps).
        self.stats = {"decode_steps": 0, "active_slot_steps": 0, "live_token_steps": 0, "prefills": 0,
                      "prefill_chunks": 0, "preemptions": 0, "active_slots": 0, "peak_pages_in_use": 0}
        self._thread = threading.Thread(target=self._run, name="opsd-sampler", daemon=True)
        self._thread.start()

    # ---- callers' side ------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, prompt_ids, sampling: SamplingParams = SamplingParams(), n: int = 1,
               on_token=None, should_stop=None, sample_seeds=None) -> concurrent.futures.Future:
        """Queues one prompt for n samples, prefilled once; the future resolves to n Completions
        (or raises RequestError for a request the engine cannot serve). `sample_seeds` (n
        integers) makes sample i identical to an n=1 request with seed sample_seeds[i].
        `on_token(index, completion)` runs on the sampler thread after each token of sample
        `index` (finish_reason already set on the last); `should_stop(token_ids)` lets a caller
        end a sequence early (stop strings). Either raising fails the request.
        `future.cancel()` cancels all n samples."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            future.set_exception(RequestError(f"n must be a positive integer, got {n!r}"))
            return future
        if sample_seeds is not None:
            sample_seeds = tuple(sample_seeds)
            if len(sample_seeds) != n:
                future.set_exception(RequestError(f"{len(sample_seeds)} sample_seeds for n={n} samples"))
                return future
        with self._lock:
            if self.error is not None:
                raise SamplerCrashed(f"the sampler loop failed: {self.error!r}")
            if self._draining:
                raise OrchestratorClosed("the orchestrator is draining or closed and admits no new requests")
            self._live.add(future)
            future.add_done_callback(self._forget)
            self._queue.put(
                _Request(np.asarray(prompt_ids), sampling, n, future, on_token=on_token, should_stop=should_stop,
                         sample_seeds=sample_seeds)
            )
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._live.discard(future)

    def active_requests(self) -> int:
        """Requests queued or in flight."""
        with self._lock:
            return len(self._live)

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
        futures = [self.submit(p, s, n, on_token=lambda _i, _c: bar.update()) for p, s in zip(prompts, samplings)]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as e:
                if not return_exceptions:
                    bar.close()
                    raise
                results.append(e)
        bar.close()
        return results

    def load_params(self, params) -> None:
        """New weights, placed on the engine's shardings and used from the next prefill or decode
        step on (sequences in flight continue with them; call between batches for on-policy
        rollouts). Completions record the version they started with."""
        placed = self.engine.load_params(params)
        with self._lock:
            self._pending_params = placed

    def current_params(self):
        """The placed weights decoding uses now (or will from the next step)."""
        with self._lock:
            return self._pending_params if self._pending_params is not None else self._params

    def slot_utilization(self) -> float:
        """Share of decode slot-steps that advanced a live sequence (0 before any step)."""
        steps = self.stats["decode_steps"] * self.engine.sampler_config.max_slots
        return self.stats["active_slot_steps"] / steps if steps else 0.0

    def drain(self) -> None:
        """Admits no new request from now on; queued and in-flight ones continue."""
        with self._lock:
            self._draining = True

    def close(self, deadline_s: float | None = None) -> None:
        """Drains, waits for queued and in-flight requests (at most `deadline_s` seconds, then
        cancels what is left) and stops the loop thread."""
        with self._lock:
            self._draining = True
            self._queue.put(None)
        self._thread.join(deadline_s)
        if self._thread.is_alive():
            self._deadline_passed.set()
            self._queue.put(None)
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - anything that kills the loop fails every request
            with self._lock:
                self.error = e
                self._draining = True
                live = list(self._live)
            crash = SamplerCrashed(f"the sampler loop failed: {e!r}")
            crash.__cause__ = e
            for future in live:
                self._set(future, exception=crash)

    def _loop(self) -> None:
        engine = self.engine
        slots = engine.sampler_config.max_slots
        state = engine.init_decode_state()
        if self._warmup:
            state = engine.warmup(self._params, state)
        self._pages = PageAllocator(engine.num_pages)
        self._window_pages = PageAllocator(engine.num_window_pages) if engine.windowed else None
        self._tables = engine.empty_page_tables(slots)
        self._free_slots = collections.deque(range(slots))
        self._active: dict[int, _Sequence] = {}
        self._incoming: collections.deque[_Request] = collections.deque()
        self._prefilling: _Prefill | None = None
        self._ready: collections.deque[_Prefill] = collections.deque()
        self._resume: collections.deque[_Sequence] = collections.deque()
        self._admissions = itertools.count()
        pending = None  # (result on device, {slot: sequence} it was dispatched for)
        sentinel_seen = False
        while True:
            self._apply_pending_params()
            if self._deadline_passed.is_set():
                self._cancel_everything()
                return
            sentinel_seen |= self._pull_requests(block=False)
            self._drop_cancelled()
            state = self._admit(state)
            # One prefill chunk per free slot (at least one): a decode step costs the same with
            # empty slots, so filling them first (the first turn of a batch prefills every
            # prompt that fits) beats decoding half-empty; with few free slots, a long prompt
            # still interleaves chunk by chunk with decoding.
            for _ in range(max(1, len(self._free_slots))):
                chunks = self.stats["prefill_chunks"]
                state = self._prefill_step(state)
                state = self._admit(state)
                if not self._free_slots or self.stats["prefill_chunks"] == chunks:
                    break
            if self._active:
                self._grow_pages()
            if self._active:
                snapshot = dict(self._active)
                samplings = [seq.request.sampling for seq in snapshot.values()]
                state, result = engine.generate(self._params, state, self._tables.copy(), alternatives_for(samplings))
                for seq in snapshot.values():
                    seq.next_position += 1
                self.stats["decode_steps"] += 1
                self.stats["active_slot_steps"] += len(snapshot)
                self.stats["live_token_steps"] += sum(seq.next_position for seq in snapshot.values())
                if pending is not None:
                    self._process(*pending)
                pending = (result, snapshot)
                self.stats["active_slots"] = len(self._active)
                continue
            if pending is not None:
                self._process(*pending)
                pending = None
                continue
            self.stats["active_slots"] = 0
            if self._prefilling is not None or self._ready or self._resume or self._incoming:
                continue
            if sentinel_seen and self._draining:
                return
            sentinel_seen |= self._pull_requests(block=True)

    def _pull_requests(self, block: bool) -> bool:
        """Moves queued requests to the loop's own deque; True if the close sentinel came."""
        seen = False
        try:
            item = self._queue.get(block=block)
            while True:
                if item is None:
                    seen = True
                else:
                    self._incoming.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return seen

    def _apply_pending_params(self) -> None:
        with self._lock:
            if self._pending_params is not None:
                self._params, self._pending_params = self._pending_params, None
                self.weight_version += 1

    # ---- admission and prefill ----------------------------------------------------------------

    def _admit(self, state):
        state = self._admit_waiting(state)
        if not self._active and self._free_slots and (self._ready or self._resume):
            # Nothing decodes, yet nothing waiting fits: prompts held for their remaining samples
            # take the pages. Those samples become sequences that prefill their own copy (any one
            # sequence fits the pool alone), so the loop always makes progress.
            while self._ready:
                self._reclaim_waiting()
            state = self._admit_waiting(state)
        return state

    def _admit_waiting(self, state):
        engine = self.engine
        while self._free_slots and self._resume:
            seq = self._resume[0]
            tokens = np.concatenate([seq.request.prompt, np.asarray(seq.completion.token_ids[:-1], np.int32)])
            windowed = self._window_pages is not None
            if windowed and self._window_pages.free < engine.window_pages_per_sequence:
                return state
            # Leave the pages decoding sequences are about to need, or it would be preempted at once.
            if self._pages.free < engine.pages_for(tokens.size + 1) + self._pages_needed_soon():
                return state
            pages = self._pages.allocate(engine.pages_for(tokens.size + 1))
            self._resume.popleft()
            seq.pages, seq.window, seq.finished = pages, {}, False
            start = 0
            while start < tokens.size:  # the window pool had room for a whole sequence's window
                state, start, _ = self._prefill_chunk(state, tokens, seq, start)
            state = self._place(state, seq, seq.completion.token_ids[-1], tokens.size)
        while self._free_slots and self._ready:
            entry = self._ready[0]
            request = entry.request
            full_pages = request.prompt.size // engine.page_size
            shared = entry.pages[:full_pages]
            own = self._pages.allocate(len(entry.pages) - len(shared))
            if own is None:
                return state
            window = {m: page for m, page in entry.window.items() if m < full_pages}
            partial = {m: page for m, page in entry.window.items() if m >= full_pages}
            own_window = self._window_pages.allocate(len(partial)) if partial else []
            if own_window is None:
                self._pages.release(own)
                return state
            index, first = entry.samples.pop(0)
            if not entry.samples:
                self._ready.popleft()
            for source, destination in zip(entry.pages[len(shared):], own):
                state = engine.copy_page(state, source, destination)
            for (m, source), destination in zip(sorted(partial.items()), own_window):
                state = engine.copy_page(state, source, destination, windowed=True)
                window[m] = destination
            self._pages.retain(shared)
            if self._window_pages is not None:
                self._window_pages.retain([page for m, page in window.items() if m < full_pages])
            if not entry.samples:
                self._release(entry)
            seq = _Sequence(request, index, shared + own, request.prompt.size, next(self._admissions), window=window)
            state = self._place(state, seq, int(first.token), request.prompt.size)
        return state

    def _tables_of(self, holder) -> np.ndarray:
        """int32[2, M]: the page tables of a sequence or prompt (full-attention pool, window pool)."""
        tables = self.engine.empty_page_tables(1)[:, 0]
        tables[0, : len(holder.pages)] = holder.pages
        if self._window_pages is None:
            tables[1] = tables[0]
        else:
            for m, page in holder.window.items():
                tables[1, m] = page
        return tables

    def _fit_window(self, holder, low_row: int, high_row: int) -> bool:
        """Keeps the window pages of rows low_row .. high_row (allocating what is missing) and
        releases those wholly before; False, with nothing allocated, when the pool is dry."""
        if self._window_pages is None:
            return True
        size = self.engine.page_size
        first, last = low_row // size, high_row // size
        behind = [m for m in holder.window if m < first]
        self._window_pages.release([holder.window.pop(m) for m in behind])
        missing = [m for m in range(first, last + 1) if m not in holder.window]
        if not missing:
            return True
        pages = self._window_pages.allocate(len(missing))
        if pages is None:
            return False
        holder.window.update(zip(missing, pages))
        return True

    def _prefill_chunk(self, state, tokens: np.ndarray, holder, start: int):
        """One prefill chunk of `tokens` into the pages of `holder` (a prompt job or a resumed
        sequence); returns (state, next start, logits at the last token once done), or None
        when the window pool cannot hold the chunk yet."""
        engine = self.engine
        low, high = engine.chunk_rows(tokens.size, start)
        window = self.engine.config.sliding_window or 0
        if not self._fit_window(holder, max(0, low - window + 1), min(high, tokens.size) - 1):
            return None
        self.stats["prefill_chunks"] += 1
        return engine.prefill_chunk(self._params, state, tokens, self._tables_of(holder), start)

    def _release(self, holder) -> None:
        """Drops `holder`'s hold on its pages in both pools."""
        self._pages.release(holder.pages)
        holder.pages = []
        if self._window_pages is not None:
            self._window_pages.release(list(holder.window.values()))
        holder.window = {}

    def _place(self, state, seq: _Sequence, next_token: int, next_position: int):
        slot = self._free_slots.popleft()
        seq.next_position = next_position
        self._tables[:, slot] = self._tables_of(seq)
        self._active[slot] = seq
        sampling, key_index = seq.request.sample(seq.index)
        return self.engine.insert(state, slot, sampling, next_token, next_position, key_index)

    def _prefill_step(self, state):
        """One prefill chunk (the whole prompt when nothing decodes) of the next prompt."""
        engine = self.engine
        if self._prefilling is None:
            # Samples still waiting for a slot, or preempted sequences waiting for pages, come
            # before a new prompt (which would take the pages they wait for).
            if not self._incoming or self._ready or self._resume:
                return state
            request = self._incoming[0]
            if request.future.done():
                self._incoming.popleft()
                return state
            try:
                prompt = engine.validate_request(request.prompt, request.sampling)
                for index in range(request.n if request.sample_seeds is not None else 0):
                    engine.validate_request(prompt, request.sample(index)[0])
            except RequestError as e:
                self._incoming.popleft()
                self._set(request.future, exception=e)
                return state
            if self._pages.free < engine.pages_for(prompt.size) + self._pages_needed_soon():
                return state  # wait until decoding sequences leave room
            pages = self._pages.allocate(engine.pages_for(prompt.size))
            self._incoming.popleft()
            request.prompt = prompt
            self._prefilling = _Prefill(request, pages)
        job = self._prefilling
        request = job.request
        while True:
            done = self._prefill_chunk(state, request.prompt, job, job.next_start)
            if done is None:
                return state  # the window pool is dry: decoding sequences free it as they move on
            state, job.next_start, logits_V = done
            if logits_V is not None or self._active:
                break
        if logits_V is None:
            return state
        self._prefilling = None
        self.stats["prefills"] += 1
        samplings, key_indices = zip(*(request.sample(i) for i in range(request.n)))
        first = jax.device_get(engine.sample_first(logits_V, request.prompt.size, list(samplings), list(key_indices)))
        request.completions = [
            Completion(prompt_token_ids=request.prompt.tolist(), sample_index=i, weight_version=self.weight_version)
            for i in range(request.n)
        ]
        request.remaining = request.n
        for index in range(request.n):
            token = _TokenRow(first, index)
            if not self._record(request, index, token):
                job.samples.append((index, token))
        if job.samples:
            self._ready.append(job)
        else:
            self._release(job)
        return state

    # ---- decoding -------------------------------------------------------------------------------

    def _grow_pages(self) -> None:
        """Gives every decoding sequence the pages its next row needs (in both pools; window
        pages left behind the window are released), preempting the newest sequences while a pool
        is dry."""
        size = self.engine.page_size
        window = self.engine.config.sliding_window or 0
        for slot in sorted(self._active, key=lambda s: self._active[s].admitted):
            seq = self._active.get(slot)
            if seq is None:
                continue
            row = seq.next_position
            if row > seq.last_row:
                continue
            while True:
                if row // size >= len(seq.pages):
                    page = self._pages.allocate(1)
                    if page is not None:
                        seq.pages += page
                if row // size < len(seq.pages) and self._fit_window(seq, max(0, row - window + 1), row):
                    self._tables[:, slot] = self._tables_of(seq)
                    break
                if self._reclaim_waiting():
                    continue
                newest = max(self._active, key=lambda s: self._active[s].admitted)
                self._preempt(newest)
                if newest == slot:
                    break

    def _pages_needed_soon(self) -> int:
        """Pages decoding sequences take within the next two steps (the one in flight and the next)."""
        size = self.engine.page_size
        return sum(1 for seq in self._active.values()
                   if min(seq.next_position + 2, seq.last_row) // size >= len(seq.pages))

    def _reclaim_waiting(self) -> bool:
        """Frees pages held for work that has not started decoding (cheaper to redo than a
        decoding sequence): the newest prompt held for its waiting samples (which then resume on
        their own), else the prompt being prefilled (which starts over later). False if none."""
        if self._ready:
            entry = self._ready.pop()
            self._release(entry)
            for index, _ in entry.samples:
                self._resume.append(_Sequence(entry.request, index, [], 0, next(self._admissions)))
            return True
        if self._prefilling is not None:
            job, self._prefilling = self._prefilling, None
            self._release(job)
            self._incoming.appendleft(job.request)
            return True
        return False

    def _preempt(self, slot: int) -> None:
        seq = self._release_slot(slot)
        seq.finished = True  # its in-flight token is recomputed on resume
        self._resume.appendleft(seq)
        self.stats["preemptions"] += 1

    def _release_slot(self, slot: int) -> _Sequence:
        seq = self._active.pop(slot)
        self._release(seq)
        self._tables[:, slot] = NULL_PAGE
        self._free_slots.append(slot)
        return seq

    def _process(self, result, snapshot: dict[int, _Sequence]) -> None:
        result = jax.device_get(result)
        self.stats["peak_pages_in_use"] = self._pages.peak_in_use
        if self._window_pages is not None:
            self.stats["peak_window_pages_in_use"] = self._window_pages.peak_in_use
        for slot, seq in snapshot.items():
            if seq.finished:
                continue
            if self._record(seq.request, seq.index, _TokenRow(result, slot)):
                seq.finished = True
                if self._active.get(slot) is seq:
                    self._release_slot(slot)

    def _drop_cancelled(self) -> None:
        """Frees everything held by requests whose future is done (cancelled, or failed)."""
        for slot in [s for s, seq in self._active.items() if seq.request.future.done()]:
            self._release_slot(slot).finished = True
        for entry in [e for e in self._ready if e.request.future.done()]:
            self._ready.remove(entry)
            self._release(entry)
        if self._prefilling is not None and self._prefilling.request.future.done():
            self._release(self._prefilling)
            self._prefilling = None
        self._resume = collections.deque(seq for seq in self._resume if not seq.request.future.done())

    def _cancel_everything(self) -> None:
        """Past close()'s deadline: every request not finished is cancelled."""
        self._pull_requests(block=False)
        held = [seq.request for seq in self._active.values()] + [e.request for e in self._ready]
        held += [seq.request for seq in self._resume] + list(self._incoming)
        if self._prefilling is not None:
            held.append(self._prefilling.request)
        for request in held:
            request.future.cancel()

    # ---- results --------------------------------------------------------------------------------

    def _record(self, request: _Request, index: int, token) -> bool:
        """Appends one token to sample `index`; True if that sample is finished (or failed)."""
        if request.future.done():
            return True
        completion = request.completions[index]
        completion.token_ids.append(int(token.token))
        completion.sampled_logprobs.append(float(token.sampled_logprob))
        completion.model_logprobs.append(float(token.model_logprob))
        completion.entropies.append(float(token.entropy))
        wanted = request.sampling.top_logprobs
        if wanted:
            completion.top_logprobs.append(list(zip(token.top_ids[:wanted].tolist(),
                                                    token.top_logprobs[:wanted].tolist())))
        if int(token.token) in request.sampling.stop_token_ids or request.should_stop is not None and self._callback(request, request.should_stop, completion.token_ids):
            completion.finish_reason = "stop"
        elif len(completion.token_ids) >= request.sampling.max_new_tokens:
            completion.finish_reason = "length"
        if request.on_token is not None and not request.future.done():
            self._callback(request, request.on_token, index, completion)
        if request.future.done():
            return True
        if completion.finish_reason is None:
            return False
        request.remaining -= 1
        if request.remaining == 0:
            self._set(request.future, result=request.completions)
        return True

    def _callback(self, request: _Request, function, *args) -> bool:
        try:
            return bool(function(*args))
        except Exception as e:  # noqa: BLE001 - a caller's callback fails only its request
            self._set(request.future, exception=e)
            return True

    @staticmethod
    def _set(future, result=None, exception=None) -> None:
        """Resolves a future unless it is already done (a caller may cancel at any moment)."""
        try:
            if exception is not None:
                future.set_exception(exception)
            else:
                future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass


class _TokenRow:
    """Row `index` of a TokenResult (host arrays)."""

    __slots__ = ("entropy", "model_logprob", "sampled_logprob", "token", "top_ids", "top_logprobs")

    def __init__(self, result, index: int):
        self.token = result.token[index]
        self.sampled_logprob = result.sampled_logprob[index]
        self.model_logprob = result.model_logprob[index]
        self.entropy = result.entropy[index]
        self.top_ids = result.top_ids[index]
        self.top_logprobs = result.top_logprobs[index]


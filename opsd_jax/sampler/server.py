"""OpenAI-compatible HTTP server over the orchestrator, on FastAPI + uvicorn: /v1/completions,
/v1/chat/completions, /v1/models and /health. Bound to 127.0.0.1 unless told otherwise.

Request bodies are pydantic models that reject unknown fields (400 naming the field); common
OpenAI fields that change nothing here (`user`, an empty `logit_bias`, zero penalties, ...) are
accepted, and values this server cannot honour are refused with 400 naming the field. vLLM's
conventions hold: `top_k` -1 (or 0) is off, any integer seed is accepted (taken modulo 2**63),
`max_tokens: null` generates as many tokens as fit in the sequence budget, `stop` takes any
number of strings, chat content may be a list of text parts.

`stream: true` answers with server-sent events in OpenAI's chunk format, ending with
`data: [DONE]` (`stream_options.include_usage` adds a last chunk with the usage). A client that
disconnects, streaming or not, cancels its requests and frees their slots. `echo` on completions
returns the prompt's tokens and, with `logprobs`, their log-probabilities (None for the first;
scored by one forward pass with the weights decoding uses, scoring.py) followed by the generated
tokens' (a generated stop token included, though not in the text, so that every token is
scored); with `max_tokens: 0` nothing is generated. lm-evaluation-harness's `local-completions`
loglikelihood requests are of this kind.
A draining or closed sampler answers 503; a request the sampler fails answers 500 naming the cause.

Extensions beyond OpenAI's fields: `top_k` (sampling), `chat_template_kwargs` (e.g.
{"enable_thinking": false} for Qwen3), and per-token `sampled_logprobs` (under the distribution
actually sampled from) and `entropies` (of the model distribution) in each choice's logprobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import re
import secrets
import socket
import threading
import time
import uuid
from typing import Any, Literal

import fastapi
import pydantic
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from opsd_jax.sampler.engine import RequestError
from opsd_jax.sampler.orchestrator import Orchestrator, OrchestratorClosed, SamplerCrashed
from opsd_jax.sampler.sampling import TOP_LOGPROBS, SamplingParams
from opsd_jax.sampler.scoring import PromptScorer

MAX_N = 128


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {404: "not_found_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error" if 400 <= status < 500 else "server_error")

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class _ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


# ---- request models ------------------------------------------------------------------------------


class _Strict(pydantic.BaseModel):
    # strict: JSON true is no token id and "4" no max_tokens (an integer still passes as a float)
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; usage is reported once, at the end


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at values that change nothing (checked in `_sampling`).
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # other part types are refused by name below

    type: str
    text: str | None = None


class ChatMessage(pydantic.BaseModel):
    # Extra keys (name, tool_calls, reasoning_content, ...) reach the chat template unchanged.
    model_config = pydantic.ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None only for an assistant turn (checked below)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None


_FIELD_HINTS = {
    "prompt": "prompt must be a string, a list of strings, or token id list(s)",
    "messages": "messages must be a non-empty list of {role, content} objects (content: a string or a list "
                "of text parts)",
}


def _validation_error(error: pydantic.ValidationError | fastapi.exceptions.RequestValidationError) -> APIError:
    """The first problem, naming the field."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return _bad(f"request body is not valid JSON: {first.get('msg')}")
    # Union members add their type names to the location (e.g. prompt.list[int].0): keep the fields.
    fields = [part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int")]
    param = ".".join(fields) or None
    if kind == "extra_forbidden":
        return _bad(f"unknown field {param!r} (this server does not support it)", param)
    if kind == "missing":
        return _bad(f"{param} is required", param)
    if fields and fields[0] in _FIELD_HINTS:
        return _bad(_FIELD_HINTS[fields[0]], fields[0])
    return _bad(f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str | None = None) -> bytes:
    """The token's own bytes, as OpenAI's `bytes` field means them: consecutive tokens' bytes join
    into the text. A token holding part of a multi-byte character decodes alone to U+FFFD, whose
    UTF-8 is not its bytes; those come from its vocabulary piece (a byte-level BPE alphabet, or a
    SentencePiece byte-fallback `<0xNN>`)."""
    text = tokenizer.decode([token_id]) if text is None else text
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    fallback = _BYTE_FALLBACK_PIECE.fullmatch(piece or "")
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    byte_of_char = _byte_of_char()
    if piece and all(char in byte_of_char for char in piece):
        return bytes(byte_of_char[char] for char in piece)
    return text.encode()


def stop_string_check(tokenizer, stops: list[str]):
    """`should_stop(token_ids)` for the orchestrator: True once the generated text holds a stop
    string (None without stops). It decodes only a window of the latest tokens, so it reads only
    the part of that window the finished text will read the same way: a window that starts inside
    a multi-byte character decodes U+FFFD at its start, and a character whose bytes have not all
    arrived decodes U+FFFD at its end. Either would match a stop string holding U+FFFD that the
    finished text does not contain, and end the sequence with a different text than the one the
    same generation without stops gives. A genuine U+FFFD is still read a token later (at the end)
    or was read earlier (at the start); the finished text is cut by `_finish` in any case."""
    if not stops:
        return None
    window = max(len(s) for s in stops) + 16  # tokens: at least one character each

    def should_stop(token_ids):
        tail = tokenizer.decode(token_ids[-window:], skip_special_tokens=True).rstrip("\ufffd")
        if len(token_ids) > window:
            tail = tail.lstrip("\ufffd")
        return any(s in tail for s in stops)

    return should_stop


def _parse(model: type[pydantic.BaseModel], raw: bytes):
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise _validation_error(e) from None


def _number(value, name: str, default, low=None, high=None, low_open=False):
    if value is None:
        return default
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{name} must be finite, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise _bad(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}", name)
    if high is not None and value > high:
        raise _bad(f"{name} must be <= {high}, got {value!r}", name)
    return value


def _require_default(body, name: str, allowed) -> None:
    value = getattr(body, name)
    if value is not None and value not in allowed:
        raise _bad(f"{name}={value!r} is not supported by this server (only {allowed[0]!r})", name)


# ---- text of one streamed choice -----------------------------------------------------------------


class _ChoiceText:
    """Turns one completion's tokens into text as they arrive: detokenizes incrementally (holding
    back an incomplete UTF-8 character), drops stop tokens, cuts at the first stop string, and
    holds back a tail that could still become a stop string. `take()` returns what may be sent."""

    def __init__(self, tokenizer, stop_token_ids, stops: list[str]):
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []  # visible tokens (stop tokens dropped)
        self.positions: list[int] = []  # each visible token's index in the completion
        self.ends: list[int] = []  # text length once each visible token was read
        self.text = ""
        self.seen = 0  # completion tokens consumed
        self.cut: int | None = None  # where a stop string begins
        self._searched = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self.sent_chars = 0
        self.sent_tokens = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _read(self, flush: bool = False) -> None:
        before = self._decode(self.ids[self._prefix_offset:self._read_offset])
        after = self._decode(self.ids[self._prefix_offset:])
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def feed(self, completion, count: int) -> None:
        """Reads the completion's tokens up to `count` (those its on_token call announced)."""
        while self.seen < count and self.cut is None:
            token = completion.token_ids[self.seen]
            position = self.seen
            self.seen += 1
            if token in self.stop_token_ids:
                continue
            self.ids.append(token)
            self.positions.append(position)
            self._read()
            self.ends.append(len(self.text))
            self._search()

    def _search(self) -> None:
        if not self.stops or self.cut is not None:
            return
        start = max(0, self._searched - self.holdback)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.cut = min(found)
        self._searched = len(self.text)

    def finish(self) -> None:
        """The completion ended: flush a held-back partial character."""
        if self.cut is None and self._read_offset < len(self.ids):
            self._read(flush=True)
            if self.ends:
                self.ends[-1] = len(self.text)
            self._search()

    def take(self, final: bool) -> tuple[str, list[int]]:
        """(new text, positions in the completion of the tokens that go with it)."""
        if self.cut is not None:
            limit = self.cut
        elif final:
            limit = len(self.text)
        else:
            limit = len(self.text) - self.holdback
        limit = max(limit, self.sent_chars)
        text = self.text[self.sent_chars:limit]
        self.sent_chars = limit
        end = self.sent_tokens
        while end < len(self.ids) and self.ends[end] <= limit:
            end += 1
        if final and self.cut is None:
            end = len(self.ids)
        positions = self.positions[self.sent_tokens:end]
        self.sent_tokens = end
        return text, positions


# ---- the service ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """One HTTP request, validated: what to submit and how to answer."""

    prompts: list[list[int]]
    samplings: list[SamplingParams]
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool
    generate: bool = True  # False: echo with max_tokens 0 (prompt scoring only)


class CompletionService:
    """Turns OpenAI request bodies into orchestrator requests and completions into responses."""

    def __init__(self, orchestrator: Orchestrator, tokenizer, model_name: str, stop_token_ids=()):
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.stop_token_ids = tuple(stop_token_ids)
        self._scorer: PromptScorer | None = None
        self._scorer_lock = threading.Lock()

    # ---- validation ----------------------------------------------------------------------------

    def _check_unsupported(self, body: _SamplingRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           "model")
        if body.stream_options is not None and not body.stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if body.logit_bias:
            raise _bad("logit_bias is not supported by this server (only an empty map)", "logit_bias")
        _require_default(body, "presence_penalty", (0, 0.0))
        _require_default(body, "frequency_penalty", (0, 0.0))
        _require_default(body, "repetition_penalty", (1, 1.0))
        _require_default(body, "min_p", (0, 0.0))
        _require_default(body, "min_tokens", (0,))

    def _sampling(self, body: _SamplingRequest, max_tokens: int | None, top_logprobs: int) -> tuple[SamplingParams, int]:
        self._check_unsupported(body)
        top_k = body.top_k
        if top_k is not None and not -1 <= top_k < 2**31:
            raise _bad(f"top_k must be -1 or 0 (off) or a positive integer below 2**31, got {top_k}", "top_k")
        seed = secrets.randbits(63) if body.seed is None else body.seed % 2**63
        n = _number(body.n, "n", 1, low=1, high=MAX_N)
        sampling = SamplingParams(
            temperature=float(_number(body.temperature, "temperature", 1.0, low=0, high=2)),
            top_p=float(_number(body.top_p, "top_p", 1.0, low=0, high=1, low_open=True)),
            top_k=max(top_k or 0, 0),
            seed=seed,
            max_new_tokens=max(max_tokens or 1, 1),
            stop_token_ids=self.stop_token_ids,
            top_logprobs=top_logprobs,
        )
        return sampling, n

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not all(stops):
            raise _bad("stop strings must be non-empty", "stop")
        return stops

    def _per_prompt(self, prompts, sampling: SamplingParams, fill_to_budget: bool) -> list[SamplingParams]:
        """A request without max_tokens may generate up to what the sequence budget leaves."""
        if not fill_to_budget:
            return [sampling] * len(prompts)
        length = self.orchestrator.engine.max_sequence_length
        # The last generated token is never fed back, so it needs no cache row.
        return [dataclasses.replace(sampling, max_new_tokens=max(length - len(p) + 1, 1)) for p in prompts]

    def _validate(self, prompts, samplings=None) -> None:
        """Each prompt checked by the engine: with its sampling for requests that generate, alone
        for echo-only ones (nothing is sampled, but every id is decoded and scored)."""
        validate = getattr(self.orchestrator.engine, "validate_prompt" if samplings is None else "validate_request",
                           None)
        if validate is None:
            return
        for i, prompt in enumerate(prompts):
            try:
                validate(prompt) if samplings is None else validate(prompt, samplings[i])
            except RequestError as e:
                raise self._request_error(e) from None

    @staticmethod
    def _request_error(error: Exception) -> APIError:
        message = str(error).replace("max_new_tokens", "max_tokens")
        named = message.split(" ", 1)[0]
        if named in ("max_tokens", "temperature", "top_p", "top_k", "seed", "top_logprobs"):
            param = named
        else:  # "prompt (n tokens) + max_tokens (m) needs ...": max_tokens is the part a client chose
            param = "max_tokens" if "+ max_tokens" in message else "prompt"
        return _bad(message, param)

    def _check_admitting(self) -> None:
        orchestrator = self.orchestrator
        if not orchestrator.healthy:
            raise APIError(503, f"the sampler has stopped: {orchestrator.error!r}")
        if orchestrator.draining:
            raise APIError(503, "the server is shutting down and admits no new requests")

    # ---- running requests ------------------------------------------------------------------------

    def _submit(self, plan: _Plan, loop, events: asyncio.Queue | None) -> list:
        """Submits every prompt; returns the futures (cancelling those already submitted if one
        cannot be)."""
        should_stop = stop_string_check(self.tokenizer, plan.stops)
        futures = []

        def post(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                pass

        try:
            for p, (prompt, sampling) in enumerate(zip(plan.prompts, plan.samplings)):
                on_token = None
                if events is not None:
                    def on_token(index, completion, _p=p):
                        post(("token", _p, index, completion, len(completion.token_ids)))
                future = self.orchestrator.submit(prompt, sampling, plan.n, on_token=on_token,
                                                  should_stop=should_stop)
                futures.append(future)
                if events is not None:
                    future.add_done_callback(lambda f, _p=p: post(("done", _p, f)))
        except BaseException as e:
            for future in futures:
                future.cancel()
            if isinstance(e, OrchestratorClosed):
                raise APIError(503, f"the server is shutting down and admits no new requests ({e})") from None
            if isinstance(e, SamplerCrashed):
                raise APIError(503, f"the sampler has stopped: {e}") from None
            raise
        return futures

    @staticmethod
    def _outcome(future) -> list:
        """A finished future's completions, or the APIError that answers it."""
        if future.cancelled():
            raise APIError(503, "the request was cancelled: the server is shutting down")
        error = future.exception()
        if error is None:
            return future.result()
        if isinstance(error, RequestError):
            raise CompletionService._request_error(error)
        if isinstance(error, OrchestratorClosed):
            raise APIError(503, f"the server is shutting down: {error}")
        if isinstance(error, SamplerCrashed):
            raise APIError(500, f"the sampler failed: {error}")
        raise APIError(500, f"{type(error).__name__}: {error}")

    @staticmethod
    async def _watch(request: fastapi.Request) -> None:
        """Returns when the client disconnects."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def _until_done_or_gone(self, request: fastapi.Request, awaitable):
        task = asyncio.ensure_future(awaitable)
        watcher = asyncio.ensure_future(self._watch(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            raise _ClientGone
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    @staticmethod
    async def _all_done(futures, loop) -> None:
        waiters = []
        for future in futures:
            waiter = loop.create_future()

            def done(_, w=waiter):
                try:
                    loop.call_soon_threadsafe(lambda: w.done() or w.set_result(None))
                except RuntimeError:
                    pass

            future.add_done_callback(done)
            waiters.append(waiter)
        await asyncio.gather(*waiters)

    def _scorer_for(self) -> PromptScorer:
        with self._scorer_lock:
            if self._scorer is None:
                engine = self.orchestrator.engine
                self._scorer = PromptScorer(engine.config, engine.max_sequence_length,
                                            engine.sampler_config.valid_vocab_size)
            return self._scorer

    async def _score_prompts(self, prompts: list[list[int]], top: int):
        """Per prompt: (log-probs of tokens 1.., their top alternatives or None)."""
        scorer = self._scorer_for()
        for prompt in prompts:
            if len(prompt) > scorer.max_length:
                raise _bad(f"prompt has {len(prompt)} tokens; the server scores at most {scorer.max_length}",
                           "prompt")
        params = self.orchestrator.current_params()
        return [await run_in_threadpool(scorer.score, params, prompt, top) for prompt in prompts]

    # ---- output pieces ----------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _finish(self, completion, stops: list[str]) -> tuple[list[int], str, str]:
        """Token ids, text and finish reason with stop tokens and stop strings cut off."""
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = completion.finish_reason
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            while ids and len(self.tokenizer.decode(ids, skip_special_tokens=True)) > cut:
                ids = ids[:-1]
        return ids, text, reason

    @staticmethod
    def _per_token(completion, positions, top: int):
        """(ids, model logprobs, top alternatives or Nones, sampled logprobs, entropies) at positions."""
        alternatives = completion.top_logprobs
        return (
            [completion.token_ids[i] for i in positions],
            [completion.model_logprobs[i] for i in positions],
            [alternatives[i][:top] if top and i < len(alternatives) else None for i in positions],
            [completion.sampled_logprobs[i] for i in positions],
            [completion.entropies[i] for i in positions],
        )

    def _legacy_logprobs(self, ids, logprobs, alternatives, sampled, entropies, top: int, offset: int) -> dict:
        tokens = [self._token_text(t) for t in ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": [
                None if alt is None else {self._token_text(t): lp for t, lp in alt} for alt in alternatives
            ] if top else None,
            "text_offset": offsets,
            "sampled_logprobs": sampled,
            "entropies": entropies,
        }

    def _echo_logprobs(self, prompt, scored, top: int) -> dict:
        logprobs, alternatives = scored
        return self._legacy_logprobs(
            prompt, [None, *logprobs], [None, *(alternatives or [None] * len(logprobs))],
            [None] * len(prompt), [None] * len(prompt), top, 0,
        )

    @staticmethod
    def _merge_logprobs(first: dict | None, second: dict) -> dict:
        if first is None:
            return second
        merged = {}
        for key, value in first.items():
            merged[key] = None if value is None else value + second[key]
        return merged

    def _chat_logprobs(self, ids, logprobs, alternatives, sampled, entropies) -> dict:
        def item(token_id, logprob):
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(token_bytes(self.tokenizer, token_id, text))}

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in (alt or [])]}
                for t, lp, alt in zip(ids, logprobs, alternatives)
            ],
            "sampled_logprobs": sampled,
            "entropies": entropies,
        }

    def _usage(self, prompts, generated: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated}

    # ---- /v1/completions ------------------------------------------------------------------------------

    def _plan_completions(self, body: CompletionRequest) -> tuple[_Plan, list[str | None], int | None]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise _bad(_FIELD_HINTS["prompt"], "prompt")
        if body.suffix:
            raise _bad("suffix is not supported by this server", "suffix")
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_prompts = [
            self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts
        ]
        logprobs = body.logprobs
        if logprobs is not None:
            logprobs = _number(logprobs, "logprobs", 0, low=0, high=TOP_LOGPROBS)
        max_tokens = body.max_tokens
        explicit_null = "max_tokens" in body.model_fields_set and max_tokens is None
        if max_tokens is not None and max_tokens < (0 if body.echo else 1):
            raise _bad(f"max_tokens must be >= 1 (0 only with echo), got {max_tokens}", "max_tokens")
        sampling, n = self._sampling(body, max_tokens, logprobs or 0)
        if body.best_of is not None and body.best_of != n:
            raise _bad(f"best_of must equal n ({n}): this server returns every sample", "best_of")
        samplings = self._per_prompt(token_prompts, sampling, explicit_null)
        generate = max_tokens != 0
        if generate:
            self._validate(token_prompts, samplings)
        else:
            if any(not p for p in token_prompts):
                raise _bad("prompt must be non-empty", "prompt")
            self._validate(token_prompts)
        options = body.stream_options
        plan = _Plan(token_prompts, samplings, n, self._stop_strings(body.stop), bool(body.stream),
                     bool(options and options.include_usage), generate)
        return plan, texts, logprobs

    async def completions(self, request: fastapi.Request, body: CompletionRequest):
        self._check_admitting()
        plan, texts, logprobs = self._plan_completions(body)
        echo_texts = [t if t is not None else self.tokenizer.decode(p) for t, p in zip(texts, plan.prompts)] \
            if body.echo else None
        scored = await self._score_prompts(plan.prompts, logprobs or 0) \
            if body.echo and logprobs is not None else None
        if plan.stream:
            return await self._stream_completions(request, plan, logprobs, echo_texts, scored)
        results = await self._results(request, plan)
        choices, generated = [], 0
        for i, completions in enumerate(results):
            for sample in range(plan.n):
                completion = completions[sample] if completions else None
                if completion is None:  # echo only
                    ids, text, reason = [], "", "length"
                else:
                    ids, text, reason = self._finish(completion, plan.stops)
                    generated += len(completion.token_ids)
                choice_logprobs = None
                if logprobs is not None:
                    if completion is not None:
                        count = len(ids)
                        if body.echo and count == len(completion.token_ids) - 1 and reason == "stop" \
                                and completion.token_ids[-1] in self.stop_token_ids:
                            count += 1  # echo scores every token, the stop token too (not in the text)
                        choice_logprobs = self._legacy_logprobs(
                            *self._per_token(completion, range(count), logprobs), logprobs,
                            len(echo_texts[i]) if echo_texts else 0)
                    if scored is not None:
                        echo = self._echo_logprobs(plan.prompts[i], scored[i], logprobs)
                        choice_logprobs = echo if choice_logprobs is None else self._merge_logprobs(echo, choice_logprobs)
                choices.append({"index": i * plan.n + sample, "text": (echo_texts[i] if echo_texts else "") + text,
                                "finish_reason": reason, "logprobs": choice_logprobs})
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices, "usage": self._usage(plan.prompts, generated),
        }

    async def _results(self, request: fastapi.Request, plan: _Plan) -> list:
        """Per prompt, its n completions (None when nothing is generated)."""
        if not plan.generate:
            return [None] * len(plan.prompts)
        loop = asyncio.get_running_loop()
        futures = self._submit(plan, loop, None)
        try:
            await self._until_done_or_gone(request, self._all_done(futures, loop))
        except BaseException:  # the client left (_ClientGone), or this task was cancelled
            for future in futures:
                future.cancel()
            raise
        return [self._outcome(f) for f in futures]

    # ---- /v1/chat/completions ----------------------------------------------------------------------

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not body.messages:
            raise _bad(_FIELD_HINTS["messages"], "messages")
        messages = []
        for m, message in enumerate(body.messages):
            content = message.content
            if content is None and message.role != "assistant":
                raise _bad(f"messages[{m}].content: a {message.role} message needs content", "messages")
            if isinstance(content, list):
                texts = []
                for p, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise _bad(f"messages[{m}].content[{p}]: only text parts are supported, got type "
                                   f"{part.type!r}", "messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            messages.append({**message.model_dump(exclude_none=True), "content": content or ""})
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                **(body.chat_template_kwargs or {}),
            )
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise _bad(f"chat template failed: {e}", "messages") from None
        if not isinstance(prompt, list):  # some tokenizers return a BatchEncoding regardless
            prompt = prompt["input_ids"]
        return list(prompt)

    def _plan_chat(self, body: ChatCompletionRequest) -> tuple[_Plan, int]:
        if body.tools:
            raise _bad("tools are not supported by this server", "tools")
        prompt = self._chat_prompt(body)
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, field)
            if value is not None and value < 1:
                raise _bad(f"{field} must be >= 1, got {value}", field)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, field)
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        top = _number(body.top_logprobs, "top_logprobs", 0, low=0, high=TOP_LOGPROBS) if body.logprobs else 0
        sampling, n = self._sampling(body, max_tokens, top)
        samplings = self._per_prompt([prompt], sampling, max_tokens is None)
        self._validate([prompt], samplings)
        options = body.stream_options
        plan = _Plan([prompt], samplings, n, self._stop_strings(body.stop), bool(body.stream),
                     bool(options and options.include_usage))
        return plan, top

    async def chat_completions(self, request: fastapi.Request, body: ChatCompletionRequest):
        self._check_admitting()
        plan, top = self._plan_chat(body)
        if plan.stream:
            return await self._stream_chat(request, plan, body.logprobs, top)
        (completions,) = await self._results(request, plan)
        choices, generated = [], 0
        for completion in completions:
            ids, text, reason = self._finish(completion, plan.stops)
            generated += len(completion.token_ids)
            choices.append({
                "index": completion.sample_index, "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": self._chat_logprobs(*self._per_token(completion, range(len(ids)), top))
                if body.logprobs else None,
            })
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices, "usage": self._usage(plan.prompts, generated),
        }

    # ---- streaming ----------------------------------------------------------------------------------

    async def _start_stream(self, request: fastapi.Request, plan: _Plan):
        """Submits and waits for the first event, so that a request that fails at once is answered
        with its status code instead of a 200 stream. Returns (events, futures, first event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if not plan.generate:
            return events, [], None
        futures = self._submit(plan, loop, events)
        try:
            first = await self._until_done_or_gone(request, events.get())
            if first[0] == "done":
                error = first[2]
                if error.cancelled() or error.exception() is not None:
                    self._outcome(error)  # raises
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return events, futures, first

    def _sse(self, request: fastapi.Request, chunks, futures) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.payload())}\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
                yield f"data: {json.dumps(APIError(500, f'{type(e).__name__}: {e}').payload())}\n\n"
            finally:
                # A disconnect cancels this generator: cancel the requests so their slots free up.
                for future in futures:
                    future.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream_events(self, plan: _Plan, events, first):
        """Yields ("tokens", prompt, sample, completion, count) and ("done", prompt, completions)
        until every prompt is done; raises APIError for a failed prompt."""
        remaining = len(plan.prompts) if plan.generate else 0
        event = first
        while remaining:
            if event is None:
                event = await events.get()
            if event[0] == "token":
                yield event
            else:
                _, p, future = event
                yield ("done", p, self._outcome(future))
                remaining -= 1
            event = None

    async def _stream_completions(self, request, plan: _Plan, logprobs, echo_texts, scored):
        events, futures, first = await self._start_stream(request, plan)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = logprobs or 0

        def chunk(index, text, choice_logprobs=None, reason=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": [{"index": index, "text": text, "logprobs": choice_logprobs, "finish_reason": reason}]}
            if plan.include_usage:
                out["usage"] = None
            return out

        async def chunks():
            texts = {(p, s): _ChoiceText(self.tokenizer, self.stop_token_ids, plan.stops)
                     for p in range(len(plan.prompts)) for s in range(plan.n)}
            offsets = {key: len(echo_texts[key[0]]) if echo_texts else 0 for key in texts}
            for (p, s) in texts:
                if echo_texts:
                    echo_logprobs = self._echo_logprobs(plan.prompts[p], scored[p], top) if scored else None
                    yield chunk(p * plan.n + s, echo_texts[p], echo_logprobs, None if plan.generate else "length")
                elif not plan.generate:
                    yield chunk(p * plan.n + s, "", None, "length")
            generated = 0

            def piece(p, s, completion, final, reason=None):
                state = texts[(p, s)]
                text, positions = state.take(final)
                if not text and not positions and reason is None:
                    return None
                choice_logprobs = None
                if logprobs is not None:
                    choice_logprobs = self._legacy_logprobs(*self._per_token(completion, positions, top), top,
                                                            offsets[(p, s)])
                offsets[(p, s)] += len(text)
                return chunk(p * plan.n + s, text, choice_logprobs, reason)

            async for event in self._stream_events(plan, events, first):
                if event[0] == "token":
                    _, p, s, completion, count = event
                    texts[(p, s)].feed(completion, count)
                    out = piece(p, s, completion, False)
                else:
                    _, p, completions = event
                    for completion in completions:
                        s = completion.sample_index
                        state = texts[(p, s)]
                        state.feed(completion, len(completion.token_ids))
                        state.finish()
                        generated += len(completion.token_ids)
                        reason = "stop" if state.cut is not None else completion.finish_reason
                        yield piece(p, s, completion, True, reason)
                    continue
                if out is not None:
                    yield out
            if plan.include_usage:
                yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [], "usage": self._usage(plan.prompts, generated)}

        return self._sse(request, chunks(), futures)

    async def _stream_chat(self, request, plan: _Plan, want_logprobs: bool, top: int):
        events, futures, first = await self._start_stream(request, plan)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, delta, choice_logprobs=None, reason=None):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "choices": [{"index": index, "delta": delta, "logprobs": choice_logprobs, "finish_reason": reason}]}
            if plan.include_usage:
                out["usage"] = None
            return out

        async def chunks():
            texts = {s: _ChoiceText(self.tokenizer, self.stop_token_ids, plan.stops) for s in range(plan.n)}
            for s in range(plan.n):
                yield chunk(s, {"role": "assistant", "content": ""})
            generated = 0

            def piece(s, completion, final, reason=None):
                text, positions = texts[s].take(final)
                if not text and not positions and reason is None:
                    return None
                choice_logprobs = self._chat_logprobs(*self._per_token(completion, positions, top)) \
                    if want_logprobs else None
                return chunk(s, {"content": text} if text or reason is None else {}, choice_logprobs, reason)

            async for event in self._stream_events(plan, events, first):
                if event[0] == "token":
                    _, _, s, completion, count = event
                    texts[s].feed(completion, count)
                    out = piece(s, completion, False)
                    if out is not None:
                        yield out
                else:
                    for completion in event[2]:
                        s = completion.sample_index
                        texts[s].feed(completion, len(completion.token_ids))
                        texts[s].finish()
                        generated += len(completion.token_ids)
                        reason = "stop" if texts[s].cut is not None else completion.finish_reason
                        yield piece(s, completion, True, reason)
            if plan.include_usage:
                yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                       "choices": [], "usage": self._usage(plan.prompts, generated)}

        return self._sse(request, chunks(), futures)

    # ---- the rest ----------------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "opsd-jax"}]}

    def health(self) -> tuple[int, dict]:
        orchestrator = self.orchestrator
        if not orchestrator.healthy:
            return 503, {"status": "unhealthy", "error": repr(orchestrator.error)}
        if orchestrator.draining:
            return 503, {"status": "draining"}
        return 200, {"status": "ok", "active_requests": orchestrator.active_requests()}


def build_app(service: CompletionService) -> fastapi.FastAPI:
    """The ASGI application over `service`."""
    app = fastapi.FastAPI(title="opsd-jax sampler", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.payload(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(_request, error: APIError):
        return error_response(error)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def _invalid(_request, error):
        return error_response(_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        return error_response(APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def _unexpected(_request, error):  # answer instead of dropping the connection
        return error_response(APIError(500, f"{type(error).__name__}: {error}"))

    async def answer(request: fastapi.Request, model, handler):
        body = _parse(model, await request.body())
        try:
            result = await handler(request, body)
        except _ClientGone:
            return fastapi.Response(status_code=499)  # nobody reads it
        return result if isinstance(result, fastapi.Response) else JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await answer(request, CompletionRequest, service.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await answer(request, ChatCompletionRequest, service.chat_completions)

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/health")
    async def health():
        status, payload = service.health()
        return JSONResponse(payload, status_code=status)

    return app


class CompletionServer:
    """uvicorn serving `build_app(service)`: `start()` serves on a background thread, `close()`
    stops it, `shutdown(deadline_s)` also drains and closes the orchestrator. The socket is bound
    on construction (port 0 picks a free one; `url` tells which)."""

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 8000, *,
                 log_level: str = "warning", graceful_timeout_s: float = 10.0):
        self.service = service
        self.app = build_app(service)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.socket = socket.create_server((host, port), family=family, backlog=2048)
        access_log = bool(os.environ.get("OPSD_SERVER_LOG"))
        config = uvicorn.Config(self.app, log_config=None, log_level=log_level, access_log=access_log,
                                lifespan="off", timeout_graceful_shutdown=max(1, math.ceil(graceful_timeout_s)))
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def start(self, timeout_s: float = 60.0) -> CompletionServer:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="opsd-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serves on this thread until `close()` (or, on the main thread, SIGINT/SIGTERM)."""
        self.server.run(sockets=[self.socket])

    def close(self) -> None:
        """Stops accepting, lets answers in progress finish (up to the graceful timeout), stops."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.socket.close()

    def shutdown(self, deadline_s: float | None = None) -> None:
        """Graceful stop: new requests get 503, requests in flight finish or, after deadline_s,
        are cancelled; then the orchestrator and the HTTP server close."""
        orchestrator = self.service.orchestrator
        orchestrator.drain()
        orchestrator.close(deadline_s=deadline_s)
        self.close()

"""OpenAI-compatible HTTP server over the orchestrator: /v1/completions, /v1/chat/completions,
/v1/models. Bound to 127.0.0.1 unless told otherwise.

Extensions beyond OpenAI's fields: `top_k` (sampling), `chat_template_kwargs` (e.g.
{"enable_thinking": false} for Qwen3), and per-token `sampled_logprobs` (under the distribution
actually sampled from) and `entropies` (of the model distribution) in each choice's logprobs.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import secrets
import threading
import time
import uuid

from opsd_jax.paths import user_path
from opsd_jax.sampler.engine import RequestError
from opsd_jax.sampler.orchestrator import Orchestrator
from opsd_jax.sampler.sampling import SamplingParams


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def default_stop_token_ids(tokenizer, checkpoint_dir: str | None) -> tuple[int, ...]:
    """The tokenizer's eos plus generation_config's eos_token_id(s) (Qwen3: <|im_end|> and
    <|endoftext|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(checkpoint_dir, "generation_config.json") if checkpoint_dir else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(ids))


def _number(body, name, default, kind=float, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{name} must be an integer, got {value!r}", name)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise BadRequest(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}", name)
    if high is not None and value > high:
        raise BadRequest(f"{name} must be <= {high}, got {value!r}", name)
    return value


class CompletionService:
    """Turns OpenAI request bodies into orchestrator requests and completions into responses."""

    def __init__(self, orchestrator: Orchestrator, tokenizer, model_name: str, stop_token_ids=()):
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.stop_token_ids = tuple(stop_token_ids)

    def _sampling(self, body, max_tokens_field="max_tokens") -> tuple[SamplingParams, int]:
        max_tokens = body.get(max_tokens_field, body.get("max_tokens", 16 if max_tokens_field == "max_tokens" else None))
        if max_tokens is None:
            max_tokens = self.orchestrator.engine.max_sequence_length  # trimmed per prompt below
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 16, int, low=1)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(62)
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, float, low=0, high=2),
            top_p=_number(body, "top_p", 1.0, float, low=0, high=1, low_open=True),
            top_k=_number(body, "top_k", 0, int, low=0),
            seed=_number({"seed": seed}, "seed", 0, int, low=0),
            max_new_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        n = _number(body, "n", 1, int, low=1, high=128)
        return sampling, n

    def _stop_strings(self, body) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
        return stops

    def _should_stop(self, stops: list[str]):
        if not stops:
            return None
        window = max(len(s) for s in stops) + 16  # tokens: at least one character each

        def should_stop(token_ids):
            tail = self.tokenizer.decode(token_ids[-window:], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return should_stop

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

    def _run(self, prompts: list[list[int]], sampling: SamplingParams, n: int, stops: list[str],
             fill_to_budget: bool = False):
        should_stop = self._should_stop(stops)
        engine = self.orchestrator.engine
        futures = []
        for prompt in prompts:
            per_prompt = sampling
            # A request without max_tokens may generate up to what the sequence budget leaves.
            room = engine.max_sequence_length - len(prompt) + 1
            if fill_to_budget and room >= 1:
                per_prompt = dataclasses.replace(sampling, max_new_tokens=room)
            futures.append(self.orchestrator.submit(prompt, per_prompt, n, should_stop=should_stop))
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except RequestError as e:
                raise BadRequest(str(e), "prompt") from None
        return results

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- endpoints -------------------------------------------------------------------------

    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("prompt must be a string, a list of strings, or token id list(s)", "prompt")
        token_prompts = [
            self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts
        ]
        sampling, n = self._sampling(body)
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = _number(body, "logprobs", 0, int, low=0, high=5)
        stops = self._stop_strings(body)
        results = self._run(token_prompts, sampling, n, stops)
        choices, usage_completion = [], 0
        for i, completions in enumerate(results):
            for completion in completions:
                ids, text, reason = self._finish(completion, stops)
                usage_completion += len(completion.token_ids)
                choice = {"index": i * n + completion.sample_index, "text": text, "finish_reason": reason,
                          "logprobs": None}
                if logprobs is not None:
                    choice["logprobs"] = self._legacy_logprobs(completion, ids, logprobs)
                choices.append(choice)
        prompt_tokens = sum(len(p) for p in token_prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": usage_completion,
                      "total_tokens": prompt_tokens + usage_completion},
        }

    def _legacy_logprobs(self, completion, ids, top: int) -> dict:
        count = len(ids)
        tokens = [self._token_text(t) for t in ids]
        offsets, offset = [], 0
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": completion.model_logprobs[:count],
            "top_logprobs": [
                {self._token_text(t): lp for t, lp in alternatives[:top]} for alternatives in completion.top_logprobs[:count]
            ] if top else None,
            "text_offset": offsets,
            "sampled_logprobs": completion.sampled_logprobs[:count],
            "entropies": completion.entropies[:count],
        }

    def chat_completions(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string content",
                             "messages")
        template_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(template_kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs
            )
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise BadRequest(f"chat template failed: {e}", "messages") from None
        if not isinstance(prompt, list):  # some tokenizers return a BatchEncoding regardless
            prompt = prompt["input_ids"]
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        fill_to_budget = body.get(field) is None
        sampling, n = self._sampling(body, field)
        want_logprobs = bool(body.get("logprobs", False))
        top = _number(body, "top_logprobs", 0, int, low=0, high=20) if want_logprobs else 0
        stops = self._stop_strings(body)
        (completions,) = self._run([list(prompt)], sampling, n, stops, fill_to_budget)
        choices, generated = [], 0
        for completion in completions:
            ids, text, reason = self._finish(completion, stops)
            generated += len(completion.token_ids)
            choice = {"index": completion.sample_index, "message": {"role": "assistant", "content": text},
                      "finish_reason": reason, "logprobs": None}
            if want_logprobs:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": self._token_text(t), "logprob": lp,
                            "bytes": list(self._token_text(t).encode()),
                            "top_logprobs": [
                                {"token": self._token_text(a), "logprob": alp, "bytes": list(self._token_text(a).encode())}
                                for a, alp in alternatives[:top]
                            ],
                        }
                        for t, lp, alternatives in zip(ids, completion.model_logprobs, completion.top_logprobs)
                    ],
                    "sampled_logprobs": completion.sampled_logprobs[: len(ids)],
                    "entropies": completion.entropies[: len(ids)],
                }
            choices.append(choice)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "opsd-jax"}]}


def make_handler(service: CompletionService):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet by default
            if os.environ.get("OPSD_SERVER_LOG"):
                super().log_message(format, *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param=None, kind="invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, service.models())
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            routes = {"/v1/completions": service.completions, "/v1/chat/completions": service.chat_completions}
            route = routes.get(self.path.rstrip("/"))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if route is None:
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("request body must be a JSON object")
                if body.get("stream"):
                    raise BadRequest("stream=true is not supported", "stream")
                self._send(200, route(body))
            except json.JSONDecodeError as e:
                self._error(400, f"request body is not valid JSON: {e}")
            except BadRequest as e:
                self._error(400, str(e), e.param)
            except Exception as e:  # noqa: BLE001 - never drop the connection without an answer
                self._error(500, f"{type(e).__name__}: {e}", kind="server_error")

    return Handler


class CompletionServer:
    """A threaded HTTP server; `start()` serves in the background, `close()` stops it."""

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 8000):
        self.service = service
        self.httpd = http.server.ThreadingHTTPServer((host, port), make_handler(service))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> CompletionServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="opsd-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()


def load_for_serving(checkpoint: str, *, dtype: str = "float32", mesh=None):
    """(ModelConfig, params, tokenizer, folder with the tokenizer files) from an HF folder or an
    opsd-jax Orbax checkpoint."""
    import transformers

    from opsd_jax.checkpoint.hf import load_hf
    from opsd_jax.checkpoint.orbax import HF_DIR, MANIFEST, restore_params

    checkpoint = user_path(checkpoint)
    if os.path.exists(os.path.join(checkpoint, MANIFEST)):
        config, params = restore_params(checkpoint, mesh=mesh, dtype=dtype)
        side_dir = os.path.join(checkpoint, HF_DIR)
    else:
        config, params = load_hf(checkpoint, dtype=dtype, mesh=mesh)
        side_dir = checkpoint
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(side_dir)
    except Exception as e:  # noqa: BLE001 - say which folder lacks what
        raise FileNotFoundError(f"{side_dir}: no usable tokenizer files ({e})") from None
    return config, params, tokenizer, side_dir

"""The OpenAI-compatible server (FastAPI + uvicorn), driven by the real `openai` client, raw
sockets and lm-evaluation-harness on loopback."""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from opsd_jax import load_hf
from opsd_jax.checkpoint import default_stop_token_ids
from opsd_jax.sampler import Engine, Orchestrator, SamplerConfig, SamplingParams
from opsd_jax.sampler.server import CompletionServer, CompletionService, stop_string_check
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_seed):
    path = tmp_path_factory.mktemp("qwen3")
    torch_model = save_tiny_hf_model("qwen3", str(path), seed=model_seed)
    save_tiny_tokenizer(str(path))
    config, params = load_hf(path, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return path, torch_model, config, params, tokenizer


@pytest.fixture(scope="module")
def served(checkpoint):
    path, _, config, params, tokenizer = checkpoint
    engine = Engine(config, SamplerConfig(max_slots=4, max_sequence_length=96, prefill_buckets=(16, 32, 64)))
    orchestrator = Orchestrator(engine, params)
    service = CompletionService(orchestrator, tokenizer, MODEL, default_stop_token_ids(tokenizer, str(path)))
    server = CompletionServer(service, "127.0.0.1", 0).start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    yield client, orchestrator, tokenizer, server
    server.close()
    orchestrator.close()


def server_stop_ids(served):
    return served[3].service.stop_token_ids


def post(server, route: str, body, timeout=120):
    """(status, parsed JSON) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + route, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, route: str):
    url = server.url.removesuffix("/v1") + route
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_default_stop_tokens_come_from_tokenizer_and_generation_config(served):
    _, _, tokenizer, _ = served
    expected = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert set(server_stop_ids(served)) == expected


def test_binds_loopback_lists_the_model_and_is_healthy(served):
    client, _, _, server = served
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, payload = get(server, "/health")
    assert status == 200 and payload["status"] == "ok"


def test_completions_match_the_orchestrator(served):
    client, orchestrator, tokenizer, _ = served
    prompt = "Wait, let me check: 3 + 4 ="
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                         logprobs=3, n=2)
    stop_ids = server_stop_ids(served)
    direct = orchestrator.generate_batch([tokenizer.encode(prompt)], SamplingParams(
        temperature=0, max_new_tokens=8, stop_token_ids=stop_ids), progress=False)
    assert len(response.choices) == 2 and {c.index for c in response.choices} == {0, 1}
    expected_ids = direct[0][0].token_ids
    if expected_ids and expected_ids[-1] in stop_ids:  # a stop token is not part of the text
        expected_ids = expected_ids[:-1]
    for choice in response.choices:
        assert choice.text == tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert choice.finish_reason in ("length", "stop")
        assert len(choice.logprobs.token_logprobs) == len(expected_ids)
        # Keyed by token text, as OpenAI does: alternatives that decode alike share a key.
        assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
        np.testing.assert_allclose(choice.logprobs.token_logprobs, direct[0][0].model_logprobs[: len(expected_ids)],
                                   atol=1e-6)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))


@pytest.mark.parametrize("which", ["tiny", "qwen3"])
def test_token_bytes_join_into_the_text(which, tmp_path):
    """Byte-level pieces of multi-byte characters (2, 3 and 4 bytes) and plain ones: each token's
    bytes are its own, so they join into the text, where each token decoded alone reads U+FFFD."""
    from opsd_jax.sampler.server import token_bytes
    from opsd_jax.testing import qwen3_tokenizer_dir

    if which == "tiny":
        save_tiny_tokenizer(str(tmp_path))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(str(tmp_path)))
    text = "Wait, Ԅ is 42 \u2265 \u00e9t\u00e9 \U0001f600 \u6b63\u786e"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case the bytes are for
    assert token_bytes(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"


def test_chat_completions_use_the_chat_template(served):
    client, _, tokenizer, _ = served
    messages = [{"role": "user", "content": "Perhaps 42?"}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content) <= 6
    assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    # The message text skips special tokens (a random model may well emit <think>); the log-probs,
    # as vLLM's, list every generated token. A token holding part of a multi-byte character reads
    # U+FFFD alone; its `bytes` are its own, so the tokens' bytes join into the text (OpenAI's rule).
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    joined = b"".join(bytes(item.bytes) for item in choice.logprobs.content if item.token not in special)
    assert joined.decode("utf-8", errors="replace") == choice.message.content


def test_stop_strings_cut_the_text(served):
    client, _, _, _ = served
    free = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=24, temperature=0)
    text = free.choices[0].text
    if len(text) < 4:
        pytest.skip("the random model produced too little text to cut")
    stop = text[2:4]
    cut = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_stop_strings_match_only_text_the_finished_decode_reads_the_same(checkpoint):
    # CI once saw a stop string "\ufffd" end a greedy generation early: a character whose second
    # byte had not arrived yet decoded as U+FFFD, so the answer differed from the one without stops.
    tokenizer = checkpoint[4]
    unicode_of_byte = bytes_to_unicode()
    lead, continuation = (tokenizer.convert_tokens_to_ids(unicode_of_byte[b]) for b in "ʵ".encode())
    letter = tokenizer.convert_tokens_to_ids("a")
    should_stop = stop_string_check(tokenizer, ["\ufffd"])
    assert tokenizer.decode([letter, lead, continuation]) == "aʵ"
    assert not should_stop([letter, lead])  # the character is half-written
    assert not should_stop([letter, lead, continuation])
    window = 1 + 16
    assert not should_stop([lead, continuation] + [letter] * (window - 1))  # the window starts mid-character
    assert not should_stop([letter, continuation])  # a stray byte: read once the next token came
    assert should_stop([letter, continuation, letter])
    assert should_stop([letter] * window + [continuation, letter])
    assert stop_string_check(tokenizer, []) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [({"top_p": 1.5}, "top_p must be <= 1"), ({"temperature": -1}, "temperature must be >= 0"),
     ({"prompt": "Wait " * 200}, "the engine holds at most 96 tokens"), ({"prompt": [5, 10**6]}, "outside the vocabulary"),
     ({"max_tokens": 0}, "max_tokens must be >= 1"), ({"prompt": ""}, "non-empty")],
)
def test_bad_requests_get_400_and_others_are_unaffected(served, kwargs, message):
    client, _, _, _ = served
    arguments = {"model": MODEL, "prompt": "Let me verify", "max_tokens": 4, "temperature": 0, **kwargs}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.completions.create, model=MODEL, prompt="Let me verify", max_tokens=4,
                           temperature=0)
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**arguments)
        assert good.result().choices[0].finish_reason in ("length", "stop")


def test_malformed_json_is_a_400(served):
    _, _, _, server = served
    status, payload = post(server, "/completions", b"{nope")
    assert status == 400
    assert "not valid JSON" in payload["error"]["message"]


# ---- fields: unknown ones refused, vLLM's conventions ------------------------------------------------


@pytest.mark.parametrize("route", ["/completions", "/chat/completions"])
def test_unknown_fields_are_a_400_naming_them(served, route):
    _, _, _, server = served
    body = {"model": MODEL, "max_tokens": 2, "temprature": 0.5}
    body.update({"prompt": "Wait"} if route == "/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    status, payload = post(server, route, body)
    assert status == 400
    assert payload["error"]["param"] == "temprature" and "temprature" in payload["error"]["message"]


@pytest.mark.parametrize(
    "extra, field",
    [({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"5": 1.0}}, "logit_bias"),
     ({"best_of": 3}, "best_of"), ({"top_k": -2}, "top_k"), ({"suffix": "x"}, "suffix")],
)
def test_fields_that_cannot_be_honoured_are_refused_by_name(served, extra, field):
    _, _, _, server = served
    status, payload = post(server, "/completions", {"prompt": "Wait", "max_tokens": 2, **extra})
    assert status == 400 and payload["error"]["param"] == field, payload


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("route, body, status, param", [
    ("/completions", {"prompt": "Wait", "max_tokens": 2, "top_k": 2**31}, 400, "top_k"),  # once stopped the server
    ("/completions", {"prompt": [1, -3], "max_tokens": 0, "echo": True}, 400, "prompt"),
    ("/completions", {"prompt": [1, 5000], "max_tokens": 0, "echo": True, "logprobs": 1}, 400, "prompt"),
    ("/completions", {"prompt": "Wait", "max_tokens": 2, "model": "gpt-9000"}, 404, "model"),
    ("/completions", {"prompt": [True, False], "max_tokens": 2}, 400, "prompt"),
    ("/completions", {"prompt": "Wait", "max_tokens": "4"}, 400, "max_tokens"),
    ("/completions", {"prompt": "Wait", "max_tokens": 2, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/completions", {"prompt": "Wait", "max_tokens": 1000000}, 400, "max_tokens"),
    ("/chat/completions", {**CHAT, "max_tokens": 2, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/chat/completions", {**CHAT, "max_tokens": 0, "max_completion_tokens": 2}, 400, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": None}], "max_tokens": 2}, 400, "messages"),
])
def test_bad_requests_are_refused_by_name_and_the_server_stays_up(served, route, body, status, param):
    client, _, _, server = served
    got, payload = post(server, route, body)
    assert (got, payload["error"]["param"]) == (status, param), payload
    assert payload["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert get(server, "/health")[0] == 200
    assert client.completions.create(model=MODEL, prompt="Wait", max_tokens=1).choices


def test_a_wrong_method_is_a_client_error(served):
    _, _, _, server = served
    request = urllib.request.Request(server.url + "/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 405
    assert json.loads(raised.value.read())["error"]["type"] == "invalid_request_error"


def test_common_openai_fields_at_their_defaults_are_accepted(served):
    client, _, _, _ = served
    response = client.completions.create(
        model=MODEL, prompt="Wait", max_tokens=2, temperature=0, user="someone", logit_bias={}, presence_penalty=0,
        frequency_penalty=0, best_of=1, n=1, extra_body={"top_k": -1},
    )
    assert response.choices[0].finish_reason in ("length", "stop")


def test_top_k_minus_one_is_off_and_seeds_are_any_integer(served):
    client, _, _, _ = served

    def sample(**kwargs):
        return client.completions.create(model=MODEL, prompt="Perhaps", max_tokens=6, temperature=1.0,
                                         **kwargs).choices[0].text

    assert sample(seed=-5, extra_body={"top_k": -1}) == sample(seed=-5 % 2**63, extra_body={"top_k": 0})
    assert sample(seed=2**70 + 3) == sample(seed=(2**70 + 3) % 2**63)


def test_max_tokens_null_generates_what_fits(served):
    client, _, tokenizer, server = served
    prompt = "Let me verify"
    status, payload = post(server, "/completions", {"prompt": prompt, "max_tokens": None, "temperature": 0,
                                                    "stop": None})
    assert status == 200, payload
    choice, usage = payload["choices"][0], payload["usage"]
    if choice["finish_reason"] == "length":
        # 96-token sequences; the last generated token needs no cache row.
        assert usage["completion_tokens"] == 96 - len(tokenizer.encode(prompt)) + 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=None)
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_content_part_lists_are_joined(served):
    client, _, _, _ = served
    parts = [{"type": "text", "text": "Perhaps"}, {"type": "text", "text": "42?"}]
    as_parts = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                              max_tokens=5, temperature=0)
    as_text = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Perhaps\n42?"}],
                                             max_tokens=5, temperature=0)
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])


def test_any_number_of_stop_strings(served):
    client, _, _, _ = served
    free = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=24, temperature=0)
    text = free.choices[0].text
    if len(text) < 8:
        pytest.skip("the random model produced too little text to cut")
    stops = ["\x00never", "\x01never", "\x02never", "\x03never", "\x04never", text[5:8]]
    for stream in (False, True):
        kwargs = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 24, "temperature": 0, "stop": stops}
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.completions.create(**kwargs).choices[0]
            got, reason = choice.text, choice.finish_reason
        assert got == text[: text.find(text[5:8])] and reason == "stop"


# ---- streaming -----------------------------------------------------------------------------------------


def test_streamed_completions_equal_the_whole_answer(served):
    client, _, _, _ = served
    kwargs = {"model": MODEL, "prompt": "Wait, let me check", "max_tokens": 20, "temperature": 0, "logprobs": 2, "n": 2}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    for choice in whole.choices:
        pieces = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert "".join(p.text for p in pieces) == choice.text
        assert pieces[-1].finish_reason == choice.finish_reason
        assert all(p.finish_reason is None for p in pieces[:-1])
        streamed = [lp for p in pieces if p.logprobs for lp in p.logprobs.token_logprobs]
        np.testing.assert_allclose(streamed, choice.logprobs.token_logprobs, atol=1e-6)


def test_streamed_chat_equals_the_whole_answer(served):
    client, _, _, _ = served
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Perhaps 42?"}], "max_tokens": 12,
              "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    pieces = [c.choices[0] for c in chunks[:-1]]
    assert "".join(p.delta.content or "" for p in pieces) == whole.choices[0].message.content
    assert pieces[-1].finish_reason == whole.choices[0].finish_reason
    tokens = [item.token for p in pieces if p.logprobs for item in p.logprobs.content]
    assert tokens == [item.token for item in whole.choices[0].logprobs.content]


def test_streaming_without_usage_has_no_usage_chunk(served):
    client, _, _, _ = served
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in chunks)


def test_a_stream_that_fails_at_once_answers_400(served):
    client, _, _, _ = served
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        list(client.completions.create(model=MODEL, prompt=[5, 10**6], max_tokens=3, stream=True))


# ---- echo and prompt log-probabilities ---------------------------------------------------------------------


def torch_logprobs(torch_model, ids):
    """transformers' log-probabilities [len(ids), V] at every position."""
    import torch

    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_echo_scores_the_prompt_like_transformers(served, checkpoint):
    client, _, tokenizer, _ = served
    torch_model = checkpoint[1]
    prompt = "Let me verify: 3 + 4 = 7, and 7 * 6 = 42."
    ids = tokenizer.encode(prompt)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = response.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    expected = torch_logprobs(torch_model, ids)
    np.testing.assert_allclose(logprobs.token_logprobs[1:], [expected[i, ids[i + 1]] for i in range(len(ids) - 1)],
                               atol=1e-4)
    for i, top in enumerate(logprobs.top_logprobs[1:]):
        best = np.sort(expected[i])[-2:]  # keyed by text: alternatives that decode alike share a key
        assert 1 <= len(top) <= 2 and all(np.abs(best - value).min() < 1e-4 for value in top.values())

    echoed = client.completions.create(model=MODEL, prompt=[ids], max_tokens=3, echo=True, logprobs=0, temperature=0)
    generated = echoed.choices[0]
    plain = client.completions.create(model=MODEL, prompt=[ids], max_tokens=3, temperature=0).choices[0]
    assert generated.text == tokenizer.decode(ids) + plain.text
    # Echo scores every token, a generated stop token too.
    assert len(generated.logprobs.token_logprobs) == len(ids) + echoed.usage.completion_tokens
    np.testing.assert_allclose(generated.logprobs.token_logprobs[1:len(ids)], logprobs.token_logprobs[1:], atol=1e-5)

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt


def test_lm_evaluation_harness_loglikelihoods_match_transformers(served, checkpoint):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    _, _, _, server = served
    path, torch_model = checkpoint[0], checkpoint[1]
    pairs = [("Wait, let me check that again.", " Perhaps the answer is 42"),
             ("The quick brown fox", " jumps over the lazy dog."),
             ("Let me verify: 3 + 4 =", " 7"),
             ("Let me verify: 3 + 4 =", " 8")]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    for batch_size in (1, 3):
        lm = LocalCompletionsAPI(base_url=server.url + "/completions", model=MODEL, tokenizer=str(path),
                                 tokenizer_backend="huggingface", max_length=96, batch_size=batch_size,
                                 max_retries=1, timeout=120)
        results = lm.loglikelihood(instances, disable_tqdm=True)
        for (context, continuation), (loglikelihood, greedy) in zip(pairs, results):
            context_ids = lm.tok_encode(context)
            whole = lm.tok_encode(context + continuation)
            expected = torch_logprobs(torch_model, whole)
            rows = range(len(context_ids) - 1, len(whole) - 1)
            assert loglikelihood == pytest.approx(sum(expected[i, whole[i + 1]] for i in rows), abs=1e-4)
            assert greedy == all(expected[i].argmax() == whole[i + 1] for i in rows)


# ---- draining, crashes, disconnects and shutdown ------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_engine(checkpoint):
    """An engine with room for long generations; tests slow its decode step down."""
    config = checkpoint[2]
    return Engine(config, SamplerConfig(max_slots=2, max_sequence_length=256, prefill_buckets=(16,)))


@pytest.fixture
def slow_server(checkpoint, slow_engine, monkeypatch):
    """A fresh orchestrator and server whose decode steps take >= 20 ms and which has no stop
    tokens, so that a long request stays in flight for seconds."""
    generate = slow_engine.generate

    def slow_generate(*args, **kwargs):
        time.sleep(0.02)
        return generate(*args, **kwargs)

    monkeypatch.setattr(slow_engine, "generate", slow_generate)
    orchestrator = Orchestrator(slow_engine, checkpoint[3])
    server = CompletionServer(CompletionService(orchestrator, checkpoint[4], MODEL, ()), "127.0.0.1", 0).start()
    yield server, orchestrator
    server.close()
    orchestrator.close(deadline_s=0)


def wait_for(condition, timeout=60.0, what="condition"):
    """Waits for progress, not for speed: a loaded CI machine can take many seconds to start a
    request (a CI rehearsal timed out at 10 s), and a hang still fails within a minute."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def raw_request(server, body: dict) -> socket.socket:
    """Sends a POST /v1/completions on a plain socket and returns the socket unread."""
    host, port = server.socket.getsockname()[:2]
    connection = socket.create_connection((host, port), timeout=30)
    data = json.dumps(body).encode()
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return connection


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(slow_server, stream):
    server, orchestrator = slow_server
    # 250 tokens at >= 20 ms a step: at least 5 s unless the disconnect cancels it.
    connection = raw_request(server, {"prompt": "Wait", "max_tokens": 250, "temperature": 1.0, "stream": stream})
    if stream:
        received = b""
        while b"data: " not in received:
            received += connection.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
    else:
        wait_for(lambda: orchestrator.stats["active_slots"] == 1, what="the request to decode")
    connection.close()
    wait_for(lambda: orchestrator.active_requests() == 0 and orchestrator.stats["active_slots"] == 0,
             what="the slot to be freed")
    assert orchestrator.stats["decode_steps"] < 200  # cancelled, not run to its 250 tokens


def test_draining_answers_503_and_finishes_what_is_in_flight(slow_server):
    server, orchestrator = slow_server
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model=MODEL, prompt="Wait", max_tokens=40)
        wait_for(lambda: orchestrator.stats["active_slots"] == 1, what="the request to decode")
        orchestrator.drain()
        with pytest.raises(openai.APIStatusError) as error:
            client.completions.create(model=MODEL, prompt="Wait", max_tokens=2)
        assert error.value.status_code == 503
        assert get(server, "/health") == (503, {"status": "draining"})
        assert running.result().usage.completion_tokens == 40


def test_shutdown_cancels_what_outlives_the_deadline(slow_server):
    server, orchestrator = slow_server
    connection = raw_request(server, {"prompt": "Wait", "max_tokens": 250, "stream": True})
    received = b""
    while b"data: " not in received:
        received += connection.recv(4096)
    started = time.monotonic()
    server.shutdown(deadline_s=0.2)
    assert time.monotonic() - started < 5
    connection.settimeout(10)
    while chunk := connection.recv(4096):  # the server closes the connection once the answer ends
        received += chunk
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-300:]  # chunked encoding's end
    assert b"cancelled" in received  # the stream says why it ended
    assert orchestrator.active_requests() == 0
    connection.close()


def test_a_crashed_sampler_fails_every_request_and_reports_unhealthy(slow_server, slow_engine, monkeypatch):
    server, orchestrator = slow_server
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    crash = threading.Event()
    generate = slow_engine.generate

    def failing_generate(*args, **kwargs):
        if crash.is_set():
            raise RuntimeError("device fell over")
        return generate(*args, **kwargs)

    monkeypatch.setattr(slow_engine, "generate", failing_generate)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(client.completions.create, model=MODEL, prompt="Wait", max_tokens=250)
        streamed = pool.submit(lambda: list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=200, stream=True)))
        wait_for(lambda: orchestrator.stats["active_slots"] == 2, what="both requests to decode")
        crash.set()
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="device fell over") as error:
            whole.result(timeout=10)
        assert error.value.status_code == 500
        with pytest.raises(openai.APIError, match="device fell over"):
            streamed.result(timeout=10)
        assert time.monotonic() - started < 10
    status, payload = get(server, "/health")
    assert status == 503 and "device fell over" in payload["error"]
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(model=MODEL, prompt="Wait", max_tokens=2)
    assert error.value.status_code == 503

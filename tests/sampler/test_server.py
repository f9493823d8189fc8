"""The OpenAI-compatible server, driven by the real `openai` client on loopback."""

import concurrent.futures
import json
import urllib.request

import numpy as np
import openai
import pytest
import transformers

from opsd_jax import load_hf
from opsd_jax.sampler import Engine, Orchestrator, SamplerConfig, SamplingParams
from opsd_jax.sampler.server import CompletionServer, CompletionService, default_stop_token_ids
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    save_tiny_hf_model("qwen3", str(path), seed=int(np.random.default_rng().integers(2**31)))
    save_tiny_tokenizer(str(path))
    config, params = load_hf(path, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    engine = Engine(config, SamplerConfig(max_slots=4, max_sequence_length=96, prefill_buckets=(16, 32, 64)))
    orchestrator = Orchestrator(engine, params)
    service = CompletionService(orchestrator, tokenizer, "tiny-qwen3", default_stop_token_ids(tokenizer, str(path)))
    server = CompletionServer(service, "127.0.0.1", 0).start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    yield client, orchestrator, tokenizer, server
    server.close()
    orchestrator.close()


def server_stop_ids(served):
    return served[3].service.stop_token_ids


def test_default_stop_tokens_come_from_tokenizer_and_generation_config(served):
    _, _, tokenizer, _ = served
    expected = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert set(server_stop_ids(served)) == expected


def test_binds_loopback_and_lists_the_model(served):
    client, _, _, server = served
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3"]


def test_completions_match_the_orchestrator(served):
    client, orchestrator, tokenizer, _ = served
    prompt = "Wait, let me check: 3 + 4 ="
    response = client.completions.create(model="tiny-qwen3", prompt=prompt, max_tokens=8, temperature=0,
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


def test_chat_completions_use_the_chat_template(served):
    client, orchestrator, tokenizer, _ = served
    messages = [{"role": "user", "content": "Perhaps 42?"}]
    response = client.chat.completions.create(
        model="tiny-qwen3", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content) <= 6
    assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    assert "".join(item.token for item in choice.logprobs.content) == choice.message.content


def test_stop_strings_cut_the_text(served):
    client, _, _, _ = served
    free = client.completions.create(model="tiny-qwen3", prompt="The quick brown", max_tokens=24, temperature=0)
    text = free.choices[0].text
    if len(text) < 4:
        pytest.skip("the random model produced too little text to cut")
    stop = text[2:4]
    cut = client.completions.create(model="tiny-qwen3", prompt="The quick brown", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"top_p": 1.5}, "top_p must be <= 1"), ({"temperature": -1}, "temperature must be >= 0"),
     ({"prompt": "Wait " * 200}, "the engine holds at most 96 tokens"), ({"prompt": [5, 10**6]}, "outside the vocabulary"),
     ({"max_tokens": 0}, "max_tokens must be >= 1"), ({"prompt": ""}, "non-empty")],
)
def test_bad_requests_get_400_and_others_are_unaffected(served, kwargs, message):
    client, _, _, _ = served
    arguments = {"model": "tiny-qwen3", "prompt": "Let me verify", "max_tokens": 4, "temperature": 0, **kwargs}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.completions.create, model="tiny-qwen3", prompt="Let me verify", max_tokens=4,
                           temperature=0)
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**arguments)
        assert good.result().choices[0].finish_reason in ("length", "stop")


def test_malformed_json_is_a_400(served):
    _, _, _, server = served
    request = urllib.request.Request(server.url + "/completions", data=b"{nope", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 400
    assert "not valid JSON" in json.loads(error.value.read())["error"]["message"]

"""Engine and orchestrator against transformers' generate and opsd_jax.forward."""

import jax
import numpy as np
import pytest

from opsd_jax import forward, load_hf
from opsd_jax.parallel import make_mesh
from opsd_jax.sampler import Engine, Orchestrator, RequestError, SamplerConfig, SamplingParams
from opsd_jax.testing import assert_greedy_matches, save_tiny_hf_model

# Small buckets so the prompts below exercise bucket padding and chunked prefill (23, 40 > 16).
SAMPLER = SamplerConfig(max_slots=4, max_sequence_length=112, prefill_buckets=(8, 16))
PROMPT_LENGTHS = (5, 12, 23, 40)


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def tiny(request, tmp_path_factory, model_seed):
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_hf_model(request.param, str(path), seed=model_seed)
    config, params = load_hf(path, progress=False)
    return request.param, model, config, params


def _prompts(rng, vocab, lengths=PROMPT_LENGTHS):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_matches_transformers_generate(tiny, rng):
    """64 new tokens, prompts of different lengths decoded together; OLMo-3's sliding window (6)
    is far shorter than the generation."""
    name, model, config, params = tiny
    prompts = _prompts(rng, config.vocab_size)
    with Orchestrator(Engine(config, SAMPLER), params) as orchestrator:
        results = orchestrator.generate_batch(prompts, SamplingParams(temperature=0, max_new_tokens=64), progress=False)
    for prompt, (completion,) in zip(prompts, results):
        assert len(completion.token_ids) == 64
        assert_greedy_matches(model, prompt, completion.token_ids)
        assert completion.finish_reason == "length"


def test_logprobs_and_entropies_equal_forward_on_the_finished_sequence(tiny, rng):
    name, model, config, params = tiny
    prompts = _prompts(rng, config.vocab_size, (7, 19))
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=int(rng.integers(2**31)), max_new_tokens=24)
    with Orchestrator(Engine(config, SAMPLER), params) as orchestrator:
        results = orchestrator.generate_batch(prompts, sampling, n=2, progress=False)
    for prompt, completions in zip(prompts, results):
        for completion in completions:
            sequence = np.asarray(prompt + completion.token_ids)
            logits = np.asarray(forward(params, config, sequence[None, :-1]))[0, len(prompt) - 1 :]
            log_p = np.asarray(jax.nn.log_softmax(logits, -1))
            tokens = np.asarray(completion.token_ids)
            np.testing.assert_allclose(completion.model_logprobs, log_p[np.arange(len(tokens)), tokens], atol=2e-5)
            np.testing.assert_allclose(completion.entropies, -(np.exp(log_p) * log_p).sum(-1), atol=2e-5)
            # The sampled distribution: temperature, then top-k, then top-p, renormalized.
            scaled = logits / 0.8
            expected = []
            for row, token in zip(scaled, tokens):
                order = np.argsort(row)
                kept = np.zeros_like(row, bool)
                kept[order[-40:]] = True
                probs = np.where(kept, np.exp(row - row.max()), 0)
                probs /= probs.sum()
                ascending = probs[order]
                removed = np.cumsum(ascending) <= 1 - 0.9
                removed[-1] = False
                kept[order[removed]] = False
                probs = np.where(kept, probs, 0)
                expected.append(np.log(probs[token] / probs.sum()))
            np.testing.assert_allclose(completion.sampled_logprobs, expected, atol=2e-4)


def test_seeded_samples_do_not_depend_on_batch_company(tiny, rng):
    name, model, config, params = tiny
    prompts = _prompts(rng, config.vocab_size, (9, 14, 3))
    sampling = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=12)
    engine = Engine(config, SAMPLER)
    with Orchestrator(engine, params) as orchestrator:
        alone = orchestrator.generate_batch(prompts[:1], sampling, n=3, progress=False)[0]
        together = orchestrator.generate_batch(prompts, sampling, n=3, progress=False)[0]
    assert [c.token_ids for c in alone] == [c.token_ids for c in together]
    assert len({tuple(c.token_ids) for c in alone}) > 1  # the n samples differ from each other


def test_load_params_switches_weights_without_recompiling(tiny, tmp_path, rng):
    name, model, config, params = tiny
    other_model = save_tiny_hf_model(name, str(tmp_path / "other"), seed=int(rng.integers(2**31)))
    _, other_params = load_hf(tmp_path / "other", progress=False)
    prompt = _prompts(rng, config.vocab_size, (10,))
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    engine = Engine(config, SAMPLER)
    with Orchestrator(engine, params) as orchestrator:
        before = orchestrator.generate_batch(prompt, greedy, progress=False)[0][0].token_ids
        compiled = (engine._generate._cache_size(), engine._prefill_chunk._cache_size(), engine._insert._cache_size())
        orchestrator.load_params(other_params)
        after = orchestrator.generate_batch(prompt, greedy, progress=False)[0][0].token_ids
        assert (engine._generate._cache_size(), engine._prefill_chunk._cache_size(),
                engine._insert._cache_size()) == compiled
    assert len(after) == 16
    assert_greedy_matches(other_model, prompt[0], after)
    assert after != before


def test_bad_requests_fail_alone(tiny, rng):
    name, model, config, params = tiny
    good = _prompts(rng, config.vocab_size, (6,))[0]
    cases = [
        (good, SamplingParams(top_p=1.5, max_new_tokens=4), "top_p must be in"),
        (good, SamplingParams(temperature=-1.0, max_new_tokens=4), "temperature must be"),
        ([], SamplingParams(max_new_tokens=4), "non-empty"),
        (good[:3] + [config.vocab_size + 5], SamplingParams(max_new_tokens=4), f"token id {config.vocab_size + 5} is outside"),
        (good * 20, SamplingParams(max_new_tokens=4), "the engine holds at most 112 tokens"),
        (good, SamplingParams(max_new_tokens=110), r"needs 116 tokens, more than max_sequence_length 112"),
    ]
    prompts = [good] + [c[0] for c in cases] + [good]
    samplings = [SamplingParams(temperature=0, max_new_tokens=5)] + [c[1] for c in cases] + [
        SamplingParams(temperature=0, max_new_tokens=5)]
    with Orchestrator(Engine(config, SAMPLER), params) as orchestrator:
        results = orchestrator.generate_batch(prompts, samplings, progress=False, return_exceptions=True)
    assert results[0][0].token_ids == results[-1][0].token_ids and len(results[0][0].token_ids) == 5
    for result, (_, _, message) in zip(results[1:-1], cases):
        assert isinstance(result, RequestError)
        assert message in str(result) or __import__("re").search(message, str(result)), str(result)


def test_stop_tokens_end_a_sequence_and_are_kept(tiny, rng):
    name, model, config, params = tiny
    prompt = _prompts(rng, config.vocab_size, (8,))
    with Orchestrator(Engine(config, SAMPLER), params) as orchestrator:
        free = orchestrator.generate_batch(prompt, SamplingParams(temperature=0, max_new_tokens=20), progress=False)
        stop_at = free[0][0].token_ids[5]
        stopped = orchestrator.generate_batch(
            prompt, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(stop_at,)), progress=False
        )
    first = free[0][0].token_ids.index(stop_at)
    assert stopped[0][0].token_ids == free[0][0].token_ids[: first + 1]
    assert stopped[0][0].finish_reason == "stop"


def test_decode_state_size_is_known_up_front(tiny):
    name, model, config, params = tiny
    engine = Engine(config, SAMPLER)
    state = engine.init_decode_state()
    actual = sum(leaf.nbytes for layer in state.pools for leaf in layer.values())
    assert engine.decode_state_bytes == actual


def test_sharded_engine_matches_single_device(tiny, rng):
    name, model, config, params = tiny
    mesh = make_mesh(2, 2, 2)
    prompts = _prompts(rng, config.vocab_size, (5, 17, 9, 30))
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    with Orchestrator(Engine(config, SAMPLER), params) as single:
        expected = single.generate_batch(prompts, greedy, progress=False)
    engine = Engine(config, SAMPLER, mesh=mesh)
    with Orchestrator(engine, params) as sharded:
        got = sharded.generate_batch(prompts, greedy, progress=False)
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in expected]
    state = engine.init_decode_state()
    assert len(state.pools[0]["k"].sharding.device_set) == 8


def test_padded_vocabulary_is_never_sampled(tiny, rng):
    """Rows past the tokenizer (valid_vocab_size) carry no probability: never drawn, and the
    reported log-probs and entropies are those of the renormalized distribution."""
    name, model, config, params = tiny
    valid = 300
    engine = Engine(config, SamplerConfig(max_slots=4, max_sequence_length=64, prefill_buckets=(16,),
                                          valid_vocab_size=valid))
    prompts = _prompts(rng, valid, (6, 9))
    sampling = SamplingParams(temperature=1.5, seed=int(rng.integers(2**31)), max_new_tokens=20)
    with Orchestrator(engine, params) as orchestrator:
        results = orchestrator.generate_batch(prompts, sampling, n=3, progress=False)
    for prompt, completions in zip(prompts, results):
        for completion in completions:
            assert max(completion.token_ids) < valid
            logits = np.asarray(forward(params, config, np.asarray([prompt + completion.token_ids[:-1]])))[0]
            logits = logits[len(prompt) - 1 :, :valid]
            log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            tokens = np.asarray(completion.token_ids)
            np.testing.assert_allclose(completion.model_logprobs, log_p[np.arange(len(tokens)), tokens], atol=2e-5)
            np.testing.assert_allclose(completion.entropies, -(np.exp(log_p) * log_p).sum(-1), atol=2e-5)
    # Nor can a prompt hold such a row: its embedding was never trained with the tokenizer.
    with pytest.raises(RequestError, match=f"prompt token id {valid} is outside the vocabulary \\[0, {valid}\\)"):
        engine.validate_request([1, valid, 2], sampling)
    with pytest.raises(RequestError, match="integers, got a boolean"):
        engine.validate_prompt([1, True])
    with pytest.raises(RequestError, match="top_k must be an integer in"):
        engine.validate_request([1, 2], SamplingParams(top_k=2**31, max_new_tokens=2))

"""Continuous batching: same results as one-at-a-time decoding, and every request of a large
mixed load completes exactly once."""

import collections

import pytest

from opsd_jax import load_hf
from opsd_jax.sampler import Engine, Orchestrator, RequestError, SamplerConfig, SamplingParams
from opsd_jax.testing import save_tiny_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_seed):
    path = tmp_path_factory.mktemp("olmo3")
    save_tiny_hf_model("olmo3", str(path), seed=model_seed)
    return load_hf(path, progress=False)


def test_continuous_batching_equals_one_at_a_time(tiny, rng):
    config, params = tiny
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.integers(1, 30, 11)]
    samplings = [SamplingParams(temperature=0, max_new_tokens=int(b)) for b in rng.integers(1, 25, 11)]
    buckets = (8, 16)
    with Orchestrator(Engine(config, SamplerConfig(max_slots=1, max_sequence_length=64, prefill_buckets=buckets)),
                      params) as serial:
        expected = [serial.generate_batch([p], s, progress=False)[0] for p, s in zip(prompts, samplings)]
    with Orchestrator(Engine(config, SamplerConfig(max_slots=3, max_sequence_length=64, prefill_buckets=buckets)),
                      params) as batched:
        got = batched.generate_batch(prompts, samplings, n=2, progress=False)
    for want, have, sampling in zip(expected, got, samplings):
        assert [c.token_ids for c in have] == [want[0].token_ids] * 2
        assert all(len(c.token_ids) == sampling.max_new_tokens for c in have)


def test_two_thousand_mixed_requests_each_complete_exactly_once(tiny, rng):
    config, params = tiny
    engine = Engine(config, SamplerConfig(max_slots=16, max_sequence_length=48, prefill_buckets=(8, 16, 32)))
    count = 2000
    stop_ids = tuple(int(t) for t in rng.choice(config.vocab_size, 60, replace=False))
    prompts, samplings, ns = [], [], []
    for i in range(count):
        prompts.append(rng.integers(0, config.vocab_size, int(rng.integers(1, 33))).tolist())
        samplings.append(SamplingParams(
            temperature=float(rng.choice([0.0, 0.7, 1.0])), top_p=float(rng.choice([1.0, 0.9])),
            top_k=int(rng.choice([0, 20])), seed=i, max_new_tokens=int(rng.integers(1, 9)),
            stop_token_ids=stop_ids if i % 3 == 0 else (),
        ))
        ns.append(2 if i % 10 == 0 else 1)
    with Orchestrator(engine, params) as orchestrator:
        futures = [orchestrator.submit(p, s, n) for p, s, n in zip(prompts, samplings, ns)]
        results = [f.result(timeout=600) for f in futures]
    reasons = collections.Counter()
    for prompt, sampling, n, completions in zip(prompts, samplings, ns, results):
        assert len(completions) == n
        assert sorted(c.sample_index for c in completions) == list(range(n))
        for c in completions:
            assert c.prompt_token_ids == prompt
            assert 1 <= len(c.token_ids) <= sampling.max_new_tokens
            assert len(c.model_logprobs) == len(c.entropies) == len(c.token_ids)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in sampling.stop_token_ids
                assert not set(c.token_ids[:-1]) & set(sampling.stop_token_ids)
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == sampling.max_new_tokens
            reasons[c.finish_reason] += 1
    assert reasons["stop"] > 0 and reasons["length"] > 0


def test_a_failing_stop_callback_fails_only_its_request(tiny, rng):
    config, params = tiny
    engine = Engine(config, SamplerConfig(max_slots=2, max_sequence_length=32, prefill_buckets=(8,)))
    prompt = rng.integers(0, config.vocab_size, 5).tolist()
    greedy = SamplingParams(temperature=0, max_new_tokens=6)

    def broken(token_ids):
        raise RuntimeError("callback bug")

    with Orchestrator(engine, params) as orchestrator:
        bad = orchestrator.submit(prompt, greedy, should_stop=broken)
        good = orchestrator.submit(prompt, greedy)
        assert len(good.result(timeout=120)[0].token_ids) == 6
        with pytest.raises(RuntimeError, match="callback bug"):
            bad.result(timeout=120)
        # Still serving afterwards.
        assert len(orchestrator.submit(prompt, greedy).result(timeout=120)[0].token_ids) == 6


def test_invalid_n_is_rejected(tiny):
    config, params = tiny
    with Orchestrator(Engine(config, SamplerConfig(max_slots=1, max_sequence_length=16, prefill_buckets=(8,))),
                      params) as orchestrator:
        with pytest.raises(RequestError, match="n must be a positive integer"):
            orchestrator.submit([1, 2], SamplingParams(), n=0).result()

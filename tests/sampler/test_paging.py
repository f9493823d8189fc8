"""The paged KV cache through the orchestrator: same tokens whatever the page layout, shared
prompt pages, preemption under a small pool, fixed compiled shapes, cancellation, crashes and
draining that never leave a caller hanging."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from opsd_jax import load_hf
from opsd_jax.sampler import (
    Engine,
    Orchestrator,
    OrchestratorClosed,
    RequestError,
    SamplerConfig,
    SamplerCrashed,
    SamplingParams,
)
from opsd_jax.testing import assert_greedy_matches, save_tiny_hf_model

LENGTH = 96


# OLMo-3 has both kinds of layer (sliding-window layers with their own page pool, full-attention
# layers); Qwen3's plain path runs through tests/sampler/test_engine.py and test_orchestrator.py.
@pytest.fixture(scope="module", params=["olmo3"])
def tiny(request, tmp_path_factory, model_seed):
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_hf_model(request.param, str(path), seed=model_seed)
    config, params = load_hf(path, progress=False)
    return model, config, params


def _engine(config, **overrides):
    settings = {"max_slots": 4, "max_sequence_length": LENGTH, "prefill_buckets": (8, 16)}
    settings.update(overrides)
    return Engine(config, SamplerConfig(**settings))


def _run(engine, params, prompts, samplings, n):
    with Orchestrator(engine, params) as orchestrator:
        results = orchestrator.generate_batch(prompts, samplings, n=n, progress=False)
        return results, dict(orchestrator.stats)


def test_small_pages_and_a_small_pool_give_the_contiguous_tokens(tiny, rng):
    """One page per slot of the whole length is a contiguous cache. Pages of 4 rows in a pool a
    third that size must preempt and resume sequences, and still produce the same tokens, for
    seeded sampling with n samples sharing their prompt's pages."""
    _model, config, params = tiny
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in (5, 13, 22, 30, 9, 17)]
    samplings = [SamplingParams(temperature=1.0, seed=int(rng.integers(2**31)), max_new_tokens=int(m))
                 for m in rng.integers(20, 60, len(prompts))]
    contiguous, _ = _run(_engine(config, page_size=LENGTH), params, prompts, samplings, n=3)
    pool = 4 * LENGTH // 4 // 3 + 1
    paged, stats = _run(_engine(config, page_size=4, kv_pages=pool), params, prompts, samplings, n=3)
    assert stats["preemptions"] > 0
    assert stats["peak_pages_in_use"] <= pool - 1
    for want, have in zip(contiguous, paged):
        assert [c.token_ids for c in have] == [c.token_ids for c in want]
        np.testing.assert_allclose([c.model_logprobs for c in have], [c.model_logprobs for c in want], atol=1e-5)
    assert len({tuple(c.token_ids) for c in paged[0]}) > 1
    # One slot and a pool that holds one longest sequence only: the n samples of a prompt cannot
    # keep their shared prompt pages and must each prefill their own, one after another.
    # Its reference is a one-slot contiguous engine: a one-row decode matmul may sum in another
    # order than a four-row one, and a seeded draw near a CDF boundary would then pick the
    # neighbouring token, which says nothing about paging.
    need = max(len(p) + s.max_new_tokens - 1 for p, s in zip(prompts, samplings))
    alone, stats = _run(_engine(config, max_slots=1, page_size=4, kv_pages=-(-need // 4) + 1), params, prompts,
                        samplings, n=3)
    contiguous_alone, _ = _run(_engine(config, max_slots=1, page_size=LENGTH), params, prompts, samplings, n=3)
    assert [[c.token_ids for c in r] for r in alone] == [[c.token_ids for c in r] for r in contiguous_alone]
    for want, have in zip(contiguous_alone, alone):
        for c_want, c_have in zip(want, have):
            np.testing.assert_allclose(c_have.model_logprobs, c_want.model_logprobs, atol=1e-5)


def test_sliding_window_layers_match_transformers_far_past_the_window(tiny, rng):
    model, config, params = tiny
    prompt = rng.integers(0, config.vocab_size, 11).tolist()
    (result,), _ = _run(_engine(config, page_size=4), params, [prompt], SamplingParams(temperature=0, max_new_tokens=70),
                        n=1)
    assert_greedy_matches(model, prompt, result[0].token_ids)


def test_n_samples_prefill_their_prompt_once(tiny, rng):
    _model, config, params = tiny
    prompts = [rng.integers(0, config.vocab_size, 14).tolist() for _ in range(3)]
    _, stats = _run(_engine(config), params, prompts, SamplingParams(seed=3, max_new_tokens=8), n=4)
    assert stats["prefills"] == 3


def test_cache_length_not_a_multiple_of_the_bucket(tiny, rng):
    """L = 50 with 16-token chunks: a 49-token prompt's last chunk runs past the cache."""
    model, config, params = tiny
    engine = Engine(config, SamplerConfig(max_slots=2, max_sequence_length=50, prefill_buckets=(16,)))
    prompt = rng.integers(0, config.vocab_size, 49).tolist()
    (result,), _ = _run(engine, params, [prompt], SamplingParams(temperature=0, max_new_tokens=2), n=1)
    assert_greedy_matches(model, prompt, result[0].token_ids)


def test_no_prompt_length_compiles_anything_after_warmup(tiny, rng):
    _model, config, params = tiny
    engine = _engine(config)
    with Orchestrator(engine, params) as orchestrator:
        orchestrator.generate_batch([[1, 2]], SamplingParams(max_new_tokens=2), progress=False)
        compiled = (engine._generate._cache_size(), engine._prefill_chunk._cache_size(), engine._insert._cache_size())
        prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.permutation(np.arange(1, 60))[:12]]
        orchestrator.generate_batch(prompts, SamplingParams(max_new_tokens=3, top_logprobs=2), progress=False)
        assert (engine._generate._cache_size(), engine._prefill_chunk._cache_size(),
                engine._insert._cache_size()) == compiled


def test_top_logprobs_only_when_asked(tiny, rng):
    _model, config, params = tiny
    prompt = rng.integers(0, config.vocab_size, 6).tolist()
    with Orchestrator(_engine(config), params) as orchestrator:
        plain, asked = orchestrator.generate_batch(
            [prompt, prompt], [SamplingParams(temperature=0, max_new_tokens=5),
                               SamplingParams(temperature=0, max_new_tokens=5, top_logprobs=3)], progress=False)
    assert plain[0].top_logprobs == []
    assert [len(top) for top in asked[0].top_logprobs] == [3] * 5
    assert [top[0][0] for top in asked[0].top_logprobs] == asked[0].token_ids  # greedy: the top token


def test_cancel_frees_the_slots_and_pages(tiny, rng):
    _model, config, params = tiny
    engine = _engine(config, max_slots=2)
    with Orchestrator(engine, params) as orchestrator:
        started = threading.Event()
        long = orchestrator.submit(rng.integers(0, config.vocab_size, 5).tolist(),
                                   SamplingParams(max_new_tokens=LENGTH - 6), n=2,
                                   on_token=lambda index, completion: started.set())
        assert started.wait(60)
        assert long.cancel()
        deadline = time.monotonic() + 30
        while orchestrator.stats["active_slots"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert orchestrator.stats["active_slots"] == 0 and orchestrator.active_requests() == 0
        after = orchestrator.submit([1, 2, 3], SamplingParams(max_new_tokens=4), n=2).result(timeout=60)
        assert [len(c.token_ids) for c in after] == [4, 4]


def test_a_crashed_loop_fails_every_request_and_later_submissions(tiny, rng, monkeypatch):
    _model, config, params = tiny
    engine = _engine(config)
    with Orchestrator(engine, params) as orchestrator:
        orchestrator.generate_batch([[1, 2]], SamplingParams(max_new_tokens=2), progress=False)

        def broken(*args, **kwargs):
            raise FloatingPointError("device lost")

        monkeypatch.setattr(engine, "generate", broken)
        futures = [orchestrator.submit([1, 2, 3], SamplingParams(max_new_tokens=8)) for _ in range(6)]
        for future in futures:
            with pytest.raises(SamplerCrashed, match="device lost"):
                future.result(timeout=30)
        assert not orchestrator.healthy
        with pytest.raises(SamplerCrashed):
            orchestrator.submit([1], SamplingParams(max_new_tokens=2))


def test_drain_refuses_new_requests_and_close_deadline_cancels_the_rest(tiny, rng):
    _model, config, params = tiny
    orchestrator = Orchestrator(_engine(config, max_slots=1), params)
    finishing = orchestrator.submit([1, 2, 3], SamplingParams(max_new_tokens=3))
    # More work than the deadline can cover: a tiny model decodes a token in about 0.3 ms on CPU,
    # so 20 such requests (1,860 steps) once all finished within the 0.5 s.
    endless = [orchestrator.submit([4, 5], SamplingParams(max_new_tokens=LENGTH - 3)) for _ in range(200)]
    orchestrator.drain()
    with pytest.raises(OrchestratorClosed):
        orchestrator.submit([1], SamplingParams(max_new_tokens=2))
    assert len(finishing.result(timeout=60)[0].token_ids) == 3
    orchestrator.close(deadline_s=0.5)
    assert any(f.cancelled() for f in endless)
    assert all(f.done() for f in endless)


def test_a_sequence_larger_than_the_pool_is_refused(tiny):
    _model, config, params = tiny
    with Orchestrator(_engine(config, page_size=8, kv_pages=4), params) as orchestrator:
        future = orchestrator.submit(list(range(1, 20)), SamplingParams(max_new_tokens=20))
        with pytest.raises(RequestError, match="KV pages"):
            future.result(timeout=60)
        assert len(orchestrator.submit([1, 2], SamplingParams(max_new_tokens=3)).result(timeout=60)[0].token_ids) == 3


def test_on_token_streams_every_token_in_order(tiny, rng):
    _model, config, params = tiny
    seen = {0: [], 1: []}
    with Orchestrator(_engine(config), params) as orchestrator:
        result = orchestrator.submit([3, 4, 5], SamplingParams(seed=5, max_new_tokens=9), n=2,
                                     on_token=lambda i, c: seen[i].append(c.token_ids[-1])).result(timeout=60)
    assert [seen[0], seen[1]] == [c.token_ids for c in result]


def test_concurrent_submitters_each_get_their_own_results(tiny, rng):
    _model, config, params = tiny
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.integers(1, 20, 16)]
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    with Orchestrator(_engine(config, page_size=4, kv_pages=20), params) as orchestrator:
        expected = orchestrator.generate_batch(prompts, greedy, progress=False)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: orchestrator.submit(p, greedy).result(timeout=120), prompts))
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in expected]


def test_default_pools_hold_full_slots_and_one_prompt_of_the_longest_prompt(tiny, rng):
    """Beside every slot at full length, the default pools keep one prompt for its waiting
    samples: a whole sequence's pages unless `max_prompt_length` says how long prompts get (as an
    evaluation does), then only that prompt's. The smaller pools give the same tokens."""
    _model, config, params = tiny
    whole = _engine(config, page_size=4)
    lean = _engine(config, page_size=4, max_prompt_length=30)
    table = LENGTH // 4
    assert whole.num_pages == 5 * table + 1
    assert lean.num_pages == 4 * table + 30 // 4 + 1 + 1  # ceil(30 / 4) = 8 pages
    assert whole.windowed and lean.window_pages_per_sequence == whole.window_pages_per_sequence
    window = whole.window_pages_per_sequence
    assert whole.num_window_pages == 5 * window + 1
    assert lean.num_window_pages == 4 * window + min(8, window) + 1
    assert lean.decode_state_bytes < whole.decode_state_bytes
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.integers(5, 31, 6)]
    samplings = [SamplingParams(temperature=1.0, seed=int(rng.integers(2**31)), max_new_tokens=LENGTH - len(p))
                 for p in prompts]
    want, _ = _run(whole, params, prompts, samplings, n=3)
    have, stats = _run(lean, params, prompts, samplings, n=3)
    assert stats["peak_pages_in_use"] <= lean.num_pages - 1
    assert [[c.token_ids for c in r] for r in have] == [[c.token_ids for c in r] for r in want]

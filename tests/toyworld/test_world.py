import itertools

import numpy as np

from opsd_jax.toyworld import world


def test_problems_have_one_answer_pair(rng):
    for problem in world.generate_problems(300, rng):
        sums = [a + b for a, b in itertools.combinations(problem.numbers, 2)]
        assert sums.count(problem.target) == 1
        assert len(set(problem.numbers)) == world.NUMBERS_PER_PROBLEM
        a, b = problem.pair
        assert a < b and a + b == problem.target and problem.answer == a


def test_excluded_problems_never_come_back(rng):
    first = world.generate_problems(100, rng)
    second = world.generate_problems(100, rng, {(p.numbers, p.target) for p in first})
    assert not {(p.numbers, p.target) for p in first} & {(p.numbers, p.target) for p in second}


def test_thinker_traces_are_valid_and_wrong_only_through_unverified_slips(rng):
    correct = []
    for problem in world.generate_problems(400, rng):
        trace = world.thinker_trace(problem, world.THINKER, rng)
        assert world.trace_is_valid(problem, trace), trace
        right = world.check_answer(problem, trace)
        correct.append(right)
        if not right:  # the last attempt claimed the target for a wrong pair and was not verified
            last = trace.split("try")[-1].split()
            assert int(last[0]) + int(last[2]) != problem.target and "verify" not in last
    # Slip 0.25 on wrong pairs, verified with 0.7: most traces end right, some do not.
    assert 0.7 < np.mean(correct) < 0.99


def test_trace_checker_rejects_broken_traces(rng):
    problem = world.Problem((3, 8, 5, 1), 9)
    good = "<think> try 3 + 8 = 11 wait try 1 + 8 = 9 verify 1 + 8 = 9 ok </think> \\boxed{ 1 }"
    assert world.trace_is_valid(problem, good)
    for broken in (good.replace("= 11", "= 12"),  # a wrong sum that is not a slip to the target
                   good.replace("11 wait", "11"),  # a failed attempt without reconsidering
                   good.replace("verify 1 + 8 = 9", "verify 1 + 8 = 8"),
                   good.replace("\\boxed{ 1 }", "\\boxed{ 8 }"),
                   good.replace("<think> ", "")):
        assert not world.trace_is_valid(problem, broken), broken


def test_checker_accepts_only_the_answer():
    problem = world.Problem((3, 8, 5, 1), 9)
    assert world.check_answer(problem, "</think> \\boxed{ 1 }")
    assert not world.check_answer(problem, "</think> \\boxed{ 8 }")
    assert not world.check_answer(problem, "</think> \\boxed{ 1")  # unfinished box
    assert not world.check_answer(problem, "the answer is 1")


def test_hinted_solvers_use_their_hint(rng):
    for problem in world.generate_problems(100, rng):
        dense = world.hinted_trace(problem, "dense", rng)
        assert dense.split()[1:6] == ["try", *problem.solution.split()[:1], "+", *problem.solution.split()[2:3], "="]
        sparse = world.hinted_trace(problem, "sparse", rng)
        assert all(str(problem.answer) in attempt.split()[:3] for attempt in sparse.split("try")[1:])
        for trace in (dense, sparse):
            assert world.check_answer(problem, trace) and "verify" not in trace and "maybe" not in trace
        assert world.hinted_prompt(problem, "sparse").endswith(f"hint {problem.answer}")


def test_thinker_accuracy_rises_with_budget(rng):
    """Measured on generated traces, cut at each budget as the eval runner cuts generations."""
    problems = world.generate_problems(400, rng)
    traces = [world.thinker_trace(p, world.THINKER, rng).split() for p in problems]
    accuracy = {budget: np.mean([world.check_answer(p, " ".join(t[:budget])) for p, t in zip(problems, traces)])
                for budget in (16, 32, 64)}
    assert accuracy[16] < accuracy[32] < accuracy[64]
    assert accuracy[64] >= 1.5 * accuracy[16]


def test_tokenizer_spells_every_trace_and_has_a_thinking_switch(tmp_path, rng):
    import transformers

    world.save_tokenizer(str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    problem = world.generate_problems(1, rng)[0]
    trace = world.thinker_trace(problem, world.THINKER, rng)
    ids = tokenizer.encode(trace, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == trace
    messages = [{"role": "user", "content": world.hinted_prompt(problem, "dense")}]
    thinking = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    direct = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert direct.startswith(thinking) and direct[len(thinking):].split() == ["<think>", "</think>"]
    assert tokenizer.unk_token_id not in tokenizer.encode(direct)
    assert tokenizer.eos_token == "<|im_end|>"


def test_trace_events_follow_the_solver_that_wrote_the_trace(rng):
    """On generated traces the events are what the generator did: a wrong box only through a slip
    closed unverified, no search given up, first-try and slip counts as drawn."""
    problems = world.generate_problems(400, rng)
    total = world.TraceEvents()
    for problem in problems:
        trace = world.thinker_trace(problem, world.THINKER, rng)
        events = world.trace_events(problem, trace)
        total += events
        assert events.attempts == trace.count("try") and events.misses_closed == events.misses_accepted == 0
        assert events.first_try_right == (int(trace.split()[2]) + int(trace.split()[4]) == problem.target)
        # A slipped pair may share the right pair's smaller number, so a closed slip can box right.
        assert events.unverified_slips_closed <= 1
        if not world.check_answer(problem, trace):
            assert events.unverified_slips_closed == 1
        # Every slip claims, and so does the right pair where the trace reaches it.
        assert events.claims == events.slips + 1 - events.unverified_slips_closed
        assert events.verified_claims == trace.count("verify") and events.hedged_claims == trace.count("maybe")
    # Slip 0.25 on wrong pairs, verification 0.7 and hedging 0.3 of claims; ~800 wrong tries.
    assert 0.19 < total.slips / total.wrong_attempts < 0.31
    assert 0.62 < total.verified_claims / total.claims < 0.78
    assert 0.22 < total.hedged_claims / total.claims < 0.38
    for problem in problems[:50]:
        for privilege in ("dense", "sparse"):
            events = world.trace_events(problem, world.hinted_trace(problem, privilege, rng))
            assert events.slips == events.verified_claims == events.unverified_slips_closed == 0
            assert events.claims == 1 and events.first_try_right == (privilege == "dense" or events.attempts == 1)


def test_a_hint_tells_where_to_look_not_how_to_add(rng):
    """Hinted solvers slip on wrong pairs as often as their solver does, stop at the first claimed
    success without hedging or checking, and box the answer they were given."""
    hinted = world.TraceEvents()
    for problem in world.generate_problems(600, rng):
        dense = world.hinted_trace(problem, "dense", rng, solver=world.THINKER)
        assert dense == world.hinted_trace(problem, "dense", rng)  # the given pair is never a slip
        trace = world.hinted_trace(problem, "sparse", rng, solver=world.THINKER)
        events = world.trace_events(problem, trace)
        hinted += events
        assert world.check_answer(problem, trace) and events.claims == 1
        assert events.hedged_claims == events.verified_claims == 0
    # Sparse: the answer sits in 3 pairs, in random order: about one wrong try per problem, ~550 here.
    assert 0.18 < hinted.slips / hinted.wrong_attempts < 0.32


def test_trace_events_read_what_a_model_writes():
    """Model-written responses break the grammar: malformed tries are skipped, a truncated one is
    not counted, and a search stopped after a miss is counted as given up."""
    problem = world.Problem((3, 8, 5, 1), 9)  # pair 1 + 8
    slipped = world.trace_events(problem, "<think> try 3 + 5 = 9 maybe </think> \\boxed{ 3 }")
    assert (slipped.attempts, slipped.slips, slipped.claims, slipped.hedged_claims,
            slipped.verified_claims, slipped.unverified_slips_closed) == (1, 1, 1, 1, 0, 1)
    caught = world.trace_events(problem, "<think> try 3 + 5 = 9 maybe verify 3 + 5 = 8 wait try 1 + 8 = 9 "
                                         "</think> \\boxed{ 1 }")
    assert (caught.attempts, caught.slips, caught.verified_claims, caught.unverified_slips_closed,
            caught.first_try_right) == (2, 1, 1, 0, 0)
    given_up = world.trace_events(problem, "<think> try 3 + 5 = 8 </think> \\boxed{ 1 }")
    assert (given_up.misses_closed, given_up.misses_accepted, given_up.claims, given_up.wrong_attempts) == (1, 0, 0, 1)
    accepted = world.trace_events(problem, "<think> try 3 + 5 = 8 maybe verify 3 + 5 = 8 ok </think> \\boxed{ 3 }")
    assert (accepted.misses_accepted, accepted.misses_closed, accepted.claims, accepted.verified_claims) == (1, 0, 0, 0)
    rejected = world.trace_events(problem, "<think> try 3 + 5 = 8 verify 3 + 5 = 8 wait try 1 + 8 = 9 </think>")
    assert (rejected.misses_accepted, rejected.attempts, rejected.first_try_right) == (0, 2, 0)
    broken = world.trace_events(problem, "<think> try try 1 + + 8 = 9 try 1 + 8 = nine try 1 + 8 = 9 try 1 + 8 =")
    assert (broken.attempts, broken.first_try_right, broken.claims) == (1, 1, 1)
    assert world.trace_events(problem, "") == world.TraceEvents()

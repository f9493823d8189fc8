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

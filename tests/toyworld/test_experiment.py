import json
import os

import numpy as np
import pytest

from opsd_jax.eval.generations import FORMAT
from opsd_jax.toyworld import experiment, world


def _generations(path, rows):
    lines = [{"format": FORMAT}] + [{"problem_id": pid, "sample_index": i, "text": text, "token_count": 1,
                                     "finish_reason": "stop", "budget_chars": {}} for i, (pid, text) in enumerate(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_trace_behaviour_pools_seeds_per_problem_and_names_each_rate(tmp_path):
    problems = [world.Problem((3, 8, 5, 1), 9), world.Problem((2, 4, 7, 9), 13)]  # pairs 1 + 8, 4 + 9
    suite = tmp_path / "suite.jsonl"
    world.write_jsonl(str(suite), [world.problem_row(p, i, "eval") for i, p in enumerate(problems)])
    seed0 = _generations(tmp_path / "a.jsonl", [
        ("toy-eval-0", "<think> try 3 + 5 = 9 </think> \\boxed{ 3 }"),  # slip boxed unverified
        ("toy-eval-1", "<think> try 4 + 9 = 13 verify 4 + 9 = 13 ok </think> \\boxed{ 4 }")])
    seed1 = _generations(tmp_path / "b.jsonl", [
        ("toy-eval-0", "<think> try 3 + 5 = 8 </think> \\boxed{ 1 }"),  # search given up
        ("toy-eval-1", "<think> try 2 + 7 = 9 verify 2 + 7 = 9 ok try 4 + 9 = 13 maybe </think> \\boxed{ 4 }")])
    counts = experiment.trace_counts([seed0, seed1], str(suite))
    assert counts["responses"].tolist() == [2, 2] and counts["slips"].tolist() == [1, 0]
    assert counts["claims"].tolist() == [1, 2] and counts["misses_closed"].tolist() == [1, 0]
    rates = experiment.behaviour_rates(counts)
    assert rates == {"responses": 4, "attempts_per_response": 5 / 4, "first_try_right": 1 / 4,
                     "slips_per_wrong_attempt": 1 / 3, "verified_claims": 1 / 3, "hedged_claims": 1 / 3,
                     "unverified_slips_closed_per_response": 1 / 4, "misses_closed_per_response": 1 / 4,
                     "misses_accepted_per_response": 1 / 4}
    assert set(rates) - {"responses"} == {key for key, _ in experiment.BEHAVIOUR_COLUMNS}
    table = experiment.behaviour_table({"base": rates, "empty": dict.fromkeys(rates)})
    header, base, empty = table.splitlines()
    assert header.split()[:2] == ["trace", "behaviour"]
    assert base.split() == ["base", "1.250", "0.250", "0.333", "0.333", "0.333", "0.250", "0.250", "0.250"]
    assert empty.split() == ["empty"] + ["-"] * len(experiment.BEHAVIOUR_COLUMNS)


def test_a_claim_of_parts_says_which_part_failed():
    assert experiment._all(("a", True), ("b", True)) == (True, "parts: a reproduced, b reproduced")
    assert experiment._all(("a", True), ("b", None)) == (None, "parts: a reproduced, b undetermined")
    holds, text = experiment._all(("lower", True), ("dense below sparse", False), ("c", None))
    assert holds is False and text == "parts: lower reproduced, dense below sparse not reproduced, c undetermined"


def _counts(rng, problems, responses=16):
    """Random per-problem trace counts (as trace_counts returns), `responses` per problem."""
    counts = {"responses": np.full(problems, float(responses))}
    for name in ("attempts", "first_try_right", "wrong_attempts", "slips", "claims", "hedged_claims",
                 "verified_claims", "unverified_slips_closed", "misses_closed", "misses_accepted"):
        counts[name] = rng.integers(0, responses + 1, problems).astype(float)
    return counts


def test_behaviour_differences_are_paired_bootstraps_over_problems(rng):
    from opsd_jax.eval.metrics import paired_difference

    problems = int(rng.integers(20, 60))
    base, other = _counts(rng, problems), _counts(rng, problems)
    seed = int(rng.integers(2**31))
    changes = experiment.behaviour_differences(base, other, resamples=500, seed=seed)
    assert set(changes) == set(experiment.BEHAVIOUR_RATES)
    # With as many responses per problem, a per-response rate's ratio of sums is the mean of the
    # per-problem rates: its interval is eval.metrics' paired bootstrap of those means.
    for key in ("first_try_right", "unverified_slips_closed_per_response", "misses_closed_per_response"):
        numerator = experiment.BEHAVIOUR_RATES[key][0]
        want = paired_difference(base[numerator] / 16, other[numerator] / 16, resamples=500, seed=seed)
        np.testing.assert_allclose(changes[key]["difference"], want["absolute"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(changes[key]["ci95"], want["absolute_ci"], rtol=1e-12, atol=1e-15)
    # A rate over another denominator is a ratio of sums, not a mean of ratios.
    want = other["slips"].sum() / other["wrong_attempts"].sum() - base["slips"].sum() / base["wrong_attempts"].sum()
    assert changes["slips_per_wrong_attempt"]["difference"] == want
    low, high = changes["slips_per_wrong_attempt"]["ci95"]
    assert low < want < high
    same = experiment.behaviour_differences(base, base, resamples=200, seed=seed)
    assert all(v == {"difference": 0.0, "ci95": [0.0, 0.0]} for v in same.values())


def test_a_rate_with_no_denominator_has_no_change(rng):
    base, other = _counts(rng, 12), _counts(rng, 12)
    other["claims"][:] = 0  # no claimed success at all: verified and hedged shares are undefined
    base["claims"][1:] = 0  # one problem with claims: resamples without it are left out
    base["claims"][0] = 3
    changes = experiment.behaviour_differences(base, other, resamples=300, seed=1)
    assert changes["verified_claims"] is None and changes["hedged_claims"] is None
    other["claims"][:] = 5
    changes = experiment.behaviour_differences(base, other, resamples=300, seed=1)
    assert np.isfinite(changes["verified_claims"]["ci95"]).all()


def test_training_markers_are_token_weighted_over_the_first_and_last_eighth():
    from opsd_jax.toyworld.experiment import training_summary

    history = [{"step": i + 1, "loss": 1.0 / (i + 1), "rollout_length_mean": 10.0 + i,
                "markers_per_1k_tokens": 100.0 - i, "markers_per_1k_tokens_hedging": float(i % 3)} for i in range(16)]
    summary = training_summary(history)
    assert summary["marker_window_steps"] == 2 and summary["first_loss"] == 1.0 and summary["last_loss"] == 1 / 16
    assert summary["markers_per_1k_tokens"]["first_steps"] == pytest.approx((10 * 100 + 11 * 99) / 21)
    assert summary["markers_per_1k_tokens"]["last_steps"] == pytest.approx((24 * 86 + 25 * 85) / 49)
    assert summary["markers_per_1k_tokens_hedging"] == pytest.approx({"first_steps": 11 / 21,
                                                                      "last_steps": (24 * 2 + 25 * 0) / 49})
    short = training_summary(history[:3])  # at least one step at each end
    assert short["marker_window_steps"] == 1 and short["markers_per_1k_tokens"]["last_steps"] == 98.0
    # a step whose rollouts were all empty logs no rate: it is left out, and a window of only such
    # steps has none
    silent = [{k: v for k, v in step.items() if not k.startswith("markers")} for step in history[:2]]
    gap = training_summary(silent + history[2:])
    assert gap["markers_per_1k_tokens"] == pytest.approx({"first_steps": None, "last_steps": (24 * 86 + 25 * 85) / 49})
    assert experiment._rate(None) == "-" and experiment._mean_or_none([None, 2.0, 4.0]) == 3.0


def test_forced_move_contexts_are_what_every_solver_writes_next():
    """Each context is a prefix of traces the world's solvers write, and the word named is the
    only one they write there (50 generated traces per context and solver, every move seen)."""
    rng = np.random.default_rng(0)
    problems = world.generate_problems(40, rng)
    seen = {move: set() for move in experiment.FORCED_MOVES}
    named = {move: set() for move in experiment.FORCED_MOVES}
    for problem in problems:
        for move, (response, forced) in experiment.forced_move_contexts(problem, rng).items():
            named[move].add(forced)
            words = response.split()
            a, b, written = int(words[2]), int(words[4]), int(words[6])
            assert (a + b == problem.target) == (move == "after the right pair verified")
            assert written == (a + b if move == "after a miss" else problem.target)
            for solver in (world.THINKER, world.STRONG_THINKER):
                for _ in range(50):
                    trace = world.thinker_trace(problem, solver, rng).split()
                    for start in range(len(trace) - len(words) + 1):
                        if trace[start: start + len(words) - 1] == words[1:]:
                            seen[move].add(trace[start + len(words) - 1])
    assert seen == named == {"after a miss": {"wait"}, "after a verified slip": {"wait"},
                             "after the right pair verified": {"ok"}}


def test_forced_move_strays_match_transformers(tmp_path, rng):
    """The probability off the forced word, computed with the project's forward, equals what
    transformers gives for the same chat-templated contexts (a random 2-layer model)."""
    import torch
    import transformers

    from opsd_jax.distill.prompts import chat_prompt_ids
    from opsd_jax.toyworld import warmstart

    tokenizer_dir, model_dir = str(tmp_path / "tokenizer"), str(tmp_path / "model")
    world.save_tokenizer(tokenizer_dir)
    recipe = warmstart.ModelRecipe("random", hidden=32, layers=2, thinking=True, solver=world.THINKER, steps=0,
                                   problems=0, seed=int(rng.integers(1 << 16)))
    warmstart.init_checkpoint(recipe, tokenizer_dir, model_dir)
    problems = world.generate_problems(12, rng)
    values = experiment.forced_move_stray_values(model_dir, problems, seed=3)
    strays = experiment.forced_move_strays(model_dir, problems, seed=3)

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    rng = np.random.default_rng(3)
    kept = {move: [] for move in experiment.FORCED_MOVES}
    for problem in problems:
        prompt = chat_prompt_ids(tokenizer, problem.text, thinking=True)
        for move, (response, forced) in experiment.forced_move_contexts(problem, rng).items():
            ids = torch.tensor([prompt + tokenizer.encode(response, add_special_tokens=False)])
            with torch.no_grad():
                probabilities = model(ids).logits[0, -1].softmax(-1)
            kept[move].append(probabilities[tokenizer.convert_tokens_to_ids(forced)].item())
    assert set(strays) == set(values) == set(experiment.FORCED_MOVES)
    for move in experiment.FORCED_MOVES:
        assert 0.5 < strays[move] < 1  # a random model spreads its mass over the 64 ids
        # per problem, in the problems' order (the batches group contexts by length)
        np.testing.assert_allclose(values[move], 1 - np.array(kept[move]), rtol=1e-5)
        np.testing.assert_allclose(strays[move], 1 - np.mean(kept[move]), rtol=1e-5)

    # The hinted give-up: the same first missed try, after the trainer's privileged teacher prompt.
    give_ups = experiment.hinted_give_up_values(model_dir, problems, seed=3)
    rng = np.random.default_rng(3)
    expected = []
    for problem in problems:
        response, _ = experiment.forced_move_contexts(problem, rng)["after a miss"]
        prompt = chat_prompt_ids(tokenizer, world.hinted_prompt(problem, "dense"), thinking=True)
        ids = torch.tensor([prompt + tokenizer.encode(response, add_special_tokens=False)])
        with torch.no_grad():
            probabilities = model(ids).logits[0, -1].softmax(-1)
        expected.append(probabilities[tokenizer.convert_tokens_to_ids("</think>")].item())
    np.testing.assert_allclose(give_ups, expected, rtol=1e-5)


def test_hinted_give_up_context_is_the_privileged_teachers_prompt():
    """The give-up is measured after the prompt privileged OPD's teacher reads in training: the
    experiment's config for that condition, through the trainer's own prompt builder."""
    from opsd_jax.data.sources import Problem
    from opsd_jax.distill.prompts import chat_prompt_ids, prompt_pair
    from opsd_jax.toyworld import warmstart

    condition = next(c for c in experiment.CONDITIONS if c.name == "privileged_opd")
    config = experiment.condition_config(condition, experiment.ExperimentSettings(), "unused.jsonl", "unused", 0)
    tokenizer = experiment._world_tokenizer(os.path.join(warmstart.SHIPPED, "teacher"))
    for index, problem in enumerate(world.generate_problems(5, np.random.default_rng(0))):
        row = world.problem_row(problem, index, "train")
        pair = prompt_pair(Problem(row["id"], row["problem"], row["solution"], row["answer"]), config.prompt, tokenizer)
        assert pair.teacher_ids == chat_prompt_ids(tokenizer, world.hinted_prompt(problem, "dense"), thinking=True)
        assert experiment._thinking_context(tokenizer, world.hinted_prompt(problem, "dense"), "") == pair.teacher_ids


def test_forced_move_differences_are_paired_over_problems(rng):
    """The teacher's excess over the thinker at each forced move is the difference of the means;
    its interval comes from resampling problems for both models at once, so a constant offset
    has a zero-width interval however much the problems differ."""
    thinker = {move: rng.uniform(0, 0.5, 40) for move in experiment.FORCED_MOVES}
    offset = {move: thinker[move] + 0.01 * (k + 1) for k, move in enumerate(experiment.FORCED_MOVES)}
    differences = experiment.forced_move_differences(thinker, offset, seed=1)
    for k, move in enumerate(experiment.FORCED_MOVES):
        assert differences[move]["difference"] == pytest.approx(0.01 * (k + 1))
        assert differences[move]["ci95"] == pytest.approx([0.01 * (k + 1)] * 2)
    noisy = {move: thinker[move] + rng.normal(0.02, 0.05, 40) for move in experiment.FORCED_MOVES}
    for move, d in experiment.forced_move_differences(thinker, noisy, seed=1).items():
        low, high = d["ci95"]
        assert d["difference"] == pytest.approx(np.mean(noisy[move] - thinker[move]))
        assert low < d["difference"] < high and high - low > 0.01
    line = experiment.forced_moves_line({"stronger teacher": {m: v.mean() for m, v in offset.items()},
                                         "base": {m: v.mean() for m, v in thinker.items()}}, differences)
    assert "after a miss" in line and "(+0.0100 [+0.0100, +0.0100])" in line


def test_teacher_bar_judges_the_upper_end_of_each_interval_and_the_greedy_count():
    """A teacher whose mean strays below the thinker's but whose interval reaches past twice the
    thinker's rate fails that move; equal greedy counts pass; one fewer fails."""
    thinker = {"after a miss": 0.002, "after a verified slip": 0.003, "after the right pair verified": 0.005}
    means = {"base": thinker, "stronger teacher": {move: 0.001 for move in experiment.FORCED_MOVES}}
    differences = {"after a miss": {"difference": -0.001, "ci95": [-0.002, 0.002]},  # exactly the thinker's: holds
                   "after a verified slip": {"difference": -0.002, "ci95": [-0.003, 0.0031]},  # past it: fails
                   "after the right pair verified": {"difference": -0.004, "ci95": [-0.005, -0.003]}}
    parts = experiment.teacher_bar_parts(means, differences, {"base": 10, "stronger teacher": 10}, 12, 96)
    assert [p["ok"] for p in parts] == [True, False, True, True]
    assert parts[1]["value"] == "+0.0031 vs 0.0030" and parts[3]["value"] == "10 vs 10 of 12"
    parts = experiment.teacher_bar_parts(means, differences, {"base": 10, "stronger teacher": 9}, 12, 96)
    assert not parts[3]["ok"] and "96 tokens" in parts[3]["part"]
    bar = {"parts": parts, "ok": False, "hinted_give_up": {
        "base": 0.04, "stronger teacher": 0.5, "teacher_minus_thinker": {"difference": 0.46, "ci95": [0.4, 0.5]}}}
    text = experiment.teacher_bar_text(bar)
    assert text.count("FAILED") == 2 and text.endswith("the teacher does not clear the bar")


def test_greedy_right_values_match_transformers_greedy_generation(tmp_path):
    """The shipped thinker's greedy answers through the project's eval runner are right on the
    same problems as transformers' greedy `generate` from the same thinking prompt."""
    import torch
    import transformers

    from opsd_jax.distill.prompts import chat_prompt_ids
    from opsd_jax.toyworld import warmstart

    settings = experiment.ExperimentSettings(train_problems=0, eval_problems=12, max_tokens=64)
    _, eval_path = experiment.write_world(str(tmp_path / "world"), settings)
    _, problems = experiment.suite_problems(eval_path)
    thinker = os.path.join(warmstart.SHIPPED, "thinker")
    right = experiment.greedy_right_values(thinker, eval_path, str(tmp_path / "greedy"), max_tokens=64)

    tokenizer = transformers.AutoTokenizer.from_pretrained(thinker)
    model = transformers.AutoModelForCausalLM.from_pretrained(thinker, dtype=torch.float32).eval()
    expected = []
    for problem in problems:
        ids = torch.tensor([chat_prompt_ids(tokenizer, problem.text, thinking=True)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(world.check_answer(problem, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    assert right.tolist() == [float(e) for e in expected]
    assert right.sum() >= len(problems) // 2  # the thinker solves most: the comparison is not of all-wrong runs


def test_the_demo_preconditions_hold_the_teacher_to_the_forced_move_part_of_the_bar():
    accuracy = {"base": {"16": {"accuracy": 0.2}, "96": {"accuracy": 0.8}}}
    analysis = {"opsd": {"groups": {"base": {"markers": {"any": {"per_1k_tokens": 90.0}}}}},
                "instruct": {"groups": {"instruct": {"markers": {"any": {"per_1k_tokens": 1.0}}}}}}
    means = {"base": {move: 0.003 for move in experiment.FORCED_MOVES}}
    sound = {move: {"difference": -0.001, "ci95": [-0.002, 0.003]} for move in experiment.FORCED_MOVES}
    assert len(experiment.preconditions_check(accuracy, analysis, "16", "96")) == 3
    checks = experiment.preconditions_check(accuracy, analysis, "16", "96", means, sound)
    assert all(c["ok"] for c in checks) and len(checks) == 4
    assert checks[3]["value"] == "+0.0030 / +0.0030 / +0.0030 vs 0.0030 / 0.0030 / 0.0030"
    strays = dict(sound, **{"after the right pair verified": {"difference": 0.001, "ci95": [-0.001, 0.0031]}})
    assert not experiment.preconditions_check(accuracy, analysis, "16", "96", means, strays)[3]["ok"]

import json

from opsd_jax.eval.generations import FORMAT
from opsd_jax.toyworld import experiment, world


def _generations(path, rows):
    lines = [{"format": FORMAT}] + [{"problem_id": pid, "sample_index": i, "text": text, "token_count": 1,
                                     "finish_reason": "stop", "budget_chars": {}} for i, (pid, text) in enumerate(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_trace_behaviour_pools_seeds_and_names_each_rate(tmp_path):
    problems = [world.Problem((3, 8, 5, 1), 9), world.Problem((2, 4, 7, 9), 13)]  # pairs 1 + 8, 4 + 9
    suite = tmp_path / "suite.jsonl"
    world.write_jsonl(str(suite), [world.problem_row(p, i, "eval") for i, p in enumerate(problems)])
    seed0 = _generations(tmp_path / "a.jsonl", [
        ("toy-eval-0", "<think> try 3 + 5 = 9 </think> \\boxed{ 3 }"),  # slip boxed unverified
        ("toy-eval-1", "<think> try 4 + 9 = 13 verify 4 + 9 = 13 ok </think> \\boxed{ 4 }")])
    seed1 = _generations(tmp_path / "b.jsonl", [
        ("toy-eval-0", "<think> try 3 + 5 = 8 </think> \\boxed{ 1 }"),  # search given up
        ("toy-eval-1", "<think> try 2 + 7 = 9 verify 2 + 7 = 9 ok try 4 + 9 = 13 maybe </think> \\boxed{ 4 }")])
    rates = experiment.trace_behaviour([seed0, seed1], str(suite))
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

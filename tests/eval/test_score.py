"""Scoring a run folder from synthetic generations with known answers and answer positions."""

import json
import os

import pytest

from opsd_jax.eval import generations
from opsd_jax.eval.report import compare_runs
from opsd_jax.eval.runner import score_run
from opsd_jax.eval.suites import load_suite


def write_suite(tmp_path):
    path = tmp_path / "toy.jsonl"
    rows = [{"id": "a", "problem": "p", "answer": "5"}, {"id": "b", "problem": "q", "answer": "\\frac{1}{2}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_suite(str(path))


def synthetic(problem_id, sample_index, answer_token, total, answer="5", finish="stop", tail=" done"):
    """One character per token: `answer_token` filler tokens, the boxed answer, then a tail."""
    text = ("." * answer_token + f"\\boxed{{{answer}}}" + tail * total)[:total]
    return {"problem_id": problem_id, "sample_index": sample_index, "seed": 0, "token_count": total,
            "finish_reason": finish, "text": text, "budget_chars": {str(b): b for b in (8, 16, 32) if b < total}}


def write_run(out, suite, records):
    header = {"format": generations.FORMAT, "suite": suite.name, "suite_fingerprint": suite.fingerprint,
              "tokenizer_fingerprint": "t", "prompt_fingerprint": "p",
              "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "seed": 0, "max_tokens": 64},
              "budgets": [8, 16, 32], "thinking_open": False, "shard": [0, 1], "suite_source": suite.source}
    with generations.Appender(generations.shard_path(os.path.join(out, suite.name), (0, 1)), header) as appender:
        for record in records:
            appender.append(record)


def test_budget_sweep_metrics_from_known_answer_positions(tmp_path):
    suite = write_suite(tmp_path)
    # \\boxed{5} is 9 characters, so an answer starting at token t is complete after t + 9 tokens.
    records = [
        synthetic("a", 0, 0, 12),     # complete at 9: right from budget 16 on
        synthetic("a", 1, 6, 20),     # complete at 15: right from 16 on
        synthetic("a", 2, 20, 40),    # complete at 29: right from 32 on
        synthetic("a", 3, 50, 64, finish="length"),  # complete at 59: right only at the full cap
        synthetic("b", 0, 0, 30, answer="0.5"),      # 11 characters: right from 16 on
        synthetic("b", 1, 0, 30, answer="2"),        # wrong everywhere
        # No box: the phrase fallback counts once the response ends within the budget (10 tokens),
        # never in a cut-off one, and never in box-only accuracy.
        {**synthetic("b", 2, 0, 10), "text": "The answer is 1/2"},
        synthetic("b", 3, 0, 64, answer="3", finish="length"),
    ]
    write_run(str(tmp_path / "run"), suite, records)
    results = score_run(str(tmp_path / "run"), [suite], progress=False)["toy"]
    expected = {8: (0, 0), 16: (2, 2), 32: (3, 2), 64: (4, 2)}  # correct samples of (a, b)
    for budget, (a, b) in expected.items():
        m = results[budget]
        assert m["accuracy"] == (a + b) / 8, budget
        assert [p["correct"] for p in m["per_problem"]] == [a, b]
        phrase = int(budget >= 16)
        assert m["accuracy_boxed_only"] == (a + b - phrase) / 8
        assert m["extraction"]["phrase"] == phrase
    # Lengths at the cap: every token counts; hit-cap share counts cut and capped responses.
    assert results[64]["length"]["mean_tokens"] == pytest.approx((12 + 20 + 40 + 64 + 30 + 30 + 10 + 64) / 8)
    assert results[64]["length"]["hit_cap_share"] == 2 / 8
    assert results[8]["length"]["hit_cap_share"] == 1.0
    assert results[64]["pass@k"]["4"] == 1.0
    with open(tmp_path / "run" / "toy" / "metrics" / "budget-16.json") as f:
        assert json.load(f)["accuracy"] == 4 / 8

    worse = [dict(r, text=r["text"].replace("\\boxed{5}", "\\boxed{6}")) for r in records]
    write_run(str(tmp_path / "worse"), suite, worse)
    score_run(str(tmp_path / "worse"), [suite], progress=False)
    report = compare_runs([str(tmp_path / "run"), str(tmp_path / "worse")], None, str(tmp_path / "report"),
                          resamples=2000)
    at_cap = next(r for r in report["differences"] if r["budget"] == 64)
    # Problem a drops from 4/4 to 0/4, b stays at 2/4: mean accuracy 3/4 -> 1/4.
    assert at_cap["absolute"] == pytest.approx(-0.5) and at_cap["relative"] == pytest.approx(-2 / 3)
    assert at_cap["absolute_ci"][0] <= -0.5 <= at_cap["absolute_ci"][1]
    assert "| toy | 64 | run | worse |" in (tmp_path / "report" / "comparison.md").read_text()


def test_incomplete_or_foreign_runs_are_refused(tmp_path):
    suite = write_suite(tmp_path)
    write_run(str(tmp_path / "run"), suite, [synthetic("a", 0, 0, 12), synthetic("b", 0, 0, 12),
                                             synthetic("b", 1, 0, 12)])
    with pytest.raises(ValueError, match=r"incomplete run.*a \(1 of 2\)"):
        score_run(str(tmp_path / "run"), [suite], progress=False)
    (tmp_path / "toy.jsonl").write_text('{"id": "a", "problem": "p", "answer": "6"}\n')
    with pytest.raises(ValueError, match="other problems than suite toy"):
        score_run(str(tmp_path / "run"), [load_suite(str(tmp_path / "toy.jsonl"))], progress=False)


def test_a_regrade_killed_while_writing_leaves_the_earlier_metrics_whole(tmp_path, monkeypatch):
    """The budget files of one grading are replaced together: a kill after some of the new ones
    are written leaves the earlier set as it was, never a mix that `--compare` would read."""
    from opsd_jax.eval import score

    suite = write_suite(tmp_path)
    records = [synthetic("a", i, 0, 12) for i in range(2)] + [synthetic("b", i, 0, 30, answer="2") for i in range(2)]
    run = tmp_path / "run"
    write_run(str(run), suite, records)
    score_run(str(run), [suite], progress=False)
    metrics = run / "toy" / "metrics"
    before = {name: (metrics / name).read_text() for name in os.listdir(metrics)}
    assert sorted(before) == ["budget-16.json", "budget-32.json", "budget-64.json", "budget-8.json"]
    written, real = [], score.write_atomic

    def killed_on_the_third(path, text):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real(path, text)

    monkeypatch.setattr(score, "write_atomic", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        score_run(str(run), [suite], progress=False)
    assert {name: (metrics / name).read_text() for name in os.listdir(metrics)} == before
    assert len(written) == 2 and all(os.sep + "metrics" + os.sep not in path for path in written)
    monkeypatch.setattr(score, "write_atomic", real)
    assert score.load_run_metrics(str(run))["toy"][64]["accuracy"] == 0.5

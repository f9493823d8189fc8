"""The paper's grader (paper_grader.py): extraction, strip_string, math_equal, the HMMT rule, and
the `--grading paper` mode through scoring. Expected values follow the spec of the paper's
evaluation/utils.py, grader.py and tasks.py, quirks included."""

import argparse
import json
import os
import shutil

import pytest

from opsd_jax.eval import generations, grader, paper_grader, score
from opsd_jax.eval.paper_grader import (extract_answer_math, extract_with_method, gold_answer, grade, math_equal,
                                        strip_string, task_for_suite)
from opsd_jax.eval.report import compare_runs
from opsd_jax.eval.runner import score_run
from opsd_jax.eval.suites import load_suite

HMMT10 = "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"  # HMMT February 2025 problem 10's reference

# ---- extraction, on hand-made finished and cut responses -------------------------------------------

EXTRACTION = [
    # A box inside reasoning that never finished (a response cut by a budget) counts.
    ("<think>Let me add: 40 + 2 = 42, so \\boxed{42}. Hmm, wait, let me verify with 17", "42", grader.BOXED),
    # The last "boxed" anywhere wins, in or after the reasoning.
    ("<think>first try \\boxed{3}</think>\nSo the final answer is \\boxed{4}.", "4", grader.BOXED),
    ("<think>maybe \\boxed{3}</think> Let me restate: 12 apples, so \\boxed{3}? no, 5", "3", grader.BOXED),
    # Unclosed (cut) box: everything after `{`, nested braces included, then normalised.
    ("<think>thus \\boxed{12", "12", grader.BOXED),
    ("so \\boxed{\\dfrac{1}{2", "\\frac{1}{2", grader.BOXED),
    # `\boxed 5$` form: up to the first dollar sign.
    ("The result is $\\boxed 5$.", "5", grader.BOXED),
    # Only the box's first line survives.
    ("\\boxed{7\n+ 1}", "7", grader.BOXED),
    # An echoed empty box after the answer is the last box (deliberate quirk): empty answer.
    ("So \\boxed{4}. (Format: \\boxed{})", "", grader.BOXED),
    # "unboxed" contains "boxed": the text after it, up to a dollar sign.
    ("\\boxed{4} would be unboxed 9 here", "9here", grader.BOXED),
    # "he answer is": the last occurrence, first line, ':' and '.' dropped.
    ("<think>no box here</think> The answer is: 17.\nThat is all, 99", "17", grader.PHRASE),
    ("I think the answer is 6 but the answer is 8.", "8", grader.PHRASE),
    # Last number, after deleting every comma from the text.
    ("<think>we have 1,234 apples and 12,345 pears", "12345", grader.LAST_NUMBER),
    ("ratio 3.5 then -0.25", "-0.25", grader.LAST_NUMBER),
    # \fbox is not a box for this grader: the fallbacks decide.
    ("\\fbox{7} is what I get, out of 8", "8", grader.LAST_NUMBER),
    ("nothing numeric at all", "", grader.NONE),
    ("", "", grader.NONE),
]


@pytest.mark.parametrize("text,answer,method", EXTRACTION)
def test_extraction(text, answer, method):
    assert extract_with_method(text) == (answer, method)
    assert extract_answer_math(text) == answer


GRADES = [  # (response, reference, correct)
    ("<think>Let me add: 40 + 2 = 42, so \\boxed{42}. Hmm, wait, let me verify with 17", "42", True),
    ("<think>Let me add: 40 + 2 = 43, so \\boxed{43}. Hmm, wait, let me verify with 42", "42", False),
    ("<think>thus \\boxed{12", "12", True),
    ("<think>thus \\boxed{12", "123", False),
    ("so \\boxed{\\dfrac{1}{2", "\\frac{1}{2}", True),  # braces are deleted before comparing
    ("<think>no box</think> The answer is: 17.", "17", True),
    ("<think>no box</think> The answer is: 17.", "71", False),
    ("<think>we have 1,234 apples and 12,345 pears", "12345", True),
    ("<think>we have 1,234 apples and 12,345 pears", "12,345", True),  # numbers compare without commas
    ("nothing numeric at all", "0", False),
    ("<think>maybe \\boxed{3}</think> Final: \\boxed{\\frac{3}{4}}", "0.75", True),
    ("<think>maybe \\boxed{3}</think> Final: \\boxed{\\frac{3}{4}}", "3", False),
    ("\\fbox{7}", "7", True),   # the last number happens to be the fbox's
    ("\\fbox{7} out of 8", "7", False),
    ("\\boxed{025}", "25", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{5 \\text{ cm}}", "5", True),
    # latex2sympy2 turns `\\,` into a space before it reads commas: 204, not a list.
    ("\\boxed{204\\,\\text{min}}", "204", True),
]


@pytest.mark.parametrize("response,reference,correct", GRADES)
def test_grade(response, reference, correct):
    g = grade(response, reference)
    assert g.correct is correct, g
    assert g.timed_out is False


def test_grade_reports_nothing_found():
    assert grade("no digits", "3") == grader.Grade(False, None, grader.NONE, False)
    assert grade("x \\boxed{}", "3") == grader.Grade(False, "", grader.BOXED, False)


# ---- strip_string -----------------------------------------------------------------------------------

STRIP = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\frac1", "\\frac1"),  # an argument shorter than two characters: unchanged
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("5\\text{ cm}", "5"),
    ("\\text{(A)}", "{(A)}"),  # the unit rule would leave nothing, so only `\text` goes
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("50\\%", "50"),
    ("\\$4.50", "4.50"),
    ("x=3", "3"),
    ("k = 3", "3"),
    ("abc=3", "abc=3"),  # a left side longer than two characters stays
    ("2.50", "2.50"),  # zeros are dropped only right after the point
    ("2.0", "2"),
    ("2.000\\text{ m}", "2"),
    ("10.0x", "10x"),
    (".5", "0.5"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("-3/4", "\\frac{-3}{4}"),
    ("1.5/2", "1.5/2"),
    ("1,000", "1,000"),
    ("3 + 2j", "3+2i"),
    ("\\infty", "\\infty"),
    ("inf", "\\infty"),
    ("\\land", "\\l"),  # every "and" goes (deliberate quirk)
    ("random", "rom"),
    ("5\\mbox{ m}", "5"),
    ("\\mathbf{v}", "{v}"),
    ("'a'", "'a'"),  # quotes stay: the original's removal is a no-op
    ("a\\\\b", "a\\b"),
    ("7.\n", "7"),
    ("", ""),
]


@pytest.mark.parametrize("raw,stripped", STRIP)
def test_strip_string(raw, stripped):
    assert strip_string(raw) == stripped


# ---- math_equal ---------------------------------------------------------------------------------------

EQUAL = [  # (prediction, reference, equal) with the task graders' timeout=True
    # Numbers: percent forms and reference/100, reference, reference*100.
    ("50%", "0.5", True),
    ("50\\%", "0.5", True),
    ("50", "0.5", True),      # reference*100 (deliberate quirk)
    ("0.5", "50", True),      # reference/100
    ("5000", "50", True),
    ("51", "0.5", False),
    # rel_tol 1e-4.
    ("1.00009", "1", True),
    ("1.0002", "1", False),
    ("100009", "100000", True),
    ("100011", "100000", False),
    ("2.50", "2.5", True),
    ("1,000", "1000", True),
    # Case-insensitive after deleting {}(); `\frac{1}{2}` even equals `\frac{12}` (quirk).
    ("X", "x", True),
    ("\\frac{1}{2}", "\\frac{12}", True),
    # Symbolic.
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.5", False),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("2^{10}", "1024", True),
    ("2^10", "1024", False),  # parse_expr reads `^` as XOR: 2^10 = 8 (faithful quirk)
    ("1-\\frac{2}{\\pi}", "\\frac{\\pi-2}{\\pi}", True),
    # Tuples and intervals element by element; bracket kinds are not compared (quirk).
    ("(1,\\frac{1}{2})", "(1,0.5)", True),
    ("(1,2)", "(2,1)", False),
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", True),
    ("(0,1)", "[0,1]", True),
    ("(1,2,3)", "(1,2)", False),
    # Equations.
    ("x+y=1", "1-y=x", True),
    ("x+y=1", "x-y=1", False),
    ("y=2x+1", "2x+1", True),
    # Matrices cell by cell.
    ("\\begin{pmatrix}1&\\frac{1}{2}\\end{pmatrix}", "\\begin{pmatrix}1&0.5\\end{pmatrix}", True),
    ("\\begin{bmatrix}1&\\frac{1}{2}\\end{bmatrix}", "\\begin{pmatrix}1&0.5\\end{pmatrix}", True),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&3\\end{pmatrix}", False),
    # A pmatrix prediction turns a reference without "pmatrix" into pmatrices of its `{a,b}`
    # groups; a bmatrix reference has none and becomes empty (deliberate quirk).
    ("\\begin{pmatrix}1&\\frac{1}{2}\\end{pmatrix}", "\\begin{bmatrix}1&0.5\\end{bmatrix}", False),
    # A comma list is ordered under math_equal (latex2sympy2 returns a list).
    ("\\frac{1}{2},\\frac{1}{3}", "\\frac{1}{2},\\frac{1}{3}", True),
    ("\\frac{1}{3},\\frac{1}{2}", "\\frac{1}{2},\\frac{1}{3}", False),
    ("204\\,", "204", True),  # a thin space is no list separator
    ("\\frac{1}{2},\\,\\frac{1}{3}", "\\frac{1}{2},\\frac{1}{3}", True),
    # A falsy prediction.
    ("", "0", False),
]


@pytest.mark.parametrize("prediction,reference,equal", EQUAL)
def test_math_equal(prediction, reference, equal):
    assert math_equal(prediction, reference, timeout=True) is equal


def test_two_numbers_never_reach_the_symbolic_step(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("symbolic step called")

    monkeypatch.setattr(paper_grader, "symbolic_equal", fail)
    assert math_equal("2", "3") is False
    assert math_equal("1e3", "1000") is True
    with pytest.raises(AssertionError, match="symbolic step called"):
        math_equal("\\frac{1}{3}", "3")


def test_symbolic_step_times_out_as_not_equal():
    # 9**9**9**9 is far beyond a second (and stuck in C): the worker is killed and replaced.
    assert paper_grader.symbolic_equal("9**9**9**9", "1", 1.0) is None
    assert paper_grader.symbolic_equal("\\frac{1}{2}", "0.5", 1.0) is True  # a fresh worker took over
    correct, timed_out = paper_grader.math_equal_detailed("9**9**9**9", "2", timeout=True)
    assert (correct, timed_out) == (False, True)


def test_parse_expr_is_guarded():
    assert paper_grader.symbolic_equal("sqrt(4)", "2", 5.0) is True  # parse_expr still reads Python syntax
    assert paper_grader.symbolic_equal("__import__('math').floor(1.5)", "1", 5.0) is False
    assert paper_grader.symbolic_equal("eval('1')", "1", 5.0) is False
    assert paper_grader.symbolic_equal("(2).__class__(1)", "1", 5.0) is False  # no attribute chains


# ---- task rules -------------------------------------------------------------------------------------

def test_hmmt_multi_answer_is_order_agnostic():
    swapped = "\\boxed{\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}}"
    same = "\\boxed{x = \\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}}"
    assert grade(swapped, HMMT10, task="hmmt").correct
    assert grade(same, HMMT10, task="hmmt").correct  # "x =" goes with strip_string's `=` rule
    assert not grade("\\boxed{\\frac{-1+\\sqrt{17}}{2}}", HMMT10, task="hmmt").correct  # one of two
    assert not grade("\\boxed{\\frac{-1+\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}}", HMMT10, task="hmmt").correct
    assert not grade("\\boxed{\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}, 0}", HMMT10, task="hmmt").correct
    # MathTask has no multi-answer rule: a swapped list is not equal.
    assert not grade(swapped, HMMT10, task="math").correct
    # Without ", " in the reference HMMT grades like MathTask.
    assert grade("\\boxed{\\frac{9\\sqrt{23}}{23}}", "\\frac{9 \\sqrt{23}}{23}", task="hmmt").correct


def test_gold_extraction_and_tasks():
    assert gold_answer("so \\boxed{\\dfrac{1}{2}} in the end") == "\\frac{1}{2}"
    assert gold_answer("\\frac{9 \\sqrt{23}}{23}") == "\\frac{9\\sqrt{23}}{23}"
    assert gold_answer("\\boxed{5}", "hmmt") == "\\boxed{5}"  # HMMTTask never extracts
    assert [task_for_suite(n) for n in ("aime24", "aime25_38912", "hmmt25", "my_hmmt_set", "toy")] == [
        "math", "math", "hmmt", "hmmt", "math"]
    with pytest.raises(ValueError, match="Countdown"):
        task_for_suite("countdown_500")
    with pytest.raises(ValueError, match="unknown paper task"):
        grade("\\boxed{1}", "1", task="countdown")


def test_builtin_suite_answers_grade_as_themselves():
    for name in ("aime24", "aime25", "hmmt25"):
        suite = load_suite(name)
        task = task_for_suite(name)
        for problem in suite.problems:
            assert grade(f"Thus \\boxed{{{problem.answer}}}.", problem.answer, task=task).correct, problem.id


# ---- the grading mode through scoring ---------------------------------------------------------------

CUT = 32


def cut_record(sample_index, text, total=64):
    """One character per token; the generation ran to the cap, with a cut recorded at CUT."""
    text = (text + " x" * total)[:total]
    return {"problem_id": "a", "sample_index": sample_index, "seed": 0, "token_count": total,
            "finish_reason": "length", "text": text, "budget_chars": {str(CUT): CUT}}


def write_toy_run(tmp_path, records):
    suite_path = tmp_path / "toy.jsonl"
    suite_path.write_text(json.dumps({"id": "a", "problem": "p", "answer": "5"}) + "\n")
    suite = load_suite(str(suite_path))
    header = {"format": generations.FORMAT, "suite": suite.name, "suite_fingerprint": suite.fingerprint,
              "tokenizer_fingerprint": "t", "prompt_fingerprint": "p",
              "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "seed": 0, "max_tokens": 64},
              "budgets": [CUT], "thinking_open": False, "shard": [0, 1], "suite_source": suite.source}
    out = tmp_path / "run"
    with generations.Appender(generations.shard_path(str(out / suite.name), (0, 1)), header) as appender:
        for record in records:
            appender.append(record)
    return suite, str(out)


RECORDS = [
    # A complete box inside unfinished thinking: both modes count it (strict as thinking_boxed).
    cut_record(0, "<think>so the total is \\boxed{5} hmm, let me check it once more"),
    # The cut falls inside the box (the "}" is at character 32): paper reads the partial box.
    cut_record(1, "<think>ok, the count is \\boxed{5} and that's it"),
    # A phrase inside unfinished thinking: strict gives a cut response no fallback.
    cut_record(2, "<think>so the answer is 5.\nBut wait, maybe I should recount"),
    # Wrong under both.
    cut_record(3, "<think>so the total is \\boxed{6} hmm, let me check it once more"),
]


def test_mode_switch_reaches_scoring(tmp_path):
    assert RECORDS[1]["text"][CUT - 1] == "5" and RECORDS[1]["text"][CUT] == "}"
    suite, out = write_toy_run(tmp_path, RECORDS)
    records = list(generations.read(generations.shard_path(os.path.join(out, "toy"), (0, 1))).records.values())
    strict_rows = score.grade_records(records, suite, CUT, thinking_open=False, grading="strict")
    paper_rows = score.grade_records(records, suite, CUT, thinking_open=False, grading="paper")
    by_sample = lambda rows: {r["sample_index"]: (r["correct"], r["method"]) for r in rows}  # noqa: E731
    assert by_sample(strict_rows) == {0: (True, grader.THINKING_BOXED), 1: (False, grader.NONE),
                                      2: (False, grader.NONE), 3: (False, grader.THINKING_BOXED)}
    assert by_sample(paper_rows) == {0: (True, grader.BOXED), 1: (True, grader.BOXED),
                                     2: (True, grader.PHRASE), 3: (False, grader.BOXED)}
    with pytest.raises(ValueError, match="--grading"):
        score.grade_records(records, suite, CUT, thinking_open=False, grading="lenient")

    primary = score_run(out, [suite], progress=False, grading="strict,paper")["toy"]
    assert primary[CUT]["grading"] == "strict" and primary[CUT]["accuracy"] == 1 / 4
    with open(os.path.join(out, "toy", "metrics-paper", f"budget-{CUT}.json")) as f:
        paper = json.load(f)
    assert paper["grading"] == "paper" and paper["accuracy"] == 3 / 4
    with open(os.path.join(out, "toy", "metrics", f"budget-{CUT}.json")) as f:
        assert json.load(f)["grading"] == "strict"
    # At the cap the box is closed, so only the phrase sample still differs.
    with open(os.path.join(out, "toy", "metrics-paper", "budget-64.json")) as f:
        assert json.load(f)["accuracy"] == 3 / 4
    assert primary[64]["accuracy"] == 2 / 4
    with open(os.path.join(out, "toy", "grades-paper.jsonl")) as f:
        assert sorted(json.loads(line)["correct"] for line in f) == [False, True, True, True]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)["toy"][str(CUT)]
    assert summary["grading"] == "strict" and summary["accuracy"] == 1 / 4
    assert {m: v["accuracy"] for m, v in summary["by_grading"].items()} == {"strict": 1 / 4, "paper": 3 / 4}
    markdown = (tmp_path / "run" / "summary.md").read_text()
    assert f"| toy | {CUT} | strict | 0.2500" in markdown and f"| toy | {CUT} | paper | 0.7500" in markdown


def test_compare_reads_one_grading_mode(tmp_path):
    suite, out = write_toy_run(tmp_path, RECORDS)
    score_run(out, [suite], progress=False, grading="paper")
    assert not os.path.exists(os.path.join(out, "toy", "metrics"))  # paper grading leaves strict files alone
    other = str(tmp_path / "other")
    shutil.copytree(out, other)
    result = compare_runs([out, other], ["a", "b"], str(tmp_path / "report"), resamples=200, grading="paper")
    assert result["grading"] == "paper" and all(r["absolute"] == 0 for r in result["differences"])
    with open(tmp_path / "report" / "comparison.json") as f:
        assert json.load(f)["grading"] == "paper"
    with pytest.raises(FileNotFoundError, match="strict grading"):
        compare_runs([out, other], ["a", "b"], str(tmp_path / "report"), resamples=200)  # never graded strict
    # A metrics file recording another mode than its folder's is refused, not compared.
    os.makedirs(os.path.join(other, "toy", "metrics"))
    shutil.copy(os.path.join(out, "toy", "metrics-paper", f"budget-{CUT}.json"),
                os.path.join(other, "toy", "metrics", f"budget-{CUT}.json"))
    with pytest.raises(ValueError, match="graded 'paper', expected 'strict'"):
        score.load_run_metrics(other, "strict")


def test_cli_grading_flag(tmp_path, capsys):
    from opsd_jax.eval.cli import add_arguments, run

    suite, out = write_toy_run(tmp_path, RECORDS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--out", out]).grading == "strict"
    args = parser.parse_args(["--out", out, "--score-only", "--grading", "paper", "--no-progress"])
    assert run(args, None) == 0
    assert f"toy budget {CUT} (paper grading): avg@4=0.7500" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one grading mode"):
        run(parser.parse_args(["--out", str(tmp_path / "r"), "--compare", out, out, "--grading", "strict,paper"]),
            None)
    with pytest.raises(ValueError, match="--grading"):
        run(parser.parse_args(["--out", out, "--score-only", "--grading", "paper,paper"]), None)

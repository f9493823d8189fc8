"""The paper's Countdown rule: numbers used exactly once, value within 1e-5 of the target."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from opsd_jax.eval import countdown
from opsd_jax.eval.score import grade_records
from opsd_jax.eval.suites import load_suite

REFERENCE = countdown.reference([25, 3, 7, 2], 71)  # 25*2 + 7*3 = 71


@pytest.mark.parametrize("response, correct, method", [
    ("<think>75 - 4 ... 25*2 + 7*3 = 71</think>\n\n$\\boxed{25 \\times 2 + 7 \\times 3}$", True, "boxed"),
    ("first \\boxed{1+1}, then \\boxed{(7 \\cdot 3) + 2 \\cdot 25}", True, "boxed"),  # the last box counts
    ("\\boxed{\\frac{25 \\cdot 2 \\cdot 3 + 7 \\cdot 3 \\cdot 3}{3}}", False, "boxed"),  # 3 reused
    ("25*2+7*3=71", True, "before_equals"),  # no box: the text before the first "="
    ("25*2+7*3\n= 71", True, "before_equals"),  # stripped of the line break before "="
    ("\\boxed{25 \\times 2 + 7 \\times 3 = 71}", True, "boxed"),  # a box's "expr = result" is its expr
    ("\\boxed{25*2+7*3=70}", True, "boxed"),  # what follows "=" is never read, as in the paper
    ("25*2+7*3=71 so \\boxed{}", True, "before_equals"),  # an empty box counts as none
    ("\\boxed{25*3-7+2}", False, "boxed"),  # every number once, but 70: wrong target
    ("\\boxed{25*2+7*3+2-2}", False, "boxed"),  # 2 reused
    ("\\boxed{25*2+7*3+0}", False, "boxed"),  # 0 was not given
    ("\\boxed{25*3-4}", False, "boxed"),  # 71, but 7 and 2 missing and 4 not given
    ("\\boxed{25/(3-3)+7+2}", False, "boxed"),  # division by zero
    ("\\boxed{(25*2+}", False, "boxed"),  # malformed
    ("\\boxed{x = 25*2+7*3}", False, "boxed"),  # characters outside the arithmetic alphabet
    ("\\boxed{25**3**7**2}", False, "boxed"),  # a huge power is wrong, not a hang
    ("\\boxed{25*2+7*3", False, "before_equals"),  # an unclosed box is no box
    ("", False, "none"),
])
def test_rule(response, correct, method):
    grade = countdown.grade(response, REFERENCE)
    assert (grade.correct, grade.method) == (correct, method)


@pytest.mark.parametrize("response, corrected, release", [
    ("\\boxed{25 \\times 2 + 7 \\times 3 = 71}", True, False),  # the release read the box whole
    ("\\boxed{25*2+7*3=70}", True, False),
    ("\\boxed{25*2+7*3\n}", True, False),  # nor stripped it
    ("\\boxed{25*2+7*3}", True, True),
    ("25*2+7*3 = 71", True, True),  # unboxed text was cut at "=" by both
    ("\\boxed{25*2+7*3+0}", False, False),
])
def test_release_rule_reads_a_box_whole(response, corrected, release):
    """`--grading paper` grades Countdown as the paper-release commit did, whose numbers the
    paper reports; strict follows the authors' later correction."""
    assert countdown.grade(response, REFERENCE).correct is corrected
    assert countdown.grade(response, REFERENCE, release_rule=True).correct is release


@pytest.mark.parametrize("numbers, target, response", [
    ([10, 4], 2.5, "\\boxed{\\dfrac{10}{4}}"),  # fractions become divisions
    ([2, 3], -1, "\\boxed{2-3}"),
    ([8, 4, 6], 2, "\\boxed{\\left(8+4\\right) \\div 6}"),
    ([1, 2, 3], 6, "$\\boxed{1 + 2 + 3}$."),
])
def test_other_correct_forms(numbers, target, response):
    assert countdown.grade(response, countdown.reference(numbers, target)).correct


def test_bad_reference_is_named():
    with pytest.raises(ValueError, match="not a Countdown reference"):
        countdown.grade("\\boxed{1}", "71")


def test_countdown_suite_from_the_builders_schema_and_scoring(tmp_path):
    rows = [{"datapoint_input_text": "Numbers: [25, 3, 7, 2] Target: 71", "datapoint_x": [25, 3, 7, 2],
             "datapoint_y": 71, "source_index": 0},
            {"datapoint_input_text": "Numbers: [10, 4] Target: 2.5", "datapoint_x": [10, 4], "datapoint_y": 2.5,
             "source_index": 1}]
    path = tmp_path / "countdown_500.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    suite = load_suite(str(path))
    assert suite.kind == "countdown" and suite.name == "countdown_500"
    assert suite.problems[0].problem == rows[0]["datapoint_input_text"]
    assert json.loads(suite.problems[1].answer) == {"numbers": [10, 4], "target": 2.5}
    records = [{"problem_id": p.id, "sample_index": 0, "text": text, "token_count": 5, "finish_reason": "stop",
                "budget_chars": {}}
               for p, text in zip(suite.problems, ["\\boxed{25*2+7*3 = 71}", "\\boxed{4/10}"])]
    for grading, first in (("strict", True), ("paper", False)):
        graded = grade_records(records, suite, 5, thinking_open=False, grading=grading)
        assert [g["correct"] for g in graded] == [first, False]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"datapoint_input_text": "x", "datapoint_x": "25,3", "datapoint_y": 71}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'datapoint_x' must be a non-empty list"):
        load_suite(str(bad))

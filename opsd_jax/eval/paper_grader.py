"""The paper's math grader, behaviour for behaviour: `extract_answer_math`, `strip_string`,
`math_equal` and its task rules (princeton-pli/rethinking-opsd-for-thinking-models,
evaluation/utils.py, grader.py and tasks.py at the paper release, which credit
TianHongZXY/RLVR-Decomposed). Written from a specification of that code, not copied.

Use it to reproduce the paper's budget-sweep numbers (run_budget_sweep.py), selected with
`opsd-jax eval --grading paper`. It differs from this repo's default grader (grader.py, `strict`)
on purpose:

- Extraction searches the whole response, reasoning included: the last `boxed` anywhere wins
  (inside `<think>`, in "unboxed", in an echoed `\\boxed{}`), an unclosed box yields everything
  after its `{`, then "he answer is", then the last number. A response cut at a token budget is
  graded exactly like a finished one; nothing is suppressed for being cut.
- Normalisation (`strip_string`) and equivalence (`math_equal`) keep the original's quirks; each
  is marked "deliberate" below, because changing any of them would change the paper's numbers.

Where this cannot match the paper exactly:

- The symbolic step (math_equal's last resort, and the equation branch) runs sympy in a separate
  worker process (paper_symbolic.py), as the paper runs it in a separate process with a 1 s
  limit. The parsers differ from the paper's environment: sympy's `parse_latex` is skipped (it
  always raises under the paper's pinned ANTLR 4.7.2, so this matches), and latex2sympy2 1.9.1 is
  replaced by latex2sympy2_extended (math-verify's fork), whose grammar reads some inputs
  differently (mixed numbers, intervals; details in paper_symbolic.py). sympy's `parse_expr`
  evaluates its input as Python, in the paper too; here it runs with dangerous builtins removed
  and refuses text containing `__`, which no math answer does. A 1 s limit
  is a wall-clock limit, so a check near it can end either way on a slower or busier machine, as
  it could in the paper. Calls the paper makes without a time limit (element-wise tuple and
  matrix comparisons, equation checks) get a 30 s safety limit here instead of none.
- The paper's timeout helper catches `queue.Empty` without importing `queue`; when its worker
  exits cleanly without a result, the paper raises NameError and its sweep counts the response
  wrong. Such a race cannot be reproduced deliberately; here that case is simply "not equal".
- Budget cuts: the paper re-tokenises the decoded response and cuts at N tokens
  (`decode(encode(text)[:N])`); this repo cuts the recorded text at the characters the first N
  *sampled* tokens decode to (metrics.cut_at_budget). The two agree unless re-tokenising the
  decoded text gives a different token sequence. Responses here also keep special tokens such as
  `<think>` in their text (the paper decodes with skip_special_tokens=True); this grader ignores
  tags, so that matters only if a special token's text contains "boxed", "he answer is" or digits.
- The paper's Countdown rule (CountdownTask) is not implemented; `task_for_suite` refuses suites
  whose name says Countdown.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time

from opsd_jax.eval.grader import BOXED, LAST_NUMBER, NONE, PHRASE, Grade

PAPER_TIMEOUT_SECONDS = 1.0  # the paper's call_with_timeout_original default
UNTIMED_SAFETY_SECONDS = 30.0  # for the paper's calls without a time limit; see the module docstring
TASKS = ("math", "hmmt")


# ---- extraction ----------------------------------------------------------------------------------

_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")


def _extract(text: str) -> tuple[str, str]:
    """(raw answer before strip_string, method); ("", BOXED) for the early return."""
    if "boxed" in text:
        # Deliberate: any "boxed" counts, including inside the reasoning, "unboxed" or an echoed
        # "\boxed{}"; `\fbox` does not contain "boxed" and falls through to the fallbacks.
        tail = text.split("boxed")[-1]
        if not tail:
            return "", BOXED
        if tail[0] == "{":
            depth, kept = 1, []
            for char in tail[1:]:
                if char == "{":
                    depth += 1
                elif char == "}":
                    depth -= 1
                    if depth == 0:
                        break
                kept.append(char)
            # Deliberate: an unclosed box (a cut response) yields everything after its `{`;
            # escaped braces `\{` count like any other.
            answer = "".join(kept)
        else:
            answer = tail.split("$")[0].strip()  # `\boxed 5$`: up to the first dollar sign
        return answer, BOXED
    if "he answer is" in text:  # "The answer is" / "the answer is"; the last occurrence
        return text.split("he answer is")[-1].strip(), PHRASE
    # Deliberate: commas are deleted from the whole text first, so "1,000" reads as 1000 and
    # "1,2" as 12; the pattern takes no thousands separators, fractions or signs other than '-'.
    numbers = _LAST_NUMBER.findall(text.replace(",", ""))
    return (numbers[-1], LAST_NUMBER) if numbers else ("", NONE)


def _finish(answer: str) -> str:
    answer = answer.split("\n")[0]  # first line only
    if answer and answer[0] == ":":
        answer = answer[1:]
    if answer and answer[-1] == ".":
        answer = answer[:-1]
    if answer and answer[-1] == "/":
        answer = answer[:-1]
    return strip_string(answer)


def extract_with_method(text: str) -> tuple[str, str]:
    """(extract_answer_math(text), method): method is BOXED, PHRASE, LAST_NUMBER or NONE (no
    number either; the answer is then "")."""
    answer, method = _extract(text)
    # The original returns "" at once when the text ends with "boxed"; normalising "" gives "" too.
    return _finish(answer), method


def extract_answer_math(text: str) -> str:
    """The paper's answer extraction; see the module docstring and `_extract`."""
    return extract_with_method(text)[0]


# ---- normalisation --------------------------------------------------------------------------------

def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; an argument shorter than two
    characters returns the whole input unchanged (deliberate: as the original)."""
    pieces = text.split("\\frac")
    fixed = pieces[0]
    for piece in pieces[1:]:
        fixed += "\\frac"
        if piece and piece[0] == "{":
            fixed += piece
            continue
        if len(piece) < 2:
            return text
        first, second = piece[0], piece[1]
        if second != "{":
            fixed += "{" + first + "}{" + second + "}" + piece[2:]
        else:
            fixed += "{" + first + "}" + second + piece[2:]
    return fixed


def _fix_a_slash_b(text: str) -> str:
    """`3/4` -> `\\frac{3}{4}` when both sides are plain ints (or contain sqrt) and the text is
    exactly `{a}/{b}` again."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    numerator, denominator = parts
    try:
        if "sqrt" not in numerator:
            numerator = int(numerator)
        if "sqrt" not in denominator:
            denominator = int(denominator)
    except ValueError:
        return text
    if text != f"{numerator}/{denominator}":
        return text
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _fix_sqrt(text: str) -> str:
    return re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", text)


def strip_string(value) -> str:
    """The paper's answer normalisation, step for step in the original order."""
    text = str(value).strip()
    text = text.replace("\n", "")
    text = text.rstrip(".")
    text = text.replace("\\!", "").replace("\\ ", "")
    text = text.replace("\\\\", "\\").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    # Deliberate: plain substring deletions, so `\leftarrow` and `\rightarrow` lose them too.
    text = text.replace("\\left", "").replace("\\right", "")
    # A trailing unit: from the first `\text{` to the end if the text ends with `}` (non-greedy
    # but anchored, so `\text{a}+\text{b}` would go entirely, and is then kept since empty).
    unitless = re.sub(r"\\text{.*?}$", "", text).strip()
    if unitless != "" and unitless != text:
        text = unitless
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "").replace("$", "")
    text = text.replace("\\text", "")  # the command only; its braces stay
    text = text.replace("x\\in", "")
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    text = text.replace("\\cdot", "")
    text = text.replace("infinity", "\\infty")
    if "\\infty" not in text:
        text = text.replace("inf", "\\infty")
    text = text.replace("+\\inity", "\\infty")  # deliberate: the original's no-op-in-practice typo
    # Deliberate: every "and" goes, inside words and commands too (`\land`, "random", "\mathbb{R} and").
    text = text.replace("and", "")
    text = text.replace("\\mathbf", "")
    text = re.sub(r"\\mbox{.*?}", "", text)
    # Deliberate: the original's quote removal discards its result, so quotes stay.
    if "j" in text and "i" not in text:
        text = text.replace("j", "i")
    # Trailing zeros right after the point only: "2.0" -> "2", "2.00cm" -> "2cm"; "2.50" stays.
    text = re.sub(r"(\d+)\.0+([^\d])", r"\1\2", text)
    text = re.sub(r"(\d+)\.0+$", r"\1", text)
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x=3", "k = 3" -> "3"
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    return _fix_a_slash_b(text)


# ---- equivalence ----------------------------------------------------------------------------------

def parse_digits(value) -> float | None:
    """float(value) after deleting commas; `50%` / `50\\%` -> 0.5; None when not a number."""
    text = str(value).replace(",", "")
    try:
        return float(text)  # deliberate: Python's float, so "inf", "nan", "1e3" and " 3 " parse too
    except ValueError:
        pass
    if text.endswith("%"):
        text = text[:-1]
        if text.endswith("\\"):
            text = text[:-1]
        try:
            return float(text) / 100
        except ValueError:
            pass
    return None


def numeric_equal(prediction: float, reference: float) -> bool:
    return math.isclose(reference, prediction, rel_tol=1e-4)


def _str_to_pmatrix(text: str) -> str:
    groups = re.findall(r"\{.*,.*\}", text.strip())
    # Deliberate: commas become a single backslash, not the `\\` row separator.
    return ", ".join("\\begin{pmatrix}" + g.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for g in groups)


_BRACKETED = re.compile(r"(\(|\[).+(\)|\])")
_MATRIX_BEGINS = ("\\begin{pmatrix}", "\\begin{bmatrix}")
_MATRIX_ENDS = ("\\end{pmatrix}", "\\end{bmatrix}")


class _Check:
    """One math_equal call tree: records whether a symbolic check ran out of time."""

    def __init__(self):
        self.timed_out = False

    def symbolic(self, a: str, b: str, timeout_seconds: float) -> bool:
        result = symbolic_equal(a, b, timeout_seconds)
        if result is None:
            self.timed_out = True
            return False
        return result

    def math_equal(self, prediction, reference, include_percentage: bool = True, is_close: bool = True,
                   timeout: bool = False) -> bool:
        if str(prediction) == str(reference):
            return True
        # Numbers: compared as numbers only, against reference/100, reference and reference*100
        # (deliberate: so 50 equals 0.5 and 5000 equals 50). When both sides are numbers this
        # decides, without a symbolic fallback.
        if parse_digits(prediction) is not None and parse_digits(reference) is not None:
            predicted, expected = parse_digits(prediction), parse_digits(reference)
            candidates = [expected / 100, expected, expected * 100] if include_percentage else [expected]
            for item in candidates:
                try:
                    if numeric_equal(predicted, item) if is_close else item == predicted:
                        return True
                except Exception:  # noqa: BLE001 - as the original
                    continue
            return False
        if not prediction and prediction not in (0, False):
            return False
        reference, prediction = str(reference).strip(), str(prediction).strip()
        if "pmatrix" in prediction and "pmatrix" not in reference:
            reference = _str_to_pmatrix(reference)
        # Brackets: strip []() from both ends of both strings when the prediction is bracketed and
        # the reference does not open with the other bracket kind (deliberate: so (1,2] vs [1,2]
        # can match), then delete every {}() and compare case-insensitively (deliberate:
        # `\frac{1}{2}` equals `\frac{12}` and `X` equals `x` here).
        pred_text, ref_text = prediction, reference
        if (prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("(")) or (
                prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("[")):
            pred_text, ref_text = pred_text.strip("[]()"), ref_text.strip("[]()")
        for char in "{}()":
            pred_text, ref_text = pred_text.replace(char, ""), ref_text.replace(char, "")
        if pred_text.lower() == ref_text.lower():
            return True
        # Tuples and intervals, element by element (no time limit in the original). Deliberate:
        # the pattern matches a prefix, and the first and last characters are cut regardless.
        if _BRACKETED.match(prediction) and _BRACKETED.match(reference):
            pred_parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
            if len(pred_parts) == len(ref_parts) and all(
                    self.math_equal(p, r, include_percentage, is_close) for p, r in zip(pred_parts, ref_parts)):
                return True
        if (prediction.startswith(_MATRIX_BEGINS) and prediction.endswith(_MATRIX_ENDS)
                and reference.startswith(_MATRIX_BEGINS) and reference.endswith(_MATRIX_ENDS)):
            if self._matrices_equal(prediction, reference, include_percentage, is_close):
                return True
        if prediction.count("=") == 1 and reference.count("=") == 1:
            left, right = prediction.split("=")
            pred_zero = f"{left.strip()} - ({right.strip()})"
            left, right = reference.split("=")
            ref_zero = f"{left.strip()} - ({right.strip()})"
            if (self.symbolic(pred_zero, ref_zero, UNTIMED_SAFETY_SECONDS)
                    or self.symbolic(f"-({pred_zero})", ref_zero, UNTIMED_SAFETY_SECONDS)):
                return True
        elif prediction.count("=") == 1 and len(prediction.split("=")[0].strip()) <= 2 and "=" not in reference:
            if self.math_equal(prediction.split("=")[1], reference, include_percentage, is_close):
                return True
        elif reference.count("=") == 1 and len(reference.split("=")[0].strip()) <= 2 and "=" not in prediction:
            if self.math_equal(prediction, reference.split("=")[1], include_percentage, is_close):
                return True
        return self.symbolic(prediction, reference, PAPER_TIMEOUT_SECONDS if timeout else UNTIMED_SAFETY_SECONDS)

    def _matrices_equal(self, prediction: str, reference: str, include_percentage: bool, is_close: bool) -> bool:
        begin, end = len("\\begin{pmatrix}"), len("\\end{pmatrix}")  # bmatrix has the same lengths

        def rows(text):
            # Rows split on `\\`; strip_string has already turned `\\` into `\`, so stripped
            # answers are a single row (deliberate: as the original).
            return [line.strip() for line in text[begin:-end].split("\\\\") if line.strip()]

        pred_rows, ref_rows = rows(prediction), rows(reference)
        if len(pred_rows) != len(ref_rows):
            return False
        for pred_row, ref_row in zip(pred_rows, ref_rows):
            pred_cells, ref_cells = pred_row.split("&"), ref_row.split("&")
            if len(pred_cells) != len(ref_cells) or not all(
                    self.math_equal(p, r, include_percentage, is_close) for p, r in zip(pred_cells, ref_cells)):
                return False
        return True


def math_equal_detailed(prediction, reference, *, timeout: bool = True) -> tuple[bool, bool]:
    """(equal, a symbolic check ran out of time) under the paper's math_equal; the task graders
    call it with timeout=True (a 1 s limit on the final symbolic check)."""
    check = _Check()
    return check.math_equal(prediction, reference, timeout=timeout), check.timed_out


def math_equal(prediction, reference, include_percentage: bool = True, is_close: bool = True,
               timeout: bool = False) -> bool:
    """The paper's math_equal: exact string, numbers (with percentages and rel_tol 1e-4), brackets,
    tuples and intervals, matrices, equations, then sympy. A timed-out check is not equal."""
    return _Check().math_equal(prediction, reference, include_percentage, is_close, timeout)


# ---- the symbolic worker --------------------------------------------------------------------------

class _Worker:
    """A long-lived `python paper_symbolic.py` process; killed and replaced when a check runs past
    its limit, so a runaway sympy computation (even one stuck in C) never blocks grading."""

    _TIMED_OUT, _DIED = object(), object()

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._owner = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_symbolic.py")
        # -P: the script's folder (which holds modules named grader, metrics, ...) stays off sys.path.
        self._process = subprocess.Popen([sys.executable, "-P", script], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._owner = os.getpid()
        if self._read_line(120.0) != b"ready":
            self.stop()
            raise RuntimeError("the paper grader's sympy worker did not start (is latex2sympy2_extended installed?)")

    def _read_line(self, timeout_seconds: float):
        """One line from the worker, _TIMED_OUT after the limit, or _DIED at end of file."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_seconds)
        if not ready:
            return self._TIMED_OUT
        line = self._process.stdout.readline()
        return line.strip() if line else self._DIED

    def stop(self) -> None:
        if self._process is not None and self._owner == os.getpid():
            self._process.kill()
            self._process.wait()
        self._process = None

    def check(self, a: str, b: str, timeout_seconds: float) -> tuple[bool | None, float]:
        """(symbolic_equal(a, b) in the worker, seconds it took); None when it ran past the limit."""
        with self._lock:
            if self._process is None or self._owner != os.getpid() or self._process.poll() is not None:
                self._process = None  # a forked child never shares its parent's worker
                self._start()
            started = time.monotonic()
            try:
                self._process.stdin.write((json.dumps({"a": a, "b": b}) + "\n").encode())
                self._process.stdin.flush()
            except BrokenPipeError:
                self.stop()
                return False, time.monotonic() - started  # the paper: a check process that died is not equal
            line = self._read_line(timeout_seconds)
            elapsed = time.monotonic() - started
            if line is self._TIMED_OUT or line is self._DIED:
                self.stop()
                return (None if line is self._TIMED_OUT else False), elapsed
            return line == b"1", elapsed


_WORKER = _Worker()
atexit.register(_WORKER.stop)
_CACHE: dict[tuple[str, str], tuple[bool, float]] = {}


def symbolic_equal(a: str, b: str, timeout_seconds: float = PAPER_TIMEOUT_SECONDS) -> bool | None:
    """The paper's symbolic_equal (paper_symbolic.py) in a separate process with a time limit:
    True / False, or None when it ran out of time (which the paper counts as not equal).
    Finished results are cached with their duration, since every budget regrades the same answers;
    a cached check that took longer than `timeout_seconds` counts as timed out again."""
    key = (a, b)
    if key in _CACHE:
        result, elapsed = _CACHE[key]
        return None if elapsed > timeout_seconds else result
    result, elapsed = _WORKER.check(a, b, timeout_seconds)
    if result is not None:
        if len(_CACHE) >= 1 << 16:
            _CACHE.clear()
        _CACHE[key] = (result, elapsed)
    return result


# ---- task rules and grade() -----------------------------------------------------------------------

def task_for_suite(name: str) -> str:
    """The paper's task for a suite name (get_task): a trailing `_<digits>` is dropped; aime24 and
    aime25 are "math", hmmt25 is "hmmt"; other names are "hmmt" when they contain "hmmt", else
    "math". A math suite named like Countdown is refused: Countdown suites are files in the
    Countdown schema (datapoint_input_text, ...), graded by opsd_jax.eval.countdown."""
    name = re.sub(r"_\d+$", "", name)
    if name in ("aime24", "aime25"):
        return "math"
    if name == "hmmt25":
        return "hmmt"
    lowered = name.lower()
    if "countdown" in lowered:
        raise ValueError(f"suite {name!r} is named like Countdown but holds math rows (problem / answer); a "
                         "Countdown suite is a file in the Countdown schema (opsd-jax data countdown)")
    return "hmmt" if "hmmt" in lowered else "math"


def gold_answer(reference: str, task: str = "math") -> str:
    """The reference as the paper compares it: MathTask extracts from a reference containing
    "boxed" and strip_strings any other; HMMTTask always strip_strings."""
    if task == "math" and "boxed" in reference:
        return extract_answer_math(reference)
    return strip_string(reference)


def _multi_answer_equal(prediction: str, reference: str) -> tuple[bool, bool]:
    """HMMTTask's rule for a reference with ", ": both sides split on ',', strip_string each part,
    equal counts, then each predicted part greedily takes the first unmatched reference part it
    equals (order-agnostic)."""
    references = [strip_string(part.strip()) for part in reference.split(",")]
    predictions = [strip_string(part.strip()) for part in str(prediction).split(",")]
    if len(references) != len(predictions):
        return False, False
    matched = [False] * len(references)
    timed_out = False
    for predicted in predictions:
        for index, expected in enumerate(references):
            if matched[index]:
                continue
            equal, slow = math_equal_detailed(predicted, expected, timeout=True)
            timed_out |= slow
            if equal:
                matched[index] = True
                break
    return all(matched), timed_out


def grade(response: str, reference: str, *, task: str = "math") -> Grade:
    """Judges one response (finished or cut at a budget, graded alike) as the paper's task
    graders do. `task`: "math" (MathTask: AIME) or "hmmt" (HMMTTask: the multi-answer rule for a
    reference containing ", "); see task_for_suite. The method names the extraction branch that
    fired (BOXED, PHRASE, LAST_NUMBER; NONE when nothing was found, answer None)."""
    if task not in TASKS:
        raise ValueError(f"unknown paper task {task!r}; expected one of {TASKS}")
    answer, method = extract_with_method(response)
    try:
        if task == "hmmt" and ", " in reference:
            correct, timed_out = _multi_answer_equal(answer, reference)
        else:
            correct, timed_out = math_equal_detailed(answer, gold_answer(reference, task), timeout=True)
    except Exception:  # noqa: BLE001 - run_budget_sweep.py counts a grading error as incorrect
        correct, timed_out = False, False
    return Grade(bool(correct), None if method == NONE else answer, method, timed_out)

"""Countdown grading: the paper's rule (evaluation/tasks.py `CountdownTask.grade` in
princeton-pli/rethinking-opsd-for-thinking-models), with a safe evaluator instead of `eval`.

A response is correct when its expression uses exactly the given numbers, each once (as a
multiset), and evaluates to within 1e-5 of the target. With every `$` and space removed, the
expression is the content of the last complete, non-empty `\\boxed{...}` of the response, else
the whole response; of either, only what comes before the first `=` (a box written
`expr = result` counts as `expr`), stripped of surrounding whitespace.

The `=` cut of a box is the authors' later fix (commit efe9fd3): the paper-release commit
(db4b214) cut unboxed responses only, so a boxed `92+5-66=31` failed the alphabet check below
whatever its arithmetic; they measured 16.5% of 600 Qwen3-4B rollouts boxing that form, accuracy
understated by about 15 points, and their handoff note says the paper's Countdown evaluation used
the release rule. `grade` follows the corrected rule; `release_rule=True` (`--grading paper`)
the release's, so that the paper's Countdown numbers can be reproduced, understatement included.

`\\frac{A}{B}` / `\\dfrac` / `\\tfrac` become `((A)/(B))`, `\\times` and `\\cdot` `*`, `\\div`
`/`, `\\left` / `\\right` go, braces become parentheses; what is left must consist of digits,
`+ - * / ( ) .` only. The paper then calls Python's `eval`; here an AST walk accepts exactly the
arithmetic those characters can spell (`+ - * / // **`, unary signs, numbers) and computes what
`eval` would, with powers bounded so no input can hang the grader. Division by zero, a malformed
expression, a missing box and an over-large power are wrong.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re

from opsd_jax.eval.grader import BOXED, NONE, Grade

BEFORE_EQUALS = "before_equals"  # no box: the text before the first "="
_ALLOWED = re.compile(r"^[\d+\-*/().]+$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_TOLERANCE = 1e-5
_MAX_EXPONENT = 64  # far beyond any Countdown answer; keeps `9**9**9` from hanging the grader
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


def reference(numbers, target) -> str:
    """A Countdown problem's reference as a suite stores it: JSON of the numbers and the target."""
    return json.dumps({"numbers": list(numbers), "target": target})


def last_complete_box(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close (None when there is none)."""
    found, start = None, 0
    while (index := text.find("\\boxed{", start)) != -1:
        depth, position = 1, index + len("\\boxed{")
        while position < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            position += 1
        if depth == 0:
            found = text[index + len("\\boxed{"):position - 1]
        start = index + 1
    return found


def extract_expression(response: str, release_rule: bool = False) -> tuple[str, str]:
    """(expression as the paper reads it, method). release_rule: a box is taken whole, as the
    paper-release commit did (no cut at "=", no strip)."""
    text = response.replace("$", "").replace(" ", "")
    boxed = last_complete_box(text)
    if boxed:  # an empty box counts as none, as in the paper
        return (boxed, BOXED) if release_rule else (boxed.split("=")[0].strip(), BOXED)
    return text.split("=")[0].strip(), BEFORE_EQUALS


def normalize_expression(expression: str) -> str:
    previous = None
    while previous != expression:
        previous, expression = expression, _FRACTION.sub(r"((\1)/(\2))", expression)
    for latex, python in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""),
                          ("{", "("), ("}", ")")):
        expression = expression.replace(latex, python)
    return expression


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > _MAX_EXPONENT or abs(left) > 10**6):
            raise ValueError("power too large to grade")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def evaluate(expression: str) -> float:
    """The value Python's eval gives a digits-and-operators expression; raises on anything else
    (ZeroDivisionError included)."""
    if not _ALLOWED.fullmatch(expression):
        raise ValueError(f"characters outside digits and + - * / ( ) .: {expression[:60]!r}")
    value = _evaluate(ast.parse(expression, mode="eval"))
    if isinstance(value, complex) or not math.isfinite(value):
        raise ValueError("not a finite real value")
    return float(value)


def grade(response: str, reference_json: str, *, release_rule: bool = False) -> Grade:
    """Judges one response against a Countdown reference (`reference(numbers, target)`);
    release_rule: the paper-release commit's reading of a box (see the module's docstring)."""
    try:
        problem = json.loads(reference_json)
        numbers, target = [float(n) for n in problem["numbers"]], float(problem["target"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"not a Countdown reference (JSON with numbers and target): {reference_json[:80]!r}") from None
    expression, method = extract_expression(response, release_rule)
    if not expression:
        return Grade(False, None, NONE)
    normalized = normalize_expression(expression)
    try:
        value = evaluate(normalized)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, RecursionError):
        return Grade(False, expression, method)
    used = sorted(float(n) for n in _NUMBER.findall(normalized))
    correct = abs(value - target) < _TOLERANCE and used == sorted(numbers)
    return Grade(correct, expression, method)

"""The paper grader's last step, `symbolic_equal(a, b)`, and the worker process that runs it.

This file imports only the standard library, sympy and latex2sympy2_extended, so it can run as a
script (`python -P paper_symbolic.py`) without importing opsd_jax: paper_grader.py starts it once
as a long-lived worker and kills it when a check runs past its time limit, the way the paper's
grader runs each check in its own process with a 1 s limit. Protocol: one JSON line
`{"a": str, "b": str}` in, one line `1` or `0` out; the worker prints `ready` once imported.

How this matches the paper (princeton-pli/rethinking-opsd-for-thinking-models,
evaluation/grader.py `symbolic_equal`), and where it cannot:

- Parsers. The paper tries sympy `parse_latex`, then `parse_expr`, then latex2sympy2's
  `latex2sympy`, each first on the text with `\\\\` turned into `\\` and then on the raw text;
  a side that no parser accepts stays a string. `parse_latex` is deliberately not tried here:
  sympy 1.14 refuses to run it unless the ANTLR runtime is 4.11 (a version check in
  sympy/parsing/latex/_parse_latex_antlr.py), and the paper pins 4.7.2, so there it always raises
  and parsing falls through to `parse_expr`; skipping it reproduces that even where ANTLR 4.11
  happens to be installed.
- `parse_expr` is sympy's own, with its default transformations (no `^`-to-power conversion, so
  `2^10` parses as Python XOR, 8, exactly as in the paper). It evaluates its input as Python. As
  a safety measure that the paper does not take, the builtins `__import__`, `eval`, `exec`,
  `compile`, `open`, `getattr`, `setattr`, `delattr`, `globals`, `locals`, `vars`, `input` and
  `breakpoint` are removed from its namespace and any text containing `__` is refused; no math
  answer uses these, so verdicts on math answers are unchanged.
- `latex2sympy`: the paper uses latex2sympy2 1.9.1 (ANTLR 4.7.2), which is not installable next
  to math-verify here; this uses latex2sympy2_extended (math-verify's fork) with its LaTeX
  normalisation off, case-preserving symbols and no assignment reading of `x=1`, after the
  same small rewrites latex2sympy2 applies before parsing (`\\dfrac`, `\\displaystyle`, `\\quad`,
  `~`, `\\,`, `$`, `\\left(`/`\\right)`, `\\bigl(`/`\\bigr)`). The fork's grammar is newer, so some
  inputs parse differently: for example a mixed number `2\\frac{1}{2}` is 5/2 here but 2*(1/2) = 1
  in latex2sympy2, and `(\\frac{1}{2},1)` is an open interval here but a parse error there. A
  top-level list `a, b` (or `[a, b]`, `{a, b}`) is split here and each item parsed, giving the
  ordered Python list latex2sympy2 returns (the fork would return an unordered set). These
  differences reach a verdict only when every earlier step of math_equal failed.
- The comparisons are the paper's, in its order: `str(a) == str(b) or a == b`; `a.equals(b) or
  simplify(a - b) == 0`; `abs(a.lhs - a.rhs).equals(abs(b.lhs - b.rhs))`; `isclose(float(N(a)),
  float(N(b)), rel_tol=1e-4)`; same-shape matrices rounded to 3 decimals and compared with
  `equals`. Any exception moves on to the next comparison. Where sympy would turn a leftover
  string into an expression implicitly (`N(str)`, `expr.equals(str)`), the same guarded parser is
  used (with `^` as power, as sympify does).
"""

from __future__ import annotations

import builtins
import json
import math
import sys
import types

_UNSAFE_BUILTINS = frozenset({"__import__", "eval", "exec", "compile", "open", "getattr", "setattr", "delattr",
                              "globals", "locals", "vars", "input", "breakpoint", "__build_class__"})
_GLOBALS: dict | None = None


def _safe_globals() -> dict:
    """sympy parse_expr's default namespace (everything from sympy, the builtin functions, Max/Min
    as max/min) without the builtins that reach outside the expression."""
    global _GLOBALS
    if _GLOBALS is None:
        from sympy import Max, Min

        namespace: dict = {}
        exec("from sympy import *", namespace)  # noqa: S102 - a fixed import, as sympy itself does
        for name, obj in vars(builtins).items():
            if isinstance(obj, types.BuiltinFunctionType) and name not in _UNSAFE_BUILTINS:
                namespace[name] = obj
        namespace["max"], namespace["min"] = Max, Min
        _GLOBALS = namespace
    return _GLOBALS


def _parse_expr(text: str, *, convert_xor: bool = False):
    from sympy.parsing.sympy_parser import convert_xor as xor_transform
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    if "__" in text:
        raise ValueError("refused: double underscore")
    transformations = standard_transformations + ((xor_transform,) if convert_xor else ())
    # A fresh copy per call: parse_expr's exec may bind names in its globals.
    return parse_expr(text, global_dict=dict(_safe_globals()), transformations=transformations)


_OPENERS, _CLOSERS = "([{", ")]}"
_LIST_WRAPPERS = (("\\left[", "\\right]"), ("\\left\\{", "\\right\\}"), ("\\{", "\\}"), ("[", "]"), ("{", "}"))


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char in _OPENERS) - (char in _CLOSERS)
        if depth < 0:
            return False
    return depth == 0


def _relation_list(text: str) -> list[str] | None:
    """The items of a latex2sympy2 `relation_list` (`a, b, c` or `a; b; c`, bare or wrapped in
    `[]`, `{}`, `\\{\\}`), or None for a single relation. A comma between a digit and exactly three
    digits belongs to a number (`1,000`), as in latex2sympy2's lexer."""
    body = text.strip()
    for opener, closer in _LIST_WRAPPERS:
        if body.startswith(opener) and body.endswith(closer) and _balanced(body[len(opener):-len(closer)]):
            body = body[len(opener):-len(closer)]
            break
    for separator in (",", ";"):
        parts, depth, start = [], 0, 0
        for index, char in enumerate(body):
            depth += (char in _OPENERS) - (char in _CLOSERS)
            if char != separator or depth != 0:
                continue
            if separator == "," and index > 0 and body[index - 1].isdigit() and \
                    len(body) >= index + 4 and body[index + 1:index + 4].isdigit() and \
                    (len(body) == index + 4 or not body[index + 4].isdigit()):
                continue
            parts.append(body[start:index])
            start = index + 1
        if parts:
            return parts + [body[start:]]
    return None


def _latex2sympy(text: str):
    """latex2sympy2 as closely as latex2sympy2_extended allows: a top-level list becomes a Python
    list in order (latex2sympy2's relation_list; the fork would build an unordered FiniteSet).
    latex2sympy2 rewrites the text before its grammar sees a comma, so `204\\,` is 204, not a
    list of `204\\` and nothing."""
    text = _latex2sympy2_rewrites(text)
    items = _relation_list(text)
    if items is not None:
        return [_latex2sympy_single(item) for item in items]
    return _latex2sympy_single(text)


def _latex2sympy2_rewrites(text: str) -> str:
    """latex2sympy2 1.9.1's own rewrites before parsing."""
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\mathrm{T}", "T").replace("\\mathrm{d}", "d").replace("{\\rm d}", "d")
    text = text.replace("\\left[\\begin{matrix}", "\\begin{bmatrix}").replace("\\end{matrix}\\right]", "\\end{bmatrix}")
    text = text.replace("\\displaystyle", " ")
    for space in ("\\quad", "\\qquad", "~", "\\,", "$"):
        text = text.replace(space, " ")
    return text.replace("\\bigl(", "(").replace("\\bigr)", ")").replace("\\left(", "(").replace("\\right)", ")")


def _latex2sympy_single(text: str):
    """One item, already rewritten (_latex2sympy2_rewrites)."""
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy

    config = ConversionConfig(interpret_as_mixed_fractions=False, interpret_simple_eq_as_assignment=False,
                              interpret_contains_as_eq=False, lowercase_symbols=False)
    return latex2sympy(text, normalization_config=None, conversion_config=config)


def _parse(text: str):
    """The first parser that accepts the text (`\\\\`->`\\` first, then raw), else the text itself."""
    for parser in (_parse_expr, _latex2sympy):  # the paper's parse_latex always raises; see module docstring
        for candidate in (text.replace("\\\\", "\\"), text):
            try:
                return parser(candidate)
            except Exception:  # noqa: BLE001 - the paper moves on after any failure
                pass
    return text


def _implicit_sympify(value):
    """What sympy does to a string it is handed where it wants an expression (sympify: parse_expr
    with `^` read as power), through the guarded parser."""
    return _parse_expr(value, convert_xor=True) if isinstance(value, str) else value


def symbolic_equal(a: str, b: str) -> bool:
    """The paper's symbolic comparison of two answer strings (see the module docstring)."""
    from sympy import N, simplify

    a, b = _parse(a), _parse(b)
    try:
        if str(a) == str(b) or a == b:
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        if a.equals(_implicit_sympify(b)) or simplify(a - b) == 0:
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        if abs(a.lhs - a.rhs).equals(abs(b.lhs - b.rhs)):
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        if math.isclose(float(N(_implicit_sympify(b))), float(N(_implicit_sympify(a))), rel_tol=1e-4):
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        if a.shape == b.shape:
            if a.applyfunc(lambda x: round(x, 3)).equals(b.applyfunc(lambda x: round(x, 3))):
                return True
    except Exception:  # noqa: BLE001
        pass
    return False


def _limit_memory(limit_bytes: int = 4 << 30) -> None:
    """A runaway check (`9**9**9`) fails with MemoryError in the worker instead of swapping the host."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard if hard != resource.RLIM_INFINITY else limit_bytes))
    except (ImportError, ValueError, OSError):
        pass


def _serve() -> None:
    import os

    # The protocol owns the real stdout; anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _limit_memory()
    import sympy  # noqa: F401 - imported before `ready` so no check pays for it
    import latex2sympy2_extended.latex2sympy2  # noqa: F401

    _safe_globals()
    symbolic_equal("\\frac{1}{2}", "\\sqrt{x}")  # warms parsers and simplify, so the first real check is not slower
    channel.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = symbolic_equal(request["a"], request["b"])
        except Exception:  # noqa: BLE001 - the paper's process would exit non-zero: not equal
            result = False
        channel.write("1\n" if result else "0\n")


if __name__ == "__main__":
    _serve()

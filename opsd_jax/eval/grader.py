"""Math answer grading: extract the final answer from a response, judge it against the reference.

Extraction looks at the response's final section (after the last `</think>`; the whole text when
there are no think tags): its last `\\boxed{...}` (or `\\fbox{...}`), braces nested to any depth;
without a box, and unless a token cap cut the response, an "answer is X" / "answer: X" phrase and
then the last number. A box inside the reasoning counts only when the final section has no answer
or the response never finished thinking, since a number in a chain of thought is not an answer.
The method is reported with every grade, so metrics show box-only accuracy next to accuracy with
fallbacks.

Equivalence: an integer fast path (leading zeros, thousands separators, `25.0`, degree signs and
`\\text{}` wrappers normalized) for integer references such as every AIME answer, and math-verify
(sympy) for everything else: fractions, radicals, decimals, percentages, units, intervals, tuples,
and order-agnostic lists such as HMMT February 2025 problem 10's two roots. math-verify's timeouts
use SIGALRM, which Python allows only on the main thread; elsewhere checks run without a timeout.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading

# Extraction methods, in the order they are tried.
BOXED, PHRASE, LAST_NUMBER, THINKING_BOXED, NONE = "boxed", "phrase", "last_number", "thinking_boxed", "none"
METHODS = (BOXED, PHRASE, LAST_NUMBER, THINKING_BOXED, NONE)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# The thinking block's tags as text (OLMo-3's tokenizer spells them over several tokens).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class Grade:
    """One judged response: `answer` is the extracted string (None when nothing was found)."""

    correct: bool
    answer: str | None
    method: str
    timed_out: bool = False


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at open_index, or None when the braces never balance."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":  # an escaped brace (\{ \}) does not count
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), or None."""
    starts = sorted(
        (m.start(), m.end()) for command in _BOX_COMMANDS for m in re.finditer(re.escape(command) + r"(?![A-Za-z])", text)
    )
    for start, end in reversed(starts):
        rest = text[end:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            open_index = end + (len(rest) - len(stripped))
            close = _matching_brace(text, open_index)
            if close is not None:  # an unclosed box (a cut-off response) is no answer; try an earlier one
                return text[open_index + 1 : close].strip()
        elif rest[:1] == " ":
            match = re.match(r"\s+([^\s$]+)", rest)  # `\boxed 5`: one token
            if match:
                return match.group(1).strip()
    return None


def final_section(text: str) -> str | None:
    """The part of a response after its reasoning: after the last `</think>`; the whole text when
    it has no think tags; None while a `<think>` block is still open (a cut-off response)."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return None
    return text


_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str, *, cut_off: bool = False, thinking_open: bool = False) -> tuple[str | None, str]:
    """(answer string, method) for a model response; method is one of METHODS.

    The final section (after `</think>`, or the whole text without think tags) is searched first:
    its last box, then, unless `cut_off`, an "answer is" phrase and the last number. Only when it
    holds none of these, or when the response is still thinking, does a box inside the reasoning
    count (method THINKING_BOXED).

    cut_off: the response was stopped by a token cap; a phrase or number at the end of a cut
      response is mid-sentence, not a final answer, so only complete boxes count.
    thinking_open: the prompt itself opened a `<think>` block (OLMo-3 Think), so a response
      without `</think>` is still thinking.
    """
    section = final_section(THINK_OPEN + text if thinking_open else text)
    if section is not None:
        boxed = extract_boxed(section)
        if boxed is not None:
            return boxed, BOXED
        if not cut_off:
            phrases = list(_PHRASE.finditer(section))
            if phrases:
                answer = phrases[-1].group(1).strip()
                answer = re.split(r"\.(?:\s|$)|\n", answer)[0].strip()  # up to the sentence's end
                if answer:
                    return answer, PHRASE
            numbers = _NUMBER.findall(section)
            if numbers:
                return numbers[-1], LAST_NUMBER
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, THINKING_BOXED
    return None, NONE


# ---- equivalence ----------------------------------------------------------------------------------

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:(?:,|\{,\}|\\,|\\ )\d{3})+(?:\.0*)?$")


def as_integer(answer: str) -> int | None:
    """The integer an answer string denotes when it is written as a plain integer (`025`,
    `1{,}000`, `25.0`, `\\text{25}`, `30^\\circ`, `$7$.`), else None."""
    text = answer.strip().replace("\\$", "").replace("$", "")
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    for _ in range(3):
        text = _WRAPPERS.sub(r"\1", text)
    text = _DEGREES.sub("", text).strip().rstrip(".").strip()
    if text.startswith("{") and text.endswith("}") and _matching_brace(text, 0) == len(text) - 1:
        text = text[1:-1].strip()
    if text.startswith("+"):
        text = text[1:]
    if _THOUSANDS.match(text):
        text = re.sub(r",|\{,\}|\\,|\\ ", "", text)
    match = re.fullmatch(r"(-?\d+)(?:\.0*)?", text)
    return int(match.group(1)) if match else None


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _strip_delimiters(answer: str) -> str:
    text = answer.strip().replace("\\$", "")
    text = text.strip("$").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
    return text.rstrip(".").strip()


@functools.lru_cache(maxsize=4096)
def _parse(latex: str, timeout_seconds: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        f"${latex}$",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout_seconds if _on_main_thread() else None,
        raise_on_error=True,
    )


@functools.lru_cache(maxsize=65536)
def answers_equivalent(answer: str, reference: str, timeout_seconds: int = 5) -> tuple[bool, bool]:
    """(equivalent, timed_out) for an extracted answer and a reference answer (LaTeX strings).

    Integer references (AIME) compare as integers when the answer is a plain integer too; anything
    else goes to math-verify, whose sets make lists order-agnostic. A check that exceeds
    `timeout_seconds` (parsing and verifying each) counts as wrong and is reported.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    reference_integer = as_integer(reference)
    answer_integer = as_integer(answer)
    if reference_integer is not None and answer_integer is not None:
        return answer_integer == reference_integer, False
    try:
        gold = _parse(_strip_delimiters(reference), timeout_seconds)
        target = _parse(_strip_delimiters(answer), timeout_seconds)
        if not gold or not target:
            return False, False
        return bool(verify(gold, target, timeout_seconds=timeout_seconds if _on_main_thread() else None,
                           raise_on_error=True)), False
    except TimeoutException:
        return False, True
    except Exception:  # noqa: BLE001 - sympy fails on odd input in many ways; an unparsable answer is wrong
        return False, False


def grade(response: str, reference: str, *, cut_off: bool = False, thinking_open: bool = False,
          timeout_seconds: int = 5) -> Grade:
    """Judges one model response against a reference answer (flags as in extract_answer)."""
    answer, method = extract_answer(response, cut_off=cut_off, thinking_open=thinking_open)
    if answer is None:
        return Grade(False, None, method)
    correct, timed_out = answers_equivalent(answer, reference, timeout_seconds)
    return Grade(correct, answer, method, timed_out)

"""The toy reasoning world: pair-sum search problems, the solvers that write their traces, and the
tokenizer they are spelled in.

A problem lists four distinct digits and a target that exactly one pair of them sums to; the
answer is the smaller number of that pair. Finding the pair needs search (six candidate pairs),
checking a candidate is one addition. Problem text: ``numbers 3 8 5 1 target 9`` (answer 1).

Solvers (all written as text in the world's own words, which the default marker list of
`opsd-jax analyze` already knows: ``wait`` is backtracking, ``verify`` verification, ``maybe``
hedging):

- thinker: inside ``<think> ... </think>`` it tries pairs in random order, ``try 3 + 8 = 11 wait``.
  It slips: on a wrong pair it sometimes writes the target as the sum (a false success). After
  any claimed success it may hedge (``maybe``) and may verify, ``verify 3 + 5 = 8 wait`` (a
  caught slip) or ``verify 1 + 8 = 9 ok``; then it boxes the pair's smaller number. Accuracy rises
  with the token budget because the right pair comes at a random position.
- instruct: no thinking, boxes its answer at once.
- a solver given a hint (the privileged context) knows the answer: with the worked solution
  (dense) it tries that pair first; with only the answer (sparse) it tries the pairs holding the
  answer first. Knowing, it neither hedges nor verifies. The hint does not make it add better: on
  a wrong pair it slips as often as without one, takes the slip for the success it expected, and
  boxes the answer it was given.

The hinted traces are the world's stand-in for what pretraining gives a real model: the ability
to use a reference solution in its context. The experiment then asks what a teacher with that
ability does to a student who lacks the hint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np

DIGITS = tuple(range(1, 10))
NUMBERS_PER_PROBLEM = 4
MAX_NUMBER = 20  # sums reach 17; slips write the target, at most 17
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
WORDS = ("user", "assistant", "numbers", "target", "hint", "try", "+", "=", "wait", "verify", "ok", "maybe",
         "\\boxed{", "}")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# The trainer's teacher prompt and the hinted warm-start prompts are one template, so the teacher
# meets its privileged context in the form it learned to read.
TEACHER_TEMPLATE = "{prompt} hint {privileged}"


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int

    @property
    def pair(self) -> tuple[int, int]:
        (a, b), = [p for p in itertools.combinations(sorted(self.numbers), 2) if sum(p) == self.target]
        return a, b

    @property
    def answer(self) -> int:
        return self.pair[0]

    @property
    def text(self) -> str:
        return f"numbers {' '.join(map(str, self.numbers))} target {self.target}"

    @property
    def solution(self) -> str:
        """The worked solution (dense privileged context)."""
        a, b = self.pair
        return f"{a} + {b} = {self.target}"


@dataclasses.dataclass(frozen=True)
class Solver:
    """How a solver writes: slip rate on wrong pairs, and how often it hedges and verifies a
    claimed success."""

    slip: float = 0.25
    hedge: float = 0.3
    verify: float = 0.7


THINKER = Solver()
STRONG_THINKER = Solver(slip=0.05, hedge=0.1, verify=0.95)
NO_SLIPS = Solver(slip=0.0, hedge=0.0, verify=0.0)


def generate_problems(count: int, rng: np.random.Generator, exclude: set | None = None) -> list[Problem]:
    """`count` distinct problems with a unique answer pair, none in `exclude` (keys: numbers, target)."""
    seen = set(exclude or ())
    problems = []
    while len(problems) < count:
        numbers = tuple(int(x) for x in rng.choice(DIGITS, NUMBERS_PER_PROBLEM, replace=False))
        sums = [a + b for a, b in itertools.combinations(numbers, 2)]
        unique = [s for s in sums if sums.count(s) == 1]
        target = int(rng.choice(unique))
        if (numbers, target) in seen:
            continue
        seen.add((numbers, target))
        problems.append(Problem(numbers, target))
    return problems


def _attempt(a: int, b: int, written_sum: int) -> list[str]:
    return ["try", str(a), "+", str(b), "=", str(written_sum)]


def _close(answer: int) -> list[str]:
    return ["</think>", "\\boxed{", str(answer), "}"]


def thinker_trace(problem: Problem, solver: Solver, rng: np.random.Generator) -> str:
    """A thinking solver's response (without the end-of-turn token)."""
    pairs = list(itertools.combinations(sorted(problem.numbers), 2))
    order = rng.permutation(len(pairs))
    words = ["<think>"]
    for index in order:
        a, b = pairs[index]
        right = a + b == problem.target
        slipped = not right and rng.random() < solver.slip
        words += _attempt(a, b, problem.target if slipped else a + b)
        if not right and not slipped:
            words.append("wait")
            continue
        if rng.random() < solver.hedge:
            words.append("maybe")
        if rng.random() < solver.verify:
            words += ["verify", str(a), "+", str(b), "=", str(a + b)]
            if not right:
                words.append("wait")
                continue
            words.append("ok")
        return " ".join(words + _close(a))
    raise AssertionError("the right pair is always reached")


def hinted_trace(problem: Problem, privilege: str, rng: np.random.Generator, thinking: bool = True,
                 solver: Solver = NO_SLIPS) -> str:
    """The response of a solver that was given the worked solution (dense) or the answer (sparse).

    The hint tells it where to look and what to box, not how to add: on a wrong pair it slips as
    often as `solver` does, and takes the slip for the success it expected (no hedge, no check),
    boxing the answer it was given."""
    a, b = problem.pair
    if not thinking:
        return f"\\boxed{{ {a} }}"
    if privilege == "dense":
        candidates = [(a, b)]
    elif privilege == "sparse":
        candidates = [p for p in itertools.combinations(sorted(problem.numbers), 2) if problem.answer in p]
        candidates = [candidates[i] for i in rng.permutation(len(candidates))]
    else:
        raise ValueError(f"privilege must be dense or sparse, got {privilege!r}")
    words = ["<think>"]
    for x, y in candidates:
        right = x + y == problem.target
        slipped = not right and rng.random() < solver.slip
        words += _attempt(x, y, problem.target if slipped else x + y)
        if right or slipped:
            return " ".join(words + _close(problem.answer))
        words.append("wait")
    raise AssertionError("the hinted pair is among the candidates")


def instruct_trace(problem: Problem) -> str:
    """An instruction solver's response: the answer at once (the template already closed thinking)."""
    return f"\\boxed{{ {problem.answer} }}"


def hinted_prompt(problem: Problem, privilege: str) -> str:
    """The problem with its privileged context, as the trainer's teacher prompt spells it."""
    privileged = problem.solution if privilege == "dense" else str(problem.answer)
    return TEACHER_TEMPLATE.format(prompt=problem.text, privileged=privileged)


def check_answer(problem: Problem, response: str) -> bool:
    """Whether the last complete box of `response` holds the problem's answer."""
    from opsd_jax.eval.countdown import last_complete_box

    boxed = last_complete_box(response)
    return boxed is not None and boxed.strip() == str(problem.answer)


def trace_is_valid(problem: Problem, trace: str) -> bool:
    """Whether a thinker trace follows the world's grammar and every verify and final box is
    arithmetically right: slips only where an attempt claims the target, and no boxed wrong pair."""
    words = trace.split()
    if words[:1] != ["<think>"] or words[-4:-2] != ["</think>", "\\boxed{"] or words[-1] != "}":
        return False
    body, position = words[1:-4], 0
    while position < len(body):
        if body[position] != "try" or body[position + 2] != "+" or body[position + 4] != "=":
            return False
        a, b, written = int(body[position + 1]), int(body[position + 3]), int(body[position + 5])
        position += 6
        if written != a + b and written != problem.target:
            return False
        if position < len(body) and body[position] == "wait":
            if written == problem.target:
                return False
            position += 1
            continue
        if position < len(body) and body[position] == "maybe":
            position += 1
        if position < len(body) and body[position] == "verify":
            check = body[position + 1: position + 6]
            if check != [str(a), "+", str(b), "=", str(a + b)]:
                return False
            position += 6
            verdict = body[position] if position < len(body) else None
            position += 1
            if verdict == "wait" and a + b != problem.target:
                continue
            if verdict != "ok" or a + b != problem.target:
                return False
        return position == len(body) and int(words[-2]) == a
    return False


@dataclasses.dataclass(frozen=True)
class TraceEvents:
    """What one response did, read in the world's grammar: the links of the paper's causal chain
    (search, slips, verification of a claimed success, a slip boxed unverified, a search given up
    or a miss accepted) counted separately, so a change in accuracy can be traced to the link that
    moved. Counts; the experiment pools them over responses."""

    attempts: int = 0
    first_try_right: int = 0  # 1 when the first attempt is the problem's pair
    wrong_attempts: int = 0
    slips: int = 0  # wrong pairs written with the target as their sum
    claims: int = 0  # attempts that write the target (right pairs and slips)
    hedged_claims: int = 0  # claims followed by `maybe`
    verified_claims: int = 0  # claims followed (after an optional `maybe`) by `verify`
    unverified_slips_closed: int = 0  # slips followed by `</think>`: the world's way to box a wrong answer
    misses_closed: int = 0  # attempts written with a sum that is not the target, followed by `</think>`:
    # the search given up without a claimed success, which no solver of the world does (the box
    # that follows may still guess right)
    misses_accepted: int = 0  # attempts written with a sum that is not the target, then verified
    # `ok` (after an optional `maybe`): a check that accepts a pair that missed, which no solver does

    def __add__(self, other: "TraceEvents") -> "TraceEvents":
        return TraceEvents(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def trace_events(problem: Problem, response: str) -> TraceEvents:
    """Counts the events of a (possibly model-written, possibly ungrammatical or truncated)
    response: every well-formed `try a + b = s` attempt and what follows it; anything else is
    skipped."""
    words = response.replace("<think>", " <think> ").replace("</think>", " </think> ").split()
    counts = {field.name: 0 for field in dataclasses.fields(TraceEvents)}
    position = 0
    while position + 5 < len(words):
        window = words[position: position + 6]
        if window[0] != "try" or window[2] != "+" or window[4] != "=" or not all(
                w.isdigit() for w in (window[1], window[3], window[5])):
            position += 1
            continue
        a, b, written = int(window[1]), int(window[3]), int(window[5])
        right = a + b == problem.target
        counts["first_try_right"] += counts["attempts"] == 0 and right
        counts["attempts"] += 1
        counts["wrong_attempts"] += not right
        position += 6
        hedged = words[position: position + 1] == ["maybe"]
        after_hedge = words[position + hedged: position + hedged + 1]
        if written != problem.target:
            counts["misses_closed"] += words[position: position + 1] == ["</think>"]
            counts["misses_accepted"] += after_hedge == ["verify"] and \
                words[position + hedged + 6: position + hedged + 7] == ["ok"]
            continue
        counts["claims"] += 1
        counts["slips"] += not right
        counts["hedged_claims"] += hedged
        counts["verified_claims"] += after_hedge == ["verify"]
        counts["unverified_slips_closed"] += not right and after_hedge == ["</think>"]
    return TraceEvents(**counts)


def vocabulary() -> list[str]:
    return list(SPECIAL_TOKENS) + list(WORDS) + [str(n) for n in range(MAX_NUMBER + 1)]


def save_tokenizer(path: str) -> None:
    """A word-level tokenizer (the `tokenizers` library) over the world's vocabulary, with a
    Qwen3-style chat template and thinking switch, saved with transformers; eos is <|im_end|>."""
    import tokenizers
    import transformers

    words = vocabulary()
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                             unk_token="<|endoftext|>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                                     additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos[1]}, f)


def problem_row(problem: Problem, index: int, split: str) -> dict:
    """A row both the trainer (problem, solution, answer) and eval suites (id, problem, answer) read."""
    return {"id": f"toy-{split}-{index}", "problem": problem.text, "solution": problem.solution,
            "answer": str(problem.answer), "numbers": list(problem.numbers), "target": problem.target}


def write_jsonl(path: str, rows: list[dict]) -> None:
    from opsd_jax.eval.generations import write_atomic

    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

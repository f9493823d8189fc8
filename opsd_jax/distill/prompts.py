"""Student and teacher contexts through the tokenizer's chat template.

The two contexts differ only in their prompts: the rollout the student samples is appended to
both, so loss positions align token for token. Privilege modes decide what the teacher's prompt
adds: the worked solution (dense), only the final answer (sparse), the first fraction of the
solution's tokens, nothing (vanilla OPD), or an instruction without any solution (the concise
control).
"""

from __future__ import annotations

import dataclasses
import math

from opsd_jax.config import PromptSection
from opsd_jax.data.sources import Problem


@dataclasses.dataclass(frozen=True)
class PromptPair:
    student_ids: list[int]
    teacher_ids: list[int]
    student_text: str
    teacher_text: str


def student_prompt_text(problem: Problem, section: PromptSection) -> str:
    suffix = section.student_suffix.strip()
    if section.suffix_join == "paper":
        if not suffix or problem.problem.rstrip().endswith(suffix):
            return problem.problem
        return f"{problem.problem.rstrip()} {suffix}"
    return f"{problem.problem.strip()}\n\n{suffix}" if suffix else problem.problem.strip()


def privileged_text(problem: Problem, section: PromptSection, tokenizer) -> str | None:
    """What the teacher sees beyond the student's prompt; None when it sees nothing more."""
    if section.privilege == "dense":
        return problem.solution
    if section.privilege == "sparse":
        return problem.answer
    if section.privilege == "fraction":
        if not 0 <= section.fraction <= 1:
            raise ValueError(f"prompt.fraction must be in [0, 1], got {section.fraction}")
        ids = tokenizer.encode(problem.solution, add_special_tokens=False)
        return tokenizer.decode(ids[: math.ceil(section.fraction * len(ids))])
    return None


def teacher_prompt_text(problem: Problem, section: PromptSection, tokenizer) -> str:
    student_text = student_prompt_text(problem, section)
    if section.privilege == "none":
        return student_text
    if section.privilege == "instruction":
        if "{prompt}" not in section.instruction:
            raise ValueError(f"prompt.instruction must contain {{prompt}} (where the student's prompt goes), "
                             f"got {section.instruction!r}")
        return section.instruction.replace("{prompt}", student_text)
    return section.teacher_template.format(prompt=student_text, privileged=privileged_text(problem, section, tokenizer))


def chat_prompt_ids(tokenizer, user_text: str, thinking: bool) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant's generation prompt.

    `enable_thinking` is the Qwen3 hybrid switch; templates that do not know it ignore it
    (Qwen3-2507-Thinking opens <think> itself, OLMo-3 Think/Instruct pick by model).
    """
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True,
        return_dict=False, enable_thinking=thinking,
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)


def prompt_pair(problem: Problem, section: PromptSection, tokenizer) -> PromptPair:
    student_text = student_prompt_text(problem, section)
    teacher_text = teacher_prompt_text(problem, section, tokenizer)
    return PromptPair(
        student_ids=chat_prompt_ids(tokenizer, student_text, section.student_thinking),
        teacher_ids=chat_prompt_ids(tokenizer, teacher_text, section.teacher_thinking),
        student_text=student_text,
        teacher_text=teacher_text,
    )


def truncate_left(pair: PromptPair, max_tokens: int) -> PromptPair:
    """Keeps the last `max_tokens` ids of each prompt, as the paper's trainer tokenizes with
    truncation_side="left": the start of the chat template (and of a long privileged context's
    prompt) goes first, the generation prompt the rollout follows is always kept. Texts are kept
    whole for the record."""
    if max_tokens < 1:
        raise ValueError(f"data.max_prompt_tokens must be >= 1, got {max_tokens}")
    return dataclasses.replace(pair, student_ids=pair.student_ids[-max_tokens:],
                               teacher_ids=pair.teacher_ids[-max_tokens:])

"""Student and teacher contexts with the real Qwen3 tokenizer."""

import pytest
import transformers

from opsd_jax.config import PromptSection
from opsd_jax.data.sources import Problem
from opsd_jax.distill.prompts import prompt_pair
from opsd_jax.distill.trainer import build_batch
from opsd_jax.sampler import Completion
from opsd_jax.testing import qwen3_tokenizer_dir

PROBLEM = Problem(id="p1", problem="What is $3 + 4 \\cdot 2$?",
                  solution="Multiply first: $4 \\cdot 2 = 8$, then $3 + 8 = \\boxed{11}$.", answer="11")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(str(tmp_path_factory.mktemp("qwen3"))))


def _contains(haystack, needle):
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_dense_teacher_sees_the_solution_and_the_student_does_not(tokenizer):
    pair = prompt_pair(PROBLEM, PromptSection(privilege="dense"), tokenizer)
    solution_ids = tokenizer.encode(PROBLEM.solution, add_special_tokens=False)
    assert len(solution_ids) > 10
    # The closing "}$." re-merges with the "\n\n" that follows it; the rest appears verbatim.
    assert _contains(pair.teacher_ids, solution_ids[:-2])
    assert not _contains(pair.student_ids, solution_ids[:4])
    assert "This is an example for a response to the question:" in pair.teacher_text
    assert pair.student_text.endswith("Return your final response within \\boxed{}.")
    # Both end with the assistant turn opening (thinking on: no empty think block).
    for ids in (pair.student_ids, pair.teacher_ids):
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_privilege_modes(tokenizer):
    sparse = prompt_pair(PROBLEM, PromptSection(privilege="sparse"), tokenizer)
    assert "\n11\n" in sparse.teacher_text and "Multiply first" not in sparse.teacher_text
    none = prompt_pair(PROBLEM, PromptSection(privilege="none"), tokenizer)
    assert none.teacher_ids == none.student_ids
    concise = prompt_pair(PROBLEM, PromptSection(privilege="instruction", instruction="Be brief.\n\n{prompt}"),
                          tokenizer)
    assert concise.teacher_text == f"Be brief.\n\n{concise.student_text}" and "Multiply" not in concise.teacher_text
    with pytest.raises(ValueError, match="prompt.instruction must contain"):
        prompt_pair(PROBLEM, PromptSection(privilege="instruction", instruction="Be brief."), tokenizer)
    half = prompt_pair(PROBLEM, PromptSection(privilege="fraction", fraction=0.5), tokenizer)
    assert "Multiply first" in half.teacher_text and "boxed{11}" not in half.teacher_text
    no_thinking = prompt_pair(PROBLEM, PromptSection(student_thinking=False), tokenizer)
    assert tokenizer.decode(no_thinking.student_ids).endswith("<think>\n\n</think>\n\n")


def test_rollout_positions_align(tokenizer):
    pair = prompt_pair(PROBLEM, PromptSection(privilege="dense"), tokenizer)
    rollout = tokenizer.encode("<think>\nOkay, 4*2=8.\n</think>\n\\boxed{11}", add_special_tokens=False)
    completion = Completion(prompt_token_ids=pair.student_ids, sample_index=0, token_ids=rollout,
                            sampled_logprobs=[-1.0] * len(rollout), model_logprobs=[-1.0] * len(rollout),
                            entropies=[0.0] * len(rollout))
    batch = build_batch([pair], [completion], student_length=400, teacher_length=400, completion_length=32)
    n = len(rollout)
    assert batch.lengths[0] == n
    for t in range(n):
        # The row before each completion token in both contexts, and the token itself after it.
        assert batch.student_tokens[0, batch.student_index[0, t] + 1] == rollout[t]
        assert batch.teacher_tokens[0, batch.teacher_index[0, t] + 1] == rollout[t]
    assert batch.student_index[0, 0] == len(pair.student_ids) - 1
    assert batch.teacher_index[0, 0] == len(pair.teacher_ids) - 1 > batch.student_index[0, 0]


def test_paper_suffix_join_follows_the_papers_data_builder():
    """The paper's data already ends its problems with the instruction (joined with a space); its
    trainer adds nothing. Raw problems get it the way the paper's builder adds it."""
    section = PromptSection(suffix_join="paper")
    suffix = "Return your final response within \\boxed{}."
    built = Problem(id="a", problem=f"What is 2 + 2? {suffix}", solution="", answer="4")
    raw = Problem(id="b", problem="What is 2 + 2?  \n", solution="", answer="4")
    from opsd_jax.distill.prompts import student_prompt_text

    assert student_prompt_text(built, section) == built.problem
    assert student_prompt_text(raw, section) == f"What is 2 + 2? {suffix}"
    assert student_prompt_text(raw, PromptSection()) == f"What is 2 + 2?\n\n{suffix}"
    countdown = Problem(id="c", problem="  Use 3, 5 to make 8.\n", solution="", answer="8")
    assert student_prompt_text(countdown, PromptSection(suffix_join="paper", student_suffix="")) == countdown.problem


def test_truncate_left_keeps_the_end_of_each_prompt():
    from opsd_jax.distill.prompts import PromptPair, truncate_left

    pair = PromptPair(list(range(10)), list(range(100, 130)), "s", "t")
    cut = truncate_left(pair, 12)
    assert cut.student_ids == list(range(10)) and cut.teacher_ids == list(range(118, 130))
    assert (cut.student_text, cut.teacher_text) == ("s", "t")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        truncate_left(pair, 0)

"""Prompts and records with the real Qwen3 tokenizer (shipped in tests/data), and the shipped
suites' own answers through the grader."""

import pytest
import transformers

from opsd_jax.eval import grader
from opsd_jax.eval.runner import EvalSettings, build_prompts, make_record, prompt_opens_thinking
from opsd_jax.eval.suites import BUILTIN, load_suite
from opsd_jax.sampler import Completion
from opsd_jax.testing import qwen3_tokenizer_dir


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(str(tmp_path_factory.mktemp("qwen3"))))


def test_qwen3_prompts(qwen3):
    suite = load_suite("aime25")
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    prompts = build_prompts(qwen3, suite, EvalSettings(instruction=instruction))
    assert len(prompts) == 30
    text = qwen3.decode(prompts[0])
    assert text.startswith("<|im_start|>user\n" + suite.problems[0].problem + "\n\n" + instruction)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert not prompt_opens_thinking(qwen3, prompts[0])  # Qwen3 opens <think> itself
    plain = build_prompts(qwen3, suite, EvalSettings(enable_thinking=False))
    assert qwen3.decode(plain[0]).endswith("<think>\n\n</think>\n\n")


def test_qwen3_record_keeps_think_tags_and_cuts_budgets(qwen3):
    response = "<think>\nLet me add: 40 + 30 = 70.\n</think>\n\nThe answer is $\\boxed{70}$."
    ids = qwen3.encode(response, add_special_tokens=False) + [qwen3.convert_tokens_to_ids("<|im_end|>")]
    assert qwen3.convert_tokens_to_ids("</think>") in ids  # one token: 151668
    completion = Completion(prompt_token_ids=[1], sample_index=0, token_ids=ids, finish_reason="stop")
    budgets = [4, len(ids) - 3, 10_000]
    record = make_record(completion, qwen3, (151645, 151643), "x", 0, 9, budgets)
    assert record["text"] == response and record["token_count"] == len(ids)
    assert record["token_ids"] == ids[:-1]  # what the text decodes from: the stop token is not in it
    assert set(record["budget_chars"]) == {"4", str(len(ids) - 3)}
    assert response.startswith(record["text"][: record["budget_chars"]["4"]])
    assert record["text"][: record["budget_chars"][str(len(ids) - 3)]].endswith("\\boxed{70")  # its closing brace is past the cut
    assert grader.grade(record["text"], "70").correct
    assert not grader.grade(record["text"][: record["budget_chars"][str(len(ids) - 3)]], "70", cut_off=True).correct


@pytest.mark.parametrize("name", BUILTIN)
def test_every_shipped_answer_grades_right_boxed_and_wrong_against_a_neighbour(name):
    problems = load_suite(name).problems
    for problem, neighbour in zip(problems, problems[1:] + problems[:1]):
        assert grader.grade(f"Thus \\boxed{{{problem.answer}}}.", problem.answer).correct, problem.id
        if neighbour.answer != problem.answer:
            assert not grader.grade(f"\\boxed{{{neighbour.answer}}}", problem.answer).correct, problem.id

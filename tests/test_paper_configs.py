"""The paper's 25 runs as configs: every resolved value against a table written from the paper's
submit_experiment.sh (princeton-pli/rethinking-opsd-for-thinking-models, paper-release commit)."""

import os

import pytest

from opsd_jax.config import load_config
from opsd_jax.data.sources import PRESETS, Problem
from opsd_jax.distill.prompts import student_prompt_text, teacher_prompt_text
from opsd_jax.distill.train_step import learning_rate_schedule

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# name: (model folder, privileged column, thinking in training, max prompt tokens, lr, steps, warmup)
PAPER_RUNS = {
    "qwen3_1p7b_ot15k_dense": ("Qwen3-1.7B", "solution", True, 25000, 5e-6, 234, 8),
    "qwen3_1p7b_ot15k_sparse": ("Qwen3-1.7B", "Answer", True, 8192, 5e-6, 234, 8),
    "qwen3_4b_ot15k_dense": ("Qwen3-4B", "solution", True, 25000, 5e-6, 234, 8),
    "qwen3_4b_ot15k_sparse": ("Qwen3-4B", "Answer", True, 8192, 5e-6, 234, 8),
    "qwen3_8b_ot15k_dense": ("Qwen3-8B", "solution", True, 25000, 2e-6, 234, 8),
    "qwen3_8b_ot15k_sparse": ("Qwen3-8B", "Answer", True, 8192, 2e-6, 234, 8),
    "qwen3_4b_thinking_2507_ot15k_dense": ("Qwen3-4B-Thinking-2507", "solution", True, 25000, 5e-6, 234, 8),
    "qwen3_4b_thinking_2507_ot15k_sparse": ("Qwen3-4B-Thinking-2507", "Answer", True, 8192, 5e-6, 234, 8),
    "qwen3_4b_instruct_2507_ot15k_dense": ("Qwen3-4B-Instruct-2507", "solution", True, 25000, 5e-6, 234, 8),
    "qwen3_4b_instruct_2507_ot15k_sparse": ("Qwen3-4B-Instruct-2507", "Answer", True, 8192, 5e-6, 234, 8),
    "olmo3_7b_think_ot15k_dense": ("Olmo-3-7B-Think", "solution", True, 25000, 5e-6, 234, 8),
    "olmo3_7b_think_ot15k_sparse": ("Olmo-3-7B-Think", "Answer", True, 8192, 5e-6, 234, 8),
    "olmo3_7b_instruct_ot15k_dense": ("Olmo-3-7B-Instruct", "solution", True, 25000, 5e-6, 234, 8),
    "olmo3_7b_instruct_ot15k_sparse": ("Olmo-3-7B-Instruct", "Answer", True, 8192, 5e-6, 234, 8),
    "qwen3_4b_thinking_2507_countdown_dense": ("Qwen3-4B-Thinking-2507", "response_suffix", True, 25000, 5e-6, 234, 8),
    "qwen3_4b_instruct_2507_countdown_dense": ("Qwen3-4B-Instruct-2507", "response_suffix", True, 25000, 5e-6, 234, 8),
    "olmo3_7b_think_countdown_dense": ("Olmo-3-7B-Think", "response_suffix", True, 25000, 5e-6, 234, 8),
    "olmo3_7b_instruct_countdown_dense": ("Olmo-3-7B-Instruct", "response_suffix", True, 25000, 5e-6, 234, 8),
    "qwen3_4b_thinking_2507_countdown_sparse": ("Qwen3-4B-Thinking-2507", "response_answer_only", True, 8192, 5e-6,
                                                234, 8),
    "qwen3_4b_instruct_2507_countdown_sparse": ("Qwen3-4B-Instruct-2507", "response_answer_only", True, 8192, 5e-6,
                                                234, 8),
    "olmo3_7b_think_countdown_sparse": ("Olmo-3-7B-Think", "response_answer_only", True, 8192, 5e-6, 234, 8),
    "olmo3_7b_instruct_countdown_sparse": ("Olmo-3-7B-Instruct", "response_answer_only", True, 8192, 5e-6, 234, 8),
    "qwen3_4b_ot30k_thinking": ("Qwen3-4B", "solution", True, 25000, 1e-6, 459, 14),
    "qwen3_4b_ot30k_nothink": ("Qwen3-4B", "solution", False, 25000, 1e-6, 459, 14),
    "qwen3_8b_ot15k_concise": ("Qwen3-8B", None, True, 25000, 2e-6, 234, 8),
}
CONCISE = ("Solve the following math problem concisely and correctly. Be direct -- avoid unnecessary elaboration, "
           "redundant steps, or restating the problem. Focus only on the key reasoning steps needed to reach the "
           "answer.\n\n{prompt}")
SUFFIX = "Return your final response within \\boxed{}."


def test_every_paper_run_has_a_config():
    shipped = {f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml")}
    assert len(PAPER_RUNS) == 25 and set(PAPER_RUNS) <= shipped


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_config_resolves_to_the_papers_values(name):
    folder, column, thinking, max_prompt, lr, steps, warmup = PAPER_RUNS[name]
    c = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    assert os.path.basename(c.model.checkpoint) == folder
    assert c.teacher.kind == "frozen"
    if column is None:
        assert c.prompt.privilege == "instruction" and c.prompt.instruction == CONCISE
    else:
        field = {"dense": 1, "sparse": 2}[c.prompt.privilege]
        assert PRESETS[c.data.preset][field] == column
    assert (c.prompt.student_thinking, c.prompt.teacher_thinking) == (thinking, thinking)
    assert (c.data.max_prompt_tokens, c.data.overlong) == (max_prompt, "truncate_left")
    assert c.data.empty_context == "keep"  # the paper's trainer takes an empty solution or answer as it is
    # train.py's `--seed 42` seeds both the `datasets` shuffle and TRL's sampler permutation.
    assert (c.data.order, c.data.shuffle_seed) == ("paper", 42)
    assert c.optimizer.learning_rate == lr and c.train.steps == steps and c.train.batch_size == 64
    schedule = learning_rate_schedule(c.optimizer, c.train.steps)
    assert float(schedule(warmup)) == pytest.approx(lr) and float(schedule(warmup - 1)) < lr
    assert (c.objective.kind, c.objective.beta, c.objective.skip_first) == ("jsd", 0.5, 3)
    assert (c.objective.importance, c.objective.importance_cap, c.objective.reduction) == ("paper", 2.0,
                                                                                          "sequence_mean")
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.top_k, c.sampling.max_new_tokens) == (1.0, 1.0, 50,
                                                                                                       4096)
    countdown = c.data.preset == "countdown"
    assert (c.prompt.student_suffix, c.prompt.suffix_join) == ("" if countdown else SUFFIX, "paper")
    # Evaluation as run_generate.py + run_budget_sweep.py: n 16 at 38,912 tokens, cut at four budgets,
    # the paper's grader, the template's own thinking default; Qwen3-4B-Instruct-2507 at 0.7 / 0.8.
    e = c.eval
    suites = ("data/raw/countdown_500.parquet," if countdown else "") + "aime24_h4,aime25,hmmt25"
    sampling = (0.7, 0.8) if folder == "Qwen3-4B-Instruct-2507" else (0.6, 0.95)
    assert (e.suites, e.n, e.max_tokens, (e.temperature, e.top_p), e.top_k) == (suites, 16, 38912, sampling, 0)
    assert (e.budgets, e.grading, e.thinking, e.instruction) == ("4096,8192,16384,32768", "paper", None, None)


def test_eval_takes_its_defaults_from_the_config_and_flags_win(tmp_path):
    from opsd_jax.cli import parse_arguments

    config = os.path.join(CONFIGS, "qwen3_4b_instruct_2507_countdown_dense.yaml")
    args = parse_arguments(["eval", "--config", config, "--checkpoint", "ckpt", "--out", "out", "--n", "4"])
    assert (args.n, args.max_tokens, args.temperature, args.top_p, args.grading) == (4, 38912, 0.7, 0.8, "paper")
    assert args.suite.startswith("data/raw/countdown_500.parquet") and args.thinking is None
    plain = parse_arguments(["eval", "--checkpoint", "ckpt", "--out", "out"])
    assert (plain.n, plain.temperature, plain.grading) == (16, 0.6, "strict")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  temprature: 0.7\n")
    with pytest.raises(ValueError, match="unknown config key eval.temprature"):
        parse_arguments(["eval", "--config", str(bad), "--checkpoint", "c", "--out", "o"])


def test_paper_prompt_texts():
    """Prompts as the paper's code builds them: OpenThoughts problems already end with the
    instruction (its data builder), Countdown prompts are verbatim, the concise teacher gets the
    instruction before the problem and no solution."""
    problem = Problem(id="1", problem=f"Find x if 2x = 6. {SUFFIX}", solution="x = 3", answer="3")
    dense = load_config(os.path.join(CONFIGS, "qwen3_1p7b_ot15k_dense.yaml")).prompt
    assert student_prompt_text(problem, dense) == problem.problem
    assert teacher_prompt_text(problem, dense, None) == (
        f"{problem.problem}\n\nThis is an example for a response to the question:\nx = 3\n\n"
        "Now answer with a response of your own, including the thinking process.")
    concise = load_config(os.path.join(CONFIGS, "qwen3_8b_ot15k_concise.yaml")).prompt
    assert teacher_prompt_text(problem, concise, None) == CONCISE.replace("{prompt}", problem.problem)
    countdown = load_config(os.path.join(CONFIGS, "olmo3_7b_think_countdown_sparse.yaml")).prompt
    cd = Problem(id="2", problem="Using the numbers [3, 5], create an equation that equals 8.", solution="",
                 answer="\\boxed{3+5}")
    assert student_prompt_text(cd, countdown) == cd.problem

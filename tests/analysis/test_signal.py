"""Scores against a full-logits oracle, a constructed teacher whose advantage signs are known, the
`analyze` command end to end, and bad rollouts files."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.analysis.analyze import _pairs
from opsd_jax.analysis.rollouts import Rollout, read_rollouts, write_rollouts
from opsd_jax.config import PromptSection
from opsd_jax.data.sources import Problem
from opsd_jax.distill.prompts import prompt_pair
from opsd_jax.eval import generations
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer
from tests.kernels import oracle

PROBLEM = Problem(id="p1", problem="What is 6 * 7?", solution="Let me verify: 7 * 6 = 42.", answer="42")
ROLLOUT_TEXT = "The quick brown fox is 42. Wait the total is 42."


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("student"))
    save_tiny_hf_model("qwen3", path, seed=3)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def loaded(student_dir):
    from opsd_jax.checkpoint.loading import load_for_serving

    return load_for_serving(student_dir, dtype="float32")


def _log_softmax_rows(params, config, context, first, n):
    from opsd_jax.models import forward

    logits = forward(params, config, jnp.asarray([context], jnp.int32))[0]
    rows = jax.nn.log_softmax(logits[first - 1: first - 1 + n], axis=-1)
    return np.asarray(rows)


def test_scores_match_full_logits(loaded):
    from opsd_jax.analysis.score import score_rollouts

    config, params, tokenizer, _ = loaded
    tokens = tokenizer.encode(ROLLOUT_TEXT, add_special_tokens=False)
    section = PromptSection(privilege="dense")
    privileged = prompt_pair(PROBLEM, section, tokenizer)
    vanilla = prompt_pair(PROBLEM, PromptSection(privilege="none"), tokenizer)
    short = tokens[:5]
    (scores, scores_short) = score_rollouts(params, config, params, config, [privileged, privileged],
                                            [vanilla, vanilla], [tokens, short], batch_size=4)
    for context_ids, logprob_field, entropy_field in ((privileged.student_ids, "student_logprob", "student_entropy"),
                                                      (privileged.teacher_ids, "privileged_logprob",
                                                       "privileged_entropy")):
        rows = _log_softmax_rows(params, config, context_ids + tokens, len(context_ids), len(tokens))
        np.testing.assert_allclose(scores[logprob_field], rows[np.arange(len(tokens)), tokens], atol=2e-4)
        entropy = -(np.exp(rows) * rows).sum(-1)
        np.testing.assert_allclose(scores[entropy_field], entropy, atol=2e-4)
    assert privileged.teacher_ids != privileged.student_ids
    # The trainer's objective at each position (JSD at the default beta 0.5) against float64.
    student_rows = _log_softmax_rows(params, config, privileged.student_ids + tokens, len(privileged.student_ids),
                                     len(tokens))
    teacher_rows = _log_softmax_rows(params, config, privileged.teacher_ids + tokens, len(privileged.teacher_ids),
                                     len(tokens))
    jsd = oracle.outputs(student_rows, teacher_rows, 0.5)["divergence"]
    assert jsd.min() > 1e-4  # the privileged context moves every position
    np.testing.assert_allclose(scores["privileged_divergence"], jsd, rtol=2e-3, atol=2e-6)
    # the same weights on the student's own context: the vanilla teacher is the student
    np.testing.assert_allclose(scores["vanilla_logprob"], scores["student_logprob"], atol=1e-5)
    np.testing.assert_allclose(scores["vanilla_divergence"], 0.0, atol=1e-6)
    np.testing.assert_allclose(scores_short["student_logprob"], scores["student_logprob"][:5], atol=1e-5)
    assert len(scores_short["student_entropy"]) == 5


def _constructed_teacher(loaded, tokens, marker_token, path):
    """A teacher = the student with lm_head column y moved so that at the marker position y's logit
    rises by 40 under the privileged context and falls by 40 under the vanilla one."""
    from opsd_jax.checkpoint.hf import save_hf
    from opsd_jax.models import forward_hidden

    config, params, tokenizer, side_dir = loaded
    privileged = prompt_pair(PROBLEM, PromptSection(privilege="dense"), tokenizer)
    hidden = []
    for context in (privileged.teacher_ids, privileged.student_ids):
        h, _ = forward_hidden(params, config, jnp.asarray([context + tokens], jnp.int32))
        hidden.append(np.asarray(h[0, len(context) - 1 + marker_token], np.float64))
    delta = np.linalg.pinv(np.stack(hidden)) @ np.array([40.0, -40.0])
    y = tokens[marker_token]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    (key, head), = [(k, v) for k, v in flat if "lm_head" in jax.tree_util.keystr(k)]
    new_head = np.asarray(head).copy()
    new_head[:, y] += delta.astype(new_head.dtype)
    teacher = jax.tree_util.tree_map_with_path(
        lambda k, v: jnp.asarray(new_head) if k == key else v, params)
    save_hf(teacher, config, path)
    for name in os.listdir(side_dir):
        if name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(os.path.join(side_dir, name), path)
    return path


def test_constructed_signs_and_cli_outputs(loaded, student_dir, tmp_path):
    from opsd_jax.analysis.markers import find_markers, load_markers, token_pieces
    from opsd_jax.cli import main

    _, _, tokenizer, _ = loaded
    tokens = tokenizer.encode(ROLLOUT_TEXT, add_special_tokens=False)
    text, ends = token_pieces(tokenizer, tokens)
    (match,) = find_markers(text, ends, load_markers())
    assert match.category == "backtracking" and match.phrase == "Wait"
    teacher_dir = _constructed_teacher(loaded, tokens, match.first_token, str(tmp_path / "teacher"))
    rollouts = str(tmp_path / "rollouts.jsonl")
    write_rollouts(rollouts, [Rollout(PROBLEM, tuple(tokens)), Rollout(PROBLEM, tuple(tokens[:8]), 1)], tokenizer)
    out = str(tmp_path / "report")
    code = main(["analyze", "--rollouts", rollouts, rollouts, "--labels", "base,trained", "--student", student_dir,
                 "--teacher", teacher_dir, "--privileged", "dense", "--top-rho", "0.2", "--out", out,
                 "--no-progress"])
    assert code == 0
    assert {"report.md", "metrics.json", "fork_rates.png", "marker_rates.png",
            "advantage_at_markers.png"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    group = metrics["groups"]["base"]
    signal = group["signal_at_markers"]["backtracking"]
    assert signal["positions"] == 1
    assert signal["privileged"]["mean"] > 5 and signal["vanilla"]["mean"] < -5
    assert signal["sign_disagreement"] == 1.0
    assert group["signal_at_markers"]["hedging"] == {"positions": 0}
    assert group["tokens"] == len(tokens) + 8
    assert group["markers"]["backtracking"]["per_1k_tokens"] == pytest.approx(1000 / (len(tokens) + 8))
    for name in ("student", "privileged_teacher", "vanilla_teacher"):
        rates = group["fork_rates"][name]
        assert 0 <= rates["all"]["fork_rate"] <= 1 and rates["all"]["tokens"] == group["tokens"]
        assert rates["thinking"]["tokens"] == 0  # no <think> in these rollouts: all answer span
    assert metrics["marker_differences_vs_base"]["trained"]["backtracking"]["difference"] == 0.0
    # One fork threshold, the base group's, for every group.
    for label in ("base", "trained"):
        assert metrics["groups"][label]["fork_threshold_source"] == "top_rho 0.2 of group base's student entropies"
        assert metrics["groups"][label]["fork_threshold_nats"] == group["fork_threshold_nats"]
    # At the marker the privileged teacher is sure of a token the student finds unlikely: the JSD
    # (beta 0.5) nears its bound ln 2; the vanilla teacher only lowers that token further.
    divergence = group["divergence"]
    assert divergence["beta"] == 0.5
    at_marker = divergence["privileged"]["at_markers"]["backtracking"]
    assert at_marker["positions"] == 1 and 0.6 < at_marker["mean"] <= np.log(2) + 1e-6
    assert divergence["vanilla"]["at_markers"]["backtracking"]["mean"] < 0.1
    assert divergence["privileged"]["all"]["tokens"] == group["tokens"]
    with open(os.path.join(out, "report.md")) as f:
        report_text = f.read()
    assert "| backtracking | 1 |" in report_text
    assert all(count["rollouts"] == 0 for count in group["beyond_context"].values())
    assert "Past the context" not in report_text
    assert "Per-token divergence between the student and each teacher (generalized JSD, beta 0.5" in report_text


def test_rollouts_under_a_template_that_opens_thinking(loaded, tmp_path):
    """A chat template whose generation prompt opens <think> itself (Qwen3-2507-Thinking, OLMo-3
    Think): a rollout cut before its </think> is all thinking, one that closes it is thinking up
    to the tag."""
    import copy

    from opsd_jax.analysis import forks
    from opsd_jax.analysis.markers import token_pieces

    _, _, tokenizer, _ = loaded
    thinking_template = copy.copy(tokenizer)
    thinking_template.chat_template = tokenizer.chat_template.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
    cut = tokenizer.encode("Wait, let me check that again", add_special_tokens=False)
    closed = tokenizer.encode("Wait, let me check.</think> The answer is 42.", add_special_tokens=False)
    path = str(tmp_path / "rollouts.jsonl")
    write_rollouts(path, [Rollout(PROBLEM, tuple(cut)), Rollout(PROBLEM, tuple(closed), 1)], tokenizer)
    assert not read_rollouts(path, tokenizer).prompt_opens_thinking
    opened = read_rollouts(path, thinking_template)
    assert opened.prompt_opens_thinking
    masks = [forks.thinking_mask(*token_pieces(tokenizer, r.token_ids), opened.prompt_opens_thinking)
             for r in opened.rollouts]
    assert masks[0].all()
    close = closed.index(tokenizer.convert_tokens_to_ids("</think>"))
    assert masks[1].tolist() == [True] * (close + 1) + [False] * (len(closed) - close - 1)


def test_bad_rollouts_files(loaded, tmp_path):
    _, _, tokenizer, _ = loaded
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        read_rollouts(str(empty), tokenizer)
    other_dir = str(tmp_path / "other_tokenizer")
    save_tiny_tokenizer(other_dir, vocab_size=300)
    import transformers

    other = transformers.AutoTokenizer.from_pretrained(other_dir)
    foreign = str(tmp_path / "foreign.jsonl")
    write_rollouts(foreign, [Rollout(PROBLEM, (5, 6, 7))], other)
    with pytest.raises(ValueError, match=r"foreign.jsonl:1: field 'tokenizer_fingerprint'.*another tokenizer"):
        read_rollouts(foreign, tokenizer)
    bad_ids = tmp_path / "bad_ids.jsonl"
    header = {"format": "opsd-jax-rollouts/1", "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer)}
    record = {"problem_id": "p", "problem": "q", "solution": "s", "answer": "a", "token_ids": [1, "x"]}
    bad_ids.write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"bad_ids.jsonl:2: field 'token_ids'"):
        read_rollouts(str(bad_ids), tokenizer)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"format": "something"}) + "\n")
    with pytest.raises(ValueError, match=r"unknown.jsonl:1: field 'format'"):
        read_rollouts(str(unknown), tokenizer)


def test_reads_eval_generations(loaded, tmp_path):
    _, _, tokenizer, _ = loaded
    path = str(tmp_path / "generations.jsonl")
    header = {"format": generations.FORMAT, "suite": "aime24", "suite_fingerprint": "x",
              "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer), "instruction": None,
              "enable_thinking": None, "thinking_open": False}
    records = [{"problem_id": "aime24-I-1", "sample_index": 0, "text": ROLLOUT_TEXT, "token_count": 3,
                "finish_reason": "stop", "budget_chars": {}},
               {"problem_id": "aime24-I-1", "sample_index": 1, "text": "", "token_count": 1,
                "finish_reason": "stop", "budget_chars": {}}]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in [header] + records) + "\n")
    rollout_set = read_rollouts(path, tokenizer)
    (rollout,) = rollout_set.rollouts  # the empty generation has nothing to score
    assert tokenizer.decode(list(rollout.token_ids)) == ROLLOUT_TEXT
    assert rollout.problem.answer == "204" and "coffee" in rollout.problem.problem and rollout.problem.solution
    assert rollout_set.prompt.student_suffix == ""
    assert rollout_set.prompt.student_thinking and rollout_set.prompt.teacher_thinking
    # An evaluation with thinking off: the teachers' prompts are in the same mode, so the vanilla
    # teacher's prompt is the student's and the privileged one ends in the same empty think block.
    header["enable_thinking"] = False
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in [header] + records) + "\n")
    rollout_set = read_rollouts(path, tokenizer)
    assert not rollout_set.prompt.student_thinking and not rollout_set.prompt.teacher_thinking
    privileged, vanilla = _pairs(rollout_set, "dense", tokenizer)
    assert vanilla[0].teacher_ids == vanilla[0].student_ids
    empty_block = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                tokenize=False, enable_thinking=False).split("assistant\n")[-1]
    assert empty_block.strip() and tokenizer.decode(privileged[0].teacher_ids).endswith(empty_block)
    header["enable_thinking"] = None
    header["tokenizer_fingerprint"] = "0" * 64
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in [header] + records) + "\n")
    with pytest.raises(ValueError, match="generations.jsonl:1: field 'tokenizer_fingerprint'"):
        read_rollouts(path, tokenizer)


def test_eval_generations_are_scored_as_sampled(loaded, tmp_path):
    """The runner keeps the sampled ids; a sampler can draw a split the tokenizer would never
    produce (here one byte-level token per character), and analyze scores that split. Files
    without ids (written before the runner kept them) fall back to encoding the text."""
    _, _, tokenizer, _ = loaded
    canonical = tokenizer.encode(ROLLOUT_TEXT, add_special_tokens=False)
    sampled = [i for ch in ROLLOUT_TEXT for i in tokenizer.encode(ch, add_special_tokens=False)]
    assert tokenizer.decode(sampled) == ROLLOUT_TEXT and len(sampled) > len(canonical)
    header = {"format": generations.FORMAT, "suite": "aime24", "suite_fingerprint": "x",
              "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer), "instruction": None,
              "enable_thinking": None, "thinking_open": False}

    def record(sample_index, **fields):
        return {"problem_id": "aime24-I-1", "sample_index": sample_index, "text": ROLLOUT_TEXT,
                "token_count": len(sampled) + 1, "finish_reason": "stop", "budget_chars": {}, **fields}

    path = tmp_path / "generations.jsonl"

    def write(*records):
        path.write_text("\n".join(json.dumps(r) for r in (header, *records)) + "\n")
        return str(path)

    with_ids, without_ids = read_rollouts(write(record(0, token_ids=sampled), record(1)), tokenizer).rollouts
    assert list(with_ids.token_ids) == sampled
    assert list(without_ids.token_ids) == canonical
    with pytest.raises(ValueError, match=r"generations.jsonl:2: field 'token_ids' does not decode to field 'text'"):
        read_rollouts(write(record(0, token_ids=sampled[:-1])), tokenizer)
    with pytest.raises(ValueError, match=r"generations.jsonl:3: field 'token_ids' holds 400, outside the tokenizer's "
                                         r"400 tokens"):
        read_rollouts(write(record(0, token_ids=sampled), record(1, token_ids=sampled + [len(tokenizer)])), tokenizer)


def test_cli_reports_bad_inputs(student_dir, tmp_path, capsys):
    from opsd_jax.cli import main

    bad = tmp_path / "markers.yaml"
    bad.write_text("hedging: [maybe\n")
    empty = tmp_path / "rollouts.jsonl"
    empty.write_text("")
    common = ["analyze", "--rollouts", str(empty), "--student", student_dir, "--out", str(tmp_path / "out"),
              "--no-progress"]
    assert main(common + ["--markers", str(bad)]) == 2
    assert "markers.yaml:2: markers file is not valid YAML" in capsys.readouterr().err
    assert main(common) == 2
    assert "rollouts.jsonl: empty file" in capsys.readouterr().err
    assert main(common + ["--beta", "1.5"]) == 2
    assert "--beta must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_run_as_one_of_several_processes(student_dir, tmp_path, capsys, monkeypatch):
    from opsd_jax.cli import main

    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert main(["analyze", "--rollouts", str(rollouts), "--student", student_dir, "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    assert "analyze runs as one process, and this one joined a 2-process job" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_generations_of_a_suite_without_ids(loaded, tmp_path):
    """A custom suite whose rows have no 'id' is keyed NAME-INDEX (0-based) by the eval runner;
    analyze finds the same rows."""
    _, _, tokenizer, _ = loaded
    suite = tmp_path / "mysuite.jsonl"
    suite.write_text("".join(json.dumps({"problem": f"Problem {i}", "answer": str(i), "solution": f"s{i}"}) + "\n"
                             for i in range(3)))
    header = {"format": generations.FORMAT, "suite": "mysuite", "suite_source": str(suite),
              "suite_fingerprint": "x", "tokenizer_fingerprint": generations.tokenizer_fingerprint(tokenizer),
              "instruction": None, "enable_thinking": None, "thinking_open": False}
    record = {"problem_id": "mysuite-1", "sample_index": 0, "text": ROLLOUT_TEXT, "token_count": 3,
              "finish_reason": "stop", "budget_chars": {}}
    path = tmp_path / "generations.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [header, record]) + "\n")
    (rollout,) = read_rollouts(str(path), tokenizer).rollouts
    assert (rollout.problem.problem, rollout.problem.answer, rollout.problem.solution) == ("Problem 1", "1", "s1")


def test_beyond_context_counts_tokens_predicted_past_the_limit():
    from opsd_jax.analysis.analyze import beyond_context

    # Token t after a p-token prompt is predicted at position p + t - 1.
    assert beyond_context([10], [5], 14) == {"rollouts": 0, "tokens": 0, "limit": 14}  # last at 13
    assert beyond_context([10], [5], 13) == {"rollouts": 1, "tokens": 1, "limit": 13}
    assert beyond_context([10, 20, 3], [5, 4, 2], 9) == {"rollouts": 2, "tokens": 5 + 4, "limit": 9}
    assert beyond_context([], [], 9) == {"rollouts": 0, "tokens": 0, "limit": 9}


def test_rollouts_past_a_models_context_are_counted_and_reported(loaded, student_dir, tmp_path, capsys):
    """A worked solution long enough that the privileged teacher's context passes the tiny model's
    512 positions while the student's and the vanilla teacher's do not: scored anyway, counted,
    warned about and named in the report."""
    from opsd_jax.cli import main

    config, _, tokenizer, _ = loaded
    limit = config.max_position_embeddings
    tokens = tokenizer.encode(ROLLOUT_TEXT * 6, add_special_tokens=False)
    rollouts = str(tmp_path / "rollouts.jsonl")
    for repeats in range(1, 200):  # the shortest solution whose teacher context passes the limit
        long_problem = Problem(id="long", problem="What is 6 * 7?",
                               solution=" ".join(["seven sixes are 42."] * repeats), answer="42")
        write_rollouts(rollouts, [Rollout(long_problem, tuple(tokens)), Rollout(PROBLEM, tuple(tokens), 1)],
                       tokenizer)
        privileged, vanilla = _pairs(read_rollouts(rollouts, tokenizer), "dense", tokenizer)
        teacher_context = len(privileged[0].teacher_ids) + len(tokens)
        if teacher_context - 1 > limit:
            break
    # The prompt itself fits: only the rollout's later tokens are predicted past the limit.
    assert len(privileged[0].teacher_ids) < limit and len(privileged[0].student_ids) + len(tokens) < limit
    assert len(privileged[1].teacher_ids) + len(tokens) < limit  # the short solution's rollout stays inside
    out = str(tmp_path / "report")
    assert main(["analyze", "--rollouts", rollouts, "--student", student_dir, "--privileged", "dense",
                 "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        group = json.load(f)["groups"]["rollouts"]
    past = teacher_context - 1 - limit
    assert group["beyond_context"] == {
        "student": {"rollouts": 0, "tokens": 0, "limit": limit},
        "privileged_teacher": {"rollouts": 1, "tokens": past, "limit": limit},
        "vanilla_teacher": {"rollouts": 0, "tokens": 0, "limit": limit}}
    assert np.isfinite(group["mean_entropy_nats"]["privileged_teacher"])
    assert (f"rollouts: 1 of 2 rollouts run past the privileged_teacher's context ({limit} positions); {past} of "
            "their tokens") in capsys.readouterr().err
    with open(os.path.join(out, "report.md")) as f:
        assert f"**Past the context:** 1 rollouts run past the privileged_teacher's {limit} positions" in f.read()

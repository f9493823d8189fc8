"""End to end: a tiny random model through the runner, kill and resume, reports, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from opsd_jax.eval import generations, runner
from opsd_jax.eval.report import compare_runs
from opsd_jax.eval.suites import load_suite
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Answers a random model will not hit by chance, even through the last-number fallback.
PROBLEMS = [("tiny-1", "What is 4521 + 4521?", "9042"), ("tiny-2", "Simplify 34/6.", "\\frac{17}{3}"),
            ("tiny-3", "Name both roots.", "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}")]
SETTINGS = runner.EvalSettings(n=8, max_tokens=64, temperature=1.0, top_p=1.0, seed=3, budgets=(8, 16, 32))
CLI_SETTINGS = ["--n", "8", "--max-tokens", "64", "--temperature", "1.0", "--top-p", "1.0", "--seed", "3",
                "--budgets", "8,16,32", "--dtype", "float32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_seed):
    root = tmp_path_factory.mktemp("eval")
    model = root / "model"
    save_tiny_hf_model("qwen3", str(model), seed=model_seed)
    save_tiny_tokenizer(str(model))
    suite_path = root / "tiny.jsonl"
    suite_path.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, p, a in PROBLEMS))
    return root, str(model), str(suite_path)


# Every run compared record for record with the full one decodes as many slots: the decode step's
# matmuls have the slot count as a dimension, and another shape may sum in another order, so a
# seeded draw near a CDF boundary could pick the neighbouring token. Samples are a function of
# (seed, problem, sample index) for a given engine shape; which requests share a step, which slot
# a sample lands in, and when it is admitted do not matter.
SLOTS = 4


@pytest.fixture(scope="module")
def full_run(workspace):
    """One uninterrupted run: the reference for resumed and sharded runs."""
    root, model, suite_path = workspace
    out = str(root / "full")
    result = runner.run_eval(model, [load_suite(suite_path)], out, SETTINGS, dtype="float32", max_slots=SLOTS,
                             progress=False)
    return out, result


def records_of(path):
    return generations.read(path).records


def differences(actual: dict, expected: dict) -> str:
    """What a failed record-for-record comparison needs to be diagnosed: missing and extra
    samples, and for each differing sample the first token where it departs."""
    lines = [f"missing {sorted(set(expected) - set(actual))[:5]}", f"extra {sorted(set(actual) - set(expected))[:5]}"]
    for key in sorted(set(actual) & set(expected)):
        a, e = actual[key], expected[key]
        if a != e:
            ids_a, ids_e = a.get("token_ids", []), e.get("token_ids", [])
            at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_e)) if x != y), min(len(ids_a), len(ids_e)))
            fields = sorted(f for f in set(a) | set(e) if a.get(f) != e.get(f))
            lines.append(f"{key}: fields {fields} differ; tokens from {at}: {ids_a[at:at + 3]} vs {ids_e[at:at + 3]} "
                         f"of {len(ids_a)} vs {len(ids_e)}")
    return "\n".join(lines)


def test_end_to_end_files_metrics_and_plot(full_run):
    out, result = full_run
    assert result["generation"]["tiny"]["generated"] == 24
    suite_dir = os.path.join(out, "tiny")
    records = records_of(os.path.join(suite_dir, "generations.jsonl"))
    assert sorted(records) == sorted((p, i) for p, *_ in PROBLEMS for i in range(8))
    assert all(1 <= r["token_count"] <= 64 and r["finish_reason"] in ("stop", "length") for r in records.values())
    assert len({r["seed"] for r in records.values()}) == 24
    for budget in (8, 16, 32, 64):
        with open(os.path.join(suite_dir, "metrics", f"budget-{budget}.json")) as f:
            metrics = json.load(f)
        assert metrics["budget"] == budget and metrics["samples_per_problem"] == 8 and metrics["problems"] == 3
        assert metrics["accuracy"] <= 0.05  # a random model is (near) never right
        assert set(metrics["pass@k"]) == {"1", "2", "4", "8"}
        assert metrics["length"]["max_tokens_seen"] <= budget
        assert sum(metrics["extraction"].values()) == 24
        assert [p["id"] for p in metrics["per_problem"]] == [p for p, *_ in PROBLEMS]
    with open(os.path.join(suite_dir, "grades.jsonl")) as f:
        assert len([json.loads(line) for line in f]) == 24
    with open(os.path.join(out, "summary.json")) as f:
        assert set(json.load(f)["tiny"]) == {"8", "16", "32", "64"}
    import matplotlib.image

    image = matplotlib.image.imread(os.path.join(out, "accuracy_vs_budget.png"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert not [n for _, _, files in os.walk(out) for n in files if ".tmp" in n]


def test_sharded_run_merges_to_the_same_samples(workspace, full_run):
    root, model, suite_path = workspace
    out = str(root / "sharded")
    for index in range(2):
        result = runner.run_eval(model, [load_suite(suite_path)], out, SETTINGS, shard=(index, 2), dtype="float32",
                                 max_slots=SLOTS, progress=False)
        assert "metrics" not in result
    merged = runner.score_run(out, merge=True, progress=False)
    assert records_of(os.path.join(out, "tiny", "generations.jsonl")) == records_of(
        os.path.join(full_run[0], "tiny", "generations.jsonl"))
    with open(os.path.join(full_run[0], "tiny", "metrics", "budget-64.json")) as f:
        assert merged["tiny"][64]["accuracy"] == json.load(f)["accuracy"]


def test_a_relaunch_with_one_process_generates_only_what_the_old_shards_lack(workspace, full_run):
    """A 3-process launch was cut short (shard 0 done, shard 1 killed mid-write, shard 2 never
    started); the relaunch on one process samples only the rest and grades the union."""
    root, model, suite_path = workspace
    out = root / "relaunched"
    full = generations.read(os.path.join(full_run[0], "tiny", "generations.jsonl"))
    old = {index: [r for key, r in full.records.items() if generations.shard_of(*key, 3) == index] for index in (0, 1)}
    for index, records in ((0, old[0]), (1, old[1][:2])):
        with generations.Appender(generations.shard_path(str(out / "tiny"), (index, 3)),
                                  dict(full.header, shard=[index, 3])) as appender:
            for r in records:
                appender.append(r)
    with open(generations.shard_path(str(out / "tiny"), (1, 3)), "a") as f:
        f.write(json.dumps(old[1][2])[:40])
    result = runner.run_eval(model, [load_suite(suite_path)], str(out), SETTINGS, dtype="float32",
                             max_slots=SLOTS, progress=False)
    reused = len(old[0]) + 2
    assert result["generation"]["tiny"]["existing"] == reused
    assert result["generation"]["tiny"]["generated"] == 24 - reused
    assert records_of(out / "tiny" / "generations.jsonl") == full.records  # the merged union, each sample once
    with open(out / "summary.json") as f, open(os.path.join(full_run[0], "summary.json")) as g:
        assert json.load(f)["tiny"] == json.load(g)["tiny"]


def test_a_multi_process_launch_samples_per_process_and_process_0_grades(workspace, full_run):
    """Every host of a pod runs the same `opsd-jax eval`: each process samples its own shard on its
    own devices, process 0 merges and grades; the samples are the single-process run's, none lost
    or repeated."""
    root, model, suite_path = workspace
    out = root / "two_processes"
    result = subprocess.run(
        [os.path.join(REPO, "launch", "local_cpu_cluster.sh"), "-n", "2", "-d", "4", "--", sys.executable, "-m",
         "opsd_jax.cli", "eval", "--checkpoint", model, "--suite", suite_path, "--out", str(out),
         "--max-slots", str(SLOTS), "--no-progress", *CLI_SETTINGS],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""},
        errors="replace",  # the two processes' output shares one pipe: a character may be split
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    suite_dir = str(out / "tiny")
    shards = [records_of(generations.shard_path(suite_dir, (p, 2))) for p in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    expected = records_of(os.path.join(full_run[0], "tiny", "generations.jsonl"))
    assert {**shards[0], **shards[1]} == records_of(os.path.join(suite_dir, "generations.jsonl"))
    assert {**shards[0], **shards[1]} == expected, differences({**shards[0], **shards[1]}, expected)
    with open(out / "summary.json") as f, open(os.path.join(full_run[0], "summary.json")) as g:
        assert json.load(f)["tiny"] == json.load(g)["tiny"]
    assert result.stdout.count("tiny budget 64") == 1 and "process 1: tiny: " in result.stdout


def test_kill_and_resume_loses_and_repeats_nothing(workspace, full_run):
    root, model, suite_path = workspace
    out = str(root / "killed")
    path = os.path.join(out, "tiny", "generations.jsonl")
    process = subprocess.Popen(
        [sys.executable, "-m", "opsd_jax.cli", "eval", "--checkpoint", model, "--suite", suite_path, "--out", out,
         "--max-slots", str(SLOTS), "--cpu-devices", "1", "--no-progress", *CLI_SETTINGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(path) and len(records_of(path)) >= 2:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    before = records_of(path)
    assert 2 <= len(before) < 24, len(before)
    torn = json.dumps(next(r for k, r in records_of(os.path.join(full_run[0], "tiny", "generations.jsonl")).items()
                           if k not in before))
    with open(path, "a") as f:
        f.write(torn[:40])  # what a kill during a write leaves behind

    result = runner.run_eval(model, [load_suite(suite_path)], out, SETTINGS, dtype="float32", max_slots=SLOTS,
                             progress=False)
    counts = result["generation"]["tiny"]
    assert counts["dropped_torn_line"] and counts["existing"] == len(before)
    assert counts["generated"] == 24 - len(before)
    after = records_of(path)  # read() refuses duplicates
    assert len(after) == 24 and all(after[k] == r for k, r in before.items())
    assert after == records_of(os.path.join(full_run[0], "tiny", "generations.jsonl"))


def test_compare_report_and_plot(workspace, full_run, tmp_path):
    root, _, _ = workspace
    other = str(tmp_path / "other")
    shutil.copytree(full_run[0], other)
    report = compare_runs([full_run[0], other], ["base", "same"], str(tmp_path / "report"))
    assert {(r["suite"], r["budget"]) for r in report["differences"]} == {("tiny", b) for b in (8, 16, 32, 64)}
    assert all(r["absolute"] == 0 and r["absolute_ci"] == [0, 0] for r in report["differences"])
    for name in ("comparison.json", "comparison.md", "accuracy_vs_budget.png"):
        assert os.path.getsize(tmp_path / "report" / name) > 100
    with pytest.raises(ValueError, match="at least two run folders"):
        compare_runs([full_run[0]], None, str(tmp_path / "r2"))


def test_generations_from_another_tokenizer_are_refused(workspace, full_run, tmp_path, capsys):
    from opsd_jax.cli import main

    root, model, suite_path = workspace
    other_model = tmp_path / "retokenized"
    shutil.copytree(model, other_model)
    save_tiny_tokenizer(str(other_model), vocab_size=380)
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    before = (out / "tiny" / "generations.jsonl").read_bytes()
    status = main(["eval", "--checkpoint", str(other_model), "--suite", suite_path, "--out", str(out),
                   "--no-progress", *CLI_SETTINGS])
    assert status == 2
    assert "generations.jsonl: written with a different tokenizer" in capsys.readouterr().err
    assert (out / "tiny" / "generations.jsonl").read_bytes() == before


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    from opsd_jax.cli import main

    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert "eval needs --checkpoint DIR" in capsys.readouterr().err
    assert main(["eval", "--score-only", "--out", str(tmp_path)]) == 2
    assert "no SUITE/generations*.jsonl to grade" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "x", "--out", str(tmp_path), "--shard", "3/2"]) == 2
    assert "--shard 3/2: need 0 <= i < n" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "x", "--out", str(tmp_path), "--budgets", "4k"]) == 2
    assert "--budgets must be comma-separated token counts" in capsys.readouterr().err


def test_default_budgets_are_those_below_the_cap():
    assert runner.EvalSettings(max_tokens=5000).cut_budgets() == [4096]
    assert runner.EvalSettings(max_tokens=64).cut_budgets() == []
    runner.EvalSettings(max_tokens=64).validate()
    with pytest.raises(ValueError, match="--budgets 4096 exceed --max-tokens 64"):
        runner.EvalSettings(max_tokens=64, budgets=(32, 4096)).validate()


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-5"], "--top-k must be an integer in [0, 2**31)"),
    (["--top-k", str(2**31)], "--top-k must be an integer in [0, 2**31)"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
    (["--max-tokens", "16", "--budgets", "8,64,128"], "--budgets 64, 128 exceed --max-tokens 16"),
])
def test_bad_sampling_is_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    """A generations file records its sampling and refuses other settings, so a refused setting
    must not leave one behind (the checkpoint is not even read)."""
    from opsd_jax.cli import main

    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tmp_path / "absent"), "--suite", "aime24", "--out", str(out),
                 "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.jsonl"))


def test_cli_compare(full_run, tmp_path, capsys):
    from opsd_jax.cli import main

    assert main(["eval", "--compare", full_run[0], full_run[0], "--labels", "a,b", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny budget 64: b - a = +0.0000" in out
    assert (tmp_path / "comparison.md").exists()

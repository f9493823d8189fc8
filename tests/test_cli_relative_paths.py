"""Every subcommand as a newcomer types it: a fresh process, a scratch working directory, relative
paths only (and `~`), as the README and the configs' comments show them.

The processes get neither the test suite's XLA_FLAGS nor JAX_PLATFORMS, so device set-up comes
from the command or the config, as on a user's machine.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "opsd_jax", "data", "samples", "math_demo.jsonl")


def _command() -> list[str]:
    """The installed `opsd-jax` script beside this interpreter, as the README runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "opsd-jax")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "opsd_jax.cli"]


def _environment(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch cwd that doubles as HOME, holding a tiny model written by `opsd-jax tiny-model`."""
    cwd = tmp_path_factory.mktemp("newcomer")
    run(cwd, "tiny-model", "model")
    return cwd


def run(cwd, *args, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([*_command(), *args], cwd=cwd, env=_environment(cwd), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"opsd-jax {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_tiny_model_is_a_complete_hf_folder(workspace):
    import transformers

    names = set(os.listdir(workspace / "model"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in os.listdir(workspace) if n.endswith(".partial")]
    transformers.AutoModelForCausalLM.from_pretrained(str(workspace / "model"))


def test_convert_both_directions_with_relative_paths(workspace):
    from safetensors.numpy import load_file

    run(workspace, "convert", "--from-hf", "model", "--to-orbax", "checkpoints/tiny", "--cpu-devices", "4",
        "--mesh", "1,4,1")
    run(workspace, "convert", "--from-orbax", "checkpoints/tiny", "--to-hf", "~/exports/tiny-hf")
    original = load_file(str(workspace / "model" / "model.safetensors"))
    exported = load_file(str(workspace / "exports" / "tiny-hf" / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(original[k].tobytes() == exported[k].tobytes() for k in original)


def test_train_export_eval_analyze_with_relative_paths(workspace):
    """A YAML with relative and `~` paths, devices from `train.cpu_devices`; then every consumer of
    the run, pointed at it with relative paths."""
    shutil.copy(DEMO_DATA, workspace / "problems.jsonl")
    config = {
        "model": {"checkpoint": "model", "compute_dtype": "float32", "remat": False},
        "data": {"path": "~/problems.jsonl", "preset": "math", "max_prompt_tokens": 192},
        "prompt": {"privilege": "sparse"},
        "sampling": {"max_new_tokens": 8, "max_slots": 4},
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.0},
        "train": {"output_dir": "runs/tiny", "steps": 2, "batch_size": 4, "mesh": "2,2,1", "cpu_devices": 4,
                  "checkpoint_every": 1, "save_rollouts_every": 1},
    }
    (workspace / "configs").mkdir()
    (workspace / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = run(workspace, "train", "--config", "configs/tiny.yaml")
    assert "step 2: loss" in result.stdout
    recorded = yaml.safe_load((workspace / "runs" / "tiny" / "config.yaml").read_text())
    assert recorded["model"]["checkpoint"] == str(workspace / "model")
    assert recorded["data"]["path"] == str(workspace / "problems.jsonl")
    assert len((workspace / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()) == 2

    run(workspace, "train", "--config", "configs/tiny.yaml", "--resume", "train.steps=3")
    assert len((workspace / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()) == 3

    run(workspace, "export", "--run", "runs/tiny", "--to-hf", "exports/trained")
    assert (workspace / "exports" / "trained" / "tokenizer.json").exists()

    (workspace / "suite.jsonl").write_text(json.dumps({"id": "p1", "problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    run(workspace, "eval", "--checkpoint", "exports/trained", "--suite", "suite.jsonl", "--out", "evals/trained",
        "--n", "2", "--max-tokens", "8", "--budgets", "4", "--max-slots", "2", "--dtype", "float32",
        "--cpu-devices", "1", "--no-progress")
    assert (workspace / "evals" / "trained" / "summary.json").exists()

    run(workspace, "analyze", "--rollouts", "runs/tiny/rollouts/step000001.jsonl", "--student", "model",
        "--teacher", "exports/trained", "--privileged", "sparse", "--out", "analysis", "--cpu-devices", "1",
        "--no-progress")
    assert {"report.md", "metrics.json"} <= set(os.listdir(workspace / "analysis"))


def test_serve_with_a_relative_checkpoint(workspace):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [*_command(), "serve", "--checkpoint", "model", "--port", str(port), "--max-slots", "1",
         "--max-sequence-length", "32", "--dtype", "float32", "--cpu-devices", "1"],
        cwd=workspace, env=_environment(workspace), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    assert json.load(response)["data"][0]["id"] == "model"
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_demo_config_runs_as_its_comment_says(tmp_path):
    """configs/demo_cpu.yaml's own instructions, from a copy of the repository's root layout."""
    (tmp_path / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "demo_cpu.yaml"), tmp_path / "configs")
    os.makedirs(tmp_path / "opsd_jax" / "data" / "samples")
    shutil.copy(DEMO_DATA, tmp_path / "opsd_jax" / "data" / "samples")
    comment = [line[1:].strip() for line in (tmp_path / "configs" / "demo_cpu.yaml").read_text().splitlines()
               if line.startswith("#   opsd-jax ")]
    assert len(comment) == 2, comment
    for line in comment:
        result = run(tmp_path, *line.split()[1:])
    assert "step 6: loss" in result.stdout
    assert (tmp_path / "runs" / "demo_cpu" / "run" / "checkpoints").is_dir()


def test_selfcheck_with_no_arguments(tmp_path):
    """`opsd-jax selfcheck`, nothing else, from an empty directory."""
    result = run(tmp_path, "selfcheck")
    assert result.stdout.rstrip().splitlines()[-1] == "demo passed (parity tolerance 0.0001)"
    for model in ("qwen3", "olmo3"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(model))
        assert "True" in line  # bit-exact column
    (folder,) = os.listdir(tmp_path / "runs" / "selfcheck")
    assert (tmp_path / "runs" / "selfcheck" / folder / "olmo3-export" / "config.json").exists()
    assert (tmp_path / "runs" / "selfcheck" / folder / "training" / "run" / "metrics.jsonl").exists()


def test_demo_on_a_shrunken_world(tmp_path):
    """The README's main command with the world shrunk (few problems, two steps) and the fix to try
    added (`--fixes`): every output file and every report line is produced, under the default
    relative output folder."""
    result = subprocess.run([*_command(), "demo", "--steps", "2", "--batch-size", "4", "--samples", "2",
                             "--train-problems", "8", "--eval-problems", "6", "--fixes"], cwd=tmp_path,
                            env=_environment(tmp_path), capture_output=True, text=True, timeout=900)
    # A shrunken world may miss a precondition (exit 1, said so); anything else is a failure.
    assert result.returncode in (0, 1), f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.rstrip().splitlines()[-1].startswith("demo finished")
    (folder,) = [n for n in os.listdir(tmp_path / "runs" / "demo") if not n.startswith(".")]
    assert (tmp_path / "runs" / "demo" / ".compile_cache").is_dir()  # shared by the demo's runs
    out = tmp_path / "runs" / "demo" / folder
    for name in ("report.md", "metrics.json", "accuracy_vs_budget.png", "analysis/opsd/fork_rates.png",
                 "analysis/opsd/marker_rates.png", "analysis/strong_teacher/advantage_at_markers.png",
                 "eval/opsd_dense/summary.json", "models/vanilla_opd/model.safetensors", "training_markers.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["claim"] for c in metrics["claims"]] == [1, 2, 3, 4, 5]
    trained = {"vanilla_opd", "privileged_opd", "opsd_dense", "opsd_sparse", "opsd_dense_vanilla_forks"}
    assert set(metrics["accuracy"]) == {"base", "instruct"} | trained
    report = (out / "report.md").read_text()
    for claim in metrics["claims"]:
        assert f"| ({claim['claim']}) {claim['text']} | {claim['verdict']} |" in report
        assert f"claim {claim['claim']}" in result.stdout
    assert len(metrics["preconditions"]) == 4  # the last: the forced-move part of the teacher bar
    # The stronger teacher at the world's forced moves, beside the thinker.
    forced = metrics["forced_moves"]
    assert set(forced) == {"base", "stronger teacher"} and all(set(f) == {"after a miss", "after a verified slip",
                                                                            "after the right pair verified"}
                                                               for f in forced.values())
    assert all(0 <= p <= 1 for f in forced.values() for p in f.values())
    line = next(line for line in result.stdout.splitlines() if line.startswith("at the world's forced moves"))
    teacher, thinker = forced["stronger teacher"]["after a miss"], forced["base"]["after a miss"]
    excess = metrics["forced_moves_teacher_minus_thinker"]["after a miss"]
    assert excess["difference"] == pytest.approx(teacher - thinker, abs=1e-9)
    assert excess["ci95"][0] <= excess["difference"] <= excess["ci95"][1]
    assert f"after a miss {teacher:.4f} vs {thinker:.4f} ({excess['difference']:+.4f} [" in line
    assert "| stronger teacher - thinker | " in report
    give_up = metrics["hinted_give_up"]
    assert 0 <= give_up["base"] <= 1 and 0 <= give_up["stronger teacher"] <= 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("after a missed try, with the worked"))
    assert f"stronger teacher vs thinker: {give_up['stronger teacher']:.4f} vs {give_up['base']:.4f} (" in line
    assert "## The privileged teachers after a missed try" in report
    assert "## The stronger teacher at the world's forced moves" in report
    # Trace behaviour of every thinking model (the instruct model does not search).
    assert set(metrics["behaviour"]) == {"base"} | trained
    assert all(rates["responses"] == 2 * 6 * (1 if name == "base" else 2)
               for name, rates in metrics["behaviour"].items())
    assert "## Trace behaviour" in report and "trace behaviour" in result.stdout
    # and each trained model's change from the base thinker, with its interval.
    assert set(metrics["behaviour_vs_base"]) == trained
    for name, changes in metrics["behaviour_vs_base"].items():
        tries = changes["attempts_per_response"]
        assert tries["difference"] == pytest.approx(metrics["behaviour"][name]["attempts_per_response"]
                                                    - metrics["behaviour"]["base"]["attempts_per_response"])
        assert tries["ci95"][0] <= tries["ci95"][1]
        assert f"| {name} - base | {tries['difference']:+.3f} [" in report
    # The fix: trained like the others, its line against OPSD dense and the base.
    (fix,) = metrics["fixes"]
    assert fix["fix"] == "opsd_dense_vanilla_forks" and fix["evidence"].startswith("- opsd_dense: ")
    assert f"fix opsd_dense_vanilla_forks: {fix['text']}; {fix['evidence']}" in result.stdout
    assert "## Fixes tried" in report and "opsd_dense_vanilla_forks" in metrics["markers_per_1k"]
    # Markers in each run's training rollouts: every run in the report, every condition on the console.
    assert set(metrics["training_markers_per_1k"]) == trained
    assert "## Markers in the training rollouts" in report and "markers/1k in training rollouts" in result.stdout
    for name in trained:
        first, last = (metrics["training"][name]["markers_per_1k_tokens"][end] for end in ("first_steps", "last_steps"))
        assert f"| {name} | {first:.1f} -> {last:.1f} |" in report

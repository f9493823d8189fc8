"""Preemption: a SIGTERM stops every process at one step, which is saved before the run exits with
the restart code (42); the relaunched command resumes to the uninterrupted run's losses and data
order; a second SIGTERM, or a SIGKILL, during the save leaves a restorable latest checkpoint.

The runs use objective.kind=sft (no sampler to compile) on a 16-problem file with short solutions:
what is under test is the stop step, the save and the resume, which the objective does not touch
(the rollout path's resume is covered by test_trainer.py's kill -9 test)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from opsd_jax.config import load_config
from opsd_jax.distill.trainer import Trainer, TrainingError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local_cpu_cluster.sh")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(16):
            a, b = (int(x) for x in rng.integers(1, 9, 2))
            f.write(json.dumps({"id": f"sum-{i}", "problem": f"What is {a} + {b}?",
                                "solution": f"{a} + {b} = {a + b}, so the answer is \\boxed{{{a + b}}}.",
                                "answer": str(a + b)}) + "\n")
    return str(path)


def _config(model_dir, data_path, output_dir, **train) -> dict:
    return {
        "model": {"checkpoint": model_dir, "compute_dtype": "float32", "remat": False},
        "data": {"path": data_path, "max_prompt_tokens": 64},
        "prompt": {"privilege": "none"},
        "objective": {"kind": "sft", "skip_first": 0},
        "teacher": {"kind": "live"},
        "sampling": {"max_new_tokens": 32},
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.0},
        "train": {"batch_size": 4, "output_dir": str(output_dir), "mesh": "1,-1,1", **train},
    }


def _overrides(config: dict) -> list[str]:
    return [f"{section}.{key}={value}" for section, values in config.items() for key, value in values.items()]


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_relaunch_resumes(model_dir, data_path, tmp_path):
    """2 processes x 4 CPU devices (gloo): SIGTERM to process 1 only -> JAX's preemption sync point
    stops both after the same step, both save it and exit 42; the same command again resumes
    (--resume auto, the default) and the whole run's losses and problem order equal a run that
    was never interrupted."""
    import psutil

    steps = 8
    for name in ("straight", "preempted"):
        config = _config(model_dir, data_path, tmp_path / name, steps=steps, checkpoint_every=100, mesh="2,4,1")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))

    def launch(name):
        return subprocess.Popen([LAUNCHER, "-n", "2", "-d", "4", "--", sys.executable, "-m", "opsd_jax.cli", "train",
                                 "--config", str(tmp_path / f"{name}.yaml")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env={**os.environ, "XLA_FLAGS": ""})  # two processes' bytes may interleave

    straight = launch("straight")  # alongside: the machine's cores are shared either way
    cluster = launch("preempted")
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert cluster.poll() is None, cluster.stdout.read()
        assert time.time() < deadline, "no step 2 in time"
        time.sleep(0.05)
    process_1 = [p for p in psutil.Process(cluster.pid).children(recursive=True)
                 if "opsd_jax.cli" in " ".join(p.cmdline()) and p.environ().get("OPSD_PROCESS_ID") == "1"]
    assert len(process_1) == 1
    process_1[0].send_signal(signal.SIGTERM)
    out, _ = cluster.communicate(timeout=400)
    assert cluster.returncode == 42, out[-4000:]
    for rank in (0, 1):
        assert f"[cluster] process {rank} exited with code 42" in out, out[-4000:]
    stopped = {}
    for line in out.splitlines():
        if "preempted: process" in line:
            words = line.split("preempted: process ", 1)[1].split()
            stopped[int(words[0])] = int(words[4].rstrip(","))
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1], out[-4000:]
    stop = stopped[0]
    assert 2 <= stop < steps
    assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == [str(stop)]
    assert [r["step"] for r in _metrics(tmp_path / "preempted")] == list(range(1, stop + 1))

    out, _ = straight.communicate(timeout=400)
    assert straight.returncode == 0, out[-4000:]
    relaunched = launch("preempted")  # the same command: resumes, as a JobSet restart would
    out, _ = relaunched.communicate(timeout=400)
    assert relaunched.returncode == 0, out[-4000:]
    assert f"resuming from step {stop}" in out
    expected, got = _metrics(tmp_path / "straight"), _metrics(tmp_path / "preempted")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["problem_ids"] for r in got] == [r["problem_ids"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


def test_a_second_sigterm_during_the_save_is_ignored_and_the_save_completes(model_dir, data_path, tmp_path,
                                                                          monkeypatch):
    """One process (a Python SIGTERM handler): a SIGTERM during step 2 stops the run after step 2;
    another SIGTERM while that checkpoint is being written reaches the trainer's handler (not the
    one outside it, which would have ended the process mid-save), the save completes, and the
    relaunch resumes from it. A relaunch with a different config is refused, naming the keys."""
    from opsd_jax.distill import checkpoints
    from opsd_jax.distill import trainer as trainer_module

    outside = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    calls = {"build_batch": 0, "saves": []}
    real_build_batch, real_save = trainer_module.build_batch, checkpoints.save_checkpoint

    def build_batch(*args, **kwargs):
        calls["build_batch"] += 1
        if calls["build_batch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice, during step 2
        return real_build_batch(*args, **kwargs)

    def save_checkpoint(manager, step, *args, force=False, **kwargs):
        if force:  # the second notice, handled inside Orbax's save
            os.kill(os.getpid(), signal.SIGTERM)
        started = real_save(manager, step, *args, force=force, **kwargs)
        calls["saves"].append((step, started))
        if started:
            os.kill(os.getpid(), signal.SIGTERM)  # a third, while the asynchronous write runs
        return started

    monkeypatch.setattr(trainer_module, "build_batch", build_batch)
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    config = _config(model_dir, data_path, tmp_path / "run", steps=4, checkpoint_every=100)
    try:
        trainer = Trainer(load_config(None, _overrides(config)))
        history = trainer.run(resume="auto")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outside == []
    assert trainer.preempted_step == 2 and [h["step"] for h in history] == [1, 2]
    assert calls["saves"] == [(1, False), (2, True)]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]

    changed = config | {"train": {**config["train"], "batch_size": 2},
                        "optimizer": {**config["optimizer"], "learning_rate": 2e-3}}
    with pytest.raises(TrainingError, match=r"different config \(optimizer.learning_rate: saved 0.001, now 0.002; "
                                        r"train.batch_size: saved 4, now 2\)"):
        Trainer(load_config(None, _overrides(changed))).run(resume="auto")

    monkeypatch.setattr(trainer_module, "build_batch", real_build_batch)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    resumed = Trainer(load_config(None, _overrides(config | {"eval": {"n": 2}})))  # eval keys may change
    history = resumed.run(resume="auto")
    assert resumed.preempted_step is None and [h["step"] for h in history] == [3, 4]
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4]


KILLED_DURING_SAVE = """
import os, signal, sys
from opsd_jax.distill import checkpoints
real = checkpoints.save_checkpoint
def save_checkpoint(manager, step, *args, **kwargs):
    started = real(manager, step, *args, **kwargs)
    if started and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the end of the grace period, with the save of step 2 in flight
    return started
checkpoints.save_checkpoint = save_checkpoint
from opsd_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_leaves_a_restorable_latest_checkpoint(model_dir, data_path, tmp_path):
    """Orbax writes a step into a temporary folder and renames it when complete: a process killed
    while step 2 is being written leaves a latest step (1, or 2 if the write won the race) whose
    state, data iterator state and config all restore, and the relaunch resumes from it."""
    import orbax.checkpoint as ocp

    config = _config(model_dir, data_path, tmp_path / "run", steps=3, checkpoint_every=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "job.py").write_text(KILLED_DURING_SAVE)
    result = subprocess.run([sys.executable, str(tmp_path / "job.py"), "train", "--config", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]
    manager = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    latest = manager.latest_step()
    assert latest in (1, 2) and manager.all_steps() == list(range(1, latest + 1))
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    manager.close()
    assert int(np.asarray(restored.state["step"])) == latest
    assert restored.config["train"]["steps"] == 3 and restored.data
    names = os.listdir(tmp_path / "run" / "checkpoints")
    assert all(name.isdigit() or "tmp" in name for name in names), names
    resumed = subprocess.run([sys.executable, "-m", "opsd_jax.cli", "train", "--config", str(tmp_path / "run.yaml")],
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from step {latest}" in resumed.stdout
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2", "3"]

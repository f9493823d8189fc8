"""The training loop end to end on a tiny random Qwen3, kill -9 and resume, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from opsd_jax.config import load_config
from opsd_jax.distill.train_step import (
    StepSettings,
    TrainState,
    accumulated_gradients,
    make_optimizer,
    train_step,
)
from opsd_jax.distill.trainer import Trainer, TrainingError, build_batch
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "opsd_jax", "data", "samples", "math_demo.jsonl")


def _overrides(model_dir, output_dir, **extra):
    settings = {
        "model.checkpoint": model_dir, "model.compute_dtype": "float32", "model.remat": False,
        "data.path": DATA, "data.max_prompt_tokens": 192, "prompt.privilege": "sparse",
        "sampling.max_new_tokens": 8, "sampling.max_slots": 4, "train.batch_size": 4, "train.steps": 2,
        "train.output_dir": str(output_dir), "train.mesh": "2,2,2", "optimizer.learning_rate": 1e-3,
        "optimizer.warmup_ratio": 0.0, **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def test_end_to_end_on_a_sharded_mesh(model_dir, tmp_path):
    import transformers

    from opsd_jax.analysis.markers import find_markers, load_markers, marker_counts, token_pieces
    from opsd_jax.analysis.metrics import marker_table
    from opsd_jax.analysis.rollouts import read_rollouts

    from opsd_jax.data import read_problems
    from opsd_jax.data.sources import paper_order

    config = load_config(None, _overrides(model_dir, tmp_path / "run", **{
        "train.save_rollouts_every": 2, "data.order": "paper", "data.shuffle_seed": 42,
        "data.overlong": "truncate_left"}))  # every row kept, so the order is over the file's rows
    trainer = Trainer(config)
    history = trainer.run()
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["loss_tokens"] > 0 for h in history)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and len(records[0]["problem_ids"]) == 4
    # the step compiles once, timed apart from the update whose utilization is logged (no peak on CPU)
    assert records[0]["compile_seconds"] > 0 and "compile_seconds" not in records[1]
    assert all(r["update_tflops_per_chip"] > 0 and "update_peak_fraction" not in r for r in records)
    ids = [p.id for p in read_problems(DATA)]
    assert [r["problem_ids"] for r in records] == [[ids[i] for i in chunk] for chunk in
                                                   paper_order(len(ids), seed=42, batch_size=4).reshape(-1, 4)[:2]]
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert (tmp_path / "run" / "checkpoints" / "2").exists()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 2
    assert os.listdir(tmp_path / "run" / "rollouts") == ["step000002.jsonl"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    saved = read_rollouts(str(tmp_path / "run" / "rollouts" / "step000002.jsonl"), tokenizer)
    assert [r.problem.id for r in saved.rollouts] == records[1]["problem_ids"]
    assert all(1 <= len(r.token_ids) <= 8 for r in saved.rollouts)
    lengths = [len(r.token_ids) for r in saved.rollouts]
    assert (records[1]["rollout_length_min"], records[1]["rollout_length_max"]) == (min(lengths), max(lengths))
    # the step's marker rates as `opsd-jax analyze` counts them in the saved rollouts
    markers = load_markers()
    rows = []
    for rollout in saved.rollouts:
        text, ends = token_pieces(tokenizer, rollout.token_ids)
        rows.append((len(rollout.token_ids), marker_counts(find_markers(text, ends, markers), markers)))
    table = marker_table(rows, markers)
    assert records[1]["markers_per_1k_tokens"] == pytest.approx(table["any"]["per_1k_tokens"])
    for category in markers:
        assert records[1][f"markers_per_1k_tokens_{category}"] == pytest.approx(table[category]["per_1k_tokens"])


def test_rollout_marker_rates_pool_over_the_batch():
    from opsd_jax.distill.trainer import rollout_marker_rates

    markers = {"verification": ["check"], "backtracking": ["wait"], "hedging": ["maybe"]}
    rates = rollout_marker_rates([[1, 0, 2], [0, 3, 1]], [100, 400], markers)
    assert rates == pytest.approx({"markers_per_1k_tokens": 14.0, "markers_per_1k_tokens_verification": 2.0,
                                   "markers_per_1k_tokens_backtracking": 6.0, "markers_per_1k_tokens_hedging": 6.0})
    assert rollout_marker_rates([[0, 0, 0]], [0], markers) == {}


def test_fixed_rollouts_loss_decreases_and_frozen_teacher_is_untouched(model_dir, tmp_path, rng):
    """The pure step on one fixed batch: the loss falls and the frozen teacher stays bit-identical."""
    from opsd_jax import load_hf
    from opsd_jax.parallel import make_mesh
    from opsd_jax.sampler import Completion

    mesh = make_mesh(2, 2, 2)
    model_config, params = load_hf(model_dir, mesh=mesh, progress=False)
    teacher = jax.tree.map(lambda x: x.copy(), params)
    teacher_before = jax.tree.map(np.asarray, teacher)
    config = load_config(None, _overrides(model_dir, tmp_path, **{"objective.importance_cap": "null"}))
    pairs, completions = [], []
    from opsd_jax.distill.prompts import PromptPair

    for i in range(4):
        student = rng.integers(3, 400, 12).tolist()
        pairs.append(PromptPair(student, student[:5] + rng.integers(3, 400, 9).tolist() + student[5:], "", ""))
        tokens = rng.integers(3, 400, 10).tolist()
        completions.append(Completion(student, 0, tokens, [-6.0] * 10, [-6.0] * 10, [0.0] * 10))
    batch = build_batch(pairs, completions, student_length=32, teacher_length=40, completion_length=10)
    optimizer = make_optimizer(config.optimizer, 20)
    settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective)
    state = TrainState(np.int32(0), params, optimizer.init(params), teacher)
    step = jax.jit(lambda s, b: train_step(s, b, settings=settings, optimizer=optimizer))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    for before, after in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(state.teacher_params)):
        assert np.asarray(after).tobytes() == before.tobytes()


def test_microbatches_accumulate_to_the_full_batch_gradient(model_dir, tmp_path, rng):
    from opsd_jax import load_hf
    from opsd_jax.distill.prompts import PromptPair
    from opsd_jax.sampler import Completion

    model_config, params = load_hf(model_dir, progress=False)
    pairs = [PromptPair(rng.integers(3, 400, 6).tolist(), rng.integers(3, 400, 9).tolist(), "", "") for _ in range(4)]
    completions = [Completion([], 0, rng.integers(3, 400, n).tolist(), [-6.0] * n, [-6.0] * n, [0.0] * n)
                   for n in (7, 4, 9, 6)]
    batch = build_batch(pairs, completions, student_length=16, teacher_length=20, completion_length=10)
    config = load_config(None, _overrides(model_dir, tmp_path, **{"objective.reduction": "sequence_mean"}))
    results = []
    for microbatches in (1, 2):
        settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective,
                                microbatches=microbatches)
        results.append(jax.jit(lambda p, b: accumulated_gradients(p, p, b, settings))(params, batch))
    (grads1, metrics1), (grads2, metrics2) = results
    assert float(metrics1["loss"]) == pytest.approx(float(metrics2["loss"]), rel=1e-5)
    assert float(metrics1["loss_tokens"]) == float(metrics2["loss_tokens"])
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-4)


def _train_process(config_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "opsd_jax.cli", "train", "--config", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_and_resume_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    """6 steps straight vs 3 steps, kill -9, resume to 6: identical losses and data order (the
    paper's order)."""
    def write_config(name):
        data = {}
        for item in _overrides(model_dir, tmp_path / name, **{"train.steps": 6, "train.checkpoint_every": 3,
                                                              "train.mesh": "1,-1,1", "data.order": "paper"}):
            key, value = item.split("=", 1)
            section, field = key.split(".")
            data.setdefault(section, {})[field] = yaml.safe_load(value)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    straight = _train_process(write_config("straight"))
    interrupted = _train_process(write_config("interrupted"))
    checkpoint_3 = tmp_path / "interrupted" / "checkpoints" / "3"
    deadline = time.time() + 400
    while not checkpoint_3.exists():
        assert interrupted.poll() is None, interrupted.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    resumed = _train_process(tmp_path / "interrupted.yaml", "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out

    def records(name):
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    expected, got = records("straight"), records("interrupted")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["problem_ids"] for r in got] == [r["problem_ids"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(TrainingError, match="over data.max_prompt_tokens=20"):
        Trainer(load_config(None, _overrides(model_dir, tmp_path / "a", **{"data.max_prompt_tokens": 20,
                                                                         "data.overlong": "error"}))).run()
    with pytest.raises(TrainingError, match="every problem exceeds"):
        Trainer(load_config(None, _overrides(model_dir, tmp_path / "b", **{"data.max_prompt_tokens": 20}))).run()
    # A tokenizer larger than the model's vocabulary.
    small = tmp_path / "small"
    save_tiny_hf_model("qwen3", str(small), seed=1, vocab_size=300)
    save_tiny_tokenizer(str(small))
    with pytest.raises(TrainingError, match="has 400 tokens, more than the model's vocabulary \\(300\\)"):
        Trainer(load_config(None, _overrides(str(small), tmp_path / "c"))).run()


def test_nonfinite_loss_stops_with_a_diagnostic_and_keeps_checkpoints(model_dir, tmp_path, monkeypatch):
    from opsd_jax.distill import trainer as trainer_module

    run = tmp_path / "run"
    Trainer(load_config(None, _overrides(model_dir, run, **{"train.steps": 1}))).run()
    assert (run / "checkpoints" / "1").exists()
    real_build_batch = trainer_module.build_batch

    def poisoned(*args, **kwargs):  # a rollout whose sampler log-probabilities came back NaN
        batch = real_build_batch(*args, **kwargs)
        batch.sampler_logprobs[0, :] = np.nan
        return batch

    monkeypatch.setattr(trainer_module, "build_batch", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss at step 1; batch saved to"):
        Trainer(load_config(None, _overrides(model_dir, run, **{"train.steps": 3}))).run(resume=True)
    assert sorted(os.listdir(run / "checkpoints")) == ["1"]
    diagnostics = os.listdir(run / "diagnostics")
    assert diagnostics == ["nonfinite_step2.npz"]
    saved = np.load(run / "diagnostics" / diagnostics[0])
    assert saved["targets"].shape[0] == 4 and np.isnan(saved["sampler_logprobs"][0]).all()


def _fixed_batch(rng, vocab=400):
    from opsd_jax.distill.prompts import PromptPair
    from opsd_jax.sampler import Completion

    pairs = [PromptPair(rng.integers(3, vocab, 6).tolist(), rng.integers(3, vocab, 9).tolist(), "", "") for _ in range(2)]
    completions = [Completion([], 0, rng.integers(3, vocab, n).tolist(), [-6.0] * n, [-6.0] * n, [0.0] * n)
                   for n in (8, 6)]
    return build_batch(pairs, completions, student_length=16, teacher_length=20, completion_length=10)


def test_teacher_kinds(model_dir, tmp_path, rng):
    """EMA follows rate * teacher + (1 - rate) * new student; a live teacher gives the same
    gradient as a frozen copy of the same weights (no gradient through the teacher)."""
    from opsd_jax import load_hf

    model_config, params = load_hf(model_dir, progress=False)
    batch = _fixed_batch(rng)
    config = load_config(None, _overrides(model_dir, tmp_path))
    optimizer = make_optimizer(config.optimizer, 10)
    teacher = jax.tree.map(lambda x: x * 0.5, params)
    settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective,
                            teacher_kind="ema", ema_rate=0.9)
    state, _ = jax.jit(lambda s, b: train_step(s, b, settings=settings, optimizer=optimizer))(
        TrainState(np.int32(0), params, optimizer.init(params), teacher), batch)
    for t0, p1, t1 in zip(jax.tree.leaves(teacher), jax.tree.leaves(state.params), jax.tree.leaves(state.teacher_params)):
        np.testing.assert_allclose(np.asarray(t1), 0.9 * np.asarray(t0) + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)

    settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective)
    live, _ = jax.jit(lambda p, b: accumulated_gradients(p, jax.lax.stop_gradient(p), b, settings))(params, batch)
    frozen, _ = jax.jit(lambda p, t, b: accumulated_gradients(p, t, b, settings))(params, jax.tree.map(jnp_copy, params), batch)
    for a, b in zip(jax.tree.leaves(live), jax.tree.leaves(frozen)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def jnp_copy(x):
    return x.copy()


def test_topk_objective_with_the_whole_vocabulary_equals_the_full_jsd(model_dir, tmp_path, rng):
    from opsd_jax import load_hf
    from opsd_jax.distill.train_step import loss_and_metrics

    model_config, params = load_hf(model_dir, progress=False)
    batch = _fixed_batch(rng)
    teacher = jax.tree.map(lambda x: x * 0.9, params)
    losses = {}
    for kind, extra in (("jsd", {}), ("topk", {"objective.teacher_top_k": model_config.vocab_size})):
        config = load_config(None, _overrides(model_dir, tmp_path, **{"objective.kind": kind, **extra}))
        settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective)
        losses[kind] = float(loss_and_metrics(params, teacher, batch, settings)[0])
    assert losses["topk"] == pytest.approx(losses["jsd"], rel=1e-3)


def test_export_writes_the_trained_student(model_dir, tmp_path):
    import transformers

    from opsd_jax import load_hf
    from opsd_jax.distill.trainer import export_checkpoint

    run = tmp_path / "run"
    Trainer(load_config(None, _overrides(model_dir, run, **{"train.steps": 1}))).run()
    path = export_checkpoint(str(run), None, str(tmp_path / "hf"), model_checkpoint=model_dir)
    _, exported = load_hf(path, progress=False)
    _, original = load_hf(model_dir, progress=False)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original))]
    assert any(changed)  # one AdamW step moved the weights
    assert transformers.AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"
    wider = tmp_path / "wider"
    save_tiny_hf_model("qwen3", str(wider), seed=0, hidden_size=128)
    save_tiny_tokenizer(str(wider))
    with pytest.raises(TrainingError, match=rf"step 1 does not hold the parameters of the model {wider} describes "
                                            r"\(Requested shape: .*128"):
        export_checkpoint(str(run), None, str(tmp_path / "hf2"), model_checkpoint=str(wider))
    assert not (tmp_path / "hf2").exists()


def test_sigterm_saves_at_the_next_step_boundary(model_dir, tmp_path):
    data = {}
    for item in _overrides(model_dir, tmp_path / "run", **{"train.steps": 200, "train.checkpoint_every": 100,
                                                         "train.mesh": "1,-1,1"}):
        key, value = item.split("=", 1)
        section, field = key.split(".")
        data.setdefault(section, {})[field] = yaml.safe_load(value)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    process = _train_process(tmp_path / "run.yaml")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 42, out  # train.preemption_exit_code: a restart code
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert f"preempted: process 0 stopped after step {steps[-1]}, checkpoint saved" in out
    assert os.listdir(tmp_path / "run" / "checkpoints") == [str(steps[-1])]


def test_two_process_cluster_trains_and_resumes(model_dir, tmp_path):
    """2 processes x 4 CPU devices on loopback (gloo): per-host data shards (the paper's order, each
    global batch split between the hosts) and samplers, a global batch from process-local rows,
    Orbax checkpoints from both hosts, metrics of the whole batch written by process 0."""
    from opsd_jax.data import read_problems
    from opsd_jax.data.sources import paper_order

    config = {
        "model": {"checkpoint": model_dir, "compute_dtype": "float32", "remat": False},
        "data": {"path": DATA, "max_prompt_tokens": 192, "overlong": "truncate_left", "order": "paper",
                 "shuffle_seed": 42},
        "prompt": {"privilege": "sparse"},
        "sampling": {"max_new_tokens": 8, "max_slots": 4},
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.0},
        "train": {"batch_size": 4, "steps": 2, "output_dir": str(tmp_path / "run"), "mesh": "2,4,1",
                  "checkpoint_every": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    launcher = os.path.join(REPO, "launch", "local_cpu_cluster.sh")

    def cluster(*extra):
        result = subprocess.run(
            [launcher, "-n", "2", "-d", "4", "--", sys.executable, "-m", "opsd_jax.cli", "train", "--config",
             str(tmp_path / "run.yaml"), *extra],
            capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""},
            errors="replace",  # the two processes' output shares one pipe: a character may be split
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        finals = sorted(line.split("] ", 1)[1] for line in result.stdout.splitlines() if "loss" in line and "step" in line)
        assert len(finals) == 2 and finals[0] == finals[1]  # both processes saw the same loss
        return finals[0]

    assert cluster().startswith("step 2:")
    assert cluster("--resume", "train.steps=3").startswith("step 3:")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    ids = [p.id for p in read_problems(DATA)]
    batches = paper_order(len(ids), seed=42, batch_size=4).reshape(-1, 4)
    assert [r["problem_ids"] for r in records] == [[ids[i] for i in batch] for batch in batches[:3]]  # both hosts' rows
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "3"]


def test_external_teacher_must_share_the_tokenizer(model_dir, tmp_path):
    """OPD: another checkpoint teaches; one with a different tokenizer is refused by name."""
    teacher = tmp_path / "teacher"
    save_tiny_hf_model("qwen3", str(teacher), seed=7, hidden_size=32, intermediate_size=64)
    save_tiny_tokenizer(str(teacher))
    history = Trainer(load_config(None, _overrides(model_dir, tmp_path / "run", **{
        "teacher.kind": "external", "teacher.checkpoint": str(teacher), "train.steps": 1,
        "prompt.privilege": "none"}))).run()
    assert np.isfinite(history[0]["loss"]) and history[0]["divergence"] > 0
    other = tmp_path / "other"
    save_tiny_hf_model("qwen3", str(other), seed=8)
    save_tiny_tokenizer(str(other), vocab_size=350)
    with pytest.raises(TrainingError, match=f"teacher {other} does not share the student's tokenizer"):
        Trainer(load_config(None, _overrides(model_dir, tmp_path / "run2", **{
            "teacher.kind": "external", "teacher.checkpoint": str(other)}))).run()
    padded = tmp_path / "padded"  # the same tokenizer, a head of another height
    save_tiny_hf_model("qwen3", str(padded), seed=9, vocab_size=1024)
    save_tiny_tokenizer(str(padded))
    with pytest.raises(TrainingError, match=f"teacher {padded} has 1024 vocabulary rows and the student"):
        Trainer(load_config(None, _overrides(model_dir, tmp_path / "run3", **{
            "teacher.kind": "external", "teacher.checkpoint": str(padded)}))).run()


def test_build_batch_takes_processed_or_raw_sampler_logprobs(rng):
    """importance: paper uses the log-probs of the distribution tokens were drawn from; sequence
    the raw model's."""
    from opsd_jax.distill.prompts import PromptPair
    from opsd_jax.sampler import Completion

    pair = PromptPair([5, 6, 7], [5, 6, 7, 8], "", "")
    completion = Completion([5, 6, 7], 0, [9, 10, 11], [-0.1, -0.2, -0.3], [-1.1, -1.2, -1.3], [0.0] * 3)
    shapes = dict(student_length=8, teacher_length=8, completion_length=4)
    processed = build_batch([pair], [completion], processed_logprobs=True, **shapes)
    raw = build_batch([pair], [completion], **shapes)
    np.testing.assert_allclose(processed.sampler_logprobs[0], [-0.1, -0.2, -0.3, 0.0])
    np.testing.assert_allclose(raw.sampler_logprobs[0], [-1.1, -1.2, -1.3, 0.0])


def test_optimizer_state_takes_the_parameter_shardings(model_dir, tmp_path):
    """Adam's moments live beside their parameters (jit alone puts them on one device, and the
    loop then replicated them on every chip); counts are replicated."""
    from opsd_jax import load_hf
    from opsd_jax.distill.trainer import (
        optimizer_state_shardings,
        train_state_shardings,
    )
    from opsd_jax.parallel import make_mesh

    mesh = make_mesh(2, 2, 2)
    _, params = load_hf(model_dir, mesh=mesh, progress=False)
    config = load_config(None, _overrides(model_dir, tmp_path))
    optimizer = make_optimizer(config.optimizer, 10)
    shardings = optimizer_state_shardings(optimizer, params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings)(params)
    adam = opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        for param, moment in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
            assert moment.sharding == param.sharding
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()
    sharded = [leaf for leaf in jax.tree.leaves(adam.mu) if not leaf.sharding.is_fully_replicated]
    assert sharded, "the tiny model has sharded parameters, so some moments must be sharded"
    state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, opt_state, None)
    assert jax.tree.leaves(train_state_shardings(state, mesh).opt_state) == jax.tree.leaves(shardings)


def test_sft_loss_is_the_teacher_forced_cross_entropy(model_dir, tmp_path, rng):
    """objective.kind=sft: each sequence's mean -log p(target) over its response tokens, averaged
    over sequences; checked in float64 against the model's own logits, and its gradient is the
    gradient of that cross entropy."""
    from opsd_jax import load_hf
    from opsd_jax.distill.train_step import loss_and_metrics
    from opsd_jax.models import forward

    model_config, params = load_hf(model_dir, progress=False)
    batch = _fixed_batch(rng)
    config = load_config(None, _overrides(model_dir, tmp_path, **{"objective.kind": "sft", "objective.skip_first": 0}))
    settings = StepSettings(student=model_config, teacher=model_config, objective=config.objective, teacher_kind="live")
    loss, metrics = jax.jit(lambda p, b: loss_and_metrics(p, None, b, settings))(params, batch)

    def oracle(p):
        logits = forward(p, model_config, batch.student_tokens, attention_mask=batch.student_mask)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        rows = jnp.take_along_axis(logprobs, batch.student_index[..., None], 1)
        token_logprob = jnp.take_along_axis(rows, batch.targets[..., None], -1)[..., 0]
        mask = np.arange(batch.targets.shape[1])[None] < batch.lengths[:, None]
        return (jnp.where(mask, -token_logprob, 0.0).sum(1) / batch.lengths).mean()

    with jax.default_matmul_precision("highest"):
        expected = jax.jit(oracle)(params)
        grads = jax.jit(jax.grad(lambda p: loss_and_metrics(p, None, batch, settings)[0]))(params)
        expected_grads = jax.jit(jax.grad(oracle))(params)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)
    assert float(metrics["loss_tokens"]) == float(batch.lengths.sum())


def test_sft_run_learns_the_data_responses(tmp_path):
    """An sft run reads the responses from the data's solution column (no sampler), ends each
    with the stop token, and lowers the loss; a too-long solution is an error naming its problem."""
    from opsd_jax.toyworld import world

    rng = np.random.default_rng(0)
    model = tmp_path / "model"
    save_tiny_hf_model("qwen3", str(model), seed=1, vocab_size=64)
    world.save_tokenizer(str(model))
    problems = world.generate_problems(32, rng)
    rows = [{**world.problem_row(p, i, "sft"), "solution": world.thinker_trace(p, world.THINKER, rng)}
            for i, p in enumerate(problems)]
    world.write_jsonl(str(tmp_path / "sft.jsonl"), rows)
    overrides = [f"model.checkpoint={model}", f"data.path={tmp_path / 'sft.jsonl'}", "data.max_prompt_tokens=24",
                 "prompt.student_suffix=", "prompt.privilege=none", "objective.kind=sft", "objective.skip_first=0",
                 "sampling.max_new_tokens=112", "train.batch_size=8", "train.steps=12", "train.mesh=1,-1,1",
                 "model.compute_dtype=float32", "optimizer.learning_rate=3e-3", "optimizer.warmup_ratio=0",
                 f"train.output_dir={tmp_path / 'run'}", "teacher.kind=live"]
    history = Trainer(load_config(None, overrides)).run()
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    lengths = {r["id"]: len(r["solution"].split()) + 1 for r in rows}  # one word one token, then <|im_end|>
    assert history[0]["rollout_length_mean"] == np.mean([lengths[i] for i in history[0]["problem_ids"]])
    short = [f"{o}" for o in overrides if not o.startswith(("sampling.max_new_tokens", "train.output_dir"))]
    with pytest.raises(TrainingError, match="objective.kind=sft: the solution of problem toy-sft-"):
        Trainer(load_config(None, short + ["sampling.max_new_tokens=8", f"train.output_dir={tmp_path / 'r2'}"])).run()


@pytest.mark.parametrize("kind", ["frozen", "ema"])
def test_frozen_teacher_is_kept_in_compute_dtype_and_computes_the_same(model_dir, tmp_path, kind):
    """A frozen teacher is stored in compute_dtype: the decoder casts every parameter to it before
    use, so its hidden states are bit-identical to those of the param_dtype copy, and its head is
    that copy rounded once. An EMA teacher keeps param_dtype (its updates are below bf16's ulp)."""
    from opsd_jax.models import forward_hidden

    config = load_config(None, _overrides(model_dir, tmp_path, **{"model.compute_dtype": "bfloat16",
                                                                    "teacher.kind": kind}))
    model_config, params, _, _, teacher_config, teacher_params = Trainer(config)._load_models()
    want = jnp.dtype(jnp.bfloat16 if kind == "frozen" else jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(teacher_params)} == {want}
    assert teacher_config.param_dtype == want.name
    for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(teacher_params)):
        assert t.sharding.is_equivalent_to(p.sharding, p.ndim)
        # Own buffers: the student's are donated to the step.
        assert (t.addressable_shards[0].data.unsafe_buffer_pointer()
                != p.addressable_shards[0].data.unsafe_buffer_pointer())
    tokens = np.random.default_rng(0).integers(3, model_config.vocab_size, (2, 12))
    hidden, head = jax.jit(lambda p: forward_hidden(p, model_config, tokens))(params)
    teacher_hidden, teacher_head = jax.jit(lambda p: forward_hidden(p, teacher_config, tokens))(teacher_params)
    assert np.asarray(teacher_hidden).tobytes() == np.asarray(hidden).tobytes()
    assert np.asarray(teacher_head).tobytes() == np.asarray(head.astype(want)).tobytes()


def test_contexts_and_rollout_pool_follow_the_datas_longest_prompts(model_dir, tmp_path, monkeypatch, capsys):
    """With the worked solution in the teacher's prompt, the student's prompts are much shorter:
    the step's student context and the rollout pool's sequences are sized by the longest student
    prompt, the teacher context by the longest teacher prompt (not both by data.max_prompt_tokens),
    each rounded up to twice the 8 chips."""
    import transformers

    from opsd_jax.data import read_problems
    from opsd_jax.distill import trainer as trainer_module
    from opsd_jax.distill.prompts import prompt_pair
    from opsd_jax.sampler import engine as engine_module

    config = load_config(None, _overrides(model_dir, tmp_path / "run", **{
        "prompt.privilege": "dense", "data.max_prompt_tokens": 4096, "train.steps": 1}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = [prompt_pair(p, config.prompt, tokenizer) for p in read_problems(DATA)]
    student, teacher = max(len(p.student_ids) for p in pairs), max(len(p.teacher_ids) for p in pairs)
    assert student < teacher < 4096
    seen = {}
    real_build_batch, real_engine = trainer_module.build_batch, trainer_module.Engine

    def build_batch(*args, **kwargs):
        seen["lengths"] = kwargs["student_length"], kwargs["teacher_length"]
        return real_build_batch(*args, **kwargs)

    def engine(model_config, sampler_config, **kwargs):
        seen["sampler"] = sampler_config
        return real_engine(model_config, sampler_config, **kwargs)

    monkeypatch.setattr(trainer_module, "build_batch", build_batch)
    monkeypatch.setattr(trainer_module, "Engine", engine)
    assert engine_module.Engine is real_engine
    Trainer(config).run()
    rounded = lambda n: -(-(n + 8) // 16) * 16  # noqa: E731 (+ 8 completion tokens; twice the 8 chips)
    assert seen["lengths"] == (rounded(student), rounded(teacher))
    assert seen["sampler"].max_sequence_length == student + 8
    assert f"longest prompts: student {student}, teacher {teacher} tokens" in capsys.readouterr().out


def test_the_plan_measures_prompts_as_the_trainer_does(model_dir, tmp_path):
    """`measured_prompt_lengths` (what `opsd-jax plan` plans when it has the data and tokenizer)
    is the trainer's own measure; None without the data or without the checkpoint folder."""
    import transformers

    from opsd_jax.distill.prompts import prompt_pair
    from opsd_jax.distill.trainer import PromptLengths, measured_prompt_lengths

    from opsd_jax.data import read_problems

    config = load_config(None, _overrides(model_dir, tmp_path / "run", **{"prompt.privilege": "dense",
                                                                          "data.max_prompt_tokens": 4096}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = [prompt_pair(p, config.prompt, tokenizer) for p in read_problems(DATA)]
    assert measured_prompt_lengths(config) == PromptLengths.of(pairs)
    assert measured_prompt_lengths(load_config(None, _overrides(model_dir, tmp_path / "a", **{
        "data.path": str(tmp_path / "absent.jsonl")}))) is None
    assert measured_prompt_lengths(load_config(None, _overrides(str(tmp_path / "no-model"), tmp_path / "b"))) is None

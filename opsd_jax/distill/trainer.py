"""The distillation loop: sample rollouts with the student, score them with the teacher, update.

Per step: B problems from the grain iterator -> student and teacher prompts -> one rollout per
prompt from the sampler (weights synced every step) -> aligned batch -> jitted `train_step` ->
metrics (JSONL + TensorBoard) -> Orbax checkpoint every K steps (params, optimizer state, step,
data iterator state, resolved config). Resuming takes the latest complete checkpoint and
reproduces the uninterrupted run: rollout seeds derive from (seed, step, index). A SIGTERM stops
every process at the same step, which is saved before the run exits with
`train.preemption_exit_code` (see distill/preemption.py; resume modes in distill/checkpoints.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from opsd_jax.analysis.markers import load_markers, text_marker_counts
from opsd_jax.analysis.metrics import marker_table
from opsd_jax.checkpoint.loading import default_stop_token_ids, load_for_serving
from opsd_jax.config import RunConfig, dump_config, resolve_paths
from opsd_jax.data.sources import read_problems, problem_dataset
from opsd_jax.distill.prompts import prompt_pair, truncate_left
from opsd_jax.distill.train_step import Batch, StepSettings, TrainState, make_optimizer, train_step
from opsd_jax.distill.utilization import step_flops, utilization_metrics
from opsd_jax.parallel import logical_sharding, make_mesh, parse_mesh_shape
from opsd_jax.paths import user_path
from opsd_jax.sampler import Engine, Orchestrator, SamplerConfig, SamplingParams
from opsd_jax.sampler.engine import serving_mesh
from opsd_jax.sampler.orchestrator import Completion
from opsd_jax.sampler.weight_sync import WeightSync


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what was saved."""


def rollout_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible sampler seed per (run seed, step, prompt)."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


def build_batch(pairs, completions, *, student_length: int, teacher_length: int, completion_length: int,
                processed_logprobs: bool = False) -> Batch:
    """Aligns rollouts for scoring: the same completion tokens follow the student's and the
    teacher's prompt; index arrays name the context rows whose outputs predict each token.

    processed_logprobs: the batch's sampler log-probs are those of the distribution the tokens were
    drawn from (after temperature / top-k / top-p), as the paper's vLLM reports them; otherwise the
    sampler's raw model log-probs, so the importance ratio measures only the sampler / trainer
    mismatch (numerics, bf16, stale weights)."""
    B = len(pairs)
    student_tokens = np.zeros((B, student_length), np.int32)
    teacher_tokens = np.zeros((B, teacher_length), np.int32)
    student_mask = np.zeros((B, student_length), np.int32)
    teacher_mask = np.zeros((B, teacher_length), np.int32)
    student_index = np.zeros((B, completion_length), np.int32)
    teacher_index = np.zeros((B, completion_length), np.int32)
    targets = np.zeros((B, completion_length), np.int32)
    sampler_logprobs = np.zeros((B, completion_length), np.float32)
    lengths = np.zeros(B, np.int32)
    for i, (pair, completion) in enumerate(zip(pairs, completions)):
        tokens = completion.token_ids[:completion_length]
        n = len(tokens)
        s = pair.student_ids + tokens
        t = pair.teacher_ids + tokens
        if len(s) > student_length or len(t) > teacher_length:
            raise ValueError(f"rollout {i} does not fit the batch ({len(s)}/{student_length}, {len(t)}/{teacher_length})")
        student_tokens[i, : len(s)], student_mask[i, : len(s)] = s, 1
        teacher_tokens[i, : len(t)], teacher_mask[i, : len(t)] = t, 1
        student_index[i, :n] = len(pair.student_ids) - 1 + np.arange(n)
        teacher_index[i, :n] = len(pair.teacher_ids) - 1 + np.arange(n)
        targets[i, :n] = tokens
        source = completion.sampled_logprobs if processed_logprobs else completion.model_logprobs
        sampler_logprobs[i, :n] = source[:n]
        lengths[i] = n
    return Batch(student_tokens, student_mask, teacher_tokens, teacher_mask, student_index, teacher_index,
                 targets, lengths, sampler_logprobs)


class MetricsWriter:
    """metrics.jsonl (rewritten up to the resumed step on resume, so no step appears twice) and
    TensorBoard scalars. Only process 0 writes."""

    def __init__(self, output_dir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not self.enabled:
            return
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a kill
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            staging = self.path + ".partial"
            with open(staging, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(staging, self.path)
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict, **extra) -> None:
        """Scalars go to both; `extra` (e.g. the batch's problem ids) to the JSONL only."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics, **extra}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


class Trainer:
    """Runs one RunConfig. `run()` trains to `train.steps` (resuming when asked) and returns the
    per-step metrics it produced."""

    def __init__(self, config: RunConfig):
        self.config = resolve_paths(config)
        from opsd_jax.parallel import initialize_distributed

        initialize_distributed()
        try:
            self.mesh = train_mesh(self.config, jax.devices())
        except FileNotFoundError as e:
            raise TrainingError(f"train.mesh: {e}") from None
        except ValueError as e:
            raise TrainingError(f"train.mesh: {e}{self._device_hint()}") from None
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        if self.process_index == 0 and self.config.train.mesh == "auto":
            print("train.mesh auto: " + ", ".join(f"{axis} {size}" for axis, size in self.mesh.shape.items()),
                  flush=True)
        # Each host samples its own rollouts on its own devices (sampler.serving_mesh, set once the
        # model is known): the orchestrator schedules requests dynamically, which hosts cannot do
        # in lockstep on one global mesh.
        self.sampler_devices = list(self.mesh.devices.flat) if self.process_count == 1 else jax.local_devices()
        self.sampler_mesh = None
        self.preempted_step: int | None = None  # set when a SIGTERM stopped the run (saved at that step)

    def _device_hint(self) -> str:
        wanted = self.config.train.cpu_devices
        if jax.default_backend() != "cpu":
            return ""
        if wanted and jax.device_count() != wanted:
            return (f" (train.cpu_devices={wanted} takes effect only before jax starts: run `opsd-jax train`, "
                    f"or set XLA_FLAGS=--xla_force_host_platform_device_count={wanted} before importing jax)")
        return " (on CPU, set train.cpu_devices to emulate more devices, or choose a smaller train.mesh)"

    # ---- set-up -------------------------------------------------------------------------------

    def _load_models(self):
        c = self.config
        if not c.model.checkpoint:
            raise TrainingError("model.checkpoint is not set")
        model_config, params, tokenizer, side_dir = load_for_serving(c.model.checkpoint, dtype=c.model.param_dtype,
                                                                     mesh=self.mesh)
        if len(tokenizer) > model_config.vocab_size:
            raise TrainingError(
                f"the tokenizer of {side_dir} has {len(tokenizer)} tokens, more than the model's vocabulary "
                f"({model_config.vocab_size})"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise TrainingError(f"the tokenizer of {side_dir} has no chat template (chat_template.jinja or "
                                "tokenizer_config.json's chat_template): prompts are chat turns")
        model_config = model_config.replace(**c.model.runtime(training=True))
        teacher_dtype = c.teacher.param_dtype(c.model)
        teacher_config, teacher_params = model_config, None
        if c.teacher.kind == "external":
            if not c.teacher.checkpoint:
                raise TrainingError("teacher.kind is external but teacher.checkpoint is not set")
            teacher_config, teacher_params, teacher_tokenizer, _ = load_for_serving(
                c.teacher.checkpoint, dtype=teacher_dtype, mesh=self.mesh)
            if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise TrainingError(f"teacher {c.teacher.checkpoint} does not share the student's tokenizer")
            if teacher_config.vocab_size != model_config.vocab_size:
                # The divergence compares the two heads' rows one to one.
                raise TrainingError(
                    f"teacher {c.teacher.checkpoint} has {teacher_config.vocab_size} vocabulary rows and the student "
                    f"{c.model.checkpoint} {model_config.vocab_size}: the divergence needs equal heads")
            teacher_config = teacher_config.replace(**c.model.runtime(training=False))
        elif c.objective.kind == "sft":
            pass  # no teacher: the step scores the data's responses against the student alone
        elif c.teacher.kind in ("frozen", "ema"):
            teacher_params = teacher_copy(params, teacher_dtype)
            teacher_config = model_config.replace(param_dtype=teacher_dtype)
        return model_config, params, tokenizer, side_dir, teacher_config, teacher_params

    def _problems(self, tokenizer):
        return training_problems(self.config, tokenizer, announce=self.process_index == 0)

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, resume: bool | str = False) -> list[dict]:
        """resume: "auto", "always" or "never" (distill/checkpoints.py); True means "always" and
        False "never", as before. After a preemption `self.preempted_step` names the saved step."""
        from opsd_jax.distill.checkpoints import checkpoint_manager, resume_decision, save_checkpoint
        from opsd_jax.distill.preemption import PreemptionWatcher

        c = self.config
        resume_mode = {True: "always", False: "never"}.get(resume, resume)
        if not 1 <= c.train.preemption_exit_code <= 255:
            raise TrainingError(f"train.preemption_exit_code must be in 1..255 (a restart code), got "
                                f"{c.train.preemption_exit_code}")
        os.makedirs(c.train.output_dir, exist_ok=True)
        checkpoints = os.path.join(c.train.output_dir, "checkpoints")
        # Decided before anything is loaded, so a refused launch fails fast.
        manager = checkpoint_manager(checkpoints, keep=c.train.keep_checkpoints, every=c.train.checkpoint_every)
        try:
            resume_step, differences = resume_decision(resume_mode, manager, c, c.train.output_dir)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        finally:
            manager.close()
        if differences and self.process_index == 0:
            print("resuming with a changed config: " + "; ".join(f"{key}: {old!r} -> {new!r}"
                                                                 for key, old, new in differences), flush=True)
        model_config, params, tokenizer, side_dir, teacher_config, teacher_params = self._load_models()
        problems, skipped, prompts = self._problems(tokenizer)
        problem_position = {problem.id: i for i, (problem, _) in enumerate(problems)}
        B = c.train.batch_size
        if B % c.train.microbatches:
            raise TrainingError(f"train.batch_size {B} is not divisible by train.microbatches {c.train.microbatches}")
        completion_length = c.sampling.max_new_tokens
        student_length, teacher_length = train_context_lengths(c, self.mesh.size, prompts)
        if self.process_index == 0:
            print(f"longest prompts: student {prompts.student}, teacher {prompts.teacher} tokens; training contexts "
                  f"{student_length} and {teacher_length} tokens (`opsd-jax plan --prompt-tokens "
                  f"{prompts.student},{prompts.teacher}` plans these)", flush=True)
        if B % self.process_count:
            raise TrainingError(f"train.batch_size {B} is not divisible by the {self.process_count} processes")
        local_batch = B // self.process_count
        self.sampler_mesh = serving_mesh(model_config, self.sampler_devices)
        engine = Engine(model_config, rollout_sampler_config(c, local_batch, len(tokenizer), prompts.student),
                        mesh=self.sampler_mesh)
        self._weight_sync = WeightSync(engine)
        stop_ids = default_stop_token_ids(tokenizer, side_dir)
        optimizer = make_optimizer(c.optimizer, c.train.steps)
        settings = step_settings(c, model_config, teacher_config, len(tokenizer), mesh=self.mesh)
        # Created on its shardings: jit would put the (input-independent) zeros on one device.
        opt_state = jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, self.mesh))(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                           None if c.teacher.kind == "live" else teacher_params)
        supervised = c.objective.kind == "sft"
        state_shardings = train_state_shardings(state, self.mesh)
        state = jax.device_put(state, state_shardings)
        step_fn = jitted_train_step(settings, optimizer, state_shardings)
        batch_sharding = logical_sharding(self.mesh, ("batch",), (B,))

        # Hosts read disjoint strided shards and draw the same number per step, so their iterator
        # states stay equal and one saved state resumes them all.
        data = problem_dataset(problems, seed=c.data.shuffle_seed, process_index=self.process_index,
                               process_count=self.process_count, order=c.data.order, batch_size=B,
                               steps=c.train.steps)
        data_iterator = iter(data)
        manager = checkpoint_manager(checkpoints, keep=c.train.keep_checkpoints, every=c.train.checkpoint_every)
        start_step = 0
        if resume_step is not None:
            start_step = resume_step
            saved_teacher = c.teacher.kind == "ema"
            target = state if saved_teacher else state._replace(teacher_params=None)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
            restored = manager.restore(start_step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            state = restored.state if saved_teacher else restored.state._replace(teacher_params=state.teacher_params)
            data_iterator.set_state(restored.data)
            if self.process_index == 0:
                print(f"resuming from step {start_step} ({c.train.output_dir})", flush=True)
        if self.process_index == 0:
            config_path = os.path.join(c.train.output_dir, "config.yaml")
            with open(config_path + ".partial", "w", encoding="utf-8") as f:
                f.write(dump_config(c))
            os.replace(config_path + ".partial", config_path)
            self._print_grace_period(state)

        writer = MetricsWriter(c.train.output_dir, start_step)
        watcher = PreemptionWatcher(self.process_count).start()
        history = []
        flops = None  # counted when the first step compiles
        markers = load_markers()  # self-correction phrases (analysis/markers.yaml), counted every step
        try:
            sampler = (contextlib.nullcontext() if supervised
                       else Orchestrator(engine, self._sampler_weights(state.params)))
            with sampler as orchestrator:
                bar = tqdm(range(start_step, c.train.steps), initial=start_step, total=c.train.steps,
                           desc="training", disable=jax.process_index() != 0)
                for step in bar:
                    batch_items = [next(data_iterator) for _ in range(local_batch)]
                    data_state = data_iterator.get_state()
                    started = time.perf_counter()
                    if supervised:
                        completions = [reference_completion(problem, tokenizer, stop_ids, completion_length)
                                       for problem, _ in batch_items]
                    else:
                        if step > start_step:  # the orchestrator started with these weights
                            orchestrator.load_params(self._sampler_weights(state.params))
                        samplings = [SamplingParams(
                            temperature=c.sampling.temperature, top_p=c.sampling.top_p, top_k=c.sampling.top_k,
                            seed=rollout_seed(c.train.seed, step, self.process_index * local_batch + i),
                            max_new_tokens=completion_length, stop_token_ids=stop_ids) for i in range(local_batch)]
                        rollouts = orchestrator.generate_batch([pair.student_ids for _, pair in batch_items],
                                                               samplings, progress=False)
                        completions = [r[0] for r in rollouts]
                    sampled = time.perf_counter()
                    batch = build_batch([pair for _, pair in batch_items], completions,
                                        student_length=student_length, teacher_length=teacher_length,
                                        completion_length=completion_length,
                                        processed_logprobs=c.objective.importance == "paper")
                    device_batch = self._global_batch(batch, batch_sharding)
                    compile_seconds = 0.0
                    if flops is None:
                        # Compiled ahead of the first call to count its FLOPs; jit's call below
                        # finds this executable in its cache, so the step compiles once.
                        compile_started = time.perf_counter()
                        flops = step_flops(step_fn.lower(state, device_batch).compile(), self.mesh.devices.flat[0])
                        compile_seconds = time.perf_counter() - compile_started
                        if self.process_index == 0:
                            print(flops.describe(), flush=True)
                    new_state, metrics = step_fn(state, device_batch)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    updated = time.perf_counter()
                    if not np.isfinite(metrics["loss"]):
                        path = self._save_diagnostic(step, batch, metrics)
                        raise TrainingError(f"non-finite loss at step {step}; batch saved to {path}; "
                                            "no checkpoint was written for this step")
                    state = new_state
                    marker_counts_LxC = [list(text_marker_counts(tokenizer.decode(
                        completion.token_ids, skip_special_tokens=False), markers).values())
                        for completion in completions]
                    problem_ids, lengths, truncated, marker_counts_BxC = self._global_rollout_record(
                        batch_items, completions, problem_position, problems, marker_counts_LxC)
                    metrics.update(rollout_marker_rates(marker_counts_BxC, lengths, markers))
                    metrics.update({
                        "rollout_length_mean": float(np.mean(lengths)),
                        "rollout_length_min": float(np.min(lengths)),
                        "rollout_length_max": float(np.max(lengths)),
                        "truncation_rate": float(np.mean(truncated)),
                        "sampling_seconds": sampled - started,
                        "update_seconds": updated - sampled,
                        "tokens_per_second": float(sum(lengths)) / (updated - started),
                        "skipped_overlong_prompts": skipped,
                        **utilization_metrics(flops, updated - sampled - compile_seconds),
                    })
                    if compile_seconds:
                        metrics["compile_seconds"] = compile_seconds
                    history.append({"step": step + 1, **metrics, "problem_ids": problem_ids})
                    if c.train.save_rollouts_every and (step + 1) % c.train.save_rollouts_every == 0:
                        self._save_rollouts(step + 1, batch_items, completions, tokenizer)
                    if (step + 1) % c.train.log_every == 0:
                        writer.write(step + 1, metrics, problem_ids=problem_ids)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    last = step + 1 == c.train.steps
                    # The same step on every process (distill/preemption.py): JAX's preemption
                    # sync point on several processes, the next step boundary after a SIGTERM on one.
                    stop = watcher.reached_sync_point(step + 1)
                    saved_state = state if c.teacher.kind == "ema" else state._replace(teacher_params=None)
                    # Asynchronous: the next steps run while it writes; a step directory appears
                    # only once complete, so a kill mid-write leaves the previous one as latest.
                    # Orbax's policy saves every checkpoint_every steps (and at a JAX preemption
                    # sync point); the last step and a single-process stop are forced.
                    save_checkpoint(manager, step + 1, saved_state, data_state, c.to_dict(), force=last or stop)
                    if stop and not last:  # at the last step the run is complete: exit 0
                        self.preempted_step = step + 1
                        break
        finally:
            # Waited for before the SIGTERM handler (where there is one) goes: a second SIGTERM
            # during the save is ignored, and a SIGKILL leaves the previous checkpoint as latest.
            manager.wait_until_finished()
            manager.close()
            watcher.close()
            writer.close()
        if self.preempted_step is not None:
            print(f"preempted: process {self.process_index} stopped after step {self.preempted_step}, checkpoint "
                  f"saved; exit code {c.train.preemption_exit_code} asks for a restart, which resumes", flush=True)
        return history

    def _sampler_weights(self, params):
        """The student weights placed for this process's sampler, device to device (WeightSync);
        every process calls it at the same step."""
        return self._weight_sync(params)

    def _global_batch(self, local_batch: Batch, sharding) -> Batch:
        """A global batch assembled from each process's local rows."""
        if self.process_count == 1:
            return jax.device_put(local_batch, sharding)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

    def _print_grace_period(self, state: TrainState) -> None:
        """The checkpoint's size and the preemption grace period it needs at the measured save rate."""
        from opsd_jax.launch.grace import describe

        saved = state if self.config.teacher.kind == "ema" else state._replace(teacher_params=None)
        total = sum(leaf.nbytes for leaf in jax.tree.leaves(saved))
        print(f"preemption: {describe(total, hosts=self.process_count)}", flush=True)

    def _global_rollout_record(self, batch_items, completions, problem_position, problems, marker_counts_LxC):
        """(problem ids, completion lengths, truncated flags, [B, categories] marker counts) of the
        whole step's batch in global order (process 0's rows first), gathered from every process:
        the metrics describe the step's batch, not process 0's share of it."""
        local_LxF = np.array([[problem_position[problem.id], len(c.token_ids), c.finish_reason == "length", *counts]
                              for (problem, _), c, counts in zip(batch_items, completions, marker_counts_LxC)],
                             np.int64)
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            local_LxF = np.asarray(multihost_utils.process_allgather(local_LxF)).reshape(-1, local_LxF.shape[-1])
        return ([problems[i][0].id for i in local_LxF[:, 0].tolist()], local_LxF[:, 1].tolist(),
                local_LxF[:, 2].astype(bool).tolist(), local_LxF[:, 3:])

    def _save_rollouts(self, step: int, batch_items, completions, tokenizer) -> None:
        """This process's rollouts of `step`, for `opsd-jax analyze`; rewritten whole on a resumed
        re-run of the step, so a file never holds a step twice."""
        from opsd_jax.analysis.rollouts import Rollout, write_rollouts

        folder = os.path.join(self.config.train.output_dir, "rollouts")
        os.makedirs(folder, exist_ok=True)
        suffix = "" if self.process_count == 1 else f"_process{self.process_index}"
        prompt = self.config.prompt
        write_rollouts(
            os.path.join(folder, f"step{step:06d}{suffix}.jsonl"),
            [Rollout(problem, tuple(c.token_ids)) for (problem, _), c in zip(batch_items, completions)],
            tokenizer,
            prompt={"student_suffix": prompt.student_suffix, "suffix_join": prompt.suffix_join,
                    "student_thinking": prompt.student_thinking},
        )

    def _save_diagnostic(self, step: int, batch: Batch, metrics: dict) -> str:
        folder = os.path.join(self.config.train.output_dir, "diagnostics")
        os.makedirs(folder, exist_ok=True)
        suffix = "" if self.process_count == 1 else f"_process{self.process_index}"
        path = os.path.join(folder, f"nonfinite_step{step + 1}{suffix}.npz")
        np.savez(path + ".partial.npz", **batch._asdict(), metrics=json.dumps(metrics))
        os.replace(path + ".partial.npz", path)
        return path


def rollout_marker_rates(counts_BxC, lengths_B, markers: dict[str, list[str]]) -> dict[str, float]:
    """Self-correction markers per 1,000 completion tokens in one step's rollouts, in all and per
    category (`markers_per_1k_tokens`, `markers_per_1k_tokens_<category>`), pooled over the batch
    as `opsd-jax analyze` pools them: the paper ties OPSD's losses to these phrases going quiet,
    and this shows when in training they do. Empty when the batch has no completion tokens."""
    if not sum(lengths_B):
        return {}
    rows = [(length, dict(zip(markers, counts))) for length, counts in zip(lengths_B, np.asarray(counts_BxC).tolist())]
    return {"markers_per_1k_tokens" if category == "any" else f"markers_per_1k_tokens_{category}": row["per_1k_tokens"]
            for category, row in marker_table(rows, markers).items()}


# ---- the step as the loop jits it (shared with `opsd-jax plan`) -----------------------------------


def reference_completion(problem, tokenizer, stop_token_ids, max_tokens: int) -> Completion:
    """The data's solution as the response an `sft` step learns: its tokens, then the tokenizer's
    eos (else the first stop token), so the model learns to end its turn as its chat template
    does. Longer ones are an error naming the problem."""
    if not problem.solution.strip():
        raise TrainingError(f"objective.kind=sft: problem {problem.id} has no solution to learn")
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stop_token_ids[0]
    ids = tokenizer.encode(problem.solution, add_special_tokens=False) + [end]
    if len(ids) > max_tokens:
        raise TrainingError(f"objective.kind=sft: the solution of problem {problem.id} has {len(ids)} tokens with "
                            f"its stop token, over sampling.max_new_tokens={max_tokens}")
    zeros = [0.0] * len(ids)
    return Completion(prompt_token_ids=[], sample_index=0, token_ids=ids, sampled_logprobs=zeros,
                      model_logprobs=zeros, finish_reason="stop")


def training_problems(c: RunConfig, tokenizer, *, announce: bool = True):
    """(kept [(problem, PromptPair)], skipped count, PromptLengths): the data's problems as the
    trainer prompts them, after data.overlong; `announce` prints what was cut or is empty."""
    used = ("problem", *used_context(c))
    problems = read_problems(c.data.path, data_format=c.data.format, preset=c.data.preset,
                             columns=(c.data.problem_column, c.data.solution_column, c.data.answer_column),
                             split=c.data.split, used=used, keep_empty=c.data.empty_context == "keep")
    empty = sum(any(not getattr(p, field).strip() for field in used) for p in problems)
    if empty and announce:
        print(f"{c.data.path}: {empty} of {len(problems)} problems have an empty {' or '.join(used[1:])}; "
              "trained on as they are (data.empty_context: keep)", flush=True)
    kept, skipped, truncated = [], 0, 0
    for problem in problems:
        pair = prompt_pair(problem, c.prompt, tokenizer)
        longest = max(len(pair.student_ids), len(pair.teacher_ids))
        if longest > c.data.max_prompt_tokens:
            if c.data.overlong == "truncate_left":
                kept.append((problem, truncate_left(pair, c.data.max_prompt_tokens)))
                truncated += 1
                continue
            if c.data.overlong == "error":
                raise TrainingError(
                    f"{c.data.path}: problem {problem.id} needs a {longest}-token prompt, over "
                    f"data.max_prompt_tokens={c.data.max_prompt_tokens}"
                )
            skipped += 1
            continue
        kept.append((problem, pair))
    if not kept:
        raise TrainingError(f"{c.data.path}: every problem exceeds data.max_prompt_tokens ({skipped} skipped)")
    if truncated and announce:
        print(f"{c.data.path}: {truncated} of {len(problems)} prompts cut from the left to "
              f"data.max_prompt_tokens={c.data.max_prompt_tokens}", flush=True)
    return kept, skipped, PromptLengths.of(pair for _, pair in kept)


def measured_prompt_lengths(c: RunConfig) -> PromptLengths | None:
    """The data's longest prompts as the trainer will measure them, when this host has the data
    (data.path) and the student's tokenizer (model.checkpoint); None when either is missing."""
    from opsd_jax.checkpoint.loading import load_tokenizer
    from opsd_jax.checkpoint.orbax import config_folder

    # An absent folder would send transformers to the model hub for a repository of that name.
    if not os.path.exists(c.data.path) or not os.path.isdir(config_folder(c.model.checkpoint)):
        return None
    try:
        tokenizer, _ = load_tokenizer(c.model.checkpoint)
    except FileNotFoundError:
        return None
    return training_problems(c, tokenizer, announce=False)[2]


def rollout_sampler_config(c: RunConfig, local_batch: int, valid_vocab: int,
                           longest_prompt: int | None = None) -> SamplerConfig:
    """The rollout sampler of one process: its share of the batch decoded together, each sequence
    up to the longest student prompt (default data.max_prompt_tokens, the most the config
    allows) plus the completion. Only student prompts are sampled from, so a dense privileged
    context (the teacher's, often 10x longer) takes no room in the pool."""
    fraction, page = c.sampling.kv_cache_fraction, c.sampling.kv_page_size
    if not 0 < fraction <= 1:
        raise TrainingError(f"sampling.kv_cache_fraction must be in (0, 1], got {fraction}")
    if page < 1:
        raise TrainingError(f"sampling.kv_page_size must be >= 1, got {page}")
    slots = min(c.sampling.max_slots, local_batch)
    length = capped_prompt_tokens(c, longest_prompt) + c.sampling.max_new_tokens
    pages_per_sequence = math.ceil(length / page)
    # At least one whole sequence (and the null page), or nothing could be served.
    pages = max(math.ceil(fraction * slots * pages_per_sequence), pages_per_sequence) + 1
    return SamplerConfig(max_slots=slots, max_sequence_length=length, valid_vocab_size=valid_vocab,
                         page_size=page, kv_pages=pages)


def used_context(c: RunConfig) -> tuple[str, ...]:
    """The fields of a problem beyond its text that the run reads: the solution for a dense or
    fractional privileged context and as SFT's response, the answer for a sparse one."""
    fields = ()
    if c.prompt.privilege in ("dense", "fraction") or c.objective.kind == "sft":
        fields += ("solution",)
    if c.prompt.privilege == "sparse" and c.objective.kind != "sft":
        fields += ("answer",)
    return fields


def teacher_copy(params, dtype):
    """A frozen or EMA teacher's parameters: `params` in `dtype` (TeacherSection.param_dtype), in
    buffers of their own even where the dtype is unchanged, since the student's are donated to the
    step and overwritten."""
    return jax.tree.map(lambda p: jnp.copy(p) if p.dtype == dtype else p.astype(dtype), params)


def training_state_bytes(c: RunConfig, student, teacher=None) -> int:
    """Bytes of the whole model's training state in the step: the student's parameters, their
    gradients and Adam's two moments (all in param_dtype), and the teacher's parameters the step
    keeps (a frozen or EMA copy, or an external teacher, in `TeacherSection.param_dtype`; none
    for a live teacher or sft)."""
    from opsd_jax.models.decoder import abstract_params

    def parameter_bytes(config) -> int:
        shapes, _ = abstract_params(config)
        return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(shapes))

    student_bytes = parameter_bytes(student)
    teacher_dtype = c.teacher.param_dtype(c.model)
    if c.teacher.kind == "external" and teacher is not None:
        teacher_bytes = parameter_bytes(teacher.replace(param_dtype=teacher_dtype))
    elif c.teacher.kind in ("frozen", "ema") and c.objective.kind != "sft":
        teacher_bytes = parameter_bytes(student.replace(param_dtype=teacher_dtype))
    else:
        teacher_bytes = 0
    return 4 * student_bytes + teacher_bytes


def train_mesh(c: RunConfig, devices, *, student=None, teacher=None, memory_bytes: int | None = None):
    """The train step's mesh over `devices`: train.mesh's sizes, or for `auto` the sizes
    parallel.auto_mesh_shape picks from the student (and an external teacher), the microbatch and
    the devices. The models' config.json files are read from their checkpoints unless given;
    memory_bytes defaults to what one of this process's devices reports (None on CPU: fsdp takes
    every chip the tensor axis leaves)."""
    from opsd_jax.checkpoint.orbax import config_folder
    from opsd_jax.models import ModelConfig
    from opsd_jax.parallel import auto_mesh, device_memory_bytes, is_auto_mesh

    devices = list(devices)
    if not is_auto_mesh(c.train.mesh):
        return make_mesh(*parse_mesh_shape(c.train.mesh), devices=devices)

    def read(key: str, checkpoint: str):
        try:
            return ModelConfig.from_hf(config_folder(checkpoint), param_dtype=c.model.param_dtype)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"auto reads the config.json of {key}: {e}") from None

    if student is None:
        if not c.model.checkpoint:
            raise ValueError("auto needs the model's config.json, but model.checkpoint is not set")
        student = read("model.checkpoint", c.model.checkpoint)
    if teacher is None and c.teacher.kind == "external" and c.teacher.checkpoint:
        teacher = read("teacher.checkpoint", c.teacher.checkpoint)
    if memory_bytes is None:
        # One of this process's own chips: only those report memory, and every host must reach the
        # same answer (the chips of a job are alike), or their meshes would differ.
        local = [d for d in devices if d.process_index == jax.process_index()]
        memory_bytes = device_memory_bytes(local[0]) if local else None
    # An external teacher's heads are split over the same tensor axis as the student's.
    heads = [student] + ([teacher] if c.teacher.kind == "external" and teacher is not None else [])
    return auto_mesh(devices, num_heads=math.gcd(*(m.num_heads for m in heads)),
                     num_kv_heads=math.gcd(*(m.num_kv_heads for m in heads)),
                     batch=c.train.batch_size // max(c.train.microbatches, 1),
                     state_bytes=training_state_bytes(c, student, teacher), memory_bytes=memory_bytes)


def step_settings(c: RunConfig, student, teacher, valid_vocab: int, mesh=None) -> StepSettings:
    """mesh: the step's device mesh (the kernel's shard_map needs it on more than one device)."""
    return StepSettings(student=student, teacher=teacher, objective=c.objective, teacher_kind=c.teacher.kind,
                        ema_rate=c.teacher.ema_rate, microbatches=c.train.microbatches, valid_vocab=valid_vocab,
                        mesh=mesh, kernel_impl=c.train.kernel)


def optimizer_state_shardings(optimizer, params, mesh):
    """NamedShardings for `optimizer.init(params)`: a leaf shaped like a parameter (Adam's moments)
    takes that parameter's sharding, matched by the trailing part of its key path; the rest (step
    counts) is replicated. `params`: arrays or ShapeDtypeStructs with shardings.

    Left to itself, jit places the moments (zeros that do not depend on the parameters' values) on
    a single device, and the loop would then replicate them on every chip: for an 8B model with
    float32 Adam that is 65 GB per chip.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding(path, leaf):
        for start in range(len(path)):
            param = by_path.get(tuple(path[start:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(optimizer.init, params))


def train_state_shardings(state: TrainState, mesh):
    """The NamedSharding of every TrainState leaf (arrays, or ShapeDtypeStructs carrying the
    sharding XLA gave them); leaves XLA left unnamed (scalars such as the step and Adam's count)
    are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated, state)


def jitted_train_step(settings: StepSettings, optimizer, state_shardings):
    """The training step exactly as the loop runs it: the state donated, its shardings kept."""
    return jax.jit(functools.partial(train_step, settings=settings, optimizer=optimizer),
                   donate_argnums=(0,), out_shardings=(state_shardings, None))


@dataclasses.dataclass(frozen=True)
class PromptLengths:
    """Tokens in the data's longest student and longest teacher prompt (after data.overlong)."""

    student: int
    teacher: int

    @classmethod
    def of(cls, pairs) -> "PromptLengths":
        pairs = list(pairs)
        return cls(max(len(p.student_ids) for p in pairs), max(len(p.teacher_ids) for p in pairs))


def capped_prompt_tokens(c: RunConfig, tokens: int | None) -> int:
    """A longest prompt as training sizes it: `tokens`, at most data.max_prompt_tokens (the cap
    data.overlong enforces), and the cap itself when unknown (None)."""
    return min(tokens or c.data.max_prompt_tokens, c.data.max_prompt_tokens)


def train_context_lengths(c: RunConfig, chips: int, prompts: PromptLengths | None = None) -> tuple[int, int]:
    """Tokens in each training sequence of the student and of the teacher: the longest such
    prompt of the data (default, and at most, data.max_prompt_tokens) and the completion, rounded
    up to a multiple of twice `chips`, the mesh's device count, on more than one chip (so each
    chip's slice of positions also halves, as chunked attention's mirrored query split trades
    halves).

    Sized by the data, as the paper's trainer pads each batch to its longest: a dense privileged
    context makes the teacher's prompts long, while the student's stay problem-sized, so one
    length for both made the student's forward and backward (and the rollout pool) run over the
    teacher's padding. Rounded up because the decoder splits a microbatch's positions over the
    mesh axes its sequences leave (`parallel.constrain`), and an axis that does not divide the
    length is dropped: the paper's 25,000 + 4,096 = 29,096 tokens split over 8 chips but not over
    16, so on 16 chips each chip held whole sequences (52 GiB for Qwen3-8B on a v4-32). The
    padding is masked like any other."""
    def length(prompt: int | None) -> int:
        tokens = capped_prompt_tokens(c, prompt) + c.sampling.max_new_tokens
        multiple = 2 * chips if chips > 1 else 1
        return -(-tokens // multiple) * multiple

    return length(prompts and prompts.student), length(prompts and prompts.teacher)


def batch_shapes(c: RunConfig, batch_size: int, sharding, prompts: PromptLengths | None = None) -> Batch:
    """ShapeDtypeStructs of one global batch as `build_batch` lays it out for this config (and
    the data's longest prompts, default data.max_prompt_tokens)."""
    student, teacher = train_context_lengths(c, sharding.mesh.size, prompts)
    completion = c.sampling.max_new_tokens

    def spec(*shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)

    return Batch(spec(student), spec(student), spec(teacher), spec(teacher), spec(completion), spec(completion),
                 spec(completion), spec(), spec(completion, dtype=jnp.float32))


def export_checkpoint(run_dir: str, step: int | None, destination: str, *, model_checkpoint: str) -> str:
    """Writes the student of a training checkpoint as an HF folder (tokenizer and config from the
    run's model checkpoint)."""
    from opsd_jax.checkpoint.hf import save_hf
    from opsd_jax.models import sharded_abstract_params

    run_dir, destination, model_checkpoint = map(user_path, (run_dir, destination, model_checkpoint))
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    step = step if step is not None else manager.latest_step()
    if step is None:
        raise TrainingError(f"{run_dir}: no checkpoints")
    if step not in manager.all_steps():
        raise TrainingError(f"{run_dir}: no checkpoint for step {step}; have {sorted(manager.all_steps())}")
    from opsd_jax.config import load_config

    param_dtype = load_config(os.path.join(run_dir, "config.yaml")).model.param_dtype
    from opsd_jax.checkpoint.orbax import config_folder
    from opsd_jax.models import ModelConfig

    # Only the config and side files are needed; the weights come from the run.
    side_dir = config_folder(model_checkpoint)
    config = ModelConfig.from_hf(side_dir, param_dtype=param_dtype)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shapes = sharded_abstract_params(config, mesh)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": shapes}, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args({"params": shapes}))))
    except ValueError as e:  # Orbax names the shapes, not the model that asked for them
        raise TrainingError(f"{run_dir} step {step} does not hold the parameters of the model {model_checkpoint} "
                            f"describes ({str(e).split('. ')[0][:200]}); give the run's own model as "
                            "--model-checkpoint") from None
    finally:
        manager.close()
    params = restored.state["params"]
    return save_hf(params, config, destination, side_files_from=side_dir)


__all__ = ["PromptLengths", "Trainer", "TrainingError", "batch_shapes", "build_batch", "capped_prompt_tokens",
           "export_checkpoint", "jitted_train_step", "measured_prompt_lengths", "optimizer_state_shardings",
           "rollout_seed", "step_settings", "train_context_lengths", "train_mesh", "train_state_shardings",
           "training_problems", "training_state_bytes"]

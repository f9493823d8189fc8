"""The trainer's Orbax checkpoints: the manager (one path, shared with
benchmarks/checkpoint_save.py), what a checkpoint holds, and whether a launch resumes.

A checkpoint of step N (folder `<output_dir>/checkpoints/N`) holds three items: `state` (the
TrainState: step, params, optimizer state, and the teacher when it is an EMA), `data` (the grain
iterator state after step N's batch) and `config` (the resolved run config that wrote it, as JSON).
Orbax writes a step into a temporary folder and renames it when complete, so a process killed at
any moment of a save (a second SIGTERM, then SIGKILL at the end of the grace period) leaves the
previous complete step as the latest.

Resume modes (`opsd-jax train --resume MODE`):
  auto    the default: resume from the latest checkpoint when the run directory holds checkpoints
          written by the same config (keys in RESUME_FREE_KEYS may differ), start fresh when it
          holds none, and refuse, naming the differing keys, when the config differs;
  always  resume from the latest checkpoint whatever config wrote it (the differing keys are
          printed); what a bare `--resume` meant before;
  never   start fresh, and refuse a run directory that already holds checkpoints.
"""

from __future__ import annotations

import json
import os

# orbax (and so jax) is imported inside the functions: `opsd-jax train` reads RESUME_MODES before
# it may set up jax's CPU devices.
RESUME_MODES = ("auto", "always", "never")
# Keys that may change between launches of one run: where and how often things are written, and
# the host's emulated device count. Everything else shapes the trajectory.
RESUME_FREE_KEYS = frozenset({
    "train.output_dir", "train.cpu_devices", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.save_rollouts_every", "train.preemption_exit_code",
})
RESUME_FREE_SECTIONS = frozenset({"eval"})  # read by `opsd-jax eval`, not by training


class ResumeError(ValueError):
    """The run directory's checkpoints cannot be resumed (or must not be overwritten) as asked."""


def checkpoint_manager(directory: str, *, keep: int, every: int):
    """The manager of a run's `checkpoints/` folder: saves every `every` steps and at a preemption
    sync point (Orbax's own policies), keeps the latest `keep`. The trainer also forces a save at
    the last step and at a single-process preemption stop, which Orbax's policy cannot see."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()])
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, save_decision_policy=policy))


def save_checkpoint(manager, step: int, state, data_state, config: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save of step `step` (returns at once; `manager.wait_until_finished()`
    waits for it). Returns whether a save was started (without `force`, the manager's policy
    decides)."""
    import orbax.checkpoint as ocp

    return manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)))


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 3}} -> {"train.steps": 3}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every key that differs and matters to a
    resume; keys missing on one side (a config written by an older version) count as differing
    only when the other side's value is not the default."""
    missing = object()
    a, b = flatten(_normalized(saved)), flatten(_normalized(current))
    differences = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE_KEYS or key.split(".", 1)[0] in RESUME_FREE_SECTIONS:
            continue
        left, right = a.get(key, missing), b.get(key, missing)
        if (left is missing or right is missing) and _is_default(key, right if left is missing else left):
            continue
        if left != right:
            differences.append((key, None if left is missing else left, None if right is missing else right))
    return differences


def _normalized(tree: dict) -> dict:
    return json.loads(json.dumps(tree))


def _is_default(key: str, value) -> bool:
    from opsd_jax.config import RunConfig

    return flatten(_normalized(RunConfig().to_dict())).get(key, object()) == value


def saved_config(manager, step: int, output_dir: str) -> dict | None:
    """The run config that wrote checkpoint `step` (its `config` item), else the run directory's
    config.yaml, else None."""
    import orbax.checkpoint as ocp

    try:
        return dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    except (FileNotFoundError, KeyError, ValueError):
        pass
    path = os.path.join(output_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    return None


def resume_decision(mode: str, manager, config, output_dir: str):
    """(step to resume from or None for a fresh start, differences) for launch mode `mode` (see
    the module docstring); raises ResumeError when the mode forbids what the directory holds."""
    if mode not in RESUME_MODES:
        raise ResumeError(f"--resume: {mode!r} is not one of {', '.join(RESUME_MODES)}")
    latest = manager.latest_step()
    if latest is None:
        return None, []
    if mode == "never":
        raise ResumeError(f"{output_dir} already holds checkpoints (latest step {latest}); pass --resume auto "
                          "(same config) or --resume always, or choose a new train.output_dir")
    saved = saved_config(manager, latest, output_dir)
    if saved is None:
        if mode == "auto":
            raise ResumeError(f"{output_dir} holds checkpoints (latest step {latest}) but no record of the config "
                              "that wrote them; pass --resume always to resume anyway")
        return latest, []
    differences = config_differences(saved, config.to_dict())
    if differences and mode == "auto":
        listed = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, old, new in differences)
        raise ResumeError(f"{output_dir} holds checkpoints (latest step {latest}) of a different config ({listed}); "
                          "pass --resume always to resume with the new values, or choose a new train.output_dir")
    return latest, differences


__all__ = ["RESUME_FREE_KEYS", "RESUME_MODES", "ResumeError", "checkpoint_manager", "config_differences",
           "resume_decision", "save_checkpoint", "saved_config"]

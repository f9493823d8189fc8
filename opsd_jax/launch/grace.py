"""How long a preempted job needs between SIGTERM and SIGKILL: the termination grace period.

After the SIGTERM every process finishes the step in flight (the preemption sync point is the next
step boundary), saves the checkpoint (each host writes its own shards, in parallel with the others)
and exits. So the grace period is

    notice + one step + safety x (checkpoint bytes / hosts) x save seconds per GiB + exit margin

The save rate is measured by `benchmarks/checkpoint_save.py` through the trainer's own checkpoint
path; MEASURED_SECONDS_PER_GIB is its result on the build machine's local disk (BUILD_NOTES.md,
"Preemption"). A TPU VM writing to a persistent disk or to gs:// saves at its own rate: measure it
there with the same script and pass it (`--save-seconds-per-gib`, or OPSD_SAVE_SECONDS_PER_GIB).
"""

from __future__ import annotations

import math
import os

GiB = 2**30
# benchmarks/checkpoint_save.py --gib 3 on the shared 2-core build machine (local disk, 8 emulated
# CPU devices), 2026-11-30: median 3.74 s/GiB over 3 saves (load average ~6), 5.60 s/GiB over 5
# saves (load average ~7; 3.86 to 6.52). The slower median is kept: a grace period must not be short.
MEASURED_SECONDS_PER_GIB = 5.6
SAFETY = 2.0  # the save's share is doubled: disks and networks are slower under load than measured
NOTICE_SECONDS = 5  # XLA's SIGTERM notifier polls every second; the processes then agree on the step
EXIT_MARGIN_SECONDS = 30  # closing the checkpoint manager, jax.distributed shutdown, process exit
XPK_DEFAULT_GRACE_SECONDS = 30


def save_rate_seconds_per_gib(override: float | None = None) -> float:
    """`override`, else OPSD_SAVE_SECONDS_PER_GIB, else the rate measured on the build machine."""
    if override is not None:
        return float(override)
    text = os.environ.get("OPSD_SAVE_SECONDS_PER_GIB")
    if text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"OPSD_SAVE_SECONDS_PER_GIB: {text!r} is not a number") from None
    return MEASURED_SECONDS_PER_GIB


def grace_period_seconds(state_bytes: int, *, hosts: int = 1, seconds_per_gib: float | None = None,
                         step_seconds: float = 0.0) -> int:
    """Whole seconds of grace a job saving `state_bytes` (all hosts together) needs; `step_seconds`:
    how long one training step takes (the step in flight finishes before the save)."""
    rate = save_rate_seconds_per_gib(seconds_per_gib)
    save = SAFETY * state_bytes / max(hosts, 1) / GiB * rate
    return math.ceil(NOTICE_SECONDS + step_seconds + save + EXIT_MARGIN_SECONDS)


def checkpoint_bytes(config, *, model_config: str | None = None) -> int:
    """Bytes of what a training checkpoint of run `config` holds: the student's parameters, the
    optimizer state, and the teacher when it is an EMA (the other teachers are not saved).
    Computed from shapes alone (no weights are read); `model_config`: a folder with the student's
    config.json (default as `opsd-jax plan` finds it: model.checkpoint, else the packaged config)."""
    import jax
    import numpy as np

    from opsd_jax.distill.train_step import make_optimizer
    from opsd_jax.models.decoder import abstract_params
    from opsd_jax.plan.programs import run_model_configs

    student, _, _ = run_model_configs(config, model_config)
    params, _ = abstract_params(student)
    optimizer_state = jax.eval_shape(make_optimizer(config.optimizer, config.train.steps).init, params)

    def size(tree) -> int:
        return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))

    teacher = size(params) if config.teacher.kind == "ema" else 0
    return size(params) + size(optimizer_state) + teacher


def describe(state_bytes: int, *, hosts: int, seconds_per_gib: float | None = None, step_seconds: float = 0.0) -> str:
    """One line: the checkpoint size, the save time and the grace period it needs."""
    rate = save_rate_seconds_per_gib(seconds_per_gib)
    grace = grace_period_seconds(state_bytes, hosts=hosts, seconds_per_gib=rate, step_seconds=step_seconds)
    per_host = state_bytes / max(hosts, 1) / GiB
    return (f"checkpoint {state_bytes / GiB:.2f} GiB ({per_host:.2f} GiB per host x {hosts}); at {rate:g} s/GiB a save "
            f"takes about {per_host * rate:.0f} s; grace period needed: {grace} s (x{SAFETY:g} on the save, "
            f"+{step_seconds:g} s step, +{NOTICE_SECONDS + EXIT_MARGIN_SECONDS} s notice and exit; "
            f"XPK's default is {XPK_DEFAULT_GRACE_SECONDS} s)")


__all__ = ["MEASURED_SECONDS_PER_GIB", "checkpoint_bytes", "describe", "grace_period_seconds",
           "save_rate_seconds_per_gib"]

"""Preemption: which step every process stops at after a SIGTERM, and the exit code that asks the
scheduler for a restart.

With jax.distributed initialized (every multi-process job; also a single-host TPU VM launched with
OPSD_JAX_DISTRIBUTED=1). `jax.distributed.initialize` starts JAX's preemption
service (`jax_enable_preemption_service`, on by default): XLA installs its own SIGTERM handler, and
when any process receives the signal the notice reaches every process through the coordination
service, which agrees on a sync step (the largest step any process has reported, plus one).
`multihost_utils.reached_preemption_sync_point(step)` turns True on every process at that same
step, and Orbax's `PreemptionCheckpointingPolicy` reads the same function. So the trainer installs no
Python SIGTERM handler there (one would replace XLA's and the sync point would never fire); it asks
`reached_preemption_sync_point` once per step, which is a local check, not a collective.

Single process without jax.distributed. JAX starts no distributed client, so no preemption
service and no XLA handler exist, and `reached_preemption_sync_point` always answers False. The
same rule then reads: stop at the first step boundary after the signal; a Python SIGTERM handler
records the signal. A second SIGTERM changes nothing (the save already under way completes).

Multi-process with the service switched off (`jax_enable_preemption_service=False`): a Python
handler per process and an all-gather of the flags each step, so every process stops at the same
step (one small collective per step).

After the stop step's checkpoint is written the trainer exits with `train.preemption_exit_code`
(RESTART_EXIT_CODE, 42, by default): JobSet / XPK pod failure policies restart a job on 42 (and on
127-255, the codes of a process killed by a signal), while an exit 0 would count as finished.
"""

from __future__ import annotations

import signal

import numpy as np

RESTART_EXIT_CODE = 42


class PreemptionWatcher:
    """Answers, once per step, whether every process stops after this step.

    mode: "jax" (JAX's preemption service), "signal" (one process, a Python SIGTERM handler) or
    "allgather" (several processes without the service: Python handlers and a per-step all-gather).
    `start()` before the loop installs the Python handler where one is used; `close()` removes it,
    after the final save has been waited for."""

    def __init__(self, process_count: int):
        self.process_count = process_count
        self.signalled = False
        self._previous_handler = None
        if _preemption_service_running():
            self.mode = "jax"
        else:
            self.mode = "signal" if process_count == 1 else "allgather"

    def start(self) -> PreemptionWatcher:
        if self.mode != "jax" and self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next step boundary; a second signal changes nothing

    def reached_sync_point(self, step: int) -> bool:
        """True on every process at the same `step` (the number of steps completed) once any
        process has been told to stop. Call it once per step, with the same step on every process."""
        if self.mode == "jax":
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        if self.mode == "allgather":
            from jax.experimental import multihost_utils

            return bool(np.max(multihost_utils.process_allgather(np.int32(self.signalled))))
        return self.signalled


def _preemption_service_running() -> bool:
    """jax.distributed started the service (the flag is read when `initialize` runs)."""
    import jax

    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


__all__ = ["RESTART_EXIT_CODE", "PreemptionWatcher"]

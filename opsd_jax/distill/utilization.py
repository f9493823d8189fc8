"""How busy the chips are while the trainer updates: the compiled train step's matmul FLOPs per
chip against the time the update took and the chip's bf16 peak.

The FLOPs are counted from the compiled, partitioned program exactly as `opsd-jax plan` counts
them (plan/hlo_flops.py: scanned layers, microbatches and kernel blocks multiplied out), so a
run's log can be read against its plan. They are the FLOPs the chip runs, not "model FLOPs":
rematerialized forwards and the divergence kernel's statistics pass count, and the program is
counted at its padded shapes with every token block kept (rows the kernel skips at run time
still count). The quotient is therefore a hardware utilization, an upper bound on the usual MFU.

Counted on CPU and TPU. On GPUs XLA turns the matmuls into cuBLAS custom calls, which the count
does not read, so there the step's FLOPs are reported as not counted rather than too low.
"""

from __future__ import annotations

import dataclasses

from opsd_jax.kernels.tpu_vmem import generation_of
from opsd_jax.plan import hlo_flops
from opsd_jax.plan.topology import GENERATIONS

COUNTED_PLATFORMS = ("cpu", "tpu")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """One train step's matmul FLOPs on one chip (None: not counted on this platform) and the
    chip's bf16 peak FLOP/s (None: not a TPU generation the plan knows)."""

    per_chip: float | None
    peak_per_chip: float | None
    platform: str
    runtime_loops: tuple[str, ...] = ()  # loops bounded at run time, counted once (hlo_flops)

    def describe(self) -> str:
        """One line for the trainer's start-up output."""
        if self.per_chip is None:
            return (f"train step FLOPs not counted on {self.platform} (its matmuls are library calls the "
                    "count does not read): no utilization is logged")
        line = (f"train step: {self.per_chip / 1e12:.4g} TFLOP of matmuls per chip (compiled program, loops "
                "multiplied out, as `opsd-jax plan` counts)")
        if self.peak_per_chip:
            line += f"; chip peak {self.peak_per_chip / 1e12:.0f} TFLOP/s bf16"
        if self.runtime_loops:
            line += f"; {len(self.runtime_loops)} loop(s) bounded at run time counted once"
        return line


def peak_flops(device_kind: str) -> float | None:
    """bf16 peak FLOP/s of one chip of this jax `device_kind` ("TPU v5 lite", ...), None if unknown."""
    generation = generation_of(device_kind)
    known = GENERATIONS.get(generation) if generation else None
    return known.peak_bf16_flops if known else None


def step_flops(compiled, device) -> StepFlops:
    """StepFlops of a compiled train step (`jit(...).lower(...).compile()`) running on `device`'s kind."""
    platform = device.platform
    if platform not in COUNTED_PLATFORMS:
        return StepFlops(None, None, platform)
    counted = hlo_flops.count(compiled.as_text())
    return StepFlops(counted.flops, peak_flops(device.device_kind), platform, tuple(counted.runtime_loops))


def utilization_metrics(flops: StepFlops, seconds: float) -> dict[str, float]:
    """Per-step metrics for an update that took `seconds` of wall time: achieved TFLOP/s per chip
    and, where the peak is known, its fraction of the peak. Empty where the FLOPs were not counted."""
    if flops.per_chip is None or seconds <= 0:
        return {}
    achieved = flops.per_chip / seconds
    metrics = {"update_tflops_per_chip": achieved / 1e12}
    if flops.peak_per_chip:
        metrics["update_peak_fraction"] = achieved / flops.peak_per_chip
    return metrics

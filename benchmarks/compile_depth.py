"""Compile time of the train step against model depth (issue 13's goal: a 36-layer model within
1.5x of a 4-layer one's, on this CPU).

The benchmark's model (benchmarks/train_step.py: Qwen3 architecture, hidden 512, vocab 151,936)
at 4 and 36 layers, remat on as in every shipped config; each train step is lowered and compiled
ahead of time (nothing runs), one fresh compile per depth, timed in the same run.
    python benchmarks/compile_depth.py [--depths 4 36] [--batch 2] [--prompt 64] [--completion 192]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
from train_step import build_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 36])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=192)
    parser.add_argument("--privileged", type=int, default=64)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    print("| layers | lower s | compile s | HLO text chars |")
    print("|---|---|---|---|")
    seconds = {}
    for depth in args.depths:
        step, state, batch, _, _ = build_step(depth, args.batch, args.prompt, args.completion, args.privileged,
                                              remat=True, allocate=False)
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        seconds[depth] = done - start
        print(f"| {depth} | {lowered_at - start:.1f} | {done - lowered_at:.1f} | {len(lowered.as_text()):,} |")
        del step, state, batch
    shallow, deep = min(args.depths), max(args.depths)
    print(f"lower + compile, {deep} layers / {shallow} layers: {seconds[deep] / seconds[shallow]:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

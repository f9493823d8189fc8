"""Grading throughput on responses as long as real thinking traces.

Builds AIME 2024 generations for n=16 from the suite's own AoPS solutions (repeated to about
`--chars` characters of "thinking", one character per token for the budget cuts), half with the
right boxed answer, a quarter wrong, a quarter with no box; then grades every budget through
`score_run` and prints samples and grades per second. No model, no accelerator.

    python benchmarks/eval_grading.py [--chars 120000]
"""

import argparse
import os
import random
import tempfile
import time

from opsd_jax.eval import generations
from opsd_jax.eval.runner import score_run
from opsd_jax.eval.suites import load_suite


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=120_000)
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    suite = load_suite("aime24")
    import json

    with open(suite.source, encoding="utf-8") as f:
        solutions = {row["id"]: row["solution"] for row in map(json.loads, f)}
    budgets = [4096, 8192, 16384, 32768]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as out:
        header = {"format": generations.FORMAT, "suite": suite.name, "suite_fingerprint": suite.fingerprint,
                  "tokenizer_fingerprint": "-", "prompt_fingerprint": "-",
                  "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "seed": 0, "max_tokens": args.chars},
                  "budgets": budgets, "thinking_open": False, "shard": [0, 1]}
        with generations.Appender(generations.shard_path(os.path.join(out, suite.name), (0, 1)), header) as appender:
            for problem in suite.problems:
                thinking = (solutions[problem.id] + "\n") * (args.chars // max(1, len(solutions[problem.id])) + 1)
                for sample in range(args.n):
                    kind = rng.random()
                    final = (f"\\boxed{{{problem.answer}}}" if kind < 0.5 else
                             f"\\boxed{{{int(problem.answer) + 1}}}" if kind < 0.75 else "so it is 12.")
                    text = "<think>" + thinking[: args.chars - 200] + "</think>\nThe answer is " + final
                    appender.append({"problem_id": problem.id, "sample_index": sample, "seed": 0,
                                     "token_count": len(text), "finish_reason": "stop", "text": text,
                                     "budget_chars": {str(b): b for b in budgets if b < len(text)}})
        start = time.perf_counter()
        results = score_run(out, [suite], progress=False)
        seconds = time.perf_counter() - start
    samples = len(suite.problems) * args.n
    grades = samples * len(results[suite.name])
    full = results[suite.name][args.chars]
    print(f"{samples} samples x {len(results[suite.name])} budgets, {args.chars:,} characters each: "
          f"{seconds:.2f} s ({grades / seconds:.0f} grades/s); accuracy at the cap {full['accuracy']:.3f}, "
          f"extraction {full['extraction']}")


if __name__ == "__main__":
    main()

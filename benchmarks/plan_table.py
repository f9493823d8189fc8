"""The per-config fit table of BUILD_NOTES: `opsd-jax plan` for every shipped config on one topology.

    python benchmarks/plan_table.py --topology v5p-16 --out runs/plans [--what-if-kernel xla] [--programs train,eval]

Configs whose programs have the same shapes (same architecture, prompt and rollout lengths, batch,
microbatches, mesh, dtypes, teacher, evaluation length) are planned once and share a row. Each plan
runs in its own process (libtpu reads the accelerator type when it loads). With --what-if-kernel,
the train step is planned a second time with that divergence kernel, to see its memory while the
default Mosaic kernel cannot be partitioned (issue 12). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from opsd_jax.config import load_config  # noqa: E402  (no jax: safe before the plans' processes)

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "layer_types", "sliding_window")
GiB = 2**30


def _architecture(checkpoint: str) -> tuple:
    name = os.path.basename(os.path.normpath(checkpoint)).lower()
    with open(os.path.join(REPO, "opsd_jax", "plan", "model_configs", name, "config.json"), encoding="utf-8") as f:
        fields = json.load(f)
    return tuple(json.dumps(fields.get(k), sort_keys=True) for k in SHAPE_FIELDS)


def shape_key(path: str) -> tuple:
    c = load_config(path)
    teacher = _architecture(c.teacher.checkpoint) if c.teacher.kind == "external" else c.teacher.kind
    return (_architecture(c.model.checkpoint), teacher, c.data.max_prompt_tokens, c.sampling.max_new_tokens,
            c.sampling.max_slots, c.train.batch_size, c.train.microbatches, c.train.mesh, c.model.param_dtype,
            c.model.compute_dtype, c.model.remat, c.objective.kind, c.eval.max_tokens)


def run_plan(config: str, topology: str, out: str, *extra) -> dict:
    command = [sys.executable, "-m", "opsd_jax.cli", "plan", "--config", config, "--topology", topology,
               "--json", out, *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


WORST = {"fits": 0, "does not fit": 1, "does not compile": 2}


def summary(report: dict) -> dict:
    """Per program family (train, rollout, eval, analyze): the largest GiB per chip, the worst verdict and
    the summed compile seconds of its programs."""
    families: dict[str, dict] = {}
    for r in report["programs"]:
        family = "train" if r["name"] == "train_step" else r["name"].split("_")[0]
        cell = families.setdefault(family, {"gib": 0.0, "verdict": "fits", "seconds": 0.0})
        if r["verdict"] != "does not compile":  # nothing measured: its total would be the resident bytes alone
            cell["gib"] = max(cell["gib"], r["total_bytes"] / GiB)
        cell["verdict"] = max(cell["verdict"], r["verdict"], key=WORST.__getitem__)
        cell["seconds"] += r["compile_seconds"]
    return families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-16")
    parser.add_argument("--out", default="runs/plans")
    parser.add_argument("--what-if-kernel", choices=("xla",), help="also plan the train step with this kernel")
    parser.add_argument("--configs", nargs="*", help="config files (default: every configs/*.yaml but demo_cpu)")
    parser.add_argument("--programs", help="passed to `opsd-jax plan --programs` (default: its own)")
    args = parser.parse_args()
    programs = ("--programs", args.programs) if args.programs else ()
    os.makedirs(args.out, exist_ok=True)
    configs = args.configs or sorted(os.path.join("configs", f) for f in os.listdir(os.path.join(REPO, "configs"))
                                     if f.endswith(".yaml") and f != "demo_cpu.yaml")
    planned: dict[tuple, tuple[str, dict, dict | None]] = {}
    print(f"| config | same shapes as | train GiB/chip | train | train GiB/chip ({args.what_if_kernel or '-'}) "
          f"| rollout GiB/chip | eval GiB/chip | analyze GiB/chip | verdicts (train / rollout / eval / analyze) "
          f"| compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        key = shape_key(os.path.join(REPO, config))
        name = os.path.splitext(os.path.basename(config))[0]
        if key in planned:
            first = planned[key][0]
            print(f"| {name} | {first} | | | | | | | | |", flush=True)
            continue
        report = run_plan(config, args.topology, os.path.join(args.out, f"{name}.{args.topology}.json"), *programs)
        what_if = None
        if args.what_if_kernel:
            what_if = run_plan(config, args.topology, os.path.join(args.out, f"{name}.{args.topology}."
                                                                             f"{args.what_if_kernel}.json"),
                               "--programs", "train", "--kernel-impl", args.what_if_kernel)
        planned[key] = (name, report, what_if)
        cells = summary(report)
        train = cells.get("train", {"gib": 0, "verdict": "-", "seconds": 0})
        alt = summary(what_if).get("train") if what_if else None
        seconds = sum(cell["seconds"] for cell in cells.values()) + (alt["seconds"] if alt else 0)
        gib = lambda cell: "" if not cell or cell["gib"] == 0 else f"{cell['gib']:.1f}"  # noqa: E731
        alt_text = f"{gib(alt)} ({alt['verdict']})" if alt else ""
        verdicts = " / ".join(cells.get(f, {"verdict": "-"})["verdict"]
                              for f in ("train", "rollout", "eval", "analyze"))
        print(f"| {name} | | {gib(train)} | {train['verdict']} | {alt_text} | {gib(cells.get('rollout'))} | "
              f"{gib(cells.get('eval'))} | {gib(cells.get('analyze'))} | {verdicts} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

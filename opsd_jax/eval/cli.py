"""`opsd-jax eval`: generate (resumable, shardable), merge shards, regrade, compare runs.

  opsd-jax eval --checkpoint DIR --suite aime24,aime25,hmmt25 --out runs/eval/ckpt [--shard i/n]
  opsd-jax eval --merge --out runs/eval/ckpt          # after every shard finished
  opsd-jax eval --score-only --out runs/eval/ckpt [--grading strict,paper]   # regrade existing generations
  opsd-jax eval --compare runs/eval/a runs/eval/b --out runs/eval/report [--labels base,opsd] [--grading paper]

Nothing here imports jax at module level: the parser is built before --cpu-devices takes effect.
"""

from __future__ import annotations

import os

from opsd_jax.paths import user_path


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated token counts, got {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", type=user_path, help="HF folder or opsd-jax Orbax checkpoint")
    parser.add_argument("--suite", default="aime24,aime25,hmmt25",
                        help="comma-separated built-in suites (aime24, aime25, hmmt25, aime24_h4: the paper's AIME24 "
                             "wording) or JSONL/Parquet/dataset paths (a Countdown split from `opsd-jax data countdown`)")
    parser.add_argument("--out", required=True, metavar="DIR", type=user_path, help="run folder (or report folder with --compare)")
    parser.add_argument("--n", type=int, default=16, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=38912, help="generation cap per sample")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each (problem, sample) derives its own")
    parser.add_argument("--instruction", help='text appended to each problem, e.g. "Please reason step by step, '
                        'and put your final answer within \\boxed{}."')
    parser.add_argument("--no-thinking", dest="thinking", action="store_const", const=False, default=None,
                        help="enable_thinking=False in the chat template (default: the template's own default)")
    parser.add_argument("--thinking", dest="thinking", action="store_const", const=True,
                        help="enable_thinking=True in the chat template")
    parser.add_argument("--config", metavar="YAML", type=user_path,
                        help="a run config whose `eval` section gives the defaults of --suite, --n, --max-tokens, "
                             "--temperature, --top-p, --top-k, --budgets, --grading, thinking and --instruction "
                             "(flags still override), e.g. the paper's settings for that run")
    parser.add_argument("--budgets", default=None,
                        help="token budgets to regrade at, none above --max-tokens (default: those of "
                             "4096,8192,16384,32768 below it)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="generate only shard I of N (then --merge). A multi-process launch (every host of a pod "
                             "running this command) splits it further: each process samples its own share on its own "
                             "devices, and with 0/1 process 0 then merges and grades (--out on shared storage). "
                             "Resuming with another shard count or number of processes reuses every sample already "
                             "under --out")
    parser.add_argument("--max-slots", type=int, default=8,
                        help="sequences decoded together (KV cache: slots x (prompt + max tokens); printed at start)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                        help="this process's device mesh (default: one device); auto: every device of this "
                             "process, tensor parallel over as many "
                             "as divide the KV heads and data parallel over slots for the rest, the sampler's own "
                             "rule (sampler.engine.serving_mesh)")
    parser.add_argument("--grade-timeout", type=int, default=5,
                        help="seconds per math-verify parse / check (strict grading; paper grading keeps the paper's 1 s)")
    parser.add_argument("--grading", default="strict", metavar="MODE[,MODE]",
                        help="answer grading: strict (this repo's grader; a budget-cut response gets no fallbacks), "
                             "paper (the paper's extract_answer_math/strip_string/math_equal; a cut response is "
                             "graded like a finished one), or strict,paper for both side by side (the first is "
                             "plotted and printed). Each mode has its own SUITE/metrics folder and is recorded in "
                             "every metrics file and summary.json. With --compare: the one mode to compare")
    parser.add_argument("--merge", action="store_true",
                        help="merge the shard files under --out (of any shard counts, with any merged file already "
                             "there), then grade")
    parser.add_argument("--score-only", action="store_true", help="grade existing generations under --out")
    parser.add_argument("--compare", nargs="+", metavar="RUN", type=user_path, help="run folders to compare (the first is the base)")
    parser.add_argument("--labels", help="comma-separated labels for --compare runs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")


def config_defaults(path: str) -> dict:
    """Argument defaults from the `eval` section of the run config at `path`."""
    from opsd_jax.config import load_config

    section = load_config(path).eval
    return {"suite": section.suites, "n": section.n, "max_tokens": section.max_tokens,
            "temperature": section.temperature, "top_p": section.top_p, "top_k": section.top_k,
            "budgets": section.budgets, "grading": section.grading, "thinking": section.thinking,
            "instruction": section.instruction}


def _print_summary(results: dict) -> None:
    for suite, by_budget in results.items():
        for budget, m in sorted(by_budget.items()):
            passes = " ".join(f"pass@{k}={v:.3f}" for k, v in m["pass@k"].items())
            print(f"{suite} budget {budget} ({m['grading']} grading): "
                  f"avg@{m['samples_per_problem']}={m['accuracy']:.4f} {passes} "
                  f"mean_tokens={m['length']['mean_tokens']:.0f} hit_cap={m['length']['hit_cap_share']:.1%}")


def auto_serving_mesh(checkpoint: str, devices=None):
    """`--mesh auto`: the sampler's mesh for this checkpoint's model over this process's devices
    (or `devices`), from its config.json alone, before any weight is read."""
    import jax

    from opsd_jax.checkpoint.orbax import config_folder
    from opsd_jax.models import ModelConfig
    from opsd_jax.parallel import initialize_distributed
    from opsd_jax.sampler.engine import serving_mesh

    initialize_distributed()
    try:
        config = ModelConfig.from_hf(config_folder(checkpoint))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--mesh auto reads the config.json of --checkpoint: {e}") from None
    return serving_mesh(config, jax.local_devices() if devices is None else devices)


def run(args, make_mesh) -> int:
    """Runs the mode the flags select; `make_mesh(text)` builds the device mesh (from opsd_jax.cli)."""
    from opsd_jax.eval import runner
    from opsd_jax.eval.generations import parse_shard, process_shard, shard_path
    from opsd_jax.eval.report import compare_runs
    from opsd_jax.eval.score import parse_gradings
    from opsd_jax.eval.suites import parse_suites

    progress = not args.no_progress
    gradings = parse_gradings(args.grading)
    if args.compare:
        if len(gradings) != 1:
            raise ValueError(f"--compare compares one grading mode at a time, got --grading {args.grading}")
        labels = args.labels.split(",") if args.labels else None
        result = compare_runs(args.compare, labels, args.out, grading=gradings[0])
        for row in result["differences"]:
            print(f"{row['suite']} budget {row['budget']}: {row['run']} - {row['base_run']} = {row['absolute']:+.4f} "
                  f"[{row['absolute_ci'][0]:+.4f}, {row['absolute_ci'][1]:+.4f}]")
        print(f"wrote {args.out}/comparison.md, comparison.json, accuracy_vs_budget.png")
        return 0
    if args.merge or args.score_only:
        _print_summary(runner.score_run(args.out, merge=args.merge, timeout_seconds=args.grade_timeout,
                                        progress=progress, grading=gradings))
        return 0
    if not args.checkpoint:
        raise ValueError("eval needs --checkpoint DIR (or --merge / --score-only / --compare)")
    import jax

    settings = runner.EvalSettings(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, instruction=args.instruction, enable_thinking=args.thinking,
        budgets=None if args.budgets is None else _budgets(args.budgets))
    asked_shard = parse_shard(args.shard)
    suites = parse_suites(args.suite)
    # In a multi-process launch (every host of a pod runs this same command) each process samples
    # its own shard on its own chips: the sampler's requests, scheduling and files are per process,
    # so nothing is sharded across hosts and no process waits on another until the merge.
    mesh = auto_serving_mesh(args.checkpoint) if args.mesh and args.mesh.strip().lower() == "auto" else make_mesh(
        args.mesh, per_process=True)
    process, processes = jax.process_index(), jax.process_count()
    shard = process_shard(asked_shard, process, processes)
    result = runner.run_eval(args.checkpoint, suites, args.out, settings, shard=shard, mesh=mesh,
                             dtype=args.dtype, max_slots=args.max_slots, progress=progress,
                             timeout_seconds=args.grade_timeout, grading=gradings)
    prefix = f"process {process}: " if processes > 1 else ""
    for suite, counts in result["generation"].items():
        print(f"{prefix}{suite}: {counts['generated']} generated, {counts['existing']} already on disk"
              f"{', a torn last line dropped' if counts['dropped_torn_line'] else ''} -> {counts['path']}")
    grading = "" if gradings == ("strict",) else f" --grading {','.join(gradings)}"
    if "metrics" in result:
        _print_summary(result["metrics"])
    elif processes > 1 and asked_shard[1] == 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("opsd-jax eval: every shard generated")
        if process == 0:
            missing = [path for suite in suites for p in range(processes)
                       if not os.path.exists(path := shard_path(os.path.join(args.out, suite.name), (p, processes)))]
            if missing:
                raise FileNotFoundError(
                    f"process 0 merges every process's shard, and {missing[0]} ({len(missing)} missing in all) is not "
                    f"there: --out must be storage that every host shares, or copy the shard files into one folder "
                    f"and run opsd-jax eval --merge --out DIR{grading}")
            _print_summary(runner.score_run(args.out, suites, merge=True, timeout_seconds=args.grade_timeout,
                                            progress=progress, grading=gradings))
    else:
        print(f"{prefix}shard {shard[0]}/{shard[1]} done; once every shard is: "
              f"opsd-jax eval --merge --out {args.out}{grading}")
    return 0

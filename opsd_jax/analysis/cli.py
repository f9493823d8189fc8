"""`opsd-jax analyze`: arguments and the entry point (no jax import at module level: the parser is
built before --cpu-devices takes effect).

  opsd-jax analyze --rollouts base.jsonl trained.jsonl --labels base,opsd \\
      --student ckpt/base ckpt/opsd --teacher ckpt/base --privileged dense --out runs/analysis
"""

from __future__ import annotations

from opsd_jax.paths import user_path


def add_arguments(parser) -> None:
    parser.add_argument("--rollouts", required=True, nargs="+", metavar="FILE", type=user_path,
                        help="rollouts JSONL (opsd-jax-rollouts/1) or eval generations.jsonl files; the first is "
                             "the base for marker-rate differences")
    parser.add_argument("--labels", help="comma-separated names of the rollouts files (default: file names)")
    parser.add_argument("--student", required=True, nargs="+", metavar="CKPT", type=user_path,
                        help="student checkpoint (HF folder or Orbax): one for all files, or one per file")
    parser.add_argument("--teacher", metavar="CKPT", type=user_path, help="teacher checkpoint (default: each group's student, "
                                                          "as in self-distillation)")
    parser.add_argument("--privileged", default="dense", choices=("dense", "sparse", "none"),
                        help="what the privileged teacher sees: the solution, the answer, or nothing")
    parser.add_argument("--markers", metavar="YAML", type=user_path, help="marker phrases per category (default: the shipped list)")
    parser.add_argument("--fork-threshold", type=float, default=0.672, help="entropy (nats) above which a "
                                                                            "position is a fork")
    parser.add_argument("--top-rho", type=float, help="instead: the threshold is the entropy above which lie the top "
                                                      "rho share of the first group's student entropies, kept for "
                                                      "every group")
    parser.add_argument("--max-tokens", type=int, help="score only each rollout's first N tokens")
    parser.add_argument("--batch-size", type=int, default=4, help="rollouts scored together")
    parser.add_argument("--kernel-impl", default="auto", choices=("auto", "reference", "xla", "pallas_tpu",
                                                                  "pallas_gpu"))
    parser.add_argument("--beta", type=float, default=0.5,
                        help="the per-token divergence reported at forks and markers, as the trainer's objective: "
                             "generalized JSD (0 forward KL, 1 reverse KL; default 0.5, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--out", required=True, metavar="DIR", type=user_path, help="where report.md, metrics.json and plots go")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--mesh", metavar="DATA,FSDP,TENSOR")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")


def run(args, make_mesh) -> int:
    """Runs the analysis; `make_mesh(text)` builds the device mesh (from opsd_jax.cli)."""
    from opsd_jax.analysis.analyze import AnalysisSettings, analyze

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    settings = AnalysisSettings(privileged=args.privileged, fork_threshold=args.fork_threshold, top_rho=args.top_rho,
                                max_tokens=args.max_tokens, batch_size=args.batch_size, kernel_impl=args.kernel_impl,
                                seed=args.seed, beta=args.beta)
    labels = args.labels.split(",") if args.labels else None
    mesh = make_mesh(args.mesh)
    import jax

    if jax.process_count() > 1:
        # Each process would build its own batches for a mesh over every host's chips and write the
        # same report folder; one host is the design (`opsd-jax plan` compiles it for one host's chips).
        raise ValueError(f"opsd-jax analyze runs as one process, and this one joined a {jax.process_count()}-process "
                         "job: run it on a single-host machine (a one-host TPU VM, a GPU or CPU host) without a "
                         "multi-host launcher")
    result = analyze(args.rollouts, labels, args.student, args.teacher, args.out, settings,
                     markers_path=args.markers, mesh=mesh, dtype=args.dtype,
                     progress=not args.no_progress)
    for label, g in result["groups"].items():
        rates = " ".join(f"{name}={g['fork_rates'][name]['all']['fork_rate']:.3f}" for name in g["fork_rates"])
        any_marker = g["markers"]["any"]["per_1k_tokens"]
        signal = g["signal_at_markers"]["any"]
        line = f"{label}: {g['rollouts']} rollouts, {g['tokens']} tokens; fork rates {rates}; markers/1k {any_marker:.2f}"
        if signal["positions"]:
            line += (f"; at {signal['positions']} marker starts advantage privileged "
                     f"{signal['privileged']['mean']:+.3f} vanilla {signal['vanilla']['mean']:+.3f}, sign "
                     f"disagreement {signal['sign_disagreement']:.3f}")
        divergence = g["divergence"]["privileged"]
        if divergence["share_at_forks"] is not None:
            line += (f"; privileged-teacher divergence {divergence['share_at_forks']:.1%} at forks "
                     f"({divergence['fork_share_of_tokens']:.1%} of tokens)")
        print(line)
    print(f"wrote {args.out}/report.md, metrics.json, fork_rates.png, marker_rates.png, advantage_at_markers.png")
    return 0

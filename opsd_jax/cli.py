"""`opsd-jax` command line: convert, train, serve, eval, analyze, plan, launch, and the toy-world demo.

jax is imported only after the arguments are read, so `--cpu-devices` can set up a virtual CPU
mesh before jax initializes its backends.
"""

from __future__ import annotations

import argparse
import os
import sys

from opsd_jax.paths import user_path


def _set_cpu_devices(count: int | None, *, force_cpu: bool = True) -> None:
    """Emulates `count` CPU devices; `force_cpu` also keeps jax off any accelerator (the
    --cpu-devices flag), while a config's `train.cpu_devices` only shapes the CPU backend."""
    if not count:
        return
    if "jax" in sys.modules:
        raise RuntimeError("--cpu-devices must be applied before jax is imported")
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    if force_cpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _set_tpu_topology(name: str) -> None:
    """libtpu reads the accelerator type when it loads: set it before jax is imported. An unknown
    name is left for the plan to report."""
    from opsd_jax.plan.topology import (
        TopologyError,
        accelerator_environment,
        parse_topology,
    )

    if "jax" in sys.modules:
        raise RuntimeError("the plan's TPU topology must be set before jax is imported")
    try:
        os.environ.update(accelerator_environment(parse_topology(name)))
    except TopologyError:
        pass


def _config_cpu_devices(args) -> int | None:
    """`train.cpu_devices` of the run config `opsd-jax train` is about to run (read without jax)."""
    from opsd_jax.config import load_config

    return load_config(args.config, args.overrides).train.cpu_devices


def _mesh(text: str | None, *, per_process: bool = False):
    """The --mesh DATA,FSDP,TENSOR mesh (None: one device) over every process's devices, or over
    this process's own with `per_process` (a job whose processes each work alone)."""
    import jax

    from opsd_jax.parallel import initialize_distributed, make_mesh, parse_mesh_shape

    initialize_distributed()
    devices = jax.local_devices() if per_process else jax.devices()
    if text is None:
        return make_mesh(1, 1, 1, devices=devices[:1])
    data, fsdp, tensor = parse_mesh_shape(text)
    return make_mesh(data, fsdp, tensor, devices=devices)


def _convert(args) -> int:
    from opsd_jax.checkpoint.hf import load_hf_groups, save_hf
    from opsd_jax.checkpoint.orbax import restore_params_lazily, save_param_groups

    mesh = _mesh(args.mesh)
    # Both directions stream one parameter group (the embedding, a layer, ...) at a time.
    if args.from_hf and args.to_orbax:
        config, groups = load_hf_groups(args.from_hf, dtype=args.dtype or "float32", mesh=mesh)
        save_param_groups(groups, config, args.to_orbax, overwrite=args.overwrite)
        print(f"wrote {args.to_orbax} ({config.model_type}, {config.num_layers} layers, {config.param_dtype})")
        return 0
    if args.from_orbax and args.to_hf:
        if not args.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
        config, params = restore_params_lazily(args.from_orbax, mesh=mesh)
        save_hf(params, config, args.to_hf, dtype=args.dtype, overwrite=args.overwrite,
                max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {args.to_hf} ({config.model_type}, dtype {args.dtype or config.hf_dtype})")
        return 0
    raise SystemExit("convert needs --from-hf DIR --to-orbax DIR, or --from-orbax DIR --to-hf DIR")


def _serve(args) -> int:
    import signal
    import threading

    from opsd_jax.checkpoint.loading import default_stop_token_ids, load_for_serving
    from opsd_jax.sampler import Engine, Orchestrator, SamplerConfig
    from opsd_jax.sampler.server import CompletionServer, CompletionService

    # A multi-process launch (every host of a pod) starts one independent replica per process.
    mesh = _mesh(args.mesh, per_process=True)
    config, params, tokenizer, side_dir = load_for_serving(args.checkpoint, dtype=args.dtype, mesh=mesh)
    engine = Engine(config, SamplerConfig(max_slots=args.max_slots, max_sequence_length=args.max_sequence_length,
                                          max_prompt_length=args.max_prompt_length,
                                          valid_vocab_size=min(len(tokenizer), config.vocab_size)), mesh=mesh)
    print(f"decode state: {engine.decode_state_bytes / 2**30:.2f} GiB for {args.max_slots} slots x "
          f"{engine.max_sequence_length} tokens ({engine.num_pages} KV pages of {engine.page_size} rows)")
    orchestrator = Orchestrator(engine, params)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    service = CompletionService(orchestrator, tokenizer, name, default_stop_token_ids(tokenizer, side_dir))
    try:
        server = CompletionServer(service, args.host, args.port).start()
    except BaseException:
        orchestrator.close(deadline_s=0)
        raise
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        for handled in (signal.SIGINT, signal.SIGTERM):  # a second signal ends the process at once
            signal.signal(handled, signal.SIG_DFL)

    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, on_signal)
    print(f"serving {name} at {server.url} (SIGTERM or Ctrl-C stops: requests in flight get "
          f"{args.shutdown_timeout:g} s to finish)", flush=True)
    while not stop.wait(0.5):
        if not orchestrator.healthy:
            print(f"the sampler failed ({orchestrator.error!r}); stopping", file=sys.stderr, flush=True)
            server.shutdown(deadline_s=0)
            return 1
    print(f"stopping: admitting no new requests; {orchestrator.active_requests()} in flight", flush=True)
    server.shutdown(deadline_s=args.shutdown_timeout)
    print("stopped", flush=True)
    return 0


def _eval(args) -> int:
    from opsd_jax.eval.cli import run

    return run(args, _mesh)


def _analyze(args) -> int:
    from opsd_jax.analysis.cli import run

    return run(args, _mesh)


def _train(args) -> int:
    from opsd_jax.config import load_config
    from opsd_jax.distill.trainer import Trainer

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    history = trainer.run(resume=args.resume)
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.5f}, divergence {last['divergence']:.5f}; "
              f"metrics in {config.train.output_dir}/metrics.jsonl")
    if trainer.preempted_step is not None:
        return config.train.preemption_exit_code  # a restart code: the scheduler relaunches, which resumes
    return 0


def _resume_mode(args) -> None:
    """`--resume` alone means `always` (what the flag meant before modes); a value that is not a
    mode but an override (`--resume train.steps=3`, the old spelling) goes back to the overrides."""
    from opsd_jax.distill.checkpoints import RESUME_MODES

    if args.resume not in RESUME_MODES:
        if "=" not in args.resume:
            raise ValueError(f"--resume: {args.resume!r} is not one of {', '.join(RESUME_MODES)}")
        args.overrides.insert(0, args.resume)
        args.resume = "always"


def _export(args) -> int:
    from opsd_jax.distill.trainer import export_checkpoint

    model_checkpoint = args.model_checkpoint
    if model_checkpoint is None:
        from opsd_jax.config import load_config

        run_config = os.path.join(args.run_dir, "config.yaml")
        if not os.path.exists(run_config):
            raise FileNotFoundError(f"{run_config} not found: is {args.run_dir} a run's train.output_dir?")
        model_checkpoint = load_config(run_config).model.checkpoint
    path = export_checkpoint(args.run_dir, args.step, args.to_hf, model_checkpoint=model_checkpoint)
    print(f"wrote {path}")
    return 0


def _data(args) -> int:
    import pyarrow.parquet

    from opsd_jax.data import builders

    build = {"openthoughts": builders.build_openthoughts, "countdown": builders.build_countdown}[args.dataset]
    for name, path in build(args.source, args.out).items():
        rows = pyarrow.parquet.read_metadata(path).num_rows
        expected = builders.EXPECTED_ROWS.get(name)
        note = "" if expected is None else f" (the paper's build: {expected:,})"
        checksum = builders.content_checksum(path, builders.CHECKSUM_COLUMNS[args.dataset])
        print(f"{path}: {rows:,} rows{note}, content sha256 {checksum}")
    return 0


def _prompt_tokens(value: str | None, config):
    """(trainer.PromptLengths or None, where they came from): --prompt-tokens STUDENT,TEACHER, else
    measured from the config's data and tokenizer where this host has both, else None (the plan
    then takes data.max_prompt_tokens)."""
    from opsd_jax.distill.trainer import PromptLengths, TrainingError, measured_prompt_lengths

    if value is None:
        try:
            return measured_prompt_lengths(config), f"measured from {config.data.path}"
        except TrainingError as e:
            raise ValueError(f"data: {e}") from None
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--prompt-tokens: expected STUDENT,TEACHER (two positive token counts), got {value!r}")
    return PromptLengths(int(parts[0]), int(parts[1])), "from --prompt-tokens"


def _plan(args) -> int:
    from opsd_jax.config import load_config
    from opsd_jax.plan.planner import format_report, plan_run, write_json
    from opsd_jax.plan.programs import PlanInputError
    from opsd_jax.plan.topology import TopologyError, parse_topology

    try:
        config = load_config(args.config, args.overrides)
        prompts, prompts_source = _prompt_tokens(args.prompt_tokens, config)
        report = plan_run(config, parse_topology(args.topology),
                          programs=tuple(p.strip() for p in args.programs.split(",") if p.strip()),
                          eval_slots=args.eval_slots, kernel_impl=args.kernel_impl, model_config=args.model_config,
                          teacher_config=args.teacher_config, progress=lambda line: print(line, flush=True),
                          num_slices=args.num_slices, prompts=prompts, prompts_source=prompts_source)
    except (PlanInputError, TopologyError, ValueError, FileNotFoundError) as e:
        print(f"opsd-jax plan: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "tpu" not in str(e).lower():
            raise
        first = str(e).splitlines()[0]
        hint = ("" if "lockfile" in first else "; is libtpu installed? pip install -e '.[tpu]'")
        print(f"opsd-jax plan: error: the TPU compiler did not start ({first}){hint}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0 if report["all_fit"] else 2


def _launch(args) -> int:
    from opsd_jax.launch.cli import run

    return run(args)


def _tiny_model(args) -> int:
    from opsd_jax.checkpoint.atomic import atomic_directory
    from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        save_tiny_hf_model(args.architecture, staging, seed=args.seed)
        save_tiny_tokenizer(staging)
    print(f"wrote {args.out} (tiny random {args.architecture} with a {args.architecture}-style chat tokenizer)")
    return 0


def _selfcheck(args) -> int:
    import time

    from opsd_jax.selfcheck import run_demo

    workdir = args.workdir or user_path(os.path.join("runs", "selfcheck", time.strftime("%Y%m%d-%H%M%S")))
    return run_demo(workdir=workdir, mesh_text=args.mesh)


def _demo(args) -> int:
    from opsd_jax.toyworld.experiment import (
        ExperimentSettings,
        console_table,
        default_output_dir,
        run_experiment,
    )

    out = args.out or user_path(default_output_dir())
    settings = ExperimentSettings(train_problems=args.train_problems, eval_problems=args.eval_problems,
                                  steps=args.steps, batch_size=args.batch_size, samples=args.samples, seed=args.seed,
                                  seeds=args.seeds, fixes=args.fixes,
                                  **({"checkpoints": args.checkpoints} if args.checkpoints else {}))
    print(f"toy-world experiment -> {out}", flush=True)
    result = run_experiment(out, settings)
    print("\n" + console_table(result))
    print(f"\nreport: {os.path.join(out, 'report.md')}  metrics: {os.path.join(out, 'metrics.json')}  "
          f"plots: {out}/accuracy_vs_budget.png, {out}/training_markers.png, {out}/analysis/*/*.png  "
          f"({result['seconds']:.0f} s)")
    ok = all(p["ok"] for p in result["preconditions"])
    print("demo finished" if ok else "demo finished, but a precondition failed: the claims above mean little")
    return 0 if ok else 1


def _toyworld_warmstart(args) -> int:
    from opsd_jax.checkpoint.atomic import atomic_directory
    from opsd_jax.toyworld.warmstart import warm_start

    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        manifest = warm_start(staging, names=args.models.split(",") if args.models else None, steps=args.steps,
                              seed=args.seed)
    for name, record in manifest.items():
        print(f"{name}: {record['steps']} steps, seed {record['seed']}, loss {record['first_losses'][0]:.4f} -> "
              f"{record['final_loss']:.4f}")
    print(f"wrote {args.out}")
    return 0


def _toyworld_vet_teacher(args) -> int:
    import json
    import time

    from opsd_jax.eval.generations import write_atomic
    from opsd_jax.toyworld.experiment import teacher_bar, teacher_bar_text

    out = args.out or user_path(os.path.join("runs", "vet-teacher", time.strftime("%Y%m%d-%H%M%S")))
    for flag, folder in (("TEACHER", args.teacher), ("--thinker", args.thinker)):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise SystemExit(f"{flag} {folder}: no config.json there; give the model's own folder (for a "
                             "`toyworld warmstart` output, its teacher/ or thinker/)")
    bar = teacher_bar(args.thinker, args.teacher, out)
    write_atomic(os.path.join(out, "bar.json"), json.dumps({"thinker": args.thinker, "teacher": args.teacher, **bar},
                                                           indent=2) + "\n")
    print(teacher_bar_text(bar))
    print(f"wrote {os.path.join(out, 'bar.json')}")
    return 0 if bar["ok"] else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="HF safetensors <-> Orbax checkpoints")
    convert.add_argument("--from-hf", metavar="DIR", type=user_path)
    convert.add_argument("--to-orbax", metavar="DIR", type=user_path)
    convert.add_argument("--from-orbax", metavar="DIR", type=user_path)
    convert.add_argument("--to-hf", metavar="DIR", type=user_path)
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                         help="parameter dtype (to Orbax: default float32; to HF: the original)")
    convert.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                         help="device mesh to place parameters on, e.g. 1,-1,1 (default: one device)")
    convert.add_argument("--max-shard-gb", type=float, default=5.0, help="HF export shard size")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")
    convert.set_defaults(run=_convert)

    serve = commands.add_parser("serve", help="OpenAI-compatible /v1/completions and /v1/chat/completions")
    serve.add_argument("--checkpoint", required=True, metavar="DIR", type=user_path, help="HF folder or opsd-jax Orbax checkpoint")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (the URL is printed)")
    serve.add_argument("--model-name", help="the served model name (default: the folder name); a request naming "
                       "another model gets a 404, as from vLLM")
    serve.add_argument("--max-slots", type=int, default=8, help="sequences decoded together")
    serve.add_argument("--max-sequence-length", type=int, help="prompt + generated tokens per sequence")
    serve.add_argument("--max-prompt-length", type=int, metavar="TOKENS",
                       help="the longest prompt expected: the KV pool then holds every slot at full length plus one "
                            "such prompt instead of a whole extra sequence (longer prompts are still served, and may "
                            "wait for pages)")
    serve.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    serve.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                       help="this process's device mesh (default: one device); a multi-process launch starts one "
                            "server per process, each on its own devices")
    serve.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM/Ctrl-C, how long requests in flight may finish before they are cancelled")
    serve.set_defaults(run=_serve)

    from opsd_jax.eval.cli import add_arguments as add_eval_arguments

    evaluate = commands.add_parser("eval", help="avg@k / pass@k on math suites at token budgets (resumable)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)
    parser.set_defaults(eval_parser=evaluate)

    from opsd_jax.analysis.cli import add_arguments as add_analyze_arguments

    analyze = commands.add_parser("analyze", help="entropies, fork rates, self-correction markers, token-level signal")
    add_analyze_arguments(analyze)
    analyze.set_defaults(run=_analyze)

    train = commands.add_parser("train", help="on-policy (self-)distillation from a YAML run config")
    train.add_argument("--config", required=True, metavar="YAML", type=user_path)
    train.add_argument("--resume", nargs="?", const="always", default="auto", metavar="auto|always|never",
                       help="auto (default): continue from the latest checkpoint when train.output_dir holds "
                            "checkpoints of the same config, start fresh when it holds none, refuse (naming the "
                            "differing keys) when the config differs; always (or a bare --resume): continue whatever "
                            "config wrote them; never: refuse a directory that holds checkpoints. After a SIGTERM "
                            "the run saves and exits with train.preemption_exit_code (42), which asks for a restart")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.add_argument("--cpu-devices", type=int, help="emulate this many CPU devices")
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="write a training checkpoint's student as an HF folder")
    export.add_argument("--run", dest="run_dir", required=True, metavar="DIR", type=user_path, help="the run's train.output_dir")
    export.add_argument("--step", type=int, help="default: the latest checkpoint")
    export.add_argument("--model-checkpoint", metavar="DIR", type=user_path,
                        help="config and tokenizer files (default: the run's model.checkpoint)")
    export.add_argument("--to-hf", required=True, metavar="DIR", type=user_path)
    export.set_defaults(run=_export)

    data = commands.add_parser("data", help="rebuild the paper's training sets from local copies of their sources")
    data.add_argument("dataset", choices=("openthoughts", "countdown"),
                      help="openthoughts: Ashkchamp/Openthoughts_math_filtered_30K; countdown: "
                           "jasonrqh/Countdown-CoT-20k (train split, the hub's schema)")
    data.add_argument("source", type=user_path, help="parquet / JSON Lines file or saved dataset folder")
    data.add_argument("out", type=user_path, metavar="OUT_DIR", help="where the parquet files go (e.g. data/raw)")
    data.set_defaults(run=_data)

    plan = commands.add_parser(
        "plan", help="compile a run's train step and samplers for a TPU topology on this host; per-chip fit")
    plan.add_argument("--config", required=True, metavar="YAML", type=user_path)
    plan.add_argument("--topology", required=True,
                      help="v5e-N / v6e-N (chips) or v4-N / v5p-N (TensorCores), e.g. v5p-64")
    plan.add_argument("--num-slices", type=int, default=1,
                      help="slices of --topology joined over DCN (multi-slice): train.mesh is one slice's mesh and "
                           "the slices repeat its data axis, as the trainer builds it")
    plan.add_argument("--programs", default="train,rollout,eval,analyze",
                      help="which of train, rollout, eval, analyze to compile")
    plan.add_argument("--eval-slots", type=int, default=8, help="evaluation sampler slots (eval --max-slots)")
    plan.add_argument("--kernel-impl", default=None, choices=("auto", "xla", "pallas_tpu", "reference"),
                      help="the train step's divergence kernel (default: the config's train.kernel; auto is what "
                           "the job picks, xla); another choice asks what-if")
    plan.add_argument("--model-config", metavar="DIR", type=user_path,
                      help="folder with the student's config.json (default: from model.checkpoint, else the "
                           "packaged config of the same name)")
    plan.add_argument("--teacher-config", metavar="DIR", type=user_path, help="the same for an external teacher")
    plan.add_argument("--prompt-tokens", metavar="STUDENT,TEACHER",
                      help="the data's longest student and teacher prompts, in tokens: the trainer sizes its step "
                           "and rollout pool by them and prints them at start-up (default: measured as the trainer "
                           "does where this host has data.path and model.checkpoint's tokenizer, else "
                           "data.max_prompt_tokens for both, the most the config allows)")
    plan.add_argument("--json", metavar="FILE", type=user_path, help="also write the report as JSON")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value")
    plan.set_defaults(run=_plan)

    from opsd_jax.launch.cli import add_arguments as add_launch_arguments

    launch = commands.add_parser(
        "launch", help="run on a TPU VM slice, a queued resource, or GKE (JobSet / XPK); --dry-run prints "
                       "exactly the commands")
    add_launch_arguments(launch)
    launch.set_defaults(run=_launch)

    tiny = commands.add_parser(
        "tiny-model", help="write a tiny random HF checkpoint with a small chat tokenizer (for trying every "
                           "command on a laptop; needs torch)")
    tiny.add_argument("out", metavar="DIR", type=user_path)
    tiny.add_argument("--architecture", default="qwen3", choices=("qwen3", "olmo2", "olmo3"))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    tiny.set_defaults(run=_tiny_model)

    from opsd_jax.toyworld.experiment import ExperimentSettings

    toy = ExperimentSettings()
    demo = commands.add_parser(
        "demo", help="the main job on CPU: the toy-world OPSD experiment (train OPD/OPSD conditions from "
                     "warm-started toy models, evaluate at several budgets, analyze forks and markers, "
                     "report each paper claim)")
    demo.add_argument("--out", type=user_path, help="output folder (default: runs/demo/<date-time>)")
    demo.add_argument("--steps", type=int, default=toy.steps, help="training steps per condition")
    demo.add_argument("--batch-size", type=int, default=toy.batch_size, help="rollouts per step")
    demo.add_argument("--samples", type=int, default=toy.samples, help="evaluation samples per problem")
    demo.add_argument("--seeds", type=int, default=toy.seeds, help="training runs per condition")
    demo.add_argument("--train-problems", type=int, default=toy.train_problems)
    demo.add_argument("--eval-problems", type=int, default=toy.eval_problems)
    demo.add_argument("--seed", type=int, default=toy.seed)
    demo.add_argument("--fixes", action="store_true",
                      help="also train OPSD dense with the vanilla teacher at fork tokens (objective.fork_teacher), "
                           "and report it against OPSD dense and the base")
    demo.add_argument("--checkpoints", type=user_path, help="warm-started models (default: those shipped; "
                                                            "`opsd-jax toyworld warmstart` writes them)")
    demo.set_defaults(run=_demo)

    selfcheck = commands.add_parser(
        "selfcheck", help="CPU self-check: tiny random HF checkpoints converted both ways with logits vs "
                          "transformers, then a short OPSD run on 8 emulated devices")
    selfcheck.add_argument("--workdir", type=user_path, help="where to write the checkpoints and run "
                                                             "(default: runs/selfcheck/<date-time>)")
    selfcheck.add_argument("--mesh", default="2,2,2", metavar="DATA,FSDP,TENSOR")
    selfcheck.add_argument("--cpu-devices", type=int, default=8)
    selfcheck.set_defaults(run=_selfcheck)

    toyworld = commands.add_parser("toyworld", help="the toy world's tools")
    toyworld_commands = toyworld.add_subparsers(dest="toyworld_command", required=True)
    warm = toyworld_commands.add_parser(
        "warmstart", help="regenerate the warm-started toy models (supervised, objective.kind=sft) into DIR")
    warm.add_argument("out", metavar="DIR", type=user_path)
    warm.add_argument("--models", help="comma-separated subset of thinker,instruct,teacher")
    warm.add_argument("--steps", type=int, help="override every model's step count (for a quick check)")
    warm.add_argument("--seed", type=int, help="override every model's seed: a fresh replicate of its recipe (new "
                                               "initialisation and warm-start traces)")
    warm.add_argument("--overwrite", action="store_true")
    warm.set_defaults(run=_toyworld_warmstart)
    from opsd_jax.toyworld.warmstart import SHIPPED

    vet = toyworld_commands.add_parser(
        "vet-teacher", help="the bar a stronger teacher clears before it is shipped: at the world's forced moves "
                            "it strays credibly at most twice as often as the thinker, and greedily it solves at "
                            "least as many evaluation problems (exit 0 clears, 2 not)")
    vet.add_argument("teacher", metavar="TEACHER", type=user_path, help="the teacher's HF folder")
    vet.add_argument("--thinker", type=user_path, default=os.path.join(SHIPPED, "thinker"),
                     help="the thinker's HF folder (default: the shipped one)")
    vet.add_argument("--out", type=user_path, help="where the world, greedy generations and bar.json go "
                                                   "(default: runs/vet-teacher/<date-time>)")
    vet.set_defaults(run=_toyworld_vet_teacher)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; for `eval --config RUN.yaml`, the run config's eval section gives
    the defaults and flags given on the line still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and args.config:
        from opsd_jax.eval.cli import config_defaults

        args.eval_parser.set_defaults(**config_defaults(args.config))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"opsd-jax eval: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "train":
            _resume_mode(args)
        if args.command == "plan":
            _set_tpu_topology(args.topology)
        elif args.command == "train" and args.cpu_devices is None:
            _set_cpu_devices(_config_cpu_devices(args), force_cpu=False)
        else:
            _set_cpu_devices(getattr(args, "cpu_devices", None))
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"opsd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingError":  # anything else is a bug: keep its traceback
            raise
        print(f"opsd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

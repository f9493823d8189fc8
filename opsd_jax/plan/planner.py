"""`opsd-jax plan`: compile a run's trainer, rollout sampler, evaluation sampler and the scoring
step of `opsd-jax analyze` for a named TPU topology on this host, and say per chip whether each fits.

Verdicts: "fits" (compiled, peak per-chip bytes within the chip's HBM), "does not fit" (compiled,
over HBM: the largest arrays and remedies are listed), "does not compile" (the compiler's reason).
"""

from __future__ import annotations

import dataclasses
import math
import json

from opsd_jax.config import RunConfig
from opsd_jax.models.config import ModelConfig
from opsd_jax.plan.programs import (
    ANALYZE_BATCH,
    ANALYZE_PRIVILEGED_PROMPT_TOKENS,
    EVAL_PROMPT_TOKENS,
    PlanInputError,
    ProgramPlan,
    analyze_program,
    decode_state_bytes,
    run_model_configs,
    sampler_programs,
    train_step_program,
)
from opsd_jax.plan.topology import Topology, host_devices, topology_devices

PROGRAMS = ("train", "rollout", "eval", "analyze")
GiB = 2**30


def verdict(plan: ProgramPlan, hbm_bytes: int) -> str:
    if plan.status == "out of memory":
        return "does not fit"
    if plan.status != "compiled":
        return "does not compile"
    return "fits" if plan.total_bytes <= hbm_bytes else "does not fit"


def remedies(plan: ProgramPlan, c: RunConfig, hbm_bytes: int | None = None, *, slices: int = 1,
             prompts=None) -> list[str]:
    """Concrete changes that shrink a program that does not fit, most effective first. `prompts`:
    the PromptLengths the plan assumed (None: data.max_prompt_tokens for both)."""
    if plan.name == "train_step":
        from opsd_jax.distill.trainer import train_context_lengths

        steps = []
        excess = plan.total_bytes - hbm_bytes if hbm_bytes else 0
        if 0 < excess < plan.resident_pool_bytes:
            # The resident rollout sampler's KV page pool scales with the fraction; its weights do not.
            fraction = math.floor(c.sampling.kv_cache_fraction * (1 - excess / plan.resident_pool_bytes) * 20) / 20
            if fraction > 0:
                steps.append(f"sampling.kv_cache_fraction={fraction:g} (now {c.sampling.kv_cache_fraction:g}: a "
                             f"smaller rollout KV pool beside the step; a dry pool preempts and resumes sequences)")
        contexts = {str(n) for n in train_context_lengths(c, math.prod(plan.mesh.values()), prompts)}
        context = max(contexts, key=int)
        if any(a["shape"].count(n) >= 2 for a in plan.largest_arrays for n in contexts):
            steps.append(f"memory-efficient attention (issue 13): the largest arrays are attention scores over the "
                         f"{context}-token context, quadratic in it; meanwhile a shorter data.max_prompt_tokens")
        per_micro = c.train.batch_size // c.train.microbatches
        if per_micro > 1:
            steps.append(f"train.microbatches={min(c.train.batch_size, c.train.microbatches * 2)} "
                         f"(now {c.train.microbatches}: {per_micro} sequences per microbatch)")
        if not c.model.remat:
            steps.append("model.remat=true (recompute each layer in the backward pass)")
        if plan.mesh.get("data", 1) > slices:  # replicas within a slice each hold the whole state
            steps.append(f"train.mesh=1,-1,1 (now {c.train.mesh}: every parameter and optimizer moment sharded "
                         "over all chips of a slice)")
        if prompts is None:
            steps.append("--prompt-tokens STUDENT,TEACHER: the data's longest prompts, which the trainer prints "
                         "at start-up and sizes the step by (this plan assumed data.max_prompt_tokens for both; "
                         "run it where data.path and the checkpoint's tokenizer are, and it measures them)")
        steps.append("a larger topology")
        return steps
    if plan.name.startswith("analyze"):
        return ["fewer rollouts scored together (analyze --batch-size, down to one per chip)",
                "scoring only each rollout's first tokens (analyze --max-tokens)"]
    if plan.name.endswith("_decode"):
        return ["fewer slots (sampling.max_slots / eval --max-slots)", ("a shorter sequence (max_new_tokens / "
                "--max-tokens)"), "a smaller KV pool (sampling.kv_cache_fraction)"]
    return ["a smaller largest prefill bucket", "a shorter data.max_prompt_tokens"]


def plan_run(c: RunConfig, topology: Topology, *, programs=PROGRAMS, eval_slots: int = 8,
             kernel_impl: str | None = None, model_config: str | None = None, teacher_config: str | None = None, progress=print,
             num_slices: int = 1, prompts=None, prompts_source: str = "from --prompt-tokens") -> dict:
    """Compiles the selected programs of run `c` for `num_slices` slices of `topology`; returns the
    report dict. Several slices: `train.mesh` is one slice's mesh and the slices repeat its data
    axis over DCN (parallel.make_mesh), as the trainer builds it on the same devices. `prompts`:
    the data's longest student and teacher prompts (trainer.PromptLengths, as the trainer measures
    them; `prompts_source` says where they came from); None plans data.max_prompt_tokens for both,
    the most the config allows."""
    from opsd_jax.distill.trainer import capped_prompt_tokens, rollout_sampler_config, train_mesh
    from opsd_jax.sampler.engine import serving_mesh

    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise PlanInputError(f"--programs: unknown {sorted(unknown)}; choose from {', '.join(PROGRAMS)}")
    student, teacher, sources = run_model_configs(c, model_config, teacher_config)
    if num_slices < 1:
        raise PlanInputError(f"--num-slices must be at least 1, got {num_slices}")
    devices = topology_devices(topology, num_slices)
    processes = topology.hosts * num_slices
    try:
        # As the trainer picks it on these chips; "auto" learns their memory from the topology.
        mesh = train_mesh(c, devices, student=student, teacher=teacher, memory_bytes=topology.hbm_bytes)
    except ValueError as e:
        raise PlanInputError(f"train.mesh: {e} (topology {topology.name} has {topology.chips} chips per slice, "
                             f"{num_slices} slice(s))") from None
    local = host_devices(devices, topology, 0)
    # One process drives the whole mesh on a single host; on a pod each host samples on its own
    # chips. Either way on the sampler's own mesh (tensor parallel over KV heads), as the trainer.
    sampler_mesh = serving_mesh(student, list(mesh.devices.flat) if processes == 1 else local)
    results: list[ProgramPlan] = []
    student_prompt = capped_prompt_tokens(c, prompts and prompts.student)
    teacher_prompt = capped_prompt_tokens(c, prompts and prompts.teacher)
    sampler = rollout_sampler_config(c, max(c.train.batch_size // processes, 1), student.vocab_size, student_prompt)
    if "rollout" in programs:
        progress(f"compiling the rollout sampler on {dict(sampler_mesh.shape)} ...")
        results += sampler_programs("rollout", student, sampler, sampler_mesh, longest_prompt=student_prompt)
    if "train" in programs:
        # Kept on the chips between steps: the sampler's KV page pool and its own copy of the
        # weights (compute dtype, sampler shardings).
        pool, weights = decode_state_bytes(student, sampler, sampler_mesh)
        progress(f"compiling the train step on {dict(mesh.shape)} ...")
        results.insert(0, train_step_program(c, student, teacher, mesh, processes, resident_bytes=pool + weights,
                                             resident_pool_bytes=pool, kernel_impl=kernel_impl, prompts=prompts))
    if "eval" in programs:
        evaluation = student.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
        from opsd_jax.sampler.engine import SamplerConfig

        length = EVAL_PROMPT_TOKENS + c.eval.max_tokens
        eval_mesh = serving_mesh(evaluation, local)
        progress(f"compiling the evaluation sampler on {dict(eval_mesh.shape)} ...")
        if length > student.max_position_embeddings:
            results.append(ProgramPlan("eval_decode", "evaluation sampler", dict(eval_mesh.shape),
                                       status="does not compile",
                                       error=f"{length} tokens exceed the model's context "
                                             f"({student.max_position_embeddings})"))
        else:
            config = SamplerConfig(max_slots=eval_slots, max_sequence_length=length,
                                   max_prompt_length=EVAL_PROMPT_TOKENS, valid_vocab_size=student.vocab_size)
            results += sampler_programs("eval", evaluation, config, eval_mesh, longest_prompt=EVAL_PROMPT_TOKENS)
    analysis = None
    if "analyze" in programs:
        # `opsd-jax analyze` runs in one process: on one host's chips, parameters over all of them
        # (fsdp), each chip scoring its share of a batch's rollouts.
        from opsd_jax.parallel import make_mesh

        analyze_mesh = make_mesh(1, -1, 1, devices=local)
        shards = analyze_mesh.shape["data"] * analyze_mesh.shape["fsdp"]
        batch = -(-ANALYZE_BATCH // shards) * shards
        analysis = {"mesh_flag": "--mesh 1,-1,1", "dtype": "bfloat16", "batch_size": batch}
        # The models as `analyze` loads them (checkpoint.hf.load_hf): the checkpoint's config in
        # the --dtype, none of the run's training settings (remat and the like).
        loaded = {role: ModelConfig.from_hf(source, param_dtype=analysis["dtype"], compute_dtype=analysis["dtype"])
                  for role, source in sources.items()}
        external = loaded.get("teacher")
        for name, completion, scored_student_prompt, scored_teacher_prompt in (
                ("analyze_eval_rollouts", c.eval.max_tokens, EVAL_PROMPT_TOKENS, ANALYZE_PRIVILEGED_PROMPT_TOKENS),
                ("analyze_train_rollouts", c.sampling.max_new_tokens, student_prompt, teacher_prompt)):
            progress(f"compiling {name} on {dict(analyze_mesh.shape)} ...")
            results.append(analyze_program(name, loaded["student"], external, analyze_mesh, completion=completion,
                                           student_prompt=scored_student_prompt, teacher_prompt=scored_teacher_prompt,
                                           batch_size=batch,
                                           vanilla_is_student=c.prompt.student_thinking == c.prompt.teacher_thinking))
    rows = []
    for plan in results:
        row = dataclasses.asdict(plan)
        # A floor on the program's time: its matmuls at the chip's bf16 peak (an MFU of 1).
        peak_seconds = None if plan.flops is None else plan.flops / topology.generation.peak_bf16_flops
        row.update(total_bytes=plan.total_bytes, verdict=verdict(plan, topology.hbm_bytes), peak_seconds=peak_seconds)
        if row["verdict"] == "does not fit":
            row["remedies"] = remedies(plan, c, topology.hbm_bytes, slices=num_slices, prompts=prompts)
        rows.append(row)
    from opsd_jax.launch.grace import (
        checkpoint_bytes,
        grace_period_seconds,
        save_rate_seconds_per_gib,
    )

    state_bytes = checkpoint_bytes(c, model_config=model_config)
    return {
        # What a preemption must save before the grace period ends (launch/grace.py).
        "checkpoint": {"bytes": state_bytes, "seconds_per_gib": save_rate_seconds_per_gib(),
                       "grace_seconds": grace_period_seconds(state_bytes, hosts=processes)},
        "topology": topology.name, "jax_topology": topology.jax_name, "chips": topology.chips * num_slices,
        "slices": num_slices, "hosts": processes, "hbm_bytes_per_chip": topology.hbm_bytes, "model_configs": sources,
        "peak_bf16_flops_per_chip": topology.generation.peak_bf16_flops,
        "train_mesh": {"setting": c.train.mesh, "shape": dict(mesh.shape)},
        "prompt_tokens": {"student": student_prompt, "teacher": teacher_prompt,
                          "source": prompts_source if prompts else "data.max_prompt_tokens"},
        "eval": {"slots": eval_slots, "sequence_length": EVAL_PROMPT_TOKENS + c.eval.max_tokens,
                 "mesh_flag": "--mesh {},1,{}".format(*serving_mesh(student, local).devices.shape[::2])},
        **({"analyze": analysis} if analysis else {}),
        "programs": rows, "all_fit": all(r["verdict"] == "fits" for r in rows),
    }


def _flop_notes(r: dict) -> list[str]:
    """What a compiled program's TFLOP figure holds beyond the table: the divergence kernel's
    share against one fused sweep's matmuls, and the loops it could only count once."""
    from opsd_jax.kernels.api import KERNEL_SCOPE, STATISTICS_SCOPE

    notes = []
    kernel = r.get("kernel_flops") or {}
    if KERNEL_SCOPE in kernel:
        sweep = r.get("kernel_sweep_flops")
        against = f" = {kernel[KERNEL_SCOPE] / sweep:.3f} x one sweep's 2 N (3 Hs + Ht) V" if sweep else ""
        statistics = (f"; student statistics pass {kernel[STATISTICS_SCOPE] / 1e12:.2f}"
                      if STATISTICS_SCOPE in kernel else "")
        notes.append(f"  {r['name']}: divergence kernel {kernel[KERNEL_SCOPE] / 1e12:.2f} TFLOP{against}{statistics}")
    if r.get("attention_flops"):
        notes.append(f"  {r['name']}: splash attention {r['attention_flops'] / 1e12:.2f} TFLOP (the tiles its "
                     "masks leave, in the kernels the program runs)")
    for key, what in (("estimated_loops", "loop(s) bounded at run time, counted at the mean trips their scope "
                                          "states (chunked attention: the causal tiles of arange(T), of the "
                                          "busiest chip's queries where queries split over chips; against a "
                                          "cache, every key block)"),
                      ("runtime_loops", "loop(s) bounded at run time, counted once"),
                      ("opaque_kernels", "Pallas kernel(s) without a cost estimate, counted as 0")):
        # the op_names' last three scopes tell the loops and kernels apart
        names = list(dict.fromkeys("/".join(name.split("/")[-3:]) for name in r.get(key) or []))
        if names:
            shown = "; ".join(names[:3]) + ("; ..." if len(names) > 3 else "")
            notes.append(f"  {r['name']}: {len(names)} {what}: {shown}")
    return notes


def _prompt_line(prompts: dict) -> str:
    source = (prompts["source"] if prompts["source"] != "data.max_prompt_tokens" else
              "data.max_prompt_tokens, the most the config allows: this host lacks the data or the tokenizer; "
              "--prompt-tokens plans the data's own, which the trainer prints at start-up")
    return f"longest prompts: student {prompts['student']}, teacher {prompts['teacher']} tokens ({source})"


def format_report(report: dict) -> str:
    """The table a person reads, then what to do about each program that does not fit."""
    hbm = report["hbm_bytes_per_chip"]
    slices = report.get("slices", 1)
    over_dcn = f" x {slices} slices over DCN" if slices > 1 else ""
    lines = [f"{report['topology']} ({report['jax_topology']}){over_dcn}: {report['chips']} chips on "
             f"{report['hosts']} host(s), {hbm / GiB:.0f} GiB HBM per chip; model configs: "
             + ", ".join(f"{k} {v}" for k, v in report["model_configs"].items()),
             *([f"train.mesh {report['train_mesh']['setting']}: "
                + ", ".join(f"{axis} {size}" for axis, size in report["train_mesh"]["shape"].items())]
               if "train_mesh" in report else []),
             *([_prompt_line(report["prompt_tokens"])] if "prompt_tokens" in report else []),
             (f"{'program':<28} {'mesh d,f,t':>10} {'args':>8} {'out':>8} {'temp':>8} {'code':>7} {'resident':>8} "
             f"{'total GiB/chip':>15} {'TFLOP':>8} {'compile s':>9}  verdict")]
    for r in report["programs"]:
        mesh = ",".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        if r["status"] == "out of memory":
            lines.append(f"{r['name']:<28} {mesh:>10} {r['argument_bytes'] / GiB:>8.2f} {'':>8} "
                         f"{r['temp_bytes'] / GiB:>8.2f} {'':>7} "
                         f"{r['resident_bytes'] / GiB:>8.2f} {'>' + format(r['total_bytes'] / GiB, '.2f'):>7} / "
                         f"{hbm / GiB:<5.0f} {'':>8} {r['compile_seconds']:>9.1f}  {r['verdict']}")
            continue
        if r["status"] != "compiled":
            lines.append(f"{r['name']:<28} {mesh:>10} {'':>8} {'':>8} {'':>8} {'':>7} {'':>8} {'':>15} {'':>8} "
                         f"{r['compile_seconds']:>9.1f}  {r['verdict']}")
            continue
        flops = "" if r["flops"] is None else f"{r['flops'] / 1e12:.2f}"
        lines.append(
            f"{r['name']:<28} {mesh:>10} {r['argument_bytes'] / GiB:>8.2f} {r['output_bytes'] / GiB:>8.2f} "
            f"{r['temp_bytes'] / GiB:>8.2f} {r['code_bytes'] / 2**20:>6.1f}M {r['resident_bytes'] / GiB:>8.2f} "
            f"{r['total_bytes'] / GiB:>7.2f} / {hbm / GiB:<5.0f} {flops:>8} {r['compile_seconds']:>9.1f}  {r['verdict']}")
    for r in report["programs"]:
        if r["status"] == "compiled":
            lines += _flop_notes(r)
    for r in report["programs"]:
        if r["verdict"] == "does not compile":
            lines.append(f"\n{r['name']} does not compile: {r['error']}")
        elif r["verdict"] == "does not fit":
            largest = "; ".join(f"{a['shape']} ({a['bytes'] / GiB:.2f} GiB, {a['instruction']})"
                                for a in r["largest_arrays"])
            needed = (f"the compiler needs {r['temp_bytes'] / GiB:.2f} GiB of temporaries alone ({r['error']})"
                      if r["status"] == "out of memory" else f"{r['total_bytes'] / GiB:.2f} GiB per chip")
            lines.append(f"\n{r['name']} does not fit: {needed} > {hbm / GiB:.0f} GiB. Largest arrays: {largest}")
            lines += [f"  - try {remedy}" for remedy in r["remedies"]]
    if "checkpoint" in report:
        from opsd_jax.launch.grace import describe

        lines.append("\npreemption: " + describe(report["checkpoint"]["bytes"], hosts=report["hosts"],
                                                  seconds_per_gib=report["checkpoint"]["seconds_per_gib"]))
    peak = report.get("peak_bf16_flops_per_chip")
    floors = [f"{r['name']} {r['peak_seconds']:.3g} s" for r in report["programs"] if r.get("peak_seconds")]
    if peak and floors:
        lines.append(f"\nat the chip's bf16 peak ({peak / 1e12:.0f} TFLOP/s), each program's matmuls take at least: "
                     + ", ".join(floors) + ". A floor from compute alone: decode steps are bound by reading the "
                     "weights and the cache from HBM instead, which it does not count.")
    lines.append("\nTFLOP: the compiled program's matmuls per chip (dots, convolutions and Pallas kernels' cost "
                 "estimates; splash attention's from the tiles its masks leave, a partly masked tile counted whole), "
                 "every loop multiplied by its trip count (scanned layers, microbatches, the divergence kernel's "
                 "token blocks, the chunked attention's key blocks its causal mask leaves); any other loop bounded "
                 "only at run time is counted once, a Pallas kernel without a cost estimate as 0, both named below "
                 "their program. XLA's cost_analysis(), which counts every loop body once, is in the JSON.")
    lines.append(f"\nevaluation planned as `opsd-jax eval {report['eval']['mesh_flag']} --max-slots "
                 f"{report['eval']['slots']}` ({report['eval']['sequence_length']} tokens per slot)")
    if "analyze" in report:
        a = report["analyze"]
        lines.append(f"analysis planned as `opsd-jax analyze {a['mesh_flag']} --dtype {a['dtype']} --batch-size "
                     f"{a['batch_size']}` on one host")
    lines.append("verdict: " + ("every program fits" if report["all_fit"] else "NOT every program fits"))
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    from opsd_jax.eval.generations import write_atomic

    write_atomic(path, json.dumps(report, indent=1) + "\n")

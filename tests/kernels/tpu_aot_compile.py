"""Compile the pallas_tpu fused divergence (forward + backward) for a TPU topology on this host.

    TPU_ACCELERATOR_TYPE=v5litepod-4 JAX_PLATFORMS=cpu python -m tests.kernels.tpu_aot_compile v5e:2x2
    TPU_ACCELERATOR_TYPE=v5litepod-4 JAX_PLATFORMS=cpu python -m tests.kernels.tpu_aot_compile v5e:2x2 \\
        --mesh 1,2,2 --hidden 4096 --tokens-per-chip 8192 --head-dtype float32

Run as its own process (without XLA_FLAGS: the CPU device count they set does not apply): libtpu
reads TPU_ACCELERATOR_TYPE when it loads. Default shape: the benchmark's (N=1024 tokens per chip,
H=512, V=151,936), bf16, tokens sharded over a `data` axis in a hand-written shard_map. With
--mesh: the public API's vocabulary-parallel form on a (data, fsdp, tensor) mesh, inputs placed
as the trainer places them (hidden rows over data x fsdp, heads [H, V] over (fsdp, tensor)), with
--tokens-per-chip rows per token shard (a chip holds data x fsdp's share of the tokens and
tensor's share of the vocabulary).

Prints memory_analysis() and one JSON line: memory per chip; cost_analysis() of the whole program
(per chip: the partitioned module); each Mosaic kernel's own pl.CostEstimate and scoped VMEM as
the compiled custom calls carry them; and the kernels' FLOPs against the issue-12 goal, 8 N H V
for the KLs and 12 N H V for the JSD, and against the count of pallas_tpu's design (statistics
sweep, JSD pass, one recomputation in the backward: 12 and 16 N H V), N and V per chip.

--impl xla (with --mesh): the XLA kernel in the trainer's form, a weighted loss
sum(weights * divergence) with the same `weights` passed to the kernel and a mask, so its one
sweep forms the gradients and the backward only scales them. cost_analysis() counts each loop
body once; the JSON line therefore also has `jaxpr_dot_flops`: the matmul FLOPs of the traced
program with every loop run as often as it runs here (the forward sweep once per token block; the
backward's remainder sweep, bounded at run time, 0 times, which tests/kernels/test_training_path.py
checks for this loss form).

`hlo_matmul_flops` is what `opsd-jax plan` reports: the compiled program's matmuls with every
loop multiplied by its trip count (opsd_jax.plan.hlo_flops), a loop bounded at run time (here the
remainder sweep) once; `jaxpr_dot_flops_runtime_loop_once` is the jaxpr's count of the same.
`hlo_kernel_flops` is the kernel's share of it (its named scope): where the token rows are
gathered over fsdp in chunks, `kernel_flops` (the custom calls' estimates as compiled) sees one
chunk, and this sees them all.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opsd_jax import kernels
from opsd_jax.kernels import pallas_tpu
from opsd_jax.kernels.api import KERNEL_SCOPE
from opsd_jax.plan import hlo_flops

N_PER_DEVICE, H, V, VALID = 1024, 512, 151_936, 151_669


def _data_parallel(devices, beta, n_per_chip, width, head_dtype):
    """The kernel in a hand-written token-parallel shard_map (the head replicated)."""
    mesh = Mesh(devices, ("data",))

    def local_loss(hs, ws, ht, wt):
        out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=VALID, impl="pallas_tpu",
                                              interpret=False)
        return jnp.mean(out.divergence)

    def step(hs, ws, ht, wt):
        loss, grads = jax.value_and_grad(local_loss, argnums=(0, 1))(hs, ws, ht, wt)
        return jax.lax.pmean(loss, "data"), grads[0], jax.lax.psum(grads[1], "data")

    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P("data"), P(), P("data"), P()), out_specs=(P(), P("data"), P()), check_vma=False
    )
    n = n_per_chip * len(devices)
    rows, head = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, V), head_dtype, sharding=head),
    )
    return jax.jit(sharded), args


def _vocab_parallel(devices, beta, n_per_chip, width, head_dtype, mesh_shape, vocab=V, impl="pallas_tpu",
                    token_block=None, gather_token_rows=None, teacher_head_dtype=None, tied_head=False):
    """The public API with the mesh, as the train step calls it. teacher_head_dtype: default
    head_dtype (an EMA teacher); the trainer keeps a frozen or external teacher in compute dtype.
    The heads are stored as the trainer stores an untied head (parallel's "head_embed",
    "head_vocab"), or with tied_head as a tied one, the embedding's transpose ("embed", "vocab")."""
    teacher_head_dtype = head_dtype if teacher_head_dtype is None else teacher_head_dtype
    from opsd_jax.parallel import logical_sharding, make_mesh

    mesh = make_mesh(*mesh_shape, devices=devices)

    if impl == "xla":
        def loss(hs, ws, ht, wt, targets, weights):
            # The trainer's mask: padding is known only at run time, so the kernel's token-block
            # loops skip blocks at run time too.
            out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=min(VALID, vocab),
                                                  targets=targets, impl="xla", mesh=mesh, weights=weights,
                                                  mask=weights != 0,
                                                  token_block=token_block, gather_token_rows=gather_token_rows)
            return jnp.sum(weights * out.divergence)
    else:
        def loss(hs, ws, ht, wt, targets):
            out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, valid_vocab=min(VALID, vocab),
                                                  targets=targets, impl="pallas_tpu", interpret=False, mesh=mesh,
                                                  gather_token_rows=gather_token_rows)
            return jnp.mean(out.divergence) - jnp.mean(out.student_logprob)

    n = n_per_chip * mesh.shape["data"] * mesh.shape["fsdp"]
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    head = logical_sharding(mesh, ("embed", "vocab") if tied_head else ("head_embed", "head_vocab"), (width, vocab))
    args = (
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, vocab), head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n, width), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((width, vocab), teacher_head_dtype, sharding=head),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows),
    )
    if impl == "xla":
        args += (jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rows),)
    # Gradients leave sharded as their inputs are, as the train step's do (d/dh feeds the model's
    # backward with tokens split, d/dW the optimizer with the head's sharding).
    out_shardings = (NamedSharding(mesh, P()), (rows, head))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), out_shardings=out_shardings), args


def _has_dot(jaxpr) -> bool:
    return any(eqn.primitive.name == "dot_general"
               or any(_has_dot(sub) for sub in pallas_tpu.sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def dot_flops(jaxpr, dynamic_trips: list[int]) -> int:
    """Matmul FLOPs (2 x output elements x contracted size per dot_general) of a jaxpr, inside
    every sub-jaxpr (jit, shard_map: per shard, custom_vjp); scans count `length` times, a cond its
    costliest branch, and each while loop whose body holds a matmul as often as the next entry of
    `dynamic_trips` says (taken in the order the loops appear, outer before inner)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "scan":
            total += eqn.params["length"] * dot_flops(eqn.params["jaxpr"].jaxpr, dynamic_trips)
        elif name == "while":
            body = eqn.params["body_jaxpr"].jaxpr
            if _has_dot(body):
                if not dynamic_trips:
                    raise ValueError("more while loops with matmuls than trip counts given")
                trips = dynamic_trips.pop(0)
                # A loop that never runs hides the loops nested in it: they take no entry.
                total += trips and trips * dot_flops(body, dynamic_trips)
        elif name == "cond":
            total += max(dot_flops(branch.jaxpr, list(dynamic_trips)) for branch in eqn.params["branches"])
        else:
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                sub = eqn.params.get(key)
                if sub is not None:
                    total += dot_flops(getattr(sub, "jaxpr", sub), dynamic_trips)
    return total


_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"(\d+)","bytes_accessed":"(\d+)"')
_USED_VMEM = re.compile(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"')


def _kernel_kind(outputs: str) -> str:
    """Which pallas_tpu kernel a custom call is, from its output shapes: the gradient kernel
    returns d/dW [H, V] and the cores' d/dh partials [cores, N, H]; the statistics kernel eight
    running statistics (ten with targets), the JSD pass two [N, 1] vectors."""
    shapes = re.findall(r"\w+\[[\d,]*\]", outputs)
    if any(shape.count(",") == 2 for shape in shapes):
        return "grad"
    return {2: "jsd", 8: "stats", 10: "stats"}.get(len(shapes), f"{len(shapes)} outputs")


def kernel_estimates(compiled_text: str) -> list[dict]:
    """Each Mosaic custom call of a compiled module: its kind, the pl.CostEstimate it carries
    (None when it has none) and the scoped VMEM Mosaic reports using."""
    kernels = []
    for line in compiled_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        estimate, used = _ESTIMATE.search(line), _USED_VMEM.search(line)
        kernels.append({
            "kind": _kernel_kind(line.split("custom-call(")[0].split("=", 1)[1]),
            "flops": None if estimate is None else int(estimate.group(1)),
            "transcendentals": None if estimate is None else int(estimate.group(2)),
            "bytes_accessed": None if estimate is None else int(estimate.group(3)),
            "vmem_bytes": None if used is None else int(used.group(1)),
        })
    return kernels


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (\w+)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(")


def head_relayouts(compiled_text: str, width: int, vocab_per_chip: int) -> list[str]:
    """The copies and transposes of head-sized arrays ([H, v] or [v, H], any layout) in a
    compiled module, fused or not: what XLA adds when the layout it stores a head shard in is not
    the one a Mosaic kernel reads (BUILD_NOTES, issue 12). Bitcasts are free and not listed."""
    found = []
    for line in compiled_text.splitlines():
        match = _INSTRUCTION.match(line)
        # (copy-start / copy-done, tuple-shaped, move buffers between memory spaces: not relayouts)
        if match is None or match.group(3) not in ("copy", "transpose"):
            continue
        dims = sorted(int(d) for d in match.group(2).split(",") if d)
        if dims == sorted((width, vocab_per_chip)):
            found.append(line.strip().split(", metadata")[0][:200])
    return found


def flops_per_nhv(beta: float) -> tuple[int, int]:
    """(the issue-12 goal, pallas_tpu's design count) in units of N H V: the goal is one sweep that
    forms the gradients (8; 12 with the JSD's second pass); pallas_tpu's statistics sweep (4), JSD
    pass (4) and backward with one recomputation (8) make 12 for the KLs and 16 for the JSD."""
    jsd = 0.0 < beta < 1.0
    return (12, 16) if jsd else (8, 12)


def _gathers_in_chunks(devices, mesh_shape, n_per_chip, width, vocab, gather_token_rows) -> bool:
    """Whether the xla kernel gathers the token rows over fsdp (in chunks) on this mesh."""
    from opsd_jax.kernels import vocab_parallel
    from opsd_jax.parallel import make_mesh

    mesh = make_mesh(*mesh_shape, devices=devices)
    n = n_per_chip * mesh_shape[0] * mesh_shape[1]
    return bool(vocab_parallel.row_gather_axes(mesh, n, vocab, (width, width), "xla", row_bytes=2,
                                               choice=gather_token_rows))


def compile_for(topology_name: str, beta: float = 0.5, *, mesh_shape=None, n_per_chip: int = N_PER_DEVICE,
                width: int = H, head_dtype=jnp.bfloat16, vocab: int = V, impl: str = "pallas_tpu",
                token_block: int | None = None, gather_token_rows: bool | None = None, teacher_head_dtype=None,
                tied_head: bool = False):
    """(device kind, memory_analysis(), number of Mosaic custom calls in the lowered program,
    cost_analysis() of the compiled program, kernel_estimates of it, compiled text, matmul FLOPs
    per chip from the jaxpr (xla only, else None))."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    if mesh_shape is None:
        if impl != "pallas_tpu":
            raise SystemExit("--impl xla needs --mesh")
        jitted, args = _data_parallel(devices, beta, n_per_chip, width, head_dtype)
    else:
        jitted, args = _vocab_parallel(devices, beta, n_per_chip, width, head_dtype, mesh_shape, vocab, impl,
                                       token_block, gather_token_rows, teacher_head_dtype, tied_head)
    jaxpr_flops = None
    if impl == "xla":
        jaxpr = jax.make_jaxpr(jitted)(*args).jaxpr
        # The forward sweep's loop has a static bound (its skipped blocks are conds); the one
        # run-time loop is the backward's remainder sweep, which this loss form never enters.
        # (With the token rows gathered over fsdp that sweep is itself inside the run-time loop
        # over the gathered chunks holding a remainder row: the outer loop's 0 covers both.)
        trips = [0]
        jaxpr_flops = dot_flops(jaxpr, trips)
        if trips:
            raise RuntimeError("expected one run-time token-block loop in the xla program, found none")
        # As the compiled program's loop-aware count must see it: each run-time loop once.
        nested = 2 if _gathers_in_chunks(devices, mesh_shape, n_per_chip, width, vocab, gather_token_rows) else 1
        once = [1] * nested
        jaxpr_flops = (jaxpr_flops, dot_flops(jaxpr, once), nested)
        if once:
            raise RuntimeError(f"expected {nested} nested run-time loops in the xla program")
    lowered = jitted.lower(*args)
    hlo = lowered.as_text()
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (devices[0].device_kind, compiled.memory_analysis(), hlo.count("tpu_custom_call"), dict(cost),
            kernel_estimates(compiled.as_text()), compiled.as_text(), jaxpr_flops)


def report(topology, mesh_shape, beta, n_per_chip, width, head_dtype_name, vocab, kind, memory, mosaic_calls, cost,
           kernels, compiled_text="", jaxpr_flops=None, impl="pallas_tpu") -> dict:
    """The JSON line: memory per chip, the program's and the kernels' costs, and the kernels' FLOPs
    over the goal's and the design's N H V (N tokens and V vocabulary columns per chip)."""
    vocab_per_chip = vocab if mesh_shape is None else math.ceil(vocab / mesh_shape[2])
    nhv = n_per_chip * width * vocab_per_chip
    goal, design = flops_per_nhv(beta)
    kernel_flops = sum(k["flops"] or 0 for k in kernels)
    loop_aware = hlo_flops.count(compiled_text, scopes=(KERNEL_SCOPE,))
    kernel_loop_aware = loop_aware.by_scope.get(KERNEL_SCOPE, 0.0)
    return {
        "topology": topology,
        "impl": impl,
        "mesh": None if mesh_shape is None else ",".join(map(str, mesh_shape)),
        "beta": beta,
        "hidden": width,
        "tokens_per_chip": n_per_chip,
        "vocab_per_chip": vocab_per_chip,
        "head_dtype": head_dtype_name,
        "device_kind": kind,
        "mosaic_custom_calls": mosaic_calls,
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "flops": cost.get("flops", 0.0),
        "transcendentals": cost.get("transcendentals", 0.0),
        "bytes_accessed": cost.get("bytes accessed", 0.0),
        "kernels": kernels,
        "head_relayouts": head_relayouts(compiled_text, width, vocab_per_chip),
        "kernel_flops": kernel_flops,
        "goal_flops": goal * nhv,
        "design_flops": design * nhv,
        "flops_over_goal": cost.get("flops", 0.0) / (goal * nhv),
        "kernel_flops_over_design": kernel_flops / (design * nhv),
        "jaxpr_dot_flops": jaxpr_flops and jaxpr_flops[0],
        "jaxpr_dot_flops_over_goal": jaxpr_flops and jaxpr_flops[0] / (goal * nhv),
        "jaxpr_dot_flops_runtime_loop_once": jaxpr_flops and jaxpr_flops[1],
        # The remainder sweep's token-block loop, inside the loop over gathered chunks where the
        # token rows are gathered over fsdp.
        "jaxpr_runtime_loops": jaxpr_flops and jaxpr_flops[2],
        # What `opsd-jax plan` reads: the compiled program's matmuls with its loops multiplied out
        # (a loop bounded at run time counted once).
        "hlo_matmul_flops": loop_aware.flops,
        "hlo_matmul_flops_over_goal": loop_aware.flops / (goal * nhv),
        "hlo_runtime_loops": len(loop_aware.runtime_loops),
        # The kernel's share of that (its scope), which with token rows gathered in chunks is the
        # kernels' estimates times the chunks, where `kernel_flops` sees one chunk.
        "hlo_kernel_flops": kernel_loop_aware,
        "hlo_kernel_flops_over_goal": kernel_loop_aware / (goal * nhv),
        "hlo_kernel_flops_over_design": kernel_loop_aware / (design * nhv),
    }


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("topology")
    parser.add_argument("--mesh", help="data,fsdp,tensor: the API's vocabulary-parallel form on this mesh")
    parser.add_argument("--hidden", type=int, default=H)
    parser.add_argument("--tokens-per-chip", type=int, default=N_PER_DEVICE)
    parser.add_argument("--head-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--beta", type=float, default=0.5)
    # XLA lays out a head shard whose columns are no multiple of 128 (Qwen3's 151,936 / 2 or / 4)
    # column-major, and copies it for Mosaic, which wants row-major: another vocabulary size shows
    # what the kernel itself needs without those copies.
    parser.add_argument("--vocab", type=int, default=V, help="vocabulary size (with --mesh)")
    parser.add_argument("--impl", default="pallas_tpu", choices=["pallas_tpu", "xla"])
    parser.add_argument("--gather-token-rows", choices=["auto", "yes", "no"], default="auto",
                        help="xla with fsdp > 1: gather token rows instead of heads (auto: the kernel's rule)")
    parser.add_argument("--token-block", type=int, help="xla: rows per token block (default xla.fused_token_block's on TPU)")
    parser.add_argument("--teacher-head-dtype", choices=["bfloat16", "float32"],
                        help="with --mesh (default --head-dtype): a frozen or external teacher's head is in compute "
                             "dtype (bfloat16), an EMA teacher's in --head-dtype")
    parser.add_argument("--tied-head", action="store_true",
                        help="with --mesh: heads stored as a tied head (the embedding's transpose, hidden dimension "
                             "over fsdp); default as the trainer stores an untied head (vocabulary over tensor, fsdp)")
    args = parser.parse_args(argv[1:])
    mesh_shape = None if args.mesh is None else tuple(int(x) for x in args.mesh.split(","))
    compiled = compile_for(
        args.topology, args.beta, mesh_shape=mesh_shape, n_per_chip=args.tokens_per_chip, width=args.hidden,
        head_dtype=jnp.dtype(args.head_dtype), vocab=args.vocab, impl=args.impl, token_block=args.token_block,
        gather_token_rows={"auto": None, "yes": True, "no": False}[args.gather_token_rows],
        teacher_head_dtype=args.teacher_head_dtype and jnp.dtype(args.teacher_head_dtype), tied_head=args.tied_head,
    )
    print(compiled[1])
    line = report(args.topology, mesh_shape, args.beta, args.tokens_per_chip, args.hidden, args.head_dtype,
                  args.vocab if mesh_shape else V, *compiled, impl=args.impl)
    line["teacher_head_dtype"] = args.teacher_head_dtype or args.head_dtype
    line["head_storage"] = "tied" if args.tied_head else "untied"
    print(json.dumps(line))


if __name__ == "__main__":
    main(sys.argv)

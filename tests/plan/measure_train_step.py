"""Runs the plan's train step on real CPU arrays and prints, as JSON, the plan's per-device bytes
next to what the run allocated. Run in a fresh process (test_plan_is_honest.py): the device count
must be set before jax starts, and the peak resident memory is the process's own.

    python -m tests.plan.measure_train_step MODEL_DIR MESH
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.config import config_from_dict
from opsd_jax.distill.train_step import TrainState, make_optimizer
from opsd_jax.distill.trainer import optimizer_state_shardings, teacher_copy, train_mesh
from opsd_jax.models.config import ModelConfig
from opsd_jax.models.decoder import init_params
from opsd_jax.plan.programs import ProgramPlan, compile_program, train_step_inputs


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(folder: str, mesh_setting: str) -> dict:
    c = config_from_dict({"model": {"checkpoint": folder, "compute_dtype": "float32", "remat": True},
                          "data": {"max_prompt_tokens": 448}, "sampling": {"max_new_tokens": 64},
                          "train": {"batch_size": 8, "microbatches": 2, "mesh": mesh_setting}})
    student = ModelConfig.from_hf(folder, param_dtype="float32").replace(**c.model.runtime(training=True))
    mesh = train_mesh(c, jax.devices(), student=student)
    # The plan's own program and argument specs (the XLA kernel: the Mosaic one needs a TPU).
    step, specs, batch_specs, _ = train_step_inputs(c, student, None, mesh, 1, kernel_impl="xla")
    plan = compile_program(ProgramPlan("train_step", "", dict(mesh.shape)), step, specs, batch_specs)

    # Real arrays on the specs' shardings, the state built as Trainer.run builds it.
    params = init_params(student, jax.random.key(0), mesh)
    optimizer = make_optimizer(c.optimizer, c.train.steps)
    opt_state = jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                       teacher_copy(params, c.teacher.param_dtype(c.model)))
    state = jax.tree.map(lambda x, spec: jax.device_put(x, spec.sharding), state, specs)
    rng = np.random.default_rng(0)
    context = batch_specs.student_tokens.shape[1]

    def real(name, spec):
        if name.endswith("_index"):
            value = rng.integers(0, context, spec.shape)
        elif name in ("student_tokens", "teacher_tokens", "targets"):
            value = rng.integers(0, student.vocab_size, spec.shape)
        elif name == "lengths":
            value = np.full(spec.shape, c.sampling.max_new_tokens)
        elif name == "sampler_logprobs":
            value = np.full(spec.shape, -1.0)
        else:
            value = np.ones(spec.shape)
        return jax.device_put(value.astype(spec.dtype), spec.sharding)

    batch = type(batch_specs)(*[real(name, spec) for name, spec in zip(batch_specs._fields, batch_specs)])
    device = mesh.devices.flat[0]

    def on_device(tree) -> int:
        return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
                   if shard.device == device)

    compiled = step.lower(state, batch).compile()  # compiled before the measurement starts
    memory = compiled.memory_analysis()
    arguments = on_device((state, batch))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    new_state, metrics = compiled(state, batch)
    jax.block_until_ready((new_state, metrics))
    peak = _status_bytes("VmHWM")
    fields = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
    return {
        "mesh": dict(mesh.shape), "devices": len(jax.devices()),
        "plan": {k: getattr(plan, k) for k in fields},
        "compiled_for_real_arrays": {k: int(getattr(memory, k.replace("_bytes", "_size_in_bytes"))) for k in fields},
        "arguments_on_device": arguments, "outputs_on_device": on_device((new_state, metrics)),
        "output_leaves": len(jax.tree.leaves((new_state, metrics))), "state_on_device": on_device(new_state),
        "donated_deleted": all(leaf.is_deleted() for leaf in jax.tree.leaves(state)),
        "peak_growth_bytes": peak - before,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))

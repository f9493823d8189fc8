"""`opsd-jax plan` with `train.mesh: auto`: the plan compiles the train step on the mesh the rule
picks for the topology and reports it (fresh process: libtpu reads the accelerator type when it loads)."""

import json

from tests.plan.test_plan import _plan, _run_config, _tiny_model, needs_libtpu


@needs_libtpu
def test_plan_reports_the_mesh_auto_chose(tmp_path):
    """v5p-8 is 4 chips of 95 GiB. The tiny model's state is far under a quarter of a chip, so fsdp
    is 1; 8 sequences in 4 microbatches put 2 on each of 4 chips' batch axis, so tensor 2 (the
    model's 2 KV heads allow it) and data 2."""
    model = _tiny_model(tmp_path / "tiny")
    done = _plan(tmp_path, _run_config(model, mesh="auto", microbatches=4), "--topology", "v5p-8",
                 "--programs", "train")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["train_mesh"] == {"setting": "auto", "shape": {"data": 2, "fsdp": 1, "tensor": 2}}
    (train,) = report["programs"]
    assert train["name"] == "train_step" and train["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert train["verdict"] == "fits"
    assert "train.mesh auto: data 2, fsdp 1, tensor 2" in done.stdout


def test_the_all_fsdp_remedy_follows_the_mesh_chosen_not_the_setting():
    from opsd_jax.config import load_config
    from opsd_jax.plan.planner import remedies
    from opsd_jax.plan.programs import ProgramPlan

    c = load_config(None, ["train.mesh=auto", "train.microbatches=4"])

    def plan(mesh):
        return ProgramPlan("train_step", "", mesh, argument_bytes=100 * 2**30)

    replicas = remedies(plan({"data": 4, "fsdp": 1, "tensor": 2}), c, 95 * 2**30)
    assert any(r.startswith("train.mesh=1,-1,1 (now auto:") for r in replicas)
    # Data over two slices only (DCN), fsdp within each: already all fsdp.
    assert not any("train.mesh" in r for r in remedies(plan({"data": 2, "fsdp": 4, "tensor": 1}), c, 95 * 2**30,
                                                        slices=2))


def test_the_kv_fraction_remedy_shrinks_only_the_pool():
    """The v4-32 Qwen3-8B dense row (GiB per chip): 40.27 in all, of which the resident rollout
    sampler 19.80 = a 16.0 KV pool at fraction 1 + 3.8 of weights (compiled again at 0.4: 10.21
    resident). 8.27 over 32 GiB is 52% of the pool: fraction 0.45, 31.5 in all. Counting the
    weights as pool too, it said 0.55: 33.1, over."""
    from opsd_jax.config import load_config
    from opsd_jax.plan.planner import remedies
    from opsd_jax.plan.programs import ProgramPlan

    GiB = 2**30
    c = load_config(None, ["sampling.kv_cache_fraction=1.0"])
    plan = ProgramPlan("train_step", "", {"data": 1, "fsdp": 16, "tensor": 1}, argument_bytes=int(20.47 * GiB),
                       resident_bytes=int(19.80 * GiB), resident_pool_bytes=int(16.0 * GiB))
    (fraction,) = [r for r in remedies(plan, c, 32 * GiB) if r.startswith("sampling.kv_cache_fraction=")]
    assert fraction.startswith("sampling.kv_cache_fraction=0.45 (now 1:")
    # Over by more than the whole pool: no fraction helps.
    plan.argument_bytes += 17 * GiB
    assert not any(r.startswith("sampling.kv_cache_fraction=") for r in remedies(plan, c, 32 * GiB))

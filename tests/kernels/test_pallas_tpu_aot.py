"""pallas_tpu compiles through Mosaic for real TPU topologies on this CPU host (needs libtpu): the
kernel alone, at Qwen3-8B widths in its vocabulary-parallel form, and inside the trainer's own
jitted step (through `opsd-jax plan`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu absent: install the [tpu] extra")
# (topology, the accelerator type libtpu must be told about before it loads)
TOPOLOGIES = [("v5e:2x2", "v5litepod-4"), ("v6e:2x2", "v6e-4"), ("v5p:2x2x1", "v5p-8")]


def _tpu_env(accelerator=None):
    # A fresh process: conftest pins this one to CPU, and libtpu reads the accelerator type at load.
    # Compiling needs no chip: skip libtpu's one-process-per-host lock so other compiles may run beside it.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    if accelerator:
        env["TPU_ACCELERATOR_TYPE"] = accelerator
    env.pop("XLA_FLAGS", None)
    return env


def _compile(accelerator, *args):
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.tpu_aot_compile", *args],
        cwd=ROOT, env=_tpu_env(accelerator), capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines))  # memory_analysis() for the log
    return json.loads(lines[-1])


@needs_libtpu
@pytest.mark.parametrize("topology,accelerator", TOPOLOGIES)
def test_fused_kernel_compiles_for_tpu(topology, accelerator):
    report = _compile(accelerator, topology)
    assert report["device_kind"].startswith("TPU")
    # statistics, JSD second pass, and the one gradient kernel (d/dh and d/dW from a single
    # recomputation): all three must be Mosaic kernels, not interpreter HLO.
    assert report["mosaic_custom_calls"] == 3
    assert 0 < report["temp_bytes"] < 2 * 2**30
    _assert_costs_counted(report, ["stats", "jsd", "grad"])


def _assert_costs_counted(report, kinds):
    """Every Mosaic kernel carries its pl.CostEstimate into the compiled program, and
    cost_analysis() counts them: the kernels' FLOPs are the design's N H V count (tokens and
    vocabulary columns per chip; blocks padded past V and the elementwise work add a few percent
    at these small widths), and XLA's own ops around them add next to nothing."""
    kernels = report["kernels"]
    assert sorted(k["kind"] for k in kernels) == sorted(kinds)
    for k in kernels:
        assert k["flops"] > 0 and k["transcendentals"] > 0 and k["bytes_accessed"] > 0, k
    assert 1.0 <= report["kernel_flops_over_design"] < 1.06, report
    assert report["kernel_flops"] <= report["flops"] < 1.01 * report["kernel_flops"], report
    assert report["transcendentals"] >= sum(k["transcendentals"] for k in kernels)


@needs_libtpu
@pytest.mark.parametrize("gather", ["no", "yes"])
def test_vocab_parallel_kl_reports_its_flops_per_chip(gather):
    """The trainer's form (vocabulary split over tensor=2, tokens over fsdp=2) for a KL, small
    enough to compile in seconds: the kernels' FLOPs for this chip's tokens and vocabulary slice
    are 12 N H V (the statistics sweep and one recomputation in the backward). With the heads
    gathered over fsdp cost_analysis() sees them; with the token rows gathered (a chunk at a time,
    in a loop cost_analysis() counts once) the loop-aware count that `opsd-jax plan` reads does,
    and the chip holds less."""
    report = _compile("v5litepod-4", "v5e:2x2", "--mesh", "1,2,2", "--hidden", "256", "--tokens-per-chip", "512",
                      "--head-dtype", "float32", "--beta", "0", "--gather-token-rows", gather)
    assert report["tokens_per_chip"] == 512 and report["vocab_per_chip"] == 151_936 // 2
    design = report["design_flops"]
    assert 1.0 <= report["hlo_matmul_flops"] / design < 1.06, report
    assert 1.0 <= report["hlo_kernel_flops_over_design"] < 1.06, report
    if gather == "yes":
        assert report["kernel_flops"] < 0.5 * design, report  # one chunk's kernels, as compiled
        return
    _assert_costs_counted(report, ["stats", "grad"])
    # against the goal's one sweep (8 N H V): the design's 12 over 8, times the same few percent
    assert report["flops_over_goal"] == pytest.approx(12 / 8 * report["kernel_flops_over_design"], rel=0.01)


@needs_libtpu
@pytest.mark.parametrize("beta,gather", [(0.0, "no"), (0.5, "no"), (0.0, "auto")])
def test_xla_vocab_parallel_sweeps_once_for_tpu(beta, gather):
    """The XLA kernel in the trainer's weighted form on a vocabulary-split v5e mesh: the compiled
    TPU program's matmuls come to 8 N H V per chip, the goal's one sweep (for the JSD too, whose
    second pass reads the live tiles), with no Mosaic kernel, whether fsdp's shards gather the
    heads ("no") or their token rows (the rule's choice at these sizes). Counted from the jaxpr
    with the token-block loops run as often as they run (cost_analysis counts each loop body
    once)."""
    report = _compile("v5litepod-4", "v5e:2x2", "--mesh", "1,2,2", "--hidden", "256", "--tokens-per-chip", "1024",
                      "--head-dtype", "float32", "--beta", str(beta), "--impl", "xla", "--gather-token-rows", gather)
    assert report["mosaic_custom_calls"] == 0 and report["vocab_per_chip"] == 151_936 // 2
    nhv = 1024 * 256 * (151_936 // 2)
    # the h^T G product's last slice is clamped and revisits about 1% of the columns
    assert 8 * nhv <= report["jaxpr_dot_flops"] < 8.1 * nhv, report
    # The plan's count, read from the compiled TPU program, against the jaxpr's: the forward's
    # loops have static bounds; only the backward's remainder sweep (which this loss never
    # enters) is bounded at run time, and counted once, as is the loop over the gathered chunks
    # it sits in when the rows are gathered.
    assert report["jaxpr_runtime_loops"] == report["hlo_runtime_loops"] == (2 if gather == "auto" else 1), report
    if gather == "no":
        assert report["hlo_matmul_flops"] == pytest.approx(report["jaxpr_dot_flops_runtime_loop_once"], rel=1e-3)
    else:
        # Inside the chunk loop XLA computes the remainder sweep's two projections twice (into two
        # fusions each): once-counted, that block reads half a block more than the jaxpr's. The
        # forward, which is what training runs, is counted exactly.
        block = report["jaxpr_dot_flops_runtime_loop_once"] - report["jaxpr_dot_flops"]
        assert report["hlo_matmul_flops"] == pytest.approx(report["jaxpr_dot_flops_runtime_loop_once"] + block / 2,
                                                           rel=1e-3)


@needs_libtpu
@pytest.mark.parametrize("impl", ["pallas_tpu", "xla"])
def test_unaligned_vocabulary_slice_is_read_without_head_copies(impl):
    """Qwen3's 151,936 columns over tensor=4 give 37,984-column slices, no multiple of 128, which
    XLA stores column-major; the kernels read such heads vocabulary-major ([v, H], a bitcast of
    that buffer) and form d/dW the same way. Before, XLA copied both heads in and d/dW out for
    pallas_tpu, and d/dW out for xla (BUILD_NOTES, issue 12)."""
    report = _compile("v5p-8", "v5p:2x2x1", "--mesh", "1,1,4", "--hidden", "256", "--tokens-per-chip", "512",
                      "--head-dtype", "float32", "--beta", "0", "--impl", impl)
    assert report["vocab_per_chip"] == 37_984
    assert report["head_relayouts"] == [], report["head_relayouts"]
    if impl == "pallas_tpu":
        head_shard = 256 * 37_984 * 4
        # what remains: the per-token vectors and the two cores' [2, N, H] d/dh partials
        assert report["temp_bytes"] < head_shard, report["temp_bytes"]


@needs_libtpu
def test_xla_gathers_token_rows_over_fsdp_when_they_are_fewer():
    """Whole rows on fsdp=4 (the 8B configs' kind of mesh): gathering the heads over fsdp holds
    both [H, V] heads and the float32 [H, V] d/dW on every chip; gathering the 4 x 512 token rows
    and splitting the vocabulary 4 ways instead holds a quarter of each. The rule picks the rows
    here, and the compiled temporaries show the difference."""
    common = ("v5p:2x2x1", "--mesh", "1,4,1", "--hidden", "256", "--tokens-per-chip", "512",
              "--head-dtype", "float32", "--beta", "0", "--impl", "xla")
    heads = _compile("v5p-8", *common, "--gather-token-rows", "no")
    rows = _compile("v5p-8", *common, "--gather-token-rows", "auto")
    whole_head_grad = 256 * 151_936 * 4
    assert heads["temp_bytes"] > whole_head_grad, heads["temp_bytes"]
    assert rows["temp_bytes"] < heads["temp_bytes"] / 2, (rows["temp_bytes"], heads["temp_bytes"])
    nhv = 512 * 256 * 151_936  # the same per-chip work either way
    for report in (heads, rows):
        assert 8 * nhv <= report["jaxpr_dot_flops"] < 8.1 * nhv, report


def test_head_relayouts_finds_copies_and_transposes_of_head_sized_arrays():
    from tests.kernels.tpu_aot_compile import head_relayouts

    text = (
        "  %copy.45 = f32[4096,37984]{1,0:T(8,128)} copy(f32[4096,37984]{0,1:T(8,128)} %param.28), metadata={}\n"
        "  %transpose.3 = f32[37984,4096]{1,0:T(8,128)} transpose(%param.30), dimensions={1,0}\n"
        "  %bitcast.1 = f32[37984,4096]{1,0:T(8,128)} bitcast(%param.28)\n"
        "  %copy.35 = s32[8192,1]{1,0:T(8,128)} copy(%bitcast.13)\n"
        "  ROOT %copy.2 = bf16[4096,37984]{1,0} copy(%x)\n"
    )
    found = head_relayouts(text, 4096, 37_984)
    assert [line.split(" = ")[0].split()[-1] for line in found] == ["%copy.45", "%transpose.3", "%copy.2"]
    assert head_relayouts(text, 4096, 37_888) == []


@needs_libtpu
@pytest.mark.slow  # about 30 s of compiling per topology on the 2-core build host
@pytest.mark.parametrize("topology,accelerator,mesh", [
    ("v5e:2x2", "v5litepod-4", "1,2,2"), ("v5p:2x2x1", "v5p-8", "1,1,4"), ("v6e:2x2", "v6e-4", "1,4,1"),
])
def test_vocab_parallel_kernel_fits_vmem_at_qwen3_8b_widths(topology, accelerator, mesh):
    """H=4096, bf16 hidden states, float32 master heads, V=151,936, 8,192 tokens per chip: the
    block sizes chosen from the generation's VMEM budget compile (v5e overflowed 64M before)."""
    report = _compile(accelerator, topology, "--mesh", mesh, "--hidden", "4096", "--tokens-per-chip", "8192",
                      "--head-dtype", "float32")
    assert report["mosaic_custom_calls"] == 3


@needs_libtpu
def test_trainer_step_compiles_with_pallas_tpu_on_a_multi_chip_mesh(tmp_path):
    """The trainer's jitted step (via `opsd-jax plan`) with pallas_tpu (the TPU default until the
    plan counted both kernels in the real step; BUILD_NOTES, issue 12) on
    a 2x2 v5e mesh with the vocabulary split over tensor: a small model with Qwen3's 151,936-row
    head. Before the shard_map form, Mosaic refused: "cannot be automatically partitioned".

    Its compiled step has no copy of a head, whole ([128, 75,968] per tensor shard) or sliced
    further over fsdp ([128, 37,984]): the untied head is stored with its vocabulary split over
    tensor and fsdp (parallel's "head_vocab"), [128, 37,984] per chip, which XLA keeps
    column-major, and the kernels read it vocabulary-major. (When the head was stored split over
    fsdp in H, [64, 75,968] and row-major, reading it vocabulary-major made XLA copy both heads.)"""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151_936, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        torch_dtype="bfloat16")))
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"checkpoint": str(model), "compute_dtype": "bfloat16", "remat": True},
        "data": {"max_prompt_tokens": 96}, "sampling": {"max_new_tokens": 32, "max_slots": 4},
        "train": {"batch_size": 8, "microbatches": 2, "mesh": "1,2,2"}, "eval": {"max_tokens": 256}}))
    env = {k: v for k, v in _tpu_env().items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = f"--xla_dump_to={tmp_path / 'hlo'} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"
    done = subprocess.run(
        [sys.executable, "-m", "opsd_jax.cli", "plan", "--config", "run.yaml", "--topology", "v5e-4",
         "--programs", "train", "--kernel-impl", "pallas_tpu", "--json", "plan.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    (train,) = json.loads((tmp_path / "plan.json").read_text())["programs"]
    assert train["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert "via pallas_tpu" in train["description"] and train["verdict"] == "fits", train
    # The plan's FLOPs multiply the microbatches (2) and scanned layers out, where cost_analysis()
    # sees one of each (the kernel, which is most of this step, once), and find the kernel by its
    # scope: pallas_tpu's design for the JSD is 16 N H V against the one sweep's 8 (the statistics
    # sweep and the JSD pass; the kernels' elementwise work adds a little more at H = 128).
    assert train["flops"] > 1.9 * train["cost_analysis_flops"], train
    kernel = train["kernel_flops"]["fused_linear_divergence"]
    assert 2.0 <= kernel / train["kernel_sweep_flops"] < 2.3, (kernel, train["kernel_sweep_flops"])
    # splash attention's kernels count from the estimate scope around them, none as 0
    assert train["runtime_loops"] == [] and train["opaque_kernels"] == [], train
    assert 0 < train["attention_flops"] < train["flops"] - kernel, train
    from tests.kernels.tpu_aot_compile import head_relayouts

    (optimized,) = (tmp_path / "hlo").glob("*train_step*.after_optimizations.txt")
    text = optimized.read_text()
    assert "tpu_custom_call" in text
    assert head_relayouts(text, 128, 151_936 // 2) == []
    assert head_relayouts(text, 128, 151_936 // 4) == []

"""`opsd-jax selfcheck`: the plumbing on CPU, end to end, in about a minute (the former demo).

1. Conversion, checked against transformers: for a tiny random Qwen3 and a tiny random OLMo-3
   (sliding window + YaRN), write an HF checkpoint with transformers, load it onto a sharded mesh,
   compare logits with transformers' PyTorch forward on a left-padded batch, save to Orbax, restore
   onto a different mesh, export back to HF, and check the export is bit-exact and loads.
2. Training: OPSD with configs/demo_cpu.yaml on a tiny random Qwen3 with a tiny tokenizer and 64
   MATH problems shipped with the package: rollouts from the sampler, a frozen privileged teacher,
   the fused JSD, AdamW, Orbax checkpoints, metrics (JSONL + TensorBoard).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

PARITY_TOLERANCE = 1e-4


def _check_one(name: str, workdir: str, mesh, restore_mesh, rng) -> dict:
    import jax
    import transformers
    from safetensors.numpy import load_file

    from opsd_jax.checkpoint.hf import load_hf, save_hf
    from opsd_jax.checkpoint.orbax import restore_params, save_params
    from opsd_jax.models import forward
    from opsd_jax.testing import hf_logits, left_padded_batch, save_tiny_hf_model

    hf_dir = os.path.join(workdir, f"{name}-hf")
    model = save_tiny_hf_model(name, hf_dir, seed=int(rng.integers(2**31)))
    config, params = load_hf(hf_dir, mesh=mesh, progress=False)
    tokens, mask, positions = left_padded_batch(rng, [24, 17, 9, 24], config.vocab_size)
    ours = np.asarray(jax.jit(forward, static_argnums=1)(params, config, tokens, attention_mask=mask))
    reference = hf_logits(model, tokens, mask, positions)
    real = mask.astype(bool)
    parity = float(np.abs(ours[real] - reference[real]).max())

    orbax_dir = os.path.join(workdir, f"{name}-orbax")
    save_params(params, config, orbax_dir)
    restored_config, restored = restore_params(orbax_dir, mesh=restore_mesh)
    export_dir = os.path.join(workdir, f"{name}-export")
    save_hf(restored, restored_config, export_dir, progress=False)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(export_dir, "model.safetensors"))
    bit_exact = original.keys() == exported.keys() and all(
        original[k].tobytes() == exported[k].tobytes() for k in original
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    reload_diff = float(np.abs(hf_logits(reloaded, tokens, mask, positions) - reference)[real].max())
    return {
        "model": name,
        "layers": config.num_layers,
        "parity": parity,
        "bit_exact": bit_exact,
        "reload_diff": reload_diff,
        "ok": parity <= PARITY_TOLERANCE and bit_exact and reload_diff == 0.0,
    }


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cpu.yaml")
DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "samples", "math_demo.jsonl")


def run_training_demo(root: str, mesh_text: str) -> bool:
    """Trains the demo config in `root`; returns whether every loss was finite."""
    from opsd_jax.config import load_config
    from opsd_jax.distill.trainer import Trainer
    from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

    model_dir = os.path.join(root, "model")
    save_tiny_hf_model("qwen3", model_dir, seed=0)
    save_tiny_tokenizer(model_dir)
    overrides = [f"model.checkpoint={model_dir}", f"train.output_dir={os.path.join(root, 'run')}",
                 f"data.path={DEMO_DATA}", f"train.mesh={mesh_text}"]
    if not os.path.exists(DEMO_CONFIG):
        raise FileNotFoundError(f"{DEMO_CONFIG} not found: run the demo from a checkout of the repository")
    config = load_config(DEMO_CONFIG, overrides)
    print(f"\ntraining: {config.train.steps} OPSD steps, batch {config.train.batch_size}, "
          f"{config.prompt.privilege} privilege, {config.objective.kind} beta={config.objective.beta}")
    history = Trainer(config).run()
    print(f"{'step':>4} {'loss':>10} {'divergence':>11} {'H student':>10} {'H teacher':>10} {'tokens/s':>9}")
    for record in history:
        print(f"{record['step']:>4} {record['loss']:>10.5f} {record['divergence']:>11.5f} "
              f"{record['student_entropy']:>10.3f} {record['teacher_entropy']:>10.3f} {record['tokens_per_second']:>9.1f}")
    print(f"metrics: {config.train.output_dir}/metrics.jsonl, TensorBoard: {config.train.output_dir}/tensorboard")
    return all(np.isfinite(r["loss"]) for r in history)


def run_demo(workdir: str | None = None, mesh_text: str = "2,2,2") -> int:
    import jax

    from opsd_jax.parallel import make_mesh, parse_mesh_shape

    import transformers

    jax.config.update("jax_default_matmul_precision", "highest")
    transformers.utils.logging.disable_progress_bar()
    data, fsdp, tensor = parse_mesh_shape(mesh_text)
    mesh = make_mesh(data, fsdp, tensor)
    restore_mesh = make_mesh(1, -1, 1)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; load mesh {dict(mesh.shape)}, "
          f"restore mesh {dict(restore_mesh.shape)}")
    rng = np.random.default_rng()
    with tempfile.TemporaryDirectory() as scratch:
        root = workdir or scratch
        os.makedirs(root, exist_ok=True)
        results = [_check_one(name, root, mesh, restore_mesh, rng) for name in ("qwen3", "olmo3")]
        _print_conversion(results)
        trained = run_training_demo(os.path.join(root, "training"), mesh_text)
    ok = all(r["ok"] for r in results) and trained
    print(f"demo {'passed' if ok else 'FAILED'} (parity tolerance {PARITY_TOLERANCE:g})")
    return 0 if ok else 1


def _print_conversion(results) -> None:
    print(f"{'model':8} {'layers':>6} {'max|logit diff| vs transformers':>32} {'HF->JAX->HF bit-exact':>22} "
          f"{'reloaded export diff':>21}")
    for r in results:
        print(f"{r['model']:8} {r['layers']:>6} {r['parity']:>32.2e} {str(r['bit_exact']):>22} "
              f"{r['reload_diff']:>21.2e}")

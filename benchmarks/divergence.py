"""Fused linear divergence, forward + backward: opsd-jax against TRL and the naive path, same run.

    python benchmarks/divergence.py            # CPU table (N=1024, H=512, V=151936, float32)
    python benchmarks/divergence.py --weighted # CPU: the trainer's weighted loss (beta 0.5)
    python benchmarks/divergence.py --gpu      # GPU: xla and pallas_gpu, N=16384, H=4096, bf16

--weighted: the loss is the trainer's, sum_n w_n D_n with w the cotangent of a sequence mean
times a per-sequence importance scale (8 sequences of 128 tokens, a few padded), so every token's
weight differs. opsd-jax runs it three ways: as the train step does (student statistics first,
which give the importance scales, then the fused sweep with the final weights: 10 N H V FLOPs),
the kernel alone with the weights given, and without weights (its forward forms products for a
plain mean, the backward sweeps again: 16 N H V). TRL gets the same weights as a tensor (its
kernel and the GKD trainer's generalized_jsd_loss on full logits), so it does no importance pass.

Every measurement runs in its own subprocess so that one peer's allocator never pads another's
memory figure. Working memory = peak RSS during the timed call minus RSS just before it (the peak
is reset through /proc/self/clear_refs). Time = median of --repeats warm calls. The floor is
F * N * H * V FLOPs over the float32 matmul rate of the projection shape, with F=8 for the KLs
(two projections, two gradient products) and F=12 for the JSD; the rate is the higher of the one
measured first and the one measured right after each opsd-jax timing, so contention from other
jobs cannot lower the floor.

Letters: N tokens, H hidden width, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N, H, V = 1024, 512, 151_936
BETAS = (0.0, 0.5, 1.0)
PEERS = ("opsd_jax", "trl_chunked", "naive_torch")
WEIGHTED_PEERS = ("opsd_jax_train", "opsd_jax_given", "opsd_jax_unweighted", "trl_chunked_weighted", "trl_gkd_weighted")
TEMPERATURE = 1.0
SEQUENCES = N // 128


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _measure(call, repeats: int) -> dict:
    """Median wall time and largest working memory (MB) over `repeats` warm calls."""
    call()
    times, work = [], []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kb("VmRSS:")
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        work.append((_rss_kb("VmHWM:") - before) / 1024)
    return {"time_s": statistics.median(times), "times": times, "work_mb": max(work)}


def _inputs_np(n, h, v, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    # Scaled so that logits have O(1) spread, as a trained head's do.
    scale = 1.0 / np.sqrt(h)
    return (
        rng.standard_normal((n, h), np.float32),
        (rng.standard_normal((h, v), np.float32) * scale).astype(np.float32),
        rng.standard_normal((n, h), np.float32),
        (rng.standard_normal((h, v), np.float32) * scale).astype(np.float32),
    )


def _weighted_setup(seed=1):
    """(mask bool [N], targets int [N], sampler log-probs float32 [N], loss weights float32 [N]):
    8 sequences of 128 tokens with 0-40 padded at the end, and w = d loss / d D of the trainer's
    sequence mean with importance scales drawn once (the same tensor for every peer)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = N // SEQUENCES
    lengths = t - rng.integers(0, 41, SEQUENCES)
    mask = (np.arange(t)[None, :] < lengths[:, None])
    scale = rng.uniform(0.5, 2.0, SEQUENCES)
    weights = np.where(mask, scale[:, None] / lengths[:, None] / SEQUENCES, 0.0)
    targets = rng.integers(0, V, N)
    sampler = np.log(1.0 / V) + rng.normal(size=N) * 0.5
    return (mask.reshape(-1), targets.astype(np.int32), sampler.astype(np.float32),
            weights.reshape(-1).astype(np.float32))


def _opsd_weighted_worker(variant, beta, repeats):
    import jax
    import jax.numpy as jnp

    from opsd_jax import kernels
    from opsd_jax.distill import objectives

    hs, ws, ht, wt = (jnp.asarray(x) for x in _inputs_np(N, H, V))
    mask_np, targets_np, sampler_np, weights_np = _weighted_setup()
    mask, targets = jnp.asarray(mask_np), jnp.asarray(targets_np)
    weights = jnp.asarray(weights_np)
    mask_BxT = mask.reshape(SEQUENCES, -1)

    def loss(hs, ws):
        kw = dict(beta=beta, temperature=TEMPERATURE, mask=mask, targets=targets)
        if variant == "train":
            # As train_step: the student's log-probs first, the importance scales and the loss
            # weights from them, then the fused sweep that forms the gradients for those weights.
            _, logprob = kernels.student_statistics(hs, ws, temperature=TEMPERATURE, mask=mask, targets=targets)
            scale_B = objectives.sequence_importance(logprob.reshape(SEQUENCES, -1),
                                                     jnp.asarray(sampler_np).reshape(SEQUENCES, -1), mask_BxT, 2.0,
                                                     clamp="token")
            ones = mask_BxT.astype(jnp.float32)
            w = objectives.loss_weights(ones, mask_BxT, scale_B, "sequence_mean").reshape(-1)
            out = kernels.fused_linear_divergence(hs, ws, ht, wt, weights=w, **kw)
            return objectives.reduce_loss(out.divergence.reshape(SEQUENCES, -1), ones, mask_BxT, scale_B,
                                          "sequence_mean")
        out = kernels.fused_linear_divergence(hs, ws, ht, wt, weights=weights if variant == "given" else None, **kw)
        return jnp.sum(weights * out.divergence)

    return _measure_step(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), hs, ws, repeats)


def worker_opsd_jax_train(beta, repeats):
    return _opsd_weighted_worker("train", beta, repeats)


def worker_opsd_jax_given(beta, repeats):
    return _opsd_weighted_worker("given", beta, repeats)


def worker_opsd_jax_unweighted(beta, repeats):
    return _opsd_weighted_worker("unweighted", beta, repeats)


def worker_trl_chunked_weighted(beta, repeats):
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hs, ws, ht, wt = _inputs_np(N, H, V)
    weights = torch.from_numpy(_weighted_setup()[3])
    hs = torch.from_numpy(hs).requires_grad_()
    ws = torch.from_numpy(ws.T.copy()).requires_grad_()  # TRL's head is [V, H]
    ht, wt = torch.from_numpy(ht), torch.from_numpy(wt.T.copy())

    def call():
        hs.grad = ws.grad = None
        div, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, TEMPERATURE)
        (weights * div).sum().backward()

    return _measure(call, repeats)


def worker_trl_gkd_weighted(beta, repeats):
    """TRL's GKDTrainer.generalized_jsd_loss on full logits (its trainer's own path), per token
    (reduction="none" summed over the vocabulary), weighted."""
    import torch
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    hs, ws, ht, wt = _inputs_np(N, H, V)
    weights = torch.from_numpy(_weighted_setup()[3])
    hs = torch.from_numpy(hs).requires_grad_()
    ws = torch.from_numpy(ws).requires_grad_()
    ht, wt = torch.from_numpy(ht), torch.from_numpy(wt)

    def call():
        hs.grad = ws.grad = None
        with torch.no_grad():
            teacher = ht @ wt
        jsd = GKDTrainer.generalized_jsd_loss(hs @ ws, teacher, beta=beta, temperature=TEMPERATURE, reduction="none")
        (weights * jsd.sum(-1)).sum().backward()

    return _measure(call, repeats)


def worker_opsd_jax(beta, repeats):
    import jax
    import jax.numpy as jnp

    from opsd_jax import kernels

    hs, ws, ht, wt = (jnp.asarray(x) for x in _inputs_np(N, H, V))

    @jax.jit
    def step(hs, ws):
        def loss(hs, ws):
            out = kernels.fused_linear_divergence(hs, ws, ht, wt, beta=beta, temperature=TEMPERATURE)
            return jnp.mean(out.divergence)

        return jax.value_and_grad(loss, argnums=(0, 1))(hs, ws)

    return _measure_step(step, hs, ws, repeats)


def _measure_step(step, hs, ws, repeats: int) -> dict:
    """Times a jitted step(hs, ws); adds XLA's memory account and the same-process matmul rate."""
    import jax
    import jax.numpy as jnp

    N, H = hs.shape
    V = ws.shape[1]
    compiled = step.lower(hs, ws).compile()
    memory = compiled.memory_analysis()
    result = _measure(lambda: jax.block_until_ready(compiled(hs, ws)), repeats)
    # XLA's own account (temporaries + outputs) cross-checks the RSS figure, which an allocator
    # that keeps freed pages between calls could understate.
    result["xla_mb"] = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
    # The matmul rate again, in this process right after the timed calls: on a shared machine the
    # floor must see the same contention as the kernel it judges.
    mm = jax.jit(jnp.dot).lower(hs, ws).compile()
    result["mm_flops"] = 2.0 * N * H * V / _measure(lambda: jax.block_until_ready(mm(hs, ws)), repeats)["time_s"]
    return result


def worker_trl_chunked(beta, repeats):
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hs, ws, ht, wt = _inputs_np(N, H, V)
    hs = torch.from_numpy(hs).requires_grad_()
    ws = torch.from_numpy(ws.T.copy()).requires_grad_()  # TRL's head is [V, H]
    ht, wt = torch.from_numpy(ht), torch.from_numpy(wt.T.copy())

    def call():
        hs.grad = ws.grad = None
        div, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, TEMPERATURE)
        div.mean().backward()

    return _measure(call, repeats)


def worker_naive_torch(beta, repeats):
    import math

    import torch

    hs, ws, ht, wt = _inputs_np(N, H, V)
    hs = torch.from_numpy(hs).requires_grad_()
    ws = torch.from_numpy(ws).requires_grad_()
    ht, wt = torch.from_numpy(ht), torch.from_numpy(wt)

    def call():
        hs.grad = ws.grad = None
        ls = torch.log_softmax((hs @ ws) / TEMPERATURE, dim=-1)
        with torch.no_grad():
            lt = torch.log_softmax((ht @ wt) / TEMPERATURE, dim=-1)
        if beta == 0.0:
            div = (lt.exp() * (lt - ls)).sum(-1)
        elif beta == 1.0:
            div = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
            div = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
        div.mean().backward()

    return _measure(call, repeats)


def worker_matmul(_beta, repeats):
    """float32 FLOP/s of the [N, H] @ [H, V] projection, the best of JAX and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    hs, ws, _, _ = _inputs_np(N, H, V)
    a, b = jnp.asarray(hs), jnp.asarray(ws)
    mm = jax.jit(jnp.dot)
    jax_s = _measure(lambda: jax.block_until_ready(mm(a, b)), repeats)["time_s"]
    ta, tb = torch.from_numpy(hs), torch.from_numpy(ws)
    torch_s = _measure(lambda: ta @ tb, repeats)["time_s"]
    flops = 2.0 * N * H * V
    return {"jax_flops": flops / jax_s, "torch_flops": flops / torch_s, "flops": flops / min(jax_s, torch_s)}


WORKERS = {
    "opsd_jax": worker_opsd_jax,
    "trl_chunked": worker_trl_chunked,
    "naive_torch": worker_naive_torch,
    "matmul": worker_matmul,
    "opsd_jax_train": worker_opsd_jax_train,
    "opsd_jax_given": worker_opsd_jax_given,
    "opsd_jax_unweighted": worker_opsd_jax_unweighted,
    "trl_chunked_weighted": worker_trl_chunked_weighted,
    "trl_gkd_weighted": worker_trl_gkd_weighted,
}


def _spawn(name, beta, repeats):
    cmd = [sys.executable, __file__, "--worker", name, "--beta", str(beta), "--repeats", str(repeats)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} beta={beta} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_table(repeats: int, peers=PEERS) -> str:
    rate = _spawn("matmul", 0.0, repeats)
    load = os.getloadavg()[0]
    lines = [
        f"N={N} H={H} V={V} float32, forward+backward (student hidden and head), median of {repeats}; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start",
        f"float32 matmul rate of the projection: {rate['flops'] / 1e9:.1f} GFLOP/s "
        f"(jax {rate['jax_flops'] / 1e9:.1f}, torch {rate['torch_flops'] / 1e9:.1f})",
        "",
        "| beta | opsd-jax s | TRL s | naive s | time/TRL (goal <=0.6) | floor s (F) | time/floor (goal <=1.5) "
        "| opsd-jax MB (XLA temp+out) | TRL MB | naive MB | mem/TRL (goal <=0.5) | mem/naive (goal <=0.1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for beta in BETAS:
        r = {p: _spawn(p, beta, repeats) for p in peers}
        f = 12 if 0.0 < beta < 1.0 else 8
        floor = f * N * H * V / max(rate["flops"], r["opsd_jax"]["mm_flops"])
        ours, trl, naive = r["opsd_jax"], r["trl_chunked"], r["naive_torch"]
        lines.append(
            f"| {beta} | {ours['time_s']:.2f} | {trl['time_s']:.2f} | {naive['time_s']:.2f} "
            f"| {ours['time_s'] / trl['time_s']:.2f} | {floor:.2f} ({f}) | {ours['time_s'] / floor:.2f} "
            f"| {ours['work_mb']:.0f} ({ours['xla_mb']:.0f}) | {trl['work_mb']:.0f} | {naive['work_mb']:.0f} "
            f"| {ours['work_mb'] / trl['work_mb']:.2f} | {ours['work_mb'] / naive['work_mb']:.3f} |"
        )
        print(f"  beta={beta}: " + json.dumps(r), file=sys.stderr, flush=True)
    return "\n".join(lines)


def weighted_table(repeats: int, betas=(0.5,)) -> str:
    """The trainer's weighted loss: opsd-jax's three ways against TRL's kernel and its GKD loss."""
    rate = _spawn("matmul", 0.0, repeats)
    load = os.getloadavg()[0]
    lines = [
        (f"N={N} H={H} V={V} float32, weighted loss (sequence mean x importance, {SEQUENCES} sequences), "
         f"forward+backward (student hidden and head), median of {repeats}; {os.cpu_count()} CPUs, "
         f"load average {load:.1f} at start"),
        f"float32 matmul rate of the projection: {rate['flops'] / 1e9:.1f} GFLOP/s",
        "",
        ("| beta | peer | s | MB (XLA temp+out) | time / TRL kernel | mem / TRL kernel | time / TRL GKD "
         "| mem / TRL GKD | floor s (F) | time / floor |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    flops = {"opsd_jax_train": 10, "opsd_jax_given": 8, "opsd_jax_unweighted": 16}
    for beta in betas:
        r = {p: _spawn(p, beta, repeats) for p in WEIGHTED_PEERS}
        trl, gkd = r["trl_chunked_weighted"], r["trl_gkd_weighted"]
        best_rate = max([rate["flops"]] + [r[p]["mm_flops"] for p in flops])
        for peer in WEIGHTED_PEERS:
            m = r[peer]
            mb = f"{m['work_mb']:.0f}" + (f" ({m['xla_mb']:.0f})" if "xla_mb" in m else "")
            floor = ""
            if peer in flops:
                seconds = flops[peer] * N * H * V / best_rate
                floor = f"| {seconds:.2f} ({flops[peer]}) | {m['time_s'] / seconds:.2f} "
            else:
                floor = "| | "
            lines.append(
                f"| {beta} | {peer} | {m['time_s']:.2f} | {mb} | {m['time_s'] / trl['time_s']:.2f} "
                f"| {m['work_mb'] / trl['work_mb']:.2f} | {m['time_s'] / gkd['time_s']:.2f} "
                f"| {m['work_mb'] / gkd['work_mb']:.2f} {floor}|"
            )
        print(f"  beta={beta}: " + json.dumps(r), file=sys.stderr, flush=True)
    return "\n".join(lines)


def gpu_table(repeats: int) -> str:
    """xla and pallas_gpu at N=16384, H=4096, V=151936 bf16: TFLOP/s against a bf16 matmul of the
    projection shape, device working memory against the naive jnp path."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opsd_jax import kernels

    n, h, v = 16384, 4096, 151_936
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    hs = jax.random.normal(k1, (n, h), jnp.bfloat16)
    ws = (jax.random.normal(k2, (h, v), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    ht = jax.random.normal(k3, (n, h), jnp.bfloat16)
    wt = (jax.random.normal(k4, (h, v), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    device = jax.devices()[0]

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    mm_rate = 2.0 * n * h * v / timed(lambda: jax.block_until_ready(mm(hs, ws)))

    def step_for(impl):
        def loss(a, b):
            if impl == "naive":
                ls = jax.nn.log_softmax(jnp.dot(a, b, preferred_element_type=jnp.float32), -1)
                lt = jax.nn.log_softmax(jnp.dot(ht, wt, preferred_element_type=jnp.float32), -1)
                return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1))
            return jnp.mean(kernels.fused_linear_divergence(a, b, ht, wt, beta=0.0, impl=impl).divergence)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    lines = [
        f"GPU {device.device_kind}: N={n} H={h} V={v} bf16, beta=0, forward+backward; "
        f"bf16 matmul {mm_rate / 1e12:.1f} TFLOP/s",
        "| impl | s | TFLOP/s at 8NHV | / matmul | temp MB (compiled) | / naive |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    for impl in ("naive", "xla", "pallas_gpu"):
        step = step_for(impl)
        try:
            temp = step.lower(hs, ws).compile().memory_analysis().temp_size_in_bytes / 2**20
            seconds = timed(lambda: jax.block_until_ready(step(hs, ws)))
        except Exception as err:  # an out-of-memory naive path is itself a result
            lines.append(f"| {impl} | failed: {type(err).__name__}: {str(err)[:80]} | | | | |")
            continue
        results[impl] = temp
        rate = 8.0 * n * h * v / seconds
        rel = temp / results["naive"] if "naive" in results else float("nan")
        lines.append(f"| {impl} | {seconds:.3f} | {rate / 1e12:.1f} | {rate / mm_rate:.2f} | {temp:.0f} | {rel:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="run the GPU table instead of the CPU one")
    parser.add_argument("--weighted", action="store_true",
                        help="the trainer's weighted loss (beta 0.5 unless --betas) instead of the mean-loss table")
    parser.add_argument("--betas", type=float, nargs="+", default=None, help="betas of the --weighted table")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.beta, args.repeats)))
        return
    if args.gpu:
        print(gpu_table(args.repeats))
    elif args.weighted:
        print(weighted_table(args.repeats, tuple(args.betas or (0.5,))))
    else:
        print(cpu_table(args.repeats))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

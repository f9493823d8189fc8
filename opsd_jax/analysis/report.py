"""Writes an analysis result: metrics.json, report.md and PNG plots, each under a temporary name
then renamed, so a kill never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os

from opsd_jax.eval.generations import write_atomic

SPANS = ("all", "thinking", "answer")


def _finite(x):
    """NaN (an undefined CI) -> None: metrics.json stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def public(result: dict) -> dict:
    """The result without the per-position arrays kept for plotting (keys starting with _)."""
    return _finite({**result, "groups": {label: {k: v for k, v in g.items() if not k.startswith("_")}
                                         for label, g in result["groups"].items()}})


def _fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(pair, digits=3):
    return "—" if pair is None or any(v is None or v != v for v in pair) else f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _divergence_name(beta: float) -> str:
    return {0.0: "forward KL", 1.0: "reverse KL"}.get(float(beta), f"generalized JSD, beta {beta:g}")


def _divergence_lines(divergence: dict) -> list[str]:
    lines = [f"Per-token divergence between the student and each teacher ({_divergence_name(divergence['beta'])}, "
             "the trainer's full-vocabulary objective); forks are the student's:", "",
             "| teacher | all tokens | at forks [95% CI] | elsewhere [95% CI] | share at forks (forks' share of tokens) "
             "| at markers [95% CI] |", "| --- | --- | --- | --- | --- | --- |"]
    for which in ("privileged", "vanilla"):
        d = divergence[which]
        marker = d["at_markers"].get("any", {"positions": 0})
        at_marker = f"{_fmt(marker['mean'])} {_ci(marker['ci95'])}" if marker["positions"] else "—"
        lines.append(f"| {which} | {_fmt(d['all']['mean'])} | {_fmt(d['at_forks']['mean'])} "
                     f"{_ci(d['at_forks']['ci95'])} | {_fmt(d['off_forks']['mean'])} {_ci(d['off_forks']['ci95'])} | "
                     f"{_fmt(d['share_at_forks'])} ({_fmt(d['fork_share_of_tokens'])}) | {at_marker} |")
    return lines + [""]


def _beyond_context_lines(beyond: dict) -> list[str]:
    """A warning paragraph per model that scored rollouts past its context (analyze.beyond_context)."""
    lines = []
    for name, count in beyond.items():
        if count["rollouts"]:
            lines += [f"**Past the context:** {count['rollouts']} rollouts run past the {name}'s {count['limit']} "
                      f"positions; {count['tokens']} of their tokens are scored at positions the model was not "
                      "trained at.", ""]
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Diagnostics (privileged context: {s['privileged']})", ""]
    for label, g in result["groups"].items():
        lines += [f"## {label}", "", f"{g['rollouts']} rollouts, {g['tokens']} tokens ({g['thinking_tokens']} in "
                  f"thinking spans); student {g['student']}; rollouts {g['rollouts_file']}.", "",
                  *_beyond_context_lines(g.get("beyond_context", {})),
                  f"Fork rate: share of positions with entropy > {g['fork_threshold_nats']:.4f} nats "
                  f"({g['fork_threshold_source']}); entropies are of the models' own distributions (temperature 1, "
                  "not the sampling temperature). 95% intervals: bootstrap over problems, each with all its "
                  "rollouts.", "",
                  "| distribution | mean entropy (nats) | fork rate: all [95% CI] | thinking | answer |",
                  "| --- | --- | --- | --- | --- |"]
        for name, table in g["fork_rates"].items():
            lines.append(f"| {name} | {_fmt(g['mean_entropy_nats'][name])} | "
                         + " | ".join(f"{_fmt(table[span]['fork_rate'])} {_ci(table[span]['fork_rate_ci95'])}"
                                      for span in SPANS) + " |")
        lines += ["", "| marker | count | per 1k tokens | 95% CI |", "| --- | --- | --- | --- |"]
        for category, row in g["markers"].items():
            lines.append(f"| {category} | {row['count']} | {_fmt(row['per_1k_tokens'], 2)} | "
                         f"{_ci(row['per_1k_ci95'], 2)} |")
        lines += ["", "Advantage log p_T(y_t) - log p_S(y_t) at each marker's first token:", "",
                  "| marker | positions | privileged mean [95% CI] | vanilla mean [95% CI] | sign disagreement |",
                  "| --- | --- | --- | --- | --- |"]
        for category, sig in g["signal_at_markers"].items():
            if not sig["positions"]:
                lines.append(f"| {category} | 0 | — | — | — |")
                continue
            lines.append(f"| {category} | {sig['positions']} | {_fmt(sig['privileged']['mean'])} "
                         f"{_ci(sig['privileged']['ci95'])} | {_fmt(sig['vanilla']['mean'])} "
                         f"{_ci(sig['vanilla']['ci95'])} | {_fmt(sig['sign_disagreement'])} |")
        every = g["advantage_all_tokens"]
        lines += ["", f"Over all tokens: mean advantage privileged {_fmt(every['privileged']['mean'])}, vanilla "
                  f"{_fmt(every['vanilla']['mean'])}; sign disagreement {_fmt(every['sign_disagreement'])}.", ""]
        if g.get("vanilla_teacher_is_student"):
            lines += ["The vanilla teacher is the student itself (its weights on its own prompt): its advantage and "
                      "divergence are 0 by definition, so a sign disagreement is the share of nonzero privileged "
                      "advantages.", ""]
        lines += _divergence_lines(g["divergence"])
    if result["marker_differences_vs_base"]:
        lines += [f"## Marker rates vs {result['base_group']} (per 1k tokens, bootstrap 95% CI over problems, "
                  "paired)", "",
                  "| group | marker | difference | 95% CI |", "| --- | --- | --- | --- |"]
        for label, diff in result["marker_differences_vs_base"].items():
            for category, row in diff.items():
                lines.append(f"| {label} | {category} | {row['difference']:+.2f} | {_ci(row['ci95'], 2)} |")
        lines.append("")
    lines += ["Plots: fork_rates.png, marker_rates.png, advantage_at_markers.png.", ""]
    return "\n".join(lines)


def _or_nan(x) -> float:
    return float("nan") if x is None else float(x)


def _save_figure(figure, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}.png"
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    os.replace(temporary, path)


def plot_fork_rates(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = result["groups"]
    figure, axes = plt.subplots(1, len(SPANS), figsize=(4.2 * len(SPANS), 3.4), sharey=True)
    names = ("student", "privileged_teacher", "vanilla_teacher")
    width = 0.8 / len(names)
    for ax, span in zip(axes, SPANS):
        x = np.arange(len(groups))
        for k, name in enumerate(names):
            # An empty span has no rate: no bar, rather than a bar at 0.
            values = [_or_nan(g["fork_rates"][name][span]["fork_rate"]) for g in groups.values()]
            ax.bar(x + (k - 1) * width, values, width, label=name.replace("_", " "))
        ax.set_xticks(x, list(groups), rotation=20)
        ax.set_title(f"{span} span")
    axes[0].set_ylabel("fork rate")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save_figure(figure, path)
    plt.close(figure)


def plot_marker_rates(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = result["groups"]
    categories = list(next(iter(groups.values()))["markers"])
    figure, ax = plt.subplots(figsize=(1.6 * len(categories) + 2, 3.4))
    width = 0.8 / len(groups)
    x = np.arange(len(categories))
    for k, (label, g) in enumerate(groups.items()):
        rates = np.array([_or_nan(g["markers"][c]["per_1k_tokens"]) for c in categories])
        ci = np.array([g["markers"][c]["per_1k_ci95"] for c in categories], np.float64)
        errors = np.nan_to_num(np.abs(np.stack([rates - ci[:, 0], ci[:, 1] - rates])))
        ax.bar(x + (k - (len(groups) - 1) / 2) * width, rates, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, categories)
    ax.set_ylabel("markers per 1k tokens (95% CI)")
    ax.legend(fontsize=8)
    _save_figure(figure, path)
    plt.close(figure)


def plot_advantages(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    figure, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.4), squeeze=False)
    for ax, (label, g) in zip(axes[0], groups.items()):
        samples = g["_advantage_samples"]["any"]
        if samples["privileged"]:
            ax.hist([samples["privileged"], samples["vanilla"]], bins=30, label=["privileged", "vanilla"])
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no marker positions", ha="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("log p_T(y) - log p_S(y) at marker starts")
    _save_figure(figure, path)
    plt.close(figure)


OUTPUT_FILES = ("report.md", "fork_rates.png", "marker_rates.png", "advantage_at_markers.png", "metrics.json")


def write_outputs(result: dict, out: str) -> None:
    """The report, plots and metrics.json into `out`. metrics.json goes first and comes back last,
    and the rest of an earlier set goes with it: a folder without metrics.json holds no finished
    set (a run killed while writing), and one with it holds a single run's files."""
    os.makedirs(out, exist_ok=True)
    for name in reversed(OUTPUT_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    write_atomic(os.path.join(out, "report.md"), markdown(result))
    plot_fork_rates(result, os.path.join(out, "fork_rates.png"))
    plot_marker_rates(result, os.path.join(out, "marker_rates.png"))
    plot_advantages(result, os.path.join(out, "advantage_at_markers.png"))
    write_atomic(os.path.join(out, "metrics.json"), json.dumps(public(result), indent=1, allow_nan=False) + "\n")

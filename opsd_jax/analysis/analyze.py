"""`opsd-jax analyze`: rollouts -> entropies under student / privileged teacher / vanilla teacher ->
fork rates, marker rates, token-level signal at reconsideration tokens -> report.md, metrics.json,
PNG plots.

Each rollouts file is a group (e.g. base-model rollouts, then trained-model rollouts), scored by
its own student checkpoint (one --student for all, or one per file) and one teacher; marker rate
differences are taken against the first group.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from opsd_jax.analysis import forks, markers as markers_lib, metrics, report
from opsd_jax.analysis.rollouts import RolloutSet, read_rollouts
from opsd_jax.distill.prompts import prompt_pair

DISTRIBUTIONS = (("student", "student_entropy"), ("privileged_teacher", "privileged_entropy"),
                 ("vanilla_teacher", "vanilla_entropy"))


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    privileged: str = "dense"  # dense | sparse | none
    fork_threshold: float = forks.DEFAULT_THRESHOLD_NATS
    # set: the threshold is this top quantile of the first (base) group's student entropies, and
    # holds for every group, so that a group's fork rate can differ from the base's
    top_rho: float | None = None
    max_tokens: int | None = None  # truncate rollouts (None: whole rollouts)
    batch_size: int = 4
    kernel_impl: str = "auto"
    seed: int = 0
    beta: float = 0.5  # the per-token divergence reported: generalized JSD (0 forward KL, 1 reverse KL)


def _pairs(rollout_set: RolloutSet, privilege: str, tokenizer):
    section = rollout_set.prompt
    privileged, vanilla = [], []
    for r in rollout_set.rollouts:
        needed = {"dense": "solution", "sparse": "answer"}.get(privilege)
        if needed and not getattr(r.problem, needed).strip():
            raise ValueError(f"{r.where}: problem {r.problem.id!r} has no {needed}, which --privileged {privilege} "
                             "puts in the teacher's context")
        privileged.append(prompt_pair(r.problem, dataclasses.replace(section, privilege=privilege), tokenizer))
        vanilla.append(prompt_pair(r.problem, dataclasses.replace(section, privilege="none"), tokenizer))
    return privileged, vanilla


def beyond_context(prompt_lengths, completion_lengths, limit: int) -> dict:
    """{"rollouts", "tokens", "limit"}: how many rollouts, and how many of their tokens, a model
    scores from positions at or past `limit` (its max_position_embeddings), where RoPE runs at
    positions it was not trained at. Token t (from 0) of a completion after a p-token prompt is
    predicted at position p + t - 1."""
    tokens = [max(0, min(n, p + n - 1 - limit)) for p, n in zip(prompt_lengths, completion_lengths)]
    return {"rollouts": sum(1 for t in tokens if t), "tokens": sum(tokens), "limit": limit}


def group_metrics(token_ids, scores, marker_matches, thinking, categories, settings: AnalysisSettings,
                  threshold: float | None = None, threshold_source: str | None = None, problems=None) -> dict:
    """Everything reported for one group, from per-rollout arrays (pure NumPy).

    token_ids: list of int[n_b]; scores: list of {TokenScores field: float32[n_b]};
    marker_matches: list of [MarkerMatch]; thinking: list of bool[n_b]; problems: each rollout's
    problem id, the unit the intervals resample (None: rollouts). threshold: the fork
    threshold in nats (None: from `settings`, over this group's student entropies where
    settings.top_rho is set); threshold_source: where it came from, for the report.
    """
    B = len(token_ids)
    T = max(len(t) for t in token_ids)
    mask_BxT = np.zeros((B, T), bool)
    thinking_BxT = np.zeros((B, T), bool)
    for b, ids in enumerate(token_ids):
        mask_BxT[b, : len(ids)] = True
        thinking_BxT[b, : len(ids)] = thinking[b]

    def stacked(field):
        x_BxT = np.zeros((B, T), np.float64)
        for b, s in enumerate(scores):
            x_BxT[b, : len(s[field])] = s[field]
        return x_BxT

    student_BxT = stacked("student_entropy")
    if threshold is None:
        threshold = forks.fork_threshold(student_BxT, mask_BxT, threshold=settings.fork_threshold,
                                         top_rho=settings.top_rho)
        threshold_source = threshold_source or (f"top_rho {settings.top_rho:g} of this group" if settings.top_rho
                                                else "absolute")
    fork_BxT = mask_BxT & forks.is_fork(student_BxT, threshold)  # the student's, as in its fork-rate row
    fork_table, entropy_table = {}, {}
    for name, field in DISTRIBUTIONS:
        entropy_BxT = stacked(field)
        fork_table[name] = forks.fork_rates(entropy_BxT, mask_BxT, thinking_BxT, threshold, seed=settings.seed,
                                            problems_B=problems)
        entropy_table[name] = float(entropy_BxT[mask_BxT].mean())
    rows = [(len(ids), markers_lib.marker_counts(m, categories)) for ids, m in zip(token_ids, marker_matches)]
    advantage = {which: stacked(f"{which}_logprob") - stacked("student_logprob") for which in ("privileged", "vanilla")}
    signal, samples, marker_picks = {}, {}, {}
    for category in list(categories) + ["any"]:
        picks = [(b, m.first_token) for b, ms in enumerate(marker_matches) for m in ms
                 if (category == "any" or m.category == category) and m.first_token < len(token_ids[b])]
        b_N = np.array([b for b, _ in picks], np.int64)
        t_N = np.array([t for _, t in picks], np.int64)
        marker_picks[category] = (b_N, t_N)
        p_N, v_N = advantage["privileged"][b_N, t_N], advantage["vanilla"][b_N, t_N]
        signal[category] = metrics.signal_summary(p_N, v_N, b_N, seed=settings.seed, problems_B=problems)
        samples[category] = {"privileged": p_N.tolist(), "vanilla": v_N.tolist()}
    all_tokens = {**{which: {"mean": float(a[mask_BxT].mean())} for which, a in advantage.items()},
                  "sign_disagreement": float(np.mean(np.sign(advantage["privileged"][mask_BxT])
                                                     != np.sign(advantage["vanilla"][mask_BxT])))}
    return {
        "rollouts": B, "tokens": int(mask_BxT.sum()), "thinking_tokens": int((mask_BxT & thinking_BxT).sum()),
        "fork_threshold_nats": threshold, "fork_threshold_source": threshold_source,
        "fork_rates": fork_table, "mean_entropy_nats": entropy_table,
        "markers": metrics.marker_table(rows, categories, seed=settings.seed, problems_B=problems),
        "signal_at_markers": signal, "advantage_all_tokens": all_tokens,
        "divergence": {"beta": settings.beta, **{
            which: metrics.divergence_summary(stacked(f"{which}_divergence"), mask_BxT, fork_BxT, marker_picks,
                                              seed=settings.seed, problems_B=problems)
            for which in ("privileged", "vanilla")}},
        "_marker_rows": rows, "_advantage_samples": samples, "_problems": problems,
    }


def analyze(rollout_paths, labels, student_checkpoints, teacher_checkpoint, out: str, settings: AnalysisSettings, *,
            markers_path: str | None = None, mesh=None, dtype: str = "float32", progress: bool = True) -> dict:
    """Runs the analysis and writes metrics.json, report.md and the plots under `out`."""
    from tqdm.auto import tqdm

    from opsd_jax.analysis.score import score_rollouts, vanilla_teacher_is_student
    from opsd_jax.checkpoint.loading import load_for_serving

    if settings.privileged not in ("dense", "sparse", "none"):
        raise ValueError(f"--privileged must be dense, sparse or none, got {settings.privileged!r}")
    if not 0.0 <= settings.beta <= 1.0:
        raise ValueError(f"--beta must be in [0, 1] (0 forward KL, 1 reverse KL, between the JSD), got {settings.beta}")
    if len(student_checkpoints) not in (1, len(rollout_paths)):
        raise ValueError(f"give one --student for all rollouts files or one per file ({len(rollout_paths)}), "
                         f"got {len(student_checkpoints)}")
    labels = labels or [os.path.splitext(os.path.basename(p))[0] for p in rollout_paths]
    if len(labels) != len(rollout_paths) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels must name each rollouts file once, got {labels}")
    marker_lists = markers_lib.load_markers(markers_path)
    categories = tuple(marker_lists)
    loaded = {}

    def load(path):
        if path not in loaded:
            loaded[path] = load_for_serving(path, dtype=dtype, mesh=mesh)
        return loaded[path]

    students = student_checkpoints * (len(rollout_paths) // len(student_checkpoints))
    groups = {}
    threshold = threshold_source = None  # the first group's, kept for the others
    for path, label, student_path in zip(rollout_paths, labels, students):
        student_config, student_params, tokenizer, _ = load(student_path)
        teacher_config, teacher_params, teacher_tokenizer, _ = load(teacher_checkpoint or student_path)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {teacher_checkpoint} does not share the tokenizer of student {student_path}")
        if len(tokenizer) > min(student_config.vocab_size, teacher_config.vocab_size):
            raise ValueError(f"{student_path}: the tokenizer has {len(tokenizer)} tokens, more than a model's "
                             "vocabulary")
        rollout_set = read_rollouts(path, tokenizer)
        token_ids = [list(r.token_ids[: settings.max_tokens]) for r in rollout_set.rollouts]
        privileged_pairs, vanilla_pairs = _pairs(rollout_set, settings.privileged, tokenizer)
        lengths = [len(ids) for ids in token_ids]
        beyond = {name: beyond_context([len(getattr(pair, side)) for pair in pairs], lengths,
                                       config.max_position_embeddings)
                  for name, pairs, side, config in (
                      ("student", privileged_pairs, "student_ids", student_config),
                      ("privileged_teacher", privileged_pairs, "teacher_ids", teacher_config),
                      ("vanilla_teacher", vanilla_pairs, "teacher_ids", teacher_config))}
        for name, count in beyond.items():
            if count["rollouts"]:
                print(f"opsd-jax analyze: warning: {label}: {count['rollouts']} of {len(token_ids)} rollouts run past "
                      f"the {name}'s context ({count['limit']} positions); {count['tokens']} of their tokens are "
                      "scored at positions the model was not trained at", file=sys.stderr, flush=True)
        bar = tqdm(total=len(token_ids), desc=f"scoring {label}", unit="rollout", disable=not progress)
        # The same checkpoint as teacher: its weights go to the chips once.
        own_teacher = None if teacher_params is student_params else teacher_params
        scores = score_rollouts(student_params, student_config, own_teacher, teacher_config, privileged_pairs,
                                vanilla_pairs, token_ids, batch_size=settings.batch_size, beta=settings.beta,
                                impl=settings.kernel_impl, valid_vocab=len(tokenizer), mesh=mesh,
                                progress=bar.update)
        bar.close()
        matches, thinking = [], []
        for ids in token_ids:
            text, ends = markers_lib.token_pieces(tokenizer, ids)
            matches.append(markers_lib.find_markers(text, ends, marker_lists))
            thinking.append(forks.thinking_mask(text, ends, rollout_set.prompt_opens_thinking))
        if threshold is None:
            threshold_source = (f"top_rho {settings.top_rho:g} of group {label}'s student entropies"
                                if settings.top_rho else "absolute")
        groups[label] = group_metrics(token_ids, scores, matches, thinking, categories, settings, threshold,
                                      threshold_source, [r.problem.id for r in rollout_set.rollouts])
        threshold = groups[label]["fork_threshold_nats"]
        groups[label].update(beyond_context=beyond, rollouts_file=os.path.abspath(path),
                             student=os.path.abspath(student_path),
                             vanilla_teacher_is_student=vanilla_teacher_is_student(own_teacher, vanilla_pairs))
    base = labels[0]
    differences = {label: metrics.marker_difference(groups[base]["_marker_rows"], g["_marker_rows"], categories,
                                                    seed=settings.seed, base_problems_B=groups[base]["_problems"],
                                                    problems_B=g["_problems"])
                   for label, g in groups.items() if label != base}
    result = {
        "settings": dataclasses.asdict(settings), "teacher": teacher_checkpoint and os.path.abspath(teacher_checkpoint),
        "markers": marker_lists, "base_group": base, "groups": groups, "marker_differences_vs_base": differences,
    }
    report.write_outputs(result, out)
    return result


"""The toy-world experiment (`opsd-jax demo`): the paper's pipeline end to end on the warm-started
toy models, and one line per paper claim saying whether the toy world reproduces it.

From the same warm-started thinker: vanilla OPD (the stronger teacher, no hint), privileged OPD
(the stronger teacher with the worked solution), OPSD dense and OPSD sparse (the frozen thinker
with the worked solution / the answer), all with the paper's objective (JSD beta 0.5, skip the
first 3 tokens, per-token importance cap 2). Each model, and the warm-started instruct model, is
evaluated with the project's eval runner (avg@n and pass@n on held-out problems, budgets by
truncation) and its rollouts are scored by `opsd-jax analyze` (fork rates, marker rates, teacher
advantages at reconsideration tokens).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import shutil
import time

import numpy as np

from opsd_jax.toyworld import warmstart, world

THINKER_EVAL = {"temperature": 0.6, "top_p": 0.95}  # the paper's thinking-model sampling
INSTRUCT_EVAL = {"temperature": 0.7, "top_p": 0.8}  # and its instruct-model sampling


MIN_ROLLOUTS = 10  # fewer rollouts than this give no meaningful bootstrap interval


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    teacher: str  # "self" (frozen student) or "strong"
    privilege: str  # none | dense | sparse
    fork_teacher: str = "privileged"  # objective.fork_teacher
    text: str = ""  # what a fix changes, for its report line


CONDITIONS = (
    Condition("vanilla_opd", "strong", "none"),
    Condition("privileged_opd", "strong", "dense"),
    Condition("opsd_dense", "self", "dense"),
    Condition("opsd_sparse", "self", "sparse"),
)
# Fixes to try (`opsd-jax demo --fixes`): OPSD dense whose fork tokens (the top 20% by student
# entropy, where the paper finds the privileged teacher reshapes learning) are scored by the
# frozen thinker on the student's own prompt.
FIXES = (Condition("opsd_dense_vanilla_forks", "self", "dense", fork_teacher="vanilla",
                   text="OPSD dense with the vanilla teacher (no hint) at fork tokens"),)


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    train_problems: int = 192
    eval_problems: int = 128
    steps: int = 40
    batch_size: int = 16
    learning_rate: float = 1e-3
    samples: int = 16  # per evaluation problem
    budgets: tuple[int, ...] = (16, 24, 32, 48, 64)
    max_tokens: int = 96  # rollout and evaluation cap
    seed: int = 0
    seeds: int = 2  # training runs per condition (seed, seed + 1, ...), evaluated separately
    checkpoints: str = warmstart.SHIPPED
    fixes: bool = False  # also train and evaluate the FIXES conditions


def conditions(settings: ExperimentSettings) -> tuple[Condition, ...]:
    """The conditions a run trains: the paper's, then the fixes when asked for."""
    return CONDITIONS + (FIXES if settings.fixes else ())


def write_world(root: str, settings: ExperimentSettings) -> tuple[str, str]:
    """Training prompts and the evaluation suite, from problems no warm start saw."""
    problems = warmstart.held_out_problems(warmstart.EXPERIMENT_PROBLEMS, seed=0)
    needed = settings.train_problems + settings.eval_problems
    if needed > len(problems):
        raise ValueError(f"the experiment has {len(problems)} held-out problems; {needed} were asked for")
    train = [world.problem_row(p, i, "train") for i, p in enumerate(problems[: settings.train_problems])]
    evaluation = [world.problem_row(p, i, "eval") for i, p in enumerate(problems[settings.train_problems: needed])]
    train_path, eval_path = os.path.join(root, "train.jsonl"), os.path.join(root, "toy_eval.jsonl")
    world.write_jsonl(train_path, train)
    world.write_jsonl(eval_path, evaluation)
    return train_path, eval_path


def condition_config(condition: Condition, settings: ExperimentSettings, data_path: str, run_dir: str, seed: int):
    from opsd_jax.config import config_from_dict

    teacher = ({"kind": "frozen"} if condition.teacher == "self"
               else {"kind": "external", "checkpoint": os.path.join(settings.checkpoints, "teacher")})
    return config_from_dict({
        "model": {"checkpoint": os.path.join(settings.checkpoints, "thinker"), "compute_dtype": "float32",
                  "remat": False},
        "teacher": teacher,
        "data": {"path": data_path, "max_prompt_tokens": warmstart.MAX_PROMPT_TOKENS, "shuffle_seed": seed},
        "prompt": {"privilege": condition.privilege, "student_suffix": "", "teacher_template": world.TEACHER_TEMPLATE},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": settings.max_tokens,
                     "max_slots": settings.batch_size},
        "objective": {"kind": "jsd", "beta": 0.5, "skip_first": 3, "importance_cap": 2.0,
                      "fork_teacher": condition.fork_teacher},
        "optimizer": {"learning_rate": settings.learning_rate, "warmup_ratio": 0.1},
        "train": {"output_dir": run_dir, "steps": settings.steps, "batch_size": settings.batch_size, "mesh": "1,-1,1",
                  "seed": seed, "checkpoint_every": settings.steps, "keep_checkpoints": 1,
                  "save_rollouts_every": 0},
    })


def train_condition(condition: Condition, settings: ExperimentSettings, data_path: str, root: str,
                    seed: int) -> tuple[str, list]:
    """Trains one condition with one seed; returns (its exported HF checkpoint, per-step metrics)."""
    from opsd_jax.distill.trainer import Trainer, export_checkpoint

    label = model_label(condition.name, seed - settings.seed)
    run_dir = os.path.join(root, "runs", label)
    history = Trainer(condition_config(condition, settings, data_path, run_dir, seed)).run()
    model_dir = os.path.join(root, "models", label)
    export_checkpoint(run_dir, None, model_dir, model_checkpoint=os.path.join(settings.checkpoints, "thinker"))
    return model_dir, history


def model_label(condition: str, replica: int) -> str:
    """Folder name of one trained model: the condition, then `-seedK` for replicas after the first."""
    return condition if replica == 0 else f"{condition}-seed{replica}"


def evaluate(checkpoint: str, eval_path: str, out: str, settings: ExperimentSettings, *, thinking: bool) -> dict:
    """{budget: metrics} of one model on the toy suite (the project's eval runner)."""
    from opsd_jax.eval.runner import EvalSettings, run_eval
    from opsd_jax.eval.suites import load_suite

    sampling = THINKER_EVAL if thinking else INSTRUCT_EVAL
    eval_settings = EvalSettings(n=settings.samples, max_tokens=settings.max_tokens, seed=settings.seed,
                                 enable_thinking=thinking, budgets=settings.budgets, **sampling)
    result = run_eval(checkpoint, [load_suite(eval_path)], out, eval_settings, dtype="float32",
                      max_slots=64, progress=False)
    return result["metrics"]["toy_eval"]


def analyze_groups(paths, labels, students, teacher, out: str, privileged: str) -> dict:
    from opsd_jax.analysis.analyze import AnalysisSettings, analyze

    return analyze(paths, labels, students, teacher, out, AnalysisSettings(privileged=privileged, batch_size=64),
                   progress=False)


def run_experiment(out: str, settings: ExperimentSettings = ExperimentSettings(), *, log=print) -> dict:
    """Everything into `out`: world data, runs, models, eval, analysis, report.md, metrics.json,
    plots. Returns the metrics."""
    import jax

    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    jax.config.update("jax_default_matmul_precision", "highest")
    # Every condition compiles the same sampler and step programs: compiled once, then read back
    # from this cache (beside the run folders, so a second demo starts warm too).
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(os.path.abspath(out)),
                                                                ".compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    train_path, eval_path = write_world(os.path.join(out, "world"), settings)
    models = {"base": os.path.join(settings.checkpoints, "thinker"),
              "instruct": os.path.join(settings.checkpoints, "instruct")}
    histories = {}
    for replica in range(settings.seeds):
        for condition in conditions(settings):
            label = model_label(condition.name, replica)
            log(f"[{time.perf_counter() - started:5.0f}s] training {label}: teacher {condition.teacher}, privilege "
                f"{condition.privilege}, {settings.steps} steps x {settings.batch_size} rollouts, seed "
                f"{settings.seed + replica}")
            models[label], histories[label] = train_condition(condition, settings, train_path, out,
                                                              settings.seed + replica)
    evaluation = {}
    for name, checkpoint in models.items():
        log(f"[{time.perf_counter() - started:5.0f}s] evaluating {name}")
        evaluation[name] = evaluate(checkpoint, eval_path, os.path.join(out, "eval", name), settings,
                                    thinking=name != "instruct")
    generations = {name: os.path.join(out, "eval", name, "toy_eval", "generations.jsonl") for name in models}
    log(f"[{time.perf_counter() - started:5.0f}s] analyzing rollouts")
    thinker_labels = ["base", "opsd_dense", "opsd_sparse"] + [c.name for c in FIXES if settings.fixes]
    analysis = {
        # OPSD's own teacher (the frozen thinker with the worked solution) on base and trained rollouts.
        "opsd": analyze_groups([generations[n] for n in thinker_labels], thinker_labels,
                               [models[n] for n in thinker_labels], models["base"],
                               os.path.join(out, "analysis", "opsd"), "dense"),
        "instruct": analyze_groups([generations["instruct"]], ["instruct"], [models["instruct"]], models["instruct"],
                                   os.path.join(out, "analysis", "instruct"), "dense"),
        # The stronger teacher with and without the worked solution on the base thinker's rollouts.
        "strong_teacher": analyze_groups([generations["base"]], ["base"], [models["base"]],
                                         os.path.join(settings.checkpoints, "teacher"),
                                         os.path.join(out, "analysis", "strong_teacher"), "dense"),
    }
    counts = {name: trace_counts([generations[label] for label in labels], eval_path)
              for name, labels in model_groups(settings).items() if name != "instruct"}
    _, eval_problems = suite_problems(eval_path)
    scored = (("base", models["base"]), ("stronger teacher", os.path.join(settings.checkpoints, "teacher")))
    forced_moves = {name: forced_move_stray_values(path, eval_problems, seed=settings.seed) for name, path in scored}
    give_ups = {name: hinted_give_up_values(path, eval_problems, seed=settings.seed) for name, path in scored}
    result = summarize(evaluation, analysis, histories, settings, counts, forced_moves, give_ups)
    result["seconds"] = time.perf_counter() - started
    write_report(result, out, histories)
    return result


def model_groups(settings: ExperimentSettings) -> dict[str, list[str]]:
    """{model: the evaluated labels it pools}: base and instruct alone, a condition its seeds."""
    groups = {"base": ["base"], "instruct": ["instruct"]}
    groups.update({c.name: [model_label(c.name, r) for r in range(settings.seeds)] for c in conditions(settings)})
    return groups


# Each trace-behaviour rate as (numerator, denominator): world.TraceEvents fields, "responses"
# for a rate per response.
BEHAVIOUR_RATES = {
    "attempts_per_response": ("attempts", "responses"),
    "first_try_right": ("first_try_right", "responses"),
    "slips_per_wrong_attempt": ("slips", "wrong_attempts"),
    "verified_claims": ("verified_claims", "claims"),
    "hedged_claims": ("hedged_claims", "claims"),
    "unverified_slips_closed_per_response": ("unverified_slips_closed", "responses"),
    "misses_closed_per_response": ("misses_closed", "responses"),
    "misses_accepted_per_response": ("misses_accepted", "responses"),
}
BEHAVIOUR_COLUMNS = (("attempts_per_response", "tries"), ("first_try_right", "1st right"),
                     ("slips_per_wrong_attempt", "slips/wrong"), ("verified_claims", "verified"),
                     ("hedged_claims", "hedged"), ("unverified_slips_closed_per_response", "slip boxed"),
                     ("misses_closed_per_response", "miss boxed"), ("misses_accepted_per_response", "miss ok"))


def suite_problems(suite_path: str) -> tuple[list[dict], list[world.Problem]]:
    """The rows of a suite `write_world` wrote, and their problems (same order)."""
    with open(suite_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, [world.Problem(tuple(row["numbers"]), row["target"]) for row in rows]


def trace_counts(generation_paths: list[str], eval_path: str) -> dict[str, np.ndarray]:
    """{world.TraceEvents field or "responses": float[P]}: the world's events (world.trace_events)
    in a model's full-length evaluation generations, its seeds pooled, summed per problem of the
    suite (suite order), so rates and their bootstrap intervals resample problems."""
    from opsd_jax.eval import generations

    rows, problems = suite_problems(eval_path)
    position = {row["id"]: i for i, row in enumerate(rows)}
    fields = [field.name for field in dataclasses.fields(world.TraceEvents)]
    counts = {name: np.zeros(len(rows)) for name in [*fields, "responses"]}
    for path in generation_paths:
        for record in generations.read(path).records.values():
            index = position[record["problem_id"]]
            events = world.trace_events(problems[index], record["text"])
            for name in fields:
                counts[name][index] += getattr(events, name)
            counts["responses"][index] += 1
    return counts


def behaviour_rates(counts: dict[str, np.ndarray]) -> dict:
    """The trace-behaviour rates of `trace_counts`, with the number of responses: which link of
    the paper's chain moved (search, slips, verification of claimed successes, slips boxed
    unverified, searches given up, misses accepted). Ratios of sums over problems; None where the
    denominator is 0."""
    def rate(numerator: str, denominator: str) -> float | None:
        total = counts[denominator].sum()
        return float(counts[numerator].sum() / total) if total else None

    return {"responses": int(counts["responses"].sum()),
            **{key: rate(*fraction) for key, fraction in BEHAVIOUR_RATES.items()}}


def behaviour_differences(base: dict[str, np.ndarray], other: dict[str, np.ndarray], *, resamples: int = 2_000,
                          seed: int = 0) -> dict:
    """{rate: {"difference": other - base, "ci95": [low, high]} or None}: each trace-behaviour
    rate's change, with a paired percentile bootstrap over problems (the same resampled problems
    feed both models, so problem difficulty cancels); None where either rate is undefined.
    Resamples in which a denominator is 0 are left out of that rate's interval."""
    problems = len(base["responses"])
    draws_RxP = np.random.default_rng(seed).integers(0, problems, (resamples, problems))

    def resampled(counts, numerator, denominator):
        with np.errstate(divide="ignore", invalid="ignore"):
            return counts[numerator][draws_RxP].sum(axis=1) / counts[denominator][draws_RxP].sum(axis=1)

    result = {}
    for key, (numerator, denominator) in BEHAVIOUR_RATES.items():
        if not base[denominator].sum() or not other[denominator].sum():
            result[key] = None
            continue
        changes_R = resampled(other, numerator, denominator) - resampled(base, numerator, denominator)
        changes_R = changes_R[np.isfinite(changes_R)]
        difference = (other[numerator].sum() / other[denominator].sum()
                      - base[numerator].sum() / base[denominator].sum())
        result[key] = {"difference": float(difference),
                       "ci95": [float(np.quantile(changes_R, 0.025)), float(np.quantile(changes_R, 0.975))]}
    return result


# ---- claims ------------------------------------------------------------------------------------
#
# Verdicts: "reproduced" when the effect has the claimed sign and its 95% interval excludes zero
# (bootstrap over problems, paired where two models answer the same problems), "not
# reproduced" when the point estimate has the opposite sign (or no effect where one is claimed),
# "undetermined" when the sign is the claimed one but the interval includes zero.


def _verdict(holds: bool | None) -> str:
    return {True: "reproduced", False: "not reproduced", None: "undetermined"}[holds]


def _signed(estimate: float, interval, claimed_sign: int) -> bool | None:
    """The verdict for an effect claimed to have `claimed_sign` (+1 / -1)."""
    if estimate * claimed_sign <= 0:
        return False
    low, high = interval
    return True if (low > 0 if claimed_sign > 0 else high < 0) else None


def _all(*parts: tuple[str, bool | None]) -> tuple[bool | None, str]:
    """(verdict, each part's verdict as text): a claim made of named parts holds when every part
    does, and a failed part fails it; the text says which part failed."""
    verdicts = [verdict for _, verdict in parts]
    holds = False if any(v is False for v in verdicts) else (None if any(v is None for v in verdicts) else True)
    return holds, "parts: " + ", ".join(f"{name} {_verdict(verdict)}" for name, verdict in parts)


def per_problem_accuracy(metrics_by_budget: dict) -> dict[str, np.ndarray]:
    """{budget: float[P]} per-problem accuracy in suite order."""
    return {str(b): np.array([row["accuracy"] for row in m["per_problem"]]) for b, m in metrics_by_budget.items()}


def pooled_accuracy(evaluation: dict, settings: ExperimentSettings) -> dict[str, dict[str, np.ndarray]]:
    """{model: {budget: float[P]}}; a trained condition pools the samples of its seeds."""
    pooled = {}
    for name, labels in model_groups(settings).items():
        replicas = [per_problem_accuracy(evaluation[label]) for label in labels]
        pooled[name] = {b: np.mean([r[b] for r in replicas], axis=0) for b in replicas[0]}
    return pooled


def summarize(evaluation: dict, analysis: dict, histories: dict, settings: ExperimentSettings,
              behaviour_counts: dict, forced_moves: dict, give_ups: dict | None = None) -> dict:
    """The experiment's result: accuracy, claims, preconditions, trace behaviour (from
    `behaviour_counts`, {model: trace_counts}) and its changes against the base thinker, and
    `forced_moves` ({"base" | "stronger teacher": forced_move_stray_values}: their means, and
    the teacher's difference from the thinker with its interval) and `give_ups` (the same two:
    hinted_give_up_values)."""
    from opsd_jax.eval.metrics import bootstrap_mean_interval, paired_difference

    pooled = pooled_accuracy(evaluation, settings)
    budgets = list(pooled["base"])
    shortest, longest = budgets[0], budgets[-1]
    accuracy = {name: {b: {"accuracy": float(values[b].mean()),
                           "accuracy_ci95": list(bootstrap_mean_interval(values[b], seed=settings.seed))}
                       for b in budgets} for name, values in pooled.items()}
    for name, labels in model_groups(settings).items():
        for b in budgets:
            accuracy[name][b]["per_seed"] = [evaluation[label][int(b)]["accuracy"] for label in labels]
            accuracy[name][b]["pass@k"] = evaluation[labels[0]][int(b)]["pass@k"]
            accuracy[name][b]["mean_tokens"] = float(np.mean([evaluation[label][int(b)]["length"]["mean_tokens"]
                                                              for label in labels]))

    def difference(name, budget, base="base"):
        d = paired_difference(pooled[base][budget], pooled[name][budget], seed=settings.seed)
        return d["absolute"], d["absolute_ci"]

    def fmt(d):
        return f"{d[0]:+.3f} [{d[1][0]:+.3f}, {d[1][1]:+.3f}]"

    claims = []
    # (1) OPSD lowers accuracy, most at long budgets, dense more than sparse.
    dense_long, dense_short = difference("opsd_dense", longest), difference("opsd_dense", shortest)
    sparse_long = difference("opsd_sparse", longest)
    dense_vs_sparse = difference("opsd_dense", longest, base="opsd_sparse")
    holds, parts = _all((f"dense below base at {longest}", _signed(*dense_long, -1)),
                        (f"lower at {longest} than at {shortest}", dense_long[0] < dense_short[0]),
                        (f"dense below sparse at {longest}", _signed(*dense_vs_sparse, -1)))
    claims.append({"claim": 1, "text": "OPSD lowers a thinker's accuracy, most at long budgets, dense more than sparse",
                   "verdict": _verdict(holds),
                   "evidence": f"OPSD dense - base: {fmt(dense_long)} at {longest} tokens, {fmt(dense_short)} at "
                               f"{shortest}; OPSD sparse - base at {longest}: {fmt(sparse_long)}; dense - sparse: "
                               f"{fmt(dense_vs_sparse)}; {parts}"})
    # (2) vanilla OPD from a stronger teacher helps, privileged OPD reverses that.
    vanilla = difference("vanilla_opd", longest)
    privileged = difference("privileged_opd", longest)
    privileged_vs_vanilla = difference("privileged_opd", longest, base="vanilla_opd")
    holds, parts = _all(("vanilla above base", _signed(*vanilla, +1)),
                        ("privileged below vanilla", _signed(*privileged_vs_vanilla, -1)))
    claims.append({"claim": 2, "text": "vanilla OPD from a stronger teacher helps; privileged OPD reverses that",
                   "verdict": _verdict(holds),
                   "evidence": f"at {longest} tokens: vanilla OPD - base {fmt(vanilla)}, privileged OPD - base "
                               f"{fmt(privileged)}, privileged - vanilla {fmt(privileged_vs_vanilla)}; {parts}"})
    # (3) privileged context lowers fork rates in thinker rollouts, not in instruct rollouts.
    def fork_change(table):
        p, v = table["privileged_teacher"]["all"], table["vanilla_teacher"]["all"]
        return (p["fork_rate"] or 0.0) - (v["fork_rate"] or 0.0), p, v

    thinker, tp, tv = fork_change(analysis["opsd"]["groups"]["base"]["fork_rates"])
    instruct, ip, iv = fork_change(analysis["instruct"]["groups"]["instruct"]["fork_rates"])
    # Rates of the same rollouts under two teachers: separated intervals, or the sign alone.
    thinker_lower = False if thinker >= 0 else (True if tp["fork_rate_ci95"][1] < tv["fork_rate_ci95"][0] else None)
    holds, parts = _all(("thinker forks fewer", thinker_lower),
                        ("instruct change under half the thinker's", abs(instruct) < abs(thinker) / 2))
    claims.append({"claim": 3, "text": "privileged context lowers fork rates in thinker rollouts, not in instruct rollouts",
                   "verdict": _verdict(holds),
                   "evidence": f"fork rate (student-entropy threshold), vanilla -> privileged teacher: thinker "
                               f"rollouts {tv['fork_rate']:.3f} -> {tp['fork_rate']:.3f}, instruct rollouts "
                               f"{iv['fork_rate'] or 0:.3f} -> {ip['fork_rate'] or 0:.3f}; {parts}"})
    # (4) at reconsideration tokens the privileged teacher's advantage is negative, the vanilla one's positive.
    signal = analysis["strong_teacher"]["groups"]["base"]["signal_at_markers"]["any"]
    if signal.get("rollouts", 0) < MIN_ROLLOUTS:
        holds, evidence = None, (f"{signal.get('positions', 0)} reconsideration tokens in "
                                 f"{signal.get('rollouts', 0)} rollouts: too few for an interval")
    else:
        p, v, d = signal["privileged"], signal["vanilla"], signal["privileged_minus_vanilla"]
        holds, parts = _all(("privileged negative", _signed(p["mean"], p["ci95"], -1)),
                            ("vanilla positive", _signed(v["mean"], v["ci95"], +1)))
        evidence = (f"{signal['positions']} marker tokens in {signal['rollouts']} base rollouts, stronger teacher: "
                    f"privileged advantage {fmt((p['mean'], p['ci95']))}, vanilla {fmt((v['mean'], v['ci95']))}, "
                    f"privileged - vanilla {fmt((d['mean'], d['ci95']))}")
        kinds = [(kind, s) for kind, s in analysis["strong_teacher"]["groups"]["base"]["signal_at_markers"].items()
                 if kind != "any" and s.get("positions")]
        if kinds:  # the claim is about all markers; the kinds show which of them carry its sign
            evidence += "; by marker, privileged / vanilla: " + ", ".join(
                f"{kind} {s['privileged']['mean']:+.3f} / {s['vanilla']['mean']:+.3f}" for kind, s in kinds)
        evidence += f"; {parts}"
    claims.append({"claim": 4, "text": "at self-correction tokens the privileged teacher's advantage is negative, "
                                       "the vanilla teacher's positive", "verdict": _verdict(holds), "evidence": evidence})
    # (5) fewer markers per 1,000 tokens after privileged training.
    differences = analysis["opsd"]["marker_differences_vs_base"]
    dense, sparse = differences["opsd_dense"]["any"], differences["opsd_sparse"]["any"]
    holds = _signed(dense["difference"], dense["ci95"], -1)
    base_rate = analysis["opsd"]["groups"]["base"]["markers"]["any"]["per_1k_tokens"] or 0.0
    claims.append({"claim": 5, "text": "after privileged training, fewer verification/backtracking/hedging markers",
                   "verdict": _verdict(holds),
                   "evidence": f"markers per 1k tokens: base {base_rate:.1f}; OPSD dense - base "
                               f"{fmt((dense['difference'], dense['ci95']))}; OPSD sparse - base "
                               f"{fmt((sparse['difference'], sparse['ci95']))}"})
    fixes = []
    for fix in (FIXES if settings.fixes else ()):
        # Against the paper's condition it changes (same teacher and privilege) and the base.
        unfixed = next(c.name for c in CONDITIONS if (c.teacher, c.privilege) == (fix.teacher, fix.privilege))
        long_vs_unfixed, short_vs_unfixed = (difference(fix.name, b, base=unfixed) for b in (longest, shortest))
        long_vs_base, short_vs_base = (difference(fix.name, b) for b in (longest, shortest))
        markers = analysis["opsd"]["marker_differences_vs_base"][fix.name]["any"]
        fixes.append({"fix": fix.name, "text": fix.text,
                      "evidence": f"- {unfixed}: {fmt(long_vs_unfixed)} at {longest} tokens, {fmt(short_vs_unfixed)} "
                                  f"at {shortest}; - base: {fmt(long_vs_base)} at {longest}, {fmt(short_vs_base)} at "
                                  f"{shortest}; markers per 1k - base {fmt((markers['difference'], markers['ci95']))}"})
    behaviour = {name: behaviour_rates(counts) for name, counts in behaviour_counts.items()}
    training = {name: training_summary(h) for name, h in histories.items()}
    behaviour_vs_base = {name: behaviour_differences(behaviour_counts["base"], counts, seed=settings.seed)
                         for name, counts in behaviour_counts.items() if name != "base"}
    teachers = teacher_comparison(forced_moves, give_ups, settings.seed)
    return {"settings": dataclasses.asdict(settings), "accuracy": accuracy, "claims": claims,
            "behaviour": behaviour, "behaviour_vs_base": behaviour_vs_base, "fixes": fixes,
            "preconditions": preconditions_check(accuracy, analysis, shortest, longest, teachers["forced_moves"],
                                                 teachers["forced_moves_teacher_minus_thinker"]),
            **teachers,
            "training": training,
            "training_markers_per_1k": {
                name: {end: _mean_or_none([training[label]["markers_per_1k_tokens"][end] for label in labels])
                       for end in ("first_steps", "last_steps")}
                for name, labels in model_groups(settings).items()
                if all("markers_per_1k_tokens" in training.get(label, {}) for label in labels)},
            "markers_per_1k": {label: g["markers"]["any"]["per_1k_tokens"]
                               for label, g in {**analysis["opsd"]["groups"],
                                                **analysis["instruct"]["groups"]}.items()}}


def _mean_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def training_summary(history: list[dict]) -> dict:
    """A run's loss and its rollouts' self-correction markers per 1k tokens over the first and the
    last eighth of its steps (at least one step each), token-weighted over those steps: where the
    markers went while it trained, which the evaluation after training cannot show."""
    window = max(1, len(history) // 8)

    def pooled(steps, key):
        steps = [s for s in steps if key in s]  # a step with no completion tokens logs no rate
        weights = np.array([s["rollout_length_mean"] for s in steps], np.float64)
        rates = np.array([s[key] for s in steps], np.float64)
        return float((weights * rates).sum() / weights.sum()) if weights.sum() else None

    summary = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "marker_window_steps": window}
    for key in dict.fromkeys(k for step in history for k in step if k.startswith("markers_per_1k_tokens")):
        summary[key] = {"first_steps": pooled(history[:window], key), "last_steps": pooled(history[-window:], key)}
    return summary


def preconditions_check(accuracy: dict, analysis: dict, shortest, longest, forced_moves: dict | None = None,
                        forced_move_excess: dict | None = None) -> list[dict]:
    """What the experiment needs from its warm start to mean anything, each checked. With
    `forced_moves` (the two models' mean strays) and `forced_move_excess` (forced_move_differences),
    also the forced-move part of the teacher bar: claims 2 and 4 ask what a teacher that solves
    the world better does, which a teacher that strays from the world's grammar cannot answer."""
    short, long = accuracy["base"][shortest]["accuracy"], accuracy["base"][longest]["accuracy"]
    thinker_markers = analysis["opsd"]["groups"]["base"]["markers"]["any"]["per_1k_tokens"] or 0.0
    instruct_markers = analysis["instruct"]["groups"]["instruct"]["markers"]["any"]["per_1k_tokens"] or 0.0
    checks = [
        {"check": f"thinker accuracy at {longest} tokens >= 1.5x at {shortest}",
         "value": f"{long:.3f} vs {short:.3f}", "ok": long >= 1.5 * short and long > 0},
        {"check": "thinker writes markers", "value": f"{thinker_markers:.1f} per 1k tokens", "ok": thinker_markers > 0},
        {"check": "instruct model writes few markers (< 1/4 of the thinker's rate)",
         "value": f"{instruct_markers:.1f} per 1k tokens", "ok": instruct_markers < thinker_markers / 4},
    ]
    if forced_move_excess:
        bar = forced_move_bar(forced_moves, forced_move_excess)
        checks.append({"check": "stronger teacher strays at the forced moves at most twice as often as the thinker "
                                "(upper ends of its excess vs the thinker's rates)",
                       "value": " / ".join(f"{b['upper']:+.4f}" for b in bar.values()) + " vs "
                                + " / ".join(f"{b['thinker']:.4f}" for b in bar.values()),
                       "ok": all(b["ok"] for b in bar.values())})
    return checks


# Where the world's grammar leaves every solver one move: `wait` after a try whose sum misses the
# target and after a verify that exposes a slip, `ok` after a verify of the right pair. OPD asks its
# teacher at the student's states; a teacher that strays at these moves teaches the student to stray
# (BUILD_NOTES.md, "The stronger teacher strays where every solver has one move").
FORCED_MOVES = ("after a miss", "after a verified slip", "after the right pair verified")


def forced_move_contexts(problem: world.Problem, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """{move: (response so far, the one word every solver writes next)} for `problem`, at a wrong
    pair drawn by `rng`."""
    wrong = [p for p in itertools.combinations(sorted(problem.numbers), 2) if sum(p) != problem.target]
    a, b = wrong[rng.integers(len(wrong))]
    x, y = problem.pair
    return {"after a miss": (f"<think> try {a} + {b} = {a + b}", "wait"),
            "after a verified slip": (f"<think> try {a} + {b} = {problem.target} verify {a} + {b} = {a + b}", "wait"),
            "after the right pair verified": (f"<think> try {x} + {y} = {problem.target} verify {x} + {y} = "
                                              f"{problem.target}", "ok")}


def next_word_probabilities(checkpoint: str, contexts: list[tuple[list[int], str]]) -> np.ndarray:
    """float64 [P]: for each (token ids, word) of `contexts`, the probability the model at
    `checkpoint` (an HF folder with the world's tokenizer) gives `word` next, in `contexts` order."""
    import jax
    import jax.numpy as jnp

    from opsd_jax.checkpoint.hf import load_hf
    from opsd_jax.models.decoder import forward

    tokenizer = _world_tokenizer(checkpoint)
    config, params = load_hf(checkpoint, progress=False)
    by_length = {}  # the world's prompts differ by a token or two: one batch per length, no padding
    for index, (ids, _) in enumerate(contexts):
        by_length.setdefault(len(ids), []).append(index)
    probabilities_P = np.zeros(len(contexts))
    for indices in by_length.values():
        logits = forward(params, config, jnp.asarray([contexts[i][0] for i in indices], jnp.int32))[:, -1]
        probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), np.float64)
        words = [tokenizer.convert_tokens_to_ids(contexts[i][1]) for i in indices]
        probabilities_P[indices] = probabilities[np.arange(len(indices)), words]
    return probabilities_P


def _world_tokenizer(checkpoint: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def _thinking_context(tokenizer, prompt_text: str, response: str) -> list[int]:
    """Token ids of the thinking chat prompt for `prompt_text` followed by `response`."""
    from opsd_jax.distill.prompts import chat_prompt_ids

    return chat_prompt_ids(tokenizer, prompt_text, thinking=True) + tokenizer.encode(response, add_special_tokens=False)


def forced_move_stray_values(checkpoint: str, problems: list[world.Problem], *, seed: int = 0
                             ) -> dict[str, np.ndarray]:
    """{move: float64 [P], per problem the probability the model at `checkpoint` (an HF folder with
    the world's tokenizer) puts on any word but the forced one}, in `problems` order (one wrong
    pair each, drawn with `seed`: two models given the same problems and seed meet the same
    contexts), the response after the thinking chat prompt."""
    tokenizer = _world_tokenizer(checkpoint)
    rng = np.random.default_rng(seed)
    contexts = []  # problem-major: problem p's moves at p * len(FORCED_MOVES) + m
    for problem in problems:
        moves = forced_move_contexts(problem, rng)
        contexts += [(_thinking_context(tokenizer, problem.text, moves[move][0]), moves[move][1])
                     for move in FORCED_MOVES]
    # One call, so the checkpoint is read once.
    forced_PxM = next_word_probabilities(checkpoint, contexts).reshape(len(problems), len(FORCED_MOVES))
    return {move: 1.0 - forced_PxM[:, m] for m, move in enumerate(FORCED_MOVES)}


# Privileged OPD's teacher reads the worked solution, so it tries the right pair first and never
# meets a missed try in its own traces; the student misses often. What the hinted teacher writes
# there is what privileged OPD teaches after a miss: `</think>` closes the search and boxes the
# answer the hint gave (BUILD_NOTES.md, "A fresh teacher, with the bar set on the world's own
# states").
GIVE_UP_WORD = "</think>"


def hinted_give_up_values(checkpoint: str, problems: list[world.Problem], *, seed: int = 0) -> np.ndarray:
    """float64 [P]: per problem, the probability that the model at `checkpoint`, given the worked
    solution as the trainer's privileged teacher is (`world.hinted_prompt`, dense), ends its
    thinking right after a first try of a wrong pair (drawn with `seed`, as in
    `forced_move_stray_values`)."""
    tokenizer = _world_tokenizer(checkpoint)
    rng = np.random.default_rng(seed)
    contexts = []
    for problem in problems:
        response, _ = forced_move_contexts(problem, rng)["after a miss"]
        contexts.append((_thinking_context(tokenizer, world.hinted_prompt(problem, "dense"), response), GIVE_UP_WORD))
    return next_word_probabilities(checkpoint, contexts)


def forced_move_strays(checkpoint: str, problems: list[world.Problem], *, seed: int = 0) -> dict[str, float]:
    """{move: the mean over `problems` of `forced_move_stray_values`}."""
    return _mean_strays(forced_move_stray_values(checkpoint, problems, seed=seed))


def _mean_strays(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {move: float(values_P.mean()) for move, values_P in values.items()}


def _paired_excess(base_P: np.ndarray, other_P: np.ndarray, seed: int) -> dict:
    """{"difference": mean(other) - mean(base), "ci95": [low, high]}: a paired bootstrap over
    problems (eval.metrics.paired_difference's absolute difference)."""
    from opsd_jax.eval.metrics import paired_difference

    paired = paired_difference(base_P, other_P, seed=seed)
    return {"difference": paired["absolute"], "ci95": paired["absolute_ci"]}


def hinted_give_up_summary(give_ups: dict[str, np.ndarray], seed: int = 0) -> dict:
    """{"base", "stronger teacher": mean P(give up), "teacher_minus_thinker": {"difference",
    "ci95"}} from `hinted_give_up_values` of both on the same problems (paired bootstrap)."""
    return {"base": float(give_ups["base"].mean()), "stronger teacher": float(give_ups["stronger teacher"].mean()),
            "teacher_minus_thinker": _paired_excess(give_ups["base"], give_ups["stronger teacher"], seed)}


def teacher_comparison(forced_moves: dict, give_ups: dict | None, seed: int) -> dict:
    """{"forced_moves": each model's mean strays, "forced_moves_teacher_minus_thinker":
    forced_move_differences, "hinted_give_up": hinted_give_up_summary} from the thinker's ("base")
    and the stronger teacher's `forced_move_stray_values` and `hinted_give_up_values` on the same
    problems and seed: what the demo prints about its teacher and what the teacher bar judges."""
    return {"forced_moves": {name: _mean_strays(values) for name, values in forced_moves.items()},
            "forced_moves_teacher_minus_thinker": (
                forced_move_differences(forced_moves["base"], forced_moves["stronger teacher"], seed=seed)
                if forced_moves else {}),
            "hinted_give_up": hinted_give_up_summary(give_ups, seed) if give_ups else {}}


def forced_move_differences(thinker: dict[str, np.ndarray], teacher: dict[str, np.ndarray], *,
                            seed: int = 0) -> dict[str, dict]:
    """{move: {"difference": teacher - thinker mean stray probability, "ci95": [low, high]}}, from
    `forced_move_stray_values` of both on the same problems and seed: a paired bootstrap over
    problems, as for every other difference the demo reports."""
    return {move: _paired_excess(thinker[move], teacher[move], seed) for move in FORCED_MOVES}


def greedy_right_values(checkpoint: str, eval_path: str, out: str, *, max_tokens: int = 96,
                        seed: int = 0) -> np.ndarray:
    """float64 [P]: 1 where the model at `checkpoint` answers the suite's problem right greedily
    (temperature 0, one sample, at most `max_tokens` new tokens after the thinking prompt), in suite
    order. The project's eval runner writes its generations under `out`."""
    from opsd_jax.eval.runner import EvalSettings, run_eval
    from opsd_jax.eval.suites import load_suite

    eval_settings = EvalSettings(n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=seed,
                                 enable_thinking=True, budgets=(max_tokens,))
    result = run_eval(checkpoint, [load_suite(eval_path)], out, eval_settings, dtype="float32", max_slots=64,
                      progress=False)
    return per_problem_accuracy(result["metrics"]["toy_eval"])[str(max_tokens)]


# The bar a stronger teacher clears before it is shipped (BUILD_NOTES.md, "A teacher judged on
# intervals"): at every forced move it credibly strays at most twice as often as the thinker (the
# upper end of its excess's interval at most the thinker's own rate), and greedily it solves at
# least as many evaluation problems as the thinker.
def teacher_bar(thinker: str, teacher: str, out: str, settings: ExperimentSettings = ExperimentSettings()) -> dict:
    """{"forced_moves", "forced_moves_teacher_minus_thinker", "greedy_right", "hinted_give_up",
    "parts": [{"part", "value", "ok"}], "ok"} for the HF folders `thinker` and `teacher` on the
    demo's evaluation problems (settings' split and seed); writes the world and the greedy
    generations under `out`. The give-up is reported, not judged."""
    _, eval_path = write_world(os.path.join(out, "world"), settings)
    _, problems = suite_problems(eval_path)
    models = {"base": thinker, "stronger teacher": teacher}
    strays = {name: forced_move_stray_values(path, problems, seed=settings.seed) for name, path in models.items()}
    give_ups = {name: hinted_give_up_values(path, problems, seed=settings.seed) for name, path in models.items()}
    teachers = teacher_comparison(strays, give_ups, settings.seed)
    right = {name: int(greedy_right_values(path, eval_path, os.path.join(out, "greedy", name.replace(" ", "_")),
                                           max_tokens=settings.max_tokens, seed=settings.seed).sum())
             for name, path in models.items()}
    parts = teacher_bar_parts(teachers["forced_moves"], teachers["forced_moves_teacher_minus_thinker"], right,
                              len(problems), settings.max_tokens)
    return {**teachers, "greedy_right": right, "problems": len(problems), "parts": parts,
            "ok": all(p["ok"] for p in parts)}


def forced_move_bar(forced_moves: dict, differences: dict) -> dict[str, dict]:
    """{move: {"upper": the upper end of the teacher's excess interval, "thinker": the thinker's
    mean stray, "ok": upper <= thinker}}: credibly, the teacher strays at most twice as often."""
    return {move: {"upper": differences[move]["ci95"][1], "thinker": forced_moves["base"][move],
                   "ok": differences[move]["ci95"][1] <= forced_moves["base"][move]} for move in FORCED_MOVES}


def teacher_bar_parts(forced_moves: dict, differences: dict, greedy_right: dict, problems: int,
                      max_tokens: int) -> list[dict]:
    """[{"part", "value", "ok"}]: the bar's judgement of the measures `teacher_bar` takes
    (`forced_moves` the two models' mean strays, `differences` forced_move_differences,
    `greedy_right` the two models' counts of `problems`)."""
    parts = [{"part": f"{move}: upper end of the teacher's excess stray probability <= the thinker's",
              "value": f"{b['upper']:+.4f} vs {b['thinker']:.4f}", "ok": b["ok"]}
             for move, b in forced_move_bar(forced_moves, differences).items()]
    parts.append({"part": f"greedy answers right at {max_tokens} tokens >= the thinker's",
                  "value": f"{greedy_right['stronger teacher']} vs {greedy_right['base']} of {problems}",
                  "ok": greedy_right["stronger teacher"] >= greedy_right["base"]})
    return parts


def teacher_bar_text(bar: dict) -> str:
    """The console form of `teacher_bar`: one line per part, the reported give-up, the verdict."""
    lines = [f"{'ok    ' if p['ok'] else 'FAILED'} {p['part']}: {p['value']}" for p in bar["parts"]]
    lines.append("reported: " + hinted_give_up_line(bar["hinted_give_up"]))
    lines.append("the teacher clears the bar" if bar["ok"] else "the teacher does not clear the bar")
    return "\n".join(lines)


# ---- output ------------------------------------------------------------------------------------


def _name_width(names) -> int:
    """The console tables' first column: 16 characters, wider for a longer model name."""
    return max(16, *(len(name) + 1 for name in names))


def console_table(result: dict) -> str:
    budgets = list(result["accuracy"]["base"])
    width = _name_width(result["accuracy"])
    lines = [f"{'model':{width}}" + "".join(f"{'@' + b:>8}" for b in budgets) + f"{'markers/1k':>12}"]
    for name, by_budget in result["accuracy"].items():
        rate = result["markers_per_1k"].get(name)
        lines.append(f"{name:{width}}" + "".join(f"{by_budget[b]['accuracy']:>8.3f}" for b in budgets)
                     + (f"{rate:>12.1f}" if rate is not None else f"{'':>12}"))
    lines.append("")
    if result["behaviour"]:
        lines += [behaviour_table(result["behaviour"], width), ""]
    if result.get("training_markers_per_1k"):
        window = next(iter(result["training"].values()))["marker_window_steps"]
        lines += ["markers/1k in training rollouts, first -> last " + f"{window} steps (seeds averaged): " + ", ".join(
            f"{name} {_rate(m['first_steps'])} -> {_rate(m['last_steps'])}"
            for name, m in result["training_markers_per_1k"].items()), ""]
    if result.get("forced_moves"):
        lines += [forced_moves_line(result["forced_moves"], result.get("forced_moves_teacher_minus_thinker")), ""]
    if result.get("hinted_give_up"):
        lines += [hinted_give_up_line(result["hinted_give_up"]), ""]
    for p in result["preconditions"]:
        lines.append(f"precondition {'ok ' if p['ok'] else 'FAILED'} {p['check']}: {p['value']}")
    for c in result["claims"]:
        lines.append(f"claim {c['claim']} {c['verdict']:>15}: {c['text']}; {c['evidence']}")
    for fix in result["fixes"]:
        lines.append(f"fix {fix['fix']}: {fix['text']}; {fix['evidence']}")
    return "\n".join(lines)


def _difference_text(d: dict) -> str:
    """A difference and its 95% interval, as the console prints it: +0.0327 [+0.0124, +0.0580]."""
    low, high = d["ci95"]
    return f"{d['difference']:+.4f} [{low:+.4f}, {high:+.4f}]"


def forced_moves_line(forced_moves: dict, differences: dict | None = None) -> str:
    """One console line: the stronger teacher's strays at each forced move beside the thinker's,
    and with `differences` (forced_move_differences) the teacher's excess with its interval."""
    teacher, thinker = forced_moves["stronger teacher"], forced_moves["base"]

    def move_text(move):
        text = f"{move} {teacher[move]:.4f} vs {thinker[move]:.4f}"
        return text + (f" ({_difference_text(differences[move])})" if differences else "")

    return ("at the world's forced moves, P(a word no solver writes there), stronger teacher vs thinker: "
            + ", ".join(move_text(move) for move in FORCED_MOVES))


def hinted_give_up_line(give_up: dict) -> str:
    """One console line: how often each privileged teacher ends the search after a missed try."""
    return ("after a missed try, with the worked solution in context, P(</think>: the search given up), "
            f"stronger teacher vs thinker: {give_up['stronger teacher']:.4f} vs {give_up['base']:.4f} "
            f"({_difference_text(give_up['teacher_minus_thinker'])})")


def behaviour_table(behaviour: dict, width: int = 16) -> str:
    """The trace-behaviour rates per model as console text, the names in a `width`-wide column."""
    lines = [f"{'trace behaviour':{width}}" + "".join(f"{title:>14}" for _, title in BEHAVIOUR_COLUMNS)]
    for name, rates in behaviour.items():
        lines.append(f"{name:{width}}" + "".join(f"{rates[key]:>14.3f}" if rates[key] is not None else f"{'-':>14}"
                                            for key, _ in BEHAVIOUR_COLUMNS))
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    budgets = list(result["accuracy"]["base"])
    lines = ["# Toy-world OPSD experiment", "",
             f"Settings: `{json.dumps(result['settings'])}`; wall time {result['seconds']:.0f} s.", "",
             "## Claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| ({c['claim']}) {c['text']} | {c['verdict']} | {c['evidence']} |" for c in result["claims"]]
    if result["fixes"]:
        lines += ["", "## Fixes tried", "", "| fix | condition | accuracy changes [95% CI] |", "|---|---|---|"]
        lines += [f"| {fix['fix']} | {fix['text']} | {fix['evidence']} |" for fix in result["fixes"]]
    lines += ["", "## Preconditions", "", "| check | value | ok |", "|---|---|---|"]
    lines += [f"| {p['check']} | {p['value']} | {p['ok']} |" for p in result["preconditions"]]
    lines += ["", "## avg@n accuracy by token budget", "",
              ("Trained conditions pool the samples of their seeds; brackets: 95% bootstrap interval over "
               f"problems; last column: each seed's accuracy at {budgets[-1]} tokens."), "",
              "| model | " + " | ".join(budgets) + " | per seed |", "|---|" + "---|" * (len(budgets) + 1)]
    for name, by_budget in result["accuracy"].items():
        cells = [f"{by_budget[b]['accuracy']:.3f} [{by_budget[b]['accuracy_ci95'][0]:.2f}, "
                 f"{by_budget[b]['accuracy_ci95'][1]:.2f}]" for b in budgets]
        seeds = ", ".join(f"{a:.3f}" for a in by_budget[budgets[-1]]["per_seed"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} |")
    behaviour = result["behaviour"]
    if behaviour:
        lines += ["", "## Trace behaviour", "",
                  ("Read in the world's grammar from the full-length evaluation generations (seeds pooled): "
                   "tries per response; the share whose first try is the right pair; slips (a wrong pair "
                   "written with the target) per wrong try; the share of claimed successes that are verified, "
                   "and hedged; slips closed with `</think>` unverified (a wrong box) per response; tries whose "
                   "sum is not the target closed with `</think>` (the search given up; its box may still guess "
                   "right) per response; tries whose sum is not the target then verified `ok` (a miss accepted) "
                   "per response."), "",
                  "| model | " + " | ".join(title for _, title in BEHAVIOUR_COLUMNS) + " |",
                  "|---|" + "---|" * len(BEHAVIOUR_COLUMNS)]
        lines += [f"| {name} | " + " | ".join("-" if rates[key] is None else f"{rates[key]:.3f}"
                                             for key, _ in BEHAVIOUR_COLUMNS) + " |"
                  for name, rates in behaviour.items()]
        lines += ["", ("Change from the base thinker, with a 95% interval (paired bootstrap over problems; "
                       "each rate a ratio of sums over the resampled problems):"), "",
                  "| model | " + " | ".join(title for _, title in BEHAVIOUR_COLUMNS) + " |",
                  "|---|" + "---|" * len(BEHAVIOUR_COLUMNS)]
        lines += [f"| {name} - base | " + " | ".join(
            "-" if changes[key] is None else
            f"{changes[key]['difference']:+.3f} [{changes[key]['ci95'][0]:+.3f}, {changes[key]['ci95'][1]:+.3f}]"
            for key, _ in BEHAVIOUR_COLUMNS) + " |" for name, changes in result["behaviour_vs_base"].items()]
    training = {name: t for name, t in result["training"].items() if "markers_per_1k_tokens" in t}
    if training:
        categories = [k[len("markers_per_1k_tokens_"):] for k in next(iter(training.values()))
                      if k.startswith("markers_per_1k_tokens_")]
        window = next(iter(training.values()))["marker_window_steps"]
        lines += ["", "## Markers in the training rollouts", "",
                  (f"Self-correction markers per 1k tokens in each run's own rollouts, over its first and its last "
                   f"{window} steps (token-weighted), all categories and each; plot: `training_markers.png`."), "",
                  "| run | all: first -> last | " + " | ".join(f"{c}: first -> last" for c in categories) + " |",
                  "|---|---|" + "---|" * len(categories)]
        for name, t in training.items():
            cells = [t["markers_per_1k_tokens"]] + [t[f"markers_per_1k_tokens_{c}"] for c in categories]
            lines.append(f"| {name} | " + " | ".join(f"{_rate(c['first_steps'])} -> {_rate(c['last_steps'])}"
                                                     for c in cells) + " |")
    if result.get("forced_moves"):
        lines += ["", "## The stronger teacher at the world's forced moves", "",
                  ("Where every solver of the world writes one word (`wait` after a try whose sum misses the "
                   "target and after a verify that exposes a slip, `ok` after verifying the right pair), the "
                   "probability each model puts on any other word, averaged over the evaluation problems (one "
                   "wrong pair each). Vanilla and privileged OPD learn the stronger teacher's moves at the "
                   "student's states: where it strays more than the thinker, it teaches the student to stray. "
                   "Last row: the difference, with a 95% paired bootstrap interval over problems (both models "
                   "meet the same contexts)."), "",
                  "| model | " + " | ".join(FORCED_MOVES) + " |", "|---|" + "---|" * len(FORCED_MOVES)]
        lines += [f"| {name} | " + " | ".join(f"{strays[move]:.4f}" for move in FORCED_MOVES) + " |"
                  for name, strays in result["forced_moves"].items()]
        differences = result.get("forced_moves_teacher_minus_thinker")
        if differences:
            lines.append("| stronger teacher - thinker | "
                         + " | ".join(_difference_text(differences[move]) for move in FORCED_MOVES) + " |")
    give_up = result.get("hinted_give_up")
    if give_up:
        lines += ["", "## The privileged teachers after a missed try", "",
                  ("A solver given the worked solution tries the right pair first, so no hinted trace holds a "
                   "missed try, and the world leaves the move there open. The student misses often; what each "
                   "privileged teacher writes next is what privileged training teaches there. The probability "
                   "that it ends its thinking (`</think>`, then the answer the hint gave) right after a first "
                   "try of a wrong pair, averaged over the evaluation problems: the thinker is OPSD's teacher, "
                   "the stronger teacher privileged OPD's."), "",
                  "| thinker | stronger teacher | stronger teacher - thinker |", "|---|---|---|",
                  f"| {give_up['base']:.4f} | {give_up['stronger teacher']:.4f} | "
                  f"{_difference_text(give_up['teacher_minus_thinker'])} |"]
    lines += ["", ("Verdicts: reproduced = the claimed sign with a 95% interval excluding zero (paired bootstrap "
                   "over problems, for accuracy and token-level quantities alike); not reproduced = the "
                   "opposite sign (or no effect where one is claimed); undetermined = the claimed sign, interval "
                   "includes zero.")]
    lines += ["", ("Details: `eval/<model>/summary.md`, `analysis/*/report.md`; plots: `accuracy_vs_budget.png`, "
                   "`training_markers.png`, `analysis/opsd/fork_rates.png`, `analysis/opsd/marker_rates.png`, "
                   "`analysis/strong_teacher/advantage_at_markers.png`."), ""]
    return "\n".join(lines)


def _line_plot(lines: dict, path: str, *, xlabel: str, ylabel: str, title: str, marker=None, legend_size=8) -> None:
    """lines: {label: (xs, ys)}; written as a PNG at `path` (staged, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in lines.items():
        axis.plot(xs, ys, marker=marker, label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path + ".partial.png", dpi=100)
    plt.close(figure)
    os.replace(path + ".partial.png", path)


def plot_accuracy(result: dict, path: str) -> None:
    lines = {name: ([int(b) for b in by_budget], [v["accuracy"] for v in by_budget.values()])
             for name, by_budget in result["accuracy"].items()}
    _line_plot(lines, path, xlabel="token budget", ylabel="avg@n accuracy", title="toy world: accuracy vs budget",
               marker="o")


def plot_training_markers(histories: dict, path: str) -> None:
    """Markers per 1k tokens of each run's rollouts against its training step."""
    lines = {name: ([s["step"] for s in steps], [s["markers_per_1k_tokens"] for s in steps])
             for name, steps in ((name, [s for s in history if "markers_per_1k_tokens" in s])
                                 for name, history in histories.items())}
    _line_plot(lines, path, xlabel="training step", ylabel="markers per 1k rollout tokens",
               title="toy world: self-correction markers while training", legend_size=7)


def write_report(result: dict, out: str, histories: dict | None = None) -> None:
    from opsd_jax.eval.generations import write_atomic

    write_atomic(os.path.join(out, "metrics.json"), json.dumps(result, indent=1) + "\n")
    write_atomic(os.path.join(out, "report.md"), report_markdown(result))
    plot_accuracy(result, os.path.join(out, "accuracy_vs_budget.png"))
    if histories:
        plot_training_markers(histories, os.path.join(out, "training_markers.png"))


def default_output_dir(base: str = "runs/demo") -> str:
    return os.path.join(base, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def copy_checkpoints(destination: str) -> str:
    shutil.copytree(warmstart.SHIPPED, destination, dirs_exist_ok=True)
    return destination


__all__ = ["CONDITIONS", "FIXES", "ExperimentSettings", "console_table", "run_experiment"]

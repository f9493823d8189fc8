"""The paper's data builders on small synthetic sources in the hub's schemas."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from opsd_jax.cli import main
from opsd_jax.data import builders
from opsd_jax.data.sources import read_problems

INSTRUCTION = "Return your final response within \\boxed{}."


def _openthoughts_rows(n):
    return [{
        "source": "math", "problem": f"What is {i} + {i}?" + (f" {INSTRUCTION}" if i % 2 else "  "),
        "solution": f"{i} + {i} = {2 * i}, so \\boxed{{{2 * i}}}.", "Answer": str(2 * i), "correct": True,
        "COT_Reason": "r", "messages": "m", "system": "s", "generated_token_count": 5, "Question": "q",
        "conversations": [
            {"from": "system", "value": "be helpful"},
            {"from": "user", "value": f"{INSTRUCTION} What is {i} + {i}?"},
            {"from": "assistant", "value": f"<|begin_of_thought|>add<|end_of_thought|><|begin_of_solution|>"
                                           f"\\boxed{{{2 * i}}}<|end_of_solution|>"},
        ],
    } for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_openthoughts_cleaning_and_subset(tmp_path, monkeypatch):
    source = _write_jsonl(tmp_path / "ot.jsonl", _openthoughts_rows(20))
    monkeypatch.setattr(builders, "OPENTHOUGHTS_SUBSET", 7)
    paths = builders.build_openthoughts(source, str(tmp_path / "raw"))
    full = pyarrow.parquet.read_table(paths["openthoughts_math_filtered_30k"]).to_pylist()
    subset = pyarrow.parquet.read_table(paths["openthoughts_math_filtered_15k"]).to_pylist()
    assert len(full) == 20 and subset == full[:7]
    # As the paper's builder: asked to drop, but returned by the map function, so kept.
    assert {"messages", "system", "generated_token_count", "Question"} <= set(full[0])
    assert full[1]["problem"] == f"What is 1 + 1? {INSTRUCTION}"  # already there: unchanged
    assert full[2]["problem"] == f"What is 2 + 2? {INSTRUCTION}"  # stripped, then joined with a space
    turns = full[3]["conversations"]
    assert [t["from"] for t in turns] == ["user", "assistant"]
    assert turns[0]["value"] == f"What is 3 + 3? {INSTRUCTION}"
    assert turns[1]["value"] == "<think>add</think>\n\n\\boxed{6}"
    problems = read_problems(paths["openthoughts_math_filtered_15k"], preset="openthoughts")
    assert problems[4].answer == "8" and problems[4].solution.endswith("\\boxed{8}.")
    assert not list((tmp_path / "raw").glob(".*partial*"))


def _countdown_rows(n, *, repeat_every=None):
    rows = []
    for i in range(n):
        key = i if repeat_every is None else i % repeat_every
        prompt = f"Numbers: [{key}, 3, 4] Target: {key + 7}. Use each number once."
        structured = i % 3 != 0  # some rows carry numbers / target only in the prompt text
        rows.append({
            "prompt": prompt,
            "answer": {"numbers": [key, 3, 4], "target": key + 7} if structured else None,
            "response": f"<think>try {key}+3+4</think>\n So \\boxed{{{key}+3+4}} and not \\boxed{{7",
        })
    return rows


def test_countdown_split_is_seeded_disjoint_and_normalized(tmp_path):
    source = tmp_path / "cd.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_countdown_rows(40)), source)
    paths = builders.build_countdown(str(source), str(tmp_path / "raw"), train_size=30, eval_size=6)
    assert sorted(paths) == ["countdown_30", "countdown_40", "countdown_6"]
    full = pyarrow.parquet.read_table(paths["countdown_40"]).to_pylist()
    train = pyarrow.parquet.read_table(paths["countdown_30"]).to_pylist()
    held_out = pyarrow.parquet.read_table(paths["countdown_6"]).to_pylist()
    row = full[3]
    assert row["source_index"] == 3 and row["datapoint_nums"] == [3, 3, 4] and row["datapoint_target"] == 10
    assert row["response_suffix"] == "So \\boxed{3+3+4} and not \\boxed{7"
    assert row["response_answer_only"] == "\\boxed{3+3+4}"  # the unclosed last box does not count
    assert row["input_count"] == 3 and row["datapoint_input_text"] == row["prompt"]
    import datasets

    order = datasets.Dataset.from_dict({"i": list(range(40))}).shuffle(seed=42)["i"]
    assert [r["source_index"] for r in train + held_out] == order[:36]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_countdown_refuses_too_few_distinct_prompts(tmp_path):
    source = _write_jsonl(tmp_path / "cd.jsonl", _countdown_rows(40, repeat_every=10))
    with pytest.raises(builders.BuildError, match="10 distinct prompts, fewer than the 30 \\+ 6"):
        builders.build_countdown(source, str(tmp_path / "raw"), train_size=30, eval_size=6)


def test_malformed_rows_are_named(tmp_path):
    rows = _openthoughts_rows(3)
    rows[1]["conversations"][2]["value"] = None
    source = _write_jsonl(tmp_path / "ot.jsonl", rows)
    with pytest.raises(builders.BuildError, match=r"ot.jsonl: row 1: malformed \(AttributeError"):
        builders.build_openthoughts(source, str(tmp_path / "raw"))
    rows = _countdown_rows(4)
    rows[2]["answer"], rows[2]["prompt"] = None, "Numbers: [1, 2, x] Target: 3"
    source = _write_jsonl(tmp_path / "cd.jsonl", rows)
    with pytest.raises(builders.BuildError, match=r"cd.jsonl: row 2: malformed \(ValueError: could not convert"):
        builders.build_countdown(source, str(tmp_path / "raw"), train_size=2, eval_size=1)
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(builders.BuildError, match=r"cut.parquet: not a readable parquet file"):
        builders.build_openthoughts(str(tmp_path / "cut.parquet"), str(tmp_path / "raw"))


def test_cli_reports_rows_and_a_stable_checksum(tmp_path, capsys, monkeypatch):
    source = _write_jsonl(tmp_path / "ot.jsonl", _openthoughts_rows(12))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "openthoughts", "ot.jsonl", "raw"]) == 0
    first = capsys.readouterr().out
    assert "raw/openthoughts_math_filtered_30k.parquet: 12 rows (the paper's build: 29,439)" in first
    assert main(["data", "openthoughts", source, str(tmp_path / "again")]) == 0
    second = capsys.readouterr().out
    assert [line.split("sha256 ")[1] for line in first.splitlines()] == \
        [line.split("sha256 ")[1] for line in second.splitlines()]
    assert main(["data", "countdown", "ot.jsonl", "raw"]) == 2
    assert "no column 'prompt'" in capsys.readouterr().err

"""Suites: the shipped files, other formats, and errors that name the file, line and field."""

import json

import pytest

from opsd_jax.eval.suites import BUILTIN, load_suite, parse_suites


def test_builtin_suites_are_complete():
    for name in BUILTIN:
        suite = load_suite(name)
        assert len(suite.problems) == 30 and len({p.id for p in suite.problems}) == 30
        assert all(p.problem and p.answer for p in suite.problems)
    assert all(0 <= int(p.answer) <= 999 for name in ("aime24", "aime25") for p in load_suite(name).problems)
    official, h4 = load_suite("aime24").by_id(), load_suite("aime24_h4").by_id()
    assert official.keys() == h4.keys() and all(official[i].answer == h4[i].answer for i in official)
    assert sum(official[i].problem != h4[i].problem for i in official) >= 3  # the paper's wording differs
    hmmt10 = load_suite("hmmt25").by_id()["hmmt25-feb-10"]
    assert hmmt10.answer.count(",") == 1  # the two-value answer that needs set grading


def test_other_formats(tmp_path):
    rows = [{"question": "1+1?", "answer": 2}, {"question": "2+2?", "answer": "4"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    suite = load_suite(str(path))
    assert suite.name == "mine" and [p.id for p in suite.problems] == ["mine-0", "mine-1"]
    assert [p.answer for p in suite.problems] == ["2", "4"]
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]  # one column type
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "mine2.parquet")
    assert load_suite(str(tmp_path / "mine2.parquet")).problems == tuple(
        p.__class__(p.id.replace("mine", "mine2"), p.problem, p.answer) for p in suite.problems)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert [p.answer for p in load_suite(str(tmp_path / "saved")).problems] == ["2", "4"]
    assert suite.fingerprint == load_suite(str(path)).fingerprint
    assert suite.fingerprint != load_suite(str(tmp_path / "mine2.parquet")).fingerprint


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        load_suite(str(path))


def test_missing_answer_is_named(tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "solution": "2"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: missing field 'answer' \(fields present: \['problem', 'solution'\]\)"):
        load_suite(str(path))
    path.write_text('{"problem": "", "answer": "1"}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: field 'problem' must be a non-empty string"):
        load_suite(str(path))


def test_duplicates_and_unknown_suites(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "x", "problem": "a", "answer": "1"}\n{"id": "x", "problem": "b", "answer": "2"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: duplicate id 'x' \(first at {path}:1\)"):
        load_suite(str(path))
    with pytest.raises(FileNotFoundError, match="neither a built-in suite"):
        parse_suites("aime24,aime99")
    assert [s.name for s in parse_suites("aime24, hmmt25")] == ["aime24", "hmmt25"]

"""The command line: the README's main job (demo) and argument errors."""

import subprocess
import sys

import pytest

from opsd_jax.cli import build_parser, main


def test_demo_passes_as_a_fresh_process(tmp_path):
    """The README's first command, in its own process so it sets up its own 8 CPU devices."""
    result = subprocess.run(
        [sys.executable, "-m", "opsd_jax.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "demo passed" in result.stdout
    for model in ("qwen3", "olmo3"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(model))
        assert "True" in line  # bit-exact column
    assert (tmp_path / "olmo3-export" / "config.json").exists()


def test_convert_without_a_direction_is_an_error(capsys):
    with pytest.raises(SystemExit, match="convert needs"):
        main(["convert", "--from-hf", "x"])


def test_unknown_dtype_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--from-hf", "a", "--to-orbax", "b", "--dtype", "int8"])


def test_missing_source_directory_is_named(tmp_path, capsys):
    status = main(["convert", "--from-hf", str(tmp_path / "nope"), "--to-orbax", str(tmp_path / "out")])
    assert status == 2
    assert f"{tmp_path / 'nope'}: not a directory" in capsys.readouterr().err

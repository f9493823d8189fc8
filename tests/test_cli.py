"""The command line: argument errors and the server (the README's main job: test_cli_relative_paths)."""

import subprocess
import sys

import pytest

from opsd_jax.cli import build_parser, main


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


def test_vet_teacher_names_a_folder_that_holds_no_model(tmp_path):
    (tmp_path / "ws" / "teacher").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"TEACHER .*ws: no config.json there.*its teacher/"):
        main(["toyworld", "vet-teacher", str(tmp_path / "ws"), "--out", str(tmp_path / "out")])


def test_vet_teacher_clears_the_thinker_against_itself_and_writes_its_record(tmp_path, capsys):
    """The same model as both: every excess is exactly zero with a zero-width interval, the
    greedy counts are equal, so the bar holds (exit 0). (BUILD_NOTES.md records the command on the
    teacher shipped before 2026-12-05: it fails every part.)"""
    import json
    import os

    from opsd_jax.toyworld import warmstart

    thinker = os.path.join(warmstart.SHIPPED, "thinker")
    assert main(["toyworld", "vet-teacher", thinker, "--out", str(tmp_path / "out")]) == 0
    bar = json.loads((tmp_path / "out" / "bar.json").read_text())
    assert bar["ok"] and bar["teacher"] == bar["thinker"] == thinker and bar["problems"] == 128
    assert all(d["ci95"] == [0.0, 0.0] for d in bar["forced_moves_teacher_minus_thinker"].values())
    assert bar["greedy_right"]["base"] == bar["greedy_right"]["stronger teacher"] > 64
    assert capsys.readouterr().out.count("ok    ") == 4


def test_serve_answers_on_loopback(tmp_path, model_seed):
    """`opsd-jax serve` on an HF folder: starts, binds 127.0.0.1, answers a completion, and stops
    cleanly on SIGTERM."""
    import json
    import socket
    import time
    import urllib.request

    from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

    save_tiny_hf_model("qwen3", str(tmp_path), seed=model_seed)
    save_tiny_tokenizer(str(tmp_path))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "opsd_jax.cli", "serve", "--checkpoint", str(tmp_path), "--port", str(port),
         "--max-slots", "2", "--max-sequence-length", "64", "--max-prompt-length", "20", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as response:
                    assert json.load(response)["data"][0]["id"] == tmp_path.name
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        body = json.dumps({"prompt": "Wait, let me", "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()  # SIGTERM: a graceful stop
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "stopped" in output
    # Two slots of 64 rows in pages of 16, one held prompt of 20 tokens (2 pages), the null page.
    assert "(11 KV pages of 16 rows)" in output


def test_a_multi_process_launch_serves_one_replica_per_process(tmp_path, model_seed):
    """`opsd-jax serve` on every process of a cluster: each process loads the model on its own
    devices and answers on its own port; a SIGTERM to the launcher stops both cleanly."""
    import json
    import os
    import queue
    import re
    import threading
    import urllib.request

    from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer

    save_tiny_hf_model("qwen3", str(tmp_path), seed=model_seed)
    save_tiny_tokenizer(str(tmp_path))
    launcher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                            "local_cpu_cluster.sh")
    process = subprocess.Popen(
        [launcher, "-n", "2", "-d", "2", "--", sys.executable, "-m", "opsd_jax.cli", "serve", "--checkpoint",
         str(tmp_path), "--port", "0", "--max-slots", "2", "--max-sequence-length", "64", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env={**os.environ, "XLA_FLAGS": ""},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen, urls = [], {}
    try:
        while len(urls) < 2:
            line = lines.get(timeout=240)
            assert line is not None, "".join(seen)
            seen.append(line)
            found = re.match(r"\[process (\d)\] serving \S+ at (http://\S+/v1)", line)
            if found:
                urls[found.group(1)] = found.group(2)
        assert urls["0"] != urls["1"]
        answers = []
        for url in urls.values():
            body = json.dumps({"prompt": "Wait, let me", "max_tokens": 4, "temperature": 0}).encode()
            request = urllib.request.Request(url + "/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answers.append(json.load(response)["choices"][0]["text"])
        assert answers[0] == answers[1]  # the same weights, greedy
    finally:
        process.terminate()  # the launcher forwards SIGTERM to both servers
        process.wait(timeout=120)
    while (line := lines.get(timeout=30)) is not None:
        seen.append(line)
    assert process.returncode == 0, "".join(seen)
    assert {"[process 0] stopped\n", "[process 1] stopped\n"} <= set(seen)

"""`launch/job.sh`, the detached job every TPU VM worker runs, exercised here with bash: a job
outlives its starter, a second start is refused while it runs, SIGTERM reaches the command and its
exit code is recorded, a killed job and a reused pid are told apart. And `opsd-jax launch tpu-vm`
end to end against a stand-in `gcloud` that runs each `--command` here as a worker would."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from opsd_jax.cli import main
from opsd_jax.launch.remote_job import REFUSED_CODE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_SH = os.path.join(REPO, "launch", "job.sh")

# Stands in for the trainer: prints, then on SIGTERM "saves" and exits 42 (train.preemption_exit_code).
TRAINER = textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        print("saved at step 3", flush=True)
        sys.exit(42)
    signal.signal(signal.SIGTERM, stop)
    print("step 1", flush=True)
    time.sleep(120)
""")


def _job(job_dir, *words, check=False):
    env = {**os.environ, "OPSD_JAX_JOB_DIR": str(job_dir)}
    return subprocess.run(["bash", JOB_SH, *words], env=env, capture_output=True, text=True, timeout=60,
                          check=check)


def _wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_detached_job_is_refused_a_second_start_stops_on_sigterm_and_records_its_code(tmp_path):
    _job(tmp_path, "start", "sh", "-c", "echo an earlier run", check=True)
    assert _wait_for(lambda: (tmp_path / "job.exit").exists())
    assert _job(tmp_path, "status").stdout.strip().endswith(f"exited with 0 | {_last_line(tmp_path)}")

    started = time.monotonic()
    result = _job(tmp_path, "start", sys.executable, "-c", TRAINER, check=True)
    assert time.monotonic() - started < 20  # returns at once: the job runs on without it
    assert "started (pid" in result.stdout
    assert _wait_for(lambda: _has_line(tmp_path, "step 1"))
    assert "running (pid" in _job(tmp_path, "status").stdout

    refused = _job(tmp_path, "start", "true")
    assert refused.returncode == REFUSED_CODE
    assert "still running" in refused.stderr and str(tmp_path / "job.log") in refused.stderr
    assert _job(tmp_path, "check").returncode == REFUSED_CODE

    assert "sent SIGTERM" in _job(tmp_path, "stop").stdout
    followed = _job(tmp_path, "follow")
    assert followed.returncode == 42
    # The current job's output only, from its header on; the earlier run stays in the file above it.
    assert "an earlier run" not in followed.stdout
    assert followed.stdout.splitlines()[1:3] == ["step 1", "saved at step 3"]
    assert followed.stdout.splitlines()[-1].endswith("exit 42")
    assert "an earlier run" in (tmp_path / "job.log").read_text()
    assert "exited with 42" in _job(tmp_path, "status").stdout
    assert _job(tmp_path, "check").returncode == 0
    assert _job(tmp_path, "logs", "2").stdout.splitlines()[0] == "saved at step 3"
    assert "no job running" in _job(tmp_path, "stop").stdout


def _has_line(job_dir, line):
    """Whether the command printed `line` (the header above its output quotes the command's text)."""
    return line in (job_dir / "job.log").read_text().splitlines()


def _last_line(job_dir):
    return (job_dir / "job.log").read_text().splitlines()[-1]


def test_follow_ends_with_the_job_and_a_killed_job_or_a_reused_pid_is_not_running(tmp_path):
    _job(tmp_path, "start", sys.executable, "-c", "import time; print('working', flush=True); time.sleep(1); "
         "raise SystemExit(5)", check=True)
    followed = _job(tmp_path, "follow")  # started before the job ends, returns when it does
    assert followed.returncode == 5 and "working" in followed.stdout

    _job(tmp_path, "start", sys.executable, "-c", TRAINER, check=True)
    assert _wait_for(lambda: _has_line(tmp_path, "step 1"))
    supervisor = int((tmp_path / "job.pid").read_text())
    assert os.getpgid(supervisor) == supervisor  # its own session: the kill below reaches nothing else
    os.killpg(supervisor, signal.SIGKILL)  # the VM going away: nothing gets to write job.exit
    assert _wait_for(lambda: "ended without an exit code" in _job(tmp_path, "status").stdout)
    assert _job(tmp_path, "follow").returncode == 1

    (tmp_path / "job.pid").write_text(f"{os.getpid()}\n")  # a pid that now belongs to another program
    assert _job(tmp_path, "check").returncode == 0
    assert "no job running" in _job(tmp_path, "stop").stdout


def test_bad_arguments_are_named(tmp_path):
    assert "no command" in _job(tmp_path, "start").stderr
    assert "no job was started" in _job(tmp_path, "follow").stderr
    assert "LINES must be a number" in _job(tmp_path, "logs", "ten").stderr
    assert _job(tmp_path, "launch").returncode == 2
    assert "no job" in _job(tmp_path, "status").stdout


@pytest.fixture
def fake_slice(tmp_path, monkeypatch):
    """A `gcloud` on PATH whose `tpu-vm ssh --command=C` runs C with bash here, with HOME set to a
    worker's home holding the installed tree's launch/job.sh (one worker: --worker=all is worker 0)."""
    home = tmp_path / "worker"
    (home / "opsd-jax" / "launch").mkdir(parents=True)
    (home / "opsd-jax" / "launch" / "job.sh").write_bytes(open(JOB_SH, "rb").read())
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        for a in "$@"; do case $a in --worker=*) echo "${{a#--worker=}}" >> {calls};; --command=*) c=${{a#--command=}};; esac; done
        # FAIL_AFTER_START: this worker starts its job, another one fails to (its ssh exits 1).
        if [ -n "${{FAIL_AFTER_START:-}}" ] && [[ $c == *" start "* ]]; then HOME={home} OPSD_JAX_JOB_DIR= bash -c "$c"; exit 1; fi
        HOME={home} OPSD_JAX_JOB_DIR= exec bash -c "$c"
    """))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("OPSD_JAX_JOB_DIR", raising=False)
    return home, calls


def test_launch_starts_the_job_detached_follows_it_and_exits_with_its_code(fake_slice, capfd):
    home, calls = fake_slice
    command = ["--", sys.executable, "-c", "import os; print('job in', os.getcwd(), os.environ['PATH'].split(':')[0], "
               "os.environ['PYTHONUNBUFFERED']); raise SystemExit(42)"]
    code = main(["launch", "tpu-vm", "--name", "opsd", "--zone", "z", "--topology", "v5e-4", "--no-install", *command])
    assert code == 42
    log = (home / "opsd-jax" / "runs" / "launch" / "job.log").read_text()
    assert f"job in {home / 'opsd-jax'} {home / 'opsd-jax' / '.venv' / 'bin'} 1" in log  # unbuffered: the log is a file
    assert calls.read_text().split() == ["all", "all", "0"]  # check, start, follow worker 0
    assert "preempted and saved" in capfd.readouterr().err

    assert main(["launch", "status", "--name", "opsd", "--zone", "z"]) == 0
    assert "exited with 42" in capfd.readouterr().out

    # The same slice again: the earlier job has ended, so this one starts; its code and the way to the
    # other workers' logs are reported.
    assert main(["launch", "tpu-vm", "--name", "opsd", "--zone", "z", "--topology", "v5e-4", "--no-install", "--",
                 "sh", "-c", "echo failing; exit 5"]) == 5
    out, err = capfd.readouterr()
    assert "failing" in out and "job in" not in out  # followed from this job's start
    assert "worker 0's job exited with 5" in err and "opsd-jax launch logs --worker N" in err


def test_launch_refuses_to_start_or_install_while_a_job_runs(fake_slice, capfd):
    home, calls = fake_slice
    job_dir = home / "opsd-jax" / "runs" / "launch"
    subprocess.run(["bash", JOB_SH, "start", sys.executable, "-c", TRAINER], check=True, capture_output=True,
                   env={**os.environ, "OPSD_JAX_JOB_DIR": str(job_dir)}, timeout=60)
    try:
        code = main(["launch", "tpu-vm", "--name", "opsd", "--zone", "z", "--topology", "v5e-4", "--source", REPO,
                     "--archive-dir", str(home), "--", "true"])
        assert code == REFUSED_CODE
        assert calls.read_text().split() == ["all"]  # stopped at the check: nothing packed, copied or started
        assert "still running" in capfd.readouterr().err
        assert main(["launch", "stop", "--wait", "--name", "opsd", "--zone", "z"]) == 42  # waited for the save
        assert (job_dir / "job.exit").read_text().strip() == "42"
        assert "saved at step 3" in capfd.readouterr().out
    finally:
        subprocess.run(["bash", JOB_SH, "stop"], env={**os.environ, "OPSD_JAX_JOB_DIR": str(job_dir)},
                       capture_output=True, timeout=60)


def test_a_start_that_fails_on_some_worker_stops_the_jobs_that_did_start(fake_slice, capfd, monkeypatch):
    home, calls = fake_slice
    monkeypatch.setenv("FAIL_AFTER_START", "1")
    trainer = ["--", sys.executable, "-c", TRAINER]
    assert main(["launch", "tpu-vm", "--name", "opsd", "--zone", "z", "--topology", "v5e-4", "--no-install",
                 *trainer]) == 1
    assert "the jobs that did start were sent SIGTERM" in capfd.readouterr().err
    assert calls.read_text().split() == ["all", "all", "all"]  # check, start, stop: nothing followed
    job_dir = home / "opsd-jax" / "runs" / "launch"
    assert _wait_for(lambda: (job_dir / "job.exit").exists())
    # 42 once the command's handler is in place; 143 (SIGTERM's default) when the stop came first.
    assert (job_dir / "job.exit").read_text().strip() in ("42", "143")

"""Commands a launcher runs, as argv lists: printed exactly (`--dry-run`) or run one after another,
stopping at the first that fails."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Step:
    """One command. `until`: run it again every `every` seconds until its output (stripped) is one
    of these words (a queued resource's state); `stdin`: text piped to it (a manifest)."""

    argv: tuple[str, ...]
    until: tuple[str, ...] = ()
    every: int = 30
    stdin: str | None = None

    def line(self) -> str:
        text = shlex.join(self.argv)
        if self.stdin is not None:
            text += " < manifest (printed above)"
        if self.until:
            text += f"  # again every {self.every} s until it prints {' or '.join(self.until)}"
        return text


class LaunchError(RuntimeError):
    """A launch command failed; the message names it, `code` is its exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_steps(steps: list[Step], *, dry_run: bool, out=print, failed_states: tuple[str, ...] = ()) -> int:
    """Prints every step (dry run) or runs them in order. A polled step fails when it prints one of
    `failed_states`. Returns the last command's exit code (0 for a dry run)."""
    if dry_run:
        for step in steps:
            out(step.line())
        return 0
    code = 0
    for step in steps:
        out(f"+ {step.line()}")
        sys.stdout.flush()
        if step.until:
            while True:
                result = subprocess.run(step.argv, capture_output=True, text=True, check=False)
                state = result.stdout.strip()
                if result.returncode:
                    raise LaunchError(f"{shlex.join(step.argv)} exited with {result.returncode}: "
                                      f"{result.stderr.strip()}", result.returncode)
                if state in step.until:
                    break
                if state in failed_states:
                    raise LaunchError(f"{shlex.join(step.argv)} reports {state}")
                out(f"  state {state or '(none)'}; waiting {step.every} s")
                time.sleep(step.every)
            continue
        code = subprocess.run(step.argv, input=step.stdin, text=step.stdin is not None, check=False).returncode
        if code:
            raise LaunchError(f"{shlex.join(step.argv)} exited with {code}", code)
    return code


__all__ = ["LaunchError", "Step", "run_steps"]

"""Paths as people type them: relative to the current directory, `~` allowed.

Orbax and tensorstore refuse relative paths, and a long job should not depend on the directory it
happens to be in later, so every path that enters the library is made absolute once, here.
"""

from __future__ import annotations

import os


def user_path(path: str | os.PathLike) -> str:
    """`path` with `~` expanded, made absolute against the current directory."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def optional_user_path(path: str | os.PathLike | None) -> str | None:
    """`user_path`, keeping None and "" (an unset config key) as they are."""
    return user_path(path) if path else path

"""Directories that appear only when complete: written under a staging name, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil

import jax

from opsd_jax.paths import user_path


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False, all_processes: bool = False, local: bool = False):
    """Yields a staging directory that becomes `path` when the block exits without error.

    An exception (or a kill) leaves `path` untouched; the staging directory is removed on an
    exception and is recognisable (".NAME.partial") after a kill, and the next attempt clears it.
    Replacing (`overwrite`) retires the old copy as ".NAME.replaced" until the new one is in place;
    the next attempt restores or removes what a kill left of it.
    In a multi-process job only process 0 writes unless `all_processes` (Orbax, where every process
    writes its shards); other processes get None when they do not write. `local`: only the calling
    process takes part (no barriers) and it writes.
    """
    path = user_path(path)
    parent, name = os.path.split(path)
    staging = os.path.join(parent, f".{name}.partial")
    retired = os.path.join(parent, f".{name}.replaced")
    primary = local or jax.process_index() == 0

    def barrier(name):
        if not local:
            _barrier(name)

    if primary:
        _recover(path, retired)
    barrier(f"recovered {path}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new destination or pass --overwrite")
    if primary:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    barrier(f"staging {path}")
    if not (primary or all_processes):
        yield None
        barrier(f"written {path}")
        barrier(f"commit {path}")
        return
    try:
        yield staging
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier(f"written {path}")
    if primary:
        if os.path.exists(path):
            # Two renames: a kill between them leaves only the retired copy, which the next call
            # on this path puts back (`_recover`); a kill while it is deleted leaves a remnant the
            # next call removes.
            os.rename(path, retired)
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, path)
    barrier(f"commit {path}")


def _recover(path: str, retired: str) -> None:
    """Undoes what a kill during a replacement left: the previous copy, retired but not yet
    replaced, goes back to `path`; a retired copy beside a complete `path` is removed (as are
    those of the earlier naming, `path.replaced-XXXXXXXX`)."""
    if os.path.exists(retired) and not os.path.exists(path):
        os.rename(retired, path)
    shutil.rmtree(retired, ignore_errors=True)
    if os.path.exists(path):
        parent, name = os.path.split(path)
        for entry in os.listdir(parent or "."):
            if entry.startswith(f"{name}.replaced-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

"""Directories that appear only when complete: written under a staging name, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

import jax

from opsd_jax.paths import user_path


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False, all_processes: bool = False):
    """Yields a staging directory that becomes `path` when the block exits without error.

    An exception (or a kill) leaves `path` untouched; the staging directory is removed on an
    exception and is recognisable (".NAME.partial") after a kill, and the next attempt clears it.
    In a multi-process job only process 0 writes unless `all_processes` (Orbax, where every process
    writes its shards); other processes get None when they do not write.
    """
    path = user_path(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose a new destination or pass overwrite")
    parent, name = os.path.split(path)
    staging = os.path.join(parent, f".{name}.partial")
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier(f"staging {path}")
    if not (primary or all_processes):
        yield None
        _barrier(f"written {path}")
        _barrier(f"commit {path}")
        return
    try:
        yield staging
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier(f"written {path}")
    if primary:
        if os.path.exists(path):
            retired = f"{path}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(path, retired)
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, path)
    _barrier(f"commit {path}")

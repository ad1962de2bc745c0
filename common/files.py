"""Folders that appear whole or not at all: write into a staging folder, then one rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager


def staging_path(path: str) -> str:
    """Where ``path`` is staged: ``.tmp-<name>`` beside it (hidden from ``datasets`` and checkpoint listings)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".tmp-{name}")


def staging_dir(path: str) -> str:
    """An empty staging folder for ``path``, to be filled and then published."""
    staging = staging_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish_dir(staging: str, path: str) -> None:
    """Replace ``path`` with the filled ``staging`` folder (a crash before this leaves ``path`` as it was)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(staging, path)


@contextmanager
def staged(path: str):
    """``with staged(out) as tmp:`` fill ``tmp``; on success it replaces ``out``, on an error it is removed
    (``out`` is left as it was either way until the one rename)."""
    tmp = staging_dir(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, path)


@contextmanager
def atomic_file(path: str):
    """``with atomic_file(out) as f:`` write the binary file ``f``; on success it becomes ``out`` in one
    rename, on an error it is removed (``out`` is left as it was)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            yield f
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, then one rename."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())

"""Atomic file writing: an interrupted run never leaves half an output file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union


@contextmanager
def atomic_path(path: Union[str, os.PathLike], suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed if not.

    The file gets ordinary permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".omg-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

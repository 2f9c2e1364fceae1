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


class AtomicFileSet:
    """Several files that appear together or not at all: each is written to a temporary file beside its path, and
    only when every one is written are they renamed onto their paths (a failure removes the temporaries and
    leaves every old file as it was).

        with AtomicFileSet() as files:
            image.save(files.path("out.png"), format="PNG")
            stage1.save(files.path("out_stage1.png"), format="PNG")
        # both renamed here, or neither when the block raised
    """

    def __init__(self) -> None:
        self.staged: list[tuple[str, str]] = []  # (temporary, final path)

    def path(self, final: Union[str, os.PathLike]) -> str:
        """A temporary path to write `final`'s content to."""
        final = os.fspath(final)
        folder = os.path.dirname(os.path.abspath(final))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".omg-", suffix=os.path.splitext(final)[1])
        os.close(fd)
        self.staged.append((tmp, final))
        return tmp

    def commit(self) -> list[str]:
        """Rename every temporary onto its path; returns the paths."""
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in self.staged:
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, final in self.staged:
            os.replace(tmp, final)
        written, self.staged = [final for _, final in self.staged], []
        return written

    def discard(self) -> None:
        for tmp, _ in self.staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.staged = []

    def __enter__(self) -> "AtomicFileSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

"""The workdir: checked writable before anything compiles, one writer at a time (an advisory
lock the OS releases when the process ends, however it ends), removed if a failed start
created it and left nothing in it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be written, or another run holds it."""


def prepare(workdir: Path) -> bool:
    """Creates `workdir` if needed and writes and removes a small file in it; a one-line
    WorkdirError naming the path and the OS error if that fails. Returns whether it created it."""
    created = not workdir.exists()
    probe = workdir / f".write_test.{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write to the workdir {workdir}: {e.strerror or e}") from e
    return created


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Holds `workdir`'s lock for the block; a WorkdirError naming the holder (pid, host) if
    another process holds it. A killed holder's lock is gone with it."""
    with open(workdir / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkdirError(
                f"{workdir} is in use by another training run ({holder}); wait for it to end "
                "or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def removed_if_left_empty(workdir: Path, created: bool) -> Iterator[None]:
    """On an error in the block, removes `workdir` if this run created it and it holds no file
    but the lock (empty folders do not count)."""
    try:
        yield
    except BaseException:
        if created and all(p.is_dir() or p.name == LOCK_NAME for p in workdir.rglob("*")):
            shutil.rmtree(workdir, ignore_errors=True)
        raise

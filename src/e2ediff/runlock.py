"""One writer per run folder: an exclusive ``flock`` on ``RUN/.lock`` held for the whole training run.

The lock file holds the holder's PID. A second process on the same ``--run-dir`` is refused with a message naming
that PID. The kernel drops a flock when its process dies (SIGKILL included), so a lock left by a killed run is stale
by construction: the next run takes it over and says so. The file is removed on a clean release; each acquirer checks
that the file it locked is still the one at the path (another process may have removed it in between).
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` — exclusive for the process's lifetime; creates ``run_dir`` if needed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLocked(f"run folder {self.path.parent} is in use by process {_holder(self.path)} "
                                f"(lock {self.path}); wait for it to finish or use another --run-dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the holder released and removed the file between our open and our flock: retry
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()) and not _alive(previous):
            print(f"taking over the stale lock of process {previous} (no longer running) on {self.path.parent}",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)   # closing drops the flock
        self.fd = None
        if self.created:    # a run that failed before writing anything leaves no empty run folder behind
            try:
                self.path.parent.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run_dir: Path):
    """The lock of a training command: taken by the main process only (rank 0 under torchrun / accelerate)."""
    from contextlib import nullcontext

    return RunLock(run_dir) if int(os.environ.get("RANK", 0)) == 0 else nullcontext()

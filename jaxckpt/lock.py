"""One trainer per workdir: an exclusive ``flock`` that the kernel releases when the process dies."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import jax

from jaxckpt.errors import WorkdirLocked


class WorkdirLock:
    """Held by process 0 for the life of a run; a second trainer on the same DIR refuses to start."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".jaxckpt.lock"
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirLocked(
                f"{self.path.parent} is in use by a running trainer ({holder}). Wait for it to finish, "
                "stop it, or use another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

"""One training process at a time in a run directory.

``paws train`` holds an exclusive lock on ``RUN_DIR/.lock`` (``flock``) while it runs, with its
process id in the file. A second ``paws train`` into the same ``--out``, or a ``--resume`` of
a run still training, is refused at once with one line naming that process. The operating
system drops the lock when its process ends, however it ends, so a lock left by a killed
process never blocks a resume; the file itself is removed on a clean exit.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from paws.errors import UserError

__all__ = ["LOCK", "RunLock"]

LOCK = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """The lock of a run directory, as a context manager (created with the directory).

    Raises:
        UserError: on entry, when another live process holds the run directory.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.created = False  # the directory, by this lock: removed again if left empty

    def __enter__(self) -> RunLock:
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise a one-line :class:`UserError` naming its holder."""
        if fcntl is None:
            return
        try:
            self.created = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.path.parent}: {e.strerror or e}") from e
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"{self.path.parent} is in use by {holder}, which is still training into "
                    "it; wait for it to end or stop it, or choose another --out"
                ) from None
            # The holder before us may have removed the file as we opened it: lock the file
            # that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and let go of the lock (nothing if it is not held); a run
        directory the lock created and nothing was written into is removed too."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        if self.created:
            try:
                self.path.parent.rmdir()  # only if empty: a run that failed before writing
            except OSError:
                pass

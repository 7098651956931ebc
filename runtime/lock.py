"""One job per run dir: a lock the kernel drops with its holder, so that a second job into a dir in use is refused.

Two jobs writing one run dir (a double submission, a requeued job whose old copy is still running) would
interleave their logs and TensorBoard events and race on `checkpoints/latest`. The lock is a POSIX record
lock (`lockf`) on `DIR/.lock`: it belongs to the process that took it, not to its forked children (the loader
workers), and ends with it on every way out, kill -9 included, so there is never a stale lock to clean up.
Nothing else in the holder's process may open the file: a POSIX lock also ends when its process closes any
descriptor of the file. It works on local disks and on NFS (the lock manager); a filesystem that takes no
locks (e.g. Lustre mounted without `flock`) refuses nothing, and the holder is told so. The file stays when
the lock is released (removing it would race a job opening it); it names the last holder.

A shared lock (`shared=True`) lets any number of shared holders in and keeps an exclusive one out: the nodes of
a multi-node `data_prep write` share their output folder, which a single-node write or `merge` holds alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
_HELD = (errno.EACCES, errno.EAGAIN)  # lockf's answers for "another process holds it"


class DirLock:
    """An exclusive (or shared) lock on `folder` (created if missing) through its file `name`, held from `acquire`
    until `release` or the end of this process."""

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME, shared: bool = False):
        self.path = Path(folder) / name
        self.shared = shared
        self.supported = True  # False after `acquire` on a filesystem without locks
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting. Returns None when this process holds it now (or the filesystem takes
        no locks), else who holds it: "pid P on HOST since TIME"."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            try:
                if err.errno in _HELD:
                    return os.read(fd, 512).decode(errors="replace").strip() or "another process"
                self.supported = False  # ENOLCK, EOPNOTSUPP...: nothing to hold, nothing refused
                return None
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return None

    def release(self) -> None:
        """Let the lock go (a no-op when not held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the process's lock on the file
            self._fd = None

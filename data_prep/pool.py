"""The worker pool shared by the writer and `verify`: plain `map` for one worker, else forked processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[tuple[Callable, Callable]]:
    """(ordered imap, unordered imap) over `workers` processes; plain `map` (no processes) for one worker.

    Forked where the platform allows: workers start in milliseconds and inherit the imported modules. The
    workers ignore Ctrl-C (the terminal sends it to the whole process group): the parent alone gets it, and
    stops them as it leaves the block, which is also where they stop on any other error.
    """
    if workers <= 1:
        yield map, map
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        yield (lambda f, xs: pool.imap(f, xs, chunksize=4)), (lambda f, xs: pool.imap_unordered(f, xs))

"""Preemption: SIGTERM / SIGUSR1 / Ctrl-C (and a lost launcher) stop a run at an agreed step, after a checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as torch_dist

from runtime.io import say
from runtime.logs import get_logger

# Exit codes after a signal-triggered checkpoint. SIGTERM (preemption, scancel, `scontrol requeue`): 143 =
# 128 + SIGTERM, what SLURM and shells expect of a terminated job. SIGUSR1 (SLURM's warning before the time
# limit, `--signal=B:USR1@T`; `launch` then requeues the job): 0, a planned stop. SIGINT (Ctrl-C): 130, as a
# shell reports an interrupted command.
EXIT_AFTER_SIGNAL = {signal.SIGTERM: 143, signal.SIGUSR1: 0, signal.SIGINT: 130}
# A Ctrl-C this long after the first one stops at once, without a checkpoint. Sooner, it is the same keypress
# arriving twice: from the terminal and forwarded by torchrun's agent, which gets it too.
SECOND_CTRL_C_S = 1.0
# The launcher that started this process (torchrun's agent), read at import, before it could have died.
LAUNCHER_PID = os.getppid()


class Preemption:
    """SIGTERM / SIGUSR1 / SIGINT set a flag; ranks agree on it at a step boundary, then checkpoint and exit.
    A second Ctrl-C stops at once (KeyboardInterrupt; `trainer.cli.run_verb` says so in one line).

    A lost launcher counts as SIGTERM: when torchrun's agent is killed (kill -9, OOM killer) its workers are
    re-parented and would go on training unsupervised, writing the run dir beside the rerun that replaces
    them. `launcher_pid` (our parent under torchrun) is checked at every agreement, so they stop too.
    """

    def __init__(self, launcher_pid: int | None = None):
        self.flag = False
        self.signum = signal.SIGTERM
        self.launcher_pid = launcher_pid
        self._first_ctrl_c: float | None = None
        # a process started with Ctrl-C ignored (`cmd &` in a script) keeps ignoring it, as Python itself does
        handled = [s for s in EXIT_AFTER_SIGNAL if not (s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN)]
        self._before = {sig: signal.signal(sig, self._handle) for sig in handled}

    def restore(self) -> None:
        """Put back the handlers this replaced (the run is over: a signal is no longer the loop's to act on)."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._first_ctrl_c is not None:
                if time.monotonic() - self._first_ctrl_c > SECOND_CTRL_C_S:
                    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
                return
            self._first_ctrl_c = time.monotonic()
            if os.environ.get("RANK", "0") == "0":
                say("Ctrl-C: stopping after a checkpoint at the next agreed step (within checkpoint.signal_check_every "
                    "steps); Ctrl-C again to stop now, without one", sys.stderr)
        self.flag, self.signum = True, signal.Signals(signum)

    def launcher_lost(self) -> bool:
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled (a collective: every rank must call it at the same step)."""
        if not self.flag and self.launcher_lost():
            get_logger().warning(f"the launcher (pid {self.launcher_pid}) is gone: stopping as on SIGTERM")
            self.flag, self.signum = True, signal.SIGTERM
        if not torch_dist.is_initialized():
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    @property
    def exit_code(self) -> int:
        return EXIT_AFTER_SIGNAL[self.signum]

"""Preemption: SIGTERM / SIGUSR1 (and a lost launcher) stop a run at an agreed step, after a checkpoint."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as torch_dist

from runtime.logs import get_logger

# Exit codes after a signal-triggered checkpoint. SIGTERM (preemption, scancel, `scontrol requeue`): 143 =
# 128 + SIGTERM, what SLURM and shells expect of a terminated job. SIGUSR1 (SLURM's warning before the time
# limit, `--signal=B:USR1@T`; `launch` then requeues the job): 0, a planned stop.
EXIT_AFTER_SIGNAL = {signal.SIGTERM: 143, signal.SIGUSR1: 0}
# The launcher that started this process (torchrun's agent), read at import, before it could have died.
LAUNCHER_PID = os.getppid()


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it at a step boundary, then checkpoint and exit.

    A lost launcher counts as SIGTERM: when torchrun's agent is killed (kill -9, OOM killer) its workers are
    re-parented and would go on training unsupervised, writing the run dir beside the rerun that replaces
    them. `launcher_pid` (our parent under torchrun) is checked at every agreement, so they stop too.
    """

    def __init__(self, launcher_pid: int | None = None):
        self.flag = False
        self.signum = signal.SIGTERM
        self.launcher_pid = launcher_pid
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
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

"""The error contract of every verb of both stages (see docs/architecture.md).

Bad input (a config, path, checkpoint or weight file that cannot be used) is one line on stderr naming the
problem and the fix, exit 2, raised before any process group or run directory is made. A run that stops
for a reason it explains (non-finite steps, a failed checkpoint write) is one line too, exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from runtime.config import ConfigError

EXIT_BAD_INPUT, EXIT_STOPPED = 2, 1


def run_verb(fn: Callable[[], object]) -> int:
    """Run one verb under the error contract; returns the process exit code."""
    from trainer.checkpoint import CheckpointError
    from trainer.loop import NonFiniteLoss

    try:
        fn()
    except (ConfigError, FileNotFoundError) as err:  # FileNotFoundError: a path that vanished since preflight
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except (NonFiniteLoss, CheckpointError) as err:  # a clear stop, not a traceback: say why and what to do
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0

"""The errors a run stops on with one line (trainer/cli.py's contract), apart from the modules that raise them,
so that the CLI can name them without importing torch (`config` and bad-input verbs answer in a fraction of a
second)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank; the previous one is intact and still `latest`."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""

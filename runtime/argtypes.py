"""argparse types for the CLIs' numeric options (no torch: the launcher's parser uses them too).

A count below its minimum, a negative number of seconds or a port out of range is argparse's one usage line,
exit 2, naming the option (`argument --nodes: must be an integer >= 1, got '0'`), rather than a traceback
later or a run that quietly does something else (0 nodes, a grid of no images, a rendezvous on port 0).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer option that must be >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    """A finite real option that must be >= `minimum` (> with `strict`): seconds, GiB."""
    op = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a number {op} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"number {op} {minimum:g}"
    return parse


def port(text: str) -> int:
    """A TCP port, 1-65535 (0 would mean "any free port", which a rendezvous every node must meet cannot use)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, got {text!r}")
    return value


count = at_least(1)
index = at_least(0)
seconds = number(0)

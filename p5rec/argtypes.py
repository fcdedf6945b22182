"""argparse ``type=`` callables that check a number's range where it is parsed.

A negative user cap or a zero beam width is a typing slip, not a request: caught by argparse it is one line
(``argument --beams: expected an integer >= 1, got '0'``) and exit status 2, before any data or model is loaded,
instead of a traceback minutes later or an empty answer. Kept apart from :mod:`p5rec.cli` so that stage modules
can use them without importing the command dispatcher.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["float_at_least", "int_at_least", "port"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A ``type=`` for integer options that must be ``>= minimum``; argparse reports anything else.

    The returned function raises :class:`argparse.ArgumentTypeError` (argparse prints it after the option name)
    for text that is not an integer (``"three"``, ``"2.5"``) or an integer below ``minimum``.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int>={minimum}"  # argparse names the type in some messages
    return parse


def port(text: str) -> int:
    """A ``type=`` for a TCP port: an integer from 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


def float_at_least(minimum: float) -> Callable[[str], float]:
    """A ``type=`` for finite float options that must be ``>= minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"float>={minimum:g}"
    return parse

"""The types of the ``sessiondb`` command's option values: each turns an option's text
into its value, or raises :class:`argparse.ArgumentTypeError` (a ``ValueError`` from
``int()`` or ``float()`` works alike), which argparse reports as a usage error, exit 2."""

from __future__ import annotations

import argparse

__all__ = ["count", "days", "lengths", "positive", "seconds"]


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def lengths(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(n) for n in text.replace(" ", ",").split(",") if n)
    except ValueError:
        raise argparse.ArgumentTypeError("must be lengths like 2,3,4 or 'none'") from None


def seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.1 and 3600 seconds")
    return value


def days(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of days >= 0")
    return value

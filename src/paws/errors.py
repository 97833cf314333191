"""The one exception type for mistakes a user can make (bad path, bad config, bad data), and the
one rule for showing any exception in a line.

The command line prints a :class:`UserError`'s message as a single line and exits non-zero,
without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""


def first_line(e: BaseException | str, limit: int = 160, empty: str | None = None) -> str:
    """The first line of ``e``'s message, at most ``limit`` characters: how paws quotes an
    error from a library (Pillow, YAML, torch) inside its own one-line message.

    Args:
        e: the exception (or its message).
        limit: the longest line kept.
        empty: what to say when the message is empty (default: the exception's type name).
    """
    text = str(e).strip()
    line = text.splitlines()[0] if text else (empty or type(e).__name__)
    return line[:limit]

"""The one exception type for mistakes a user can make (bad path, bad config, bad data).

The command line prints its message as a single line and exits non-zero, without a traceback;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""

"""The ``paws`` command: thin wrappers that parse arguments and call the library.

Mistakes a user can make end in one line on stderr and exit status 2 (``--debug`` shows the
traceback); interrupted training exits with 128 + the signal number after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from paws.cli.base import COMMANDS
from paws.errors import UserError, first_line

__all__ = ["main", "quiet_idle_threads"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors also say how to name a file that starts with a dash
    (``paws predict RUN -x.png`` read ``-x.png`` as an unknown option, then asked for images)."""

    def __init__(self, *args: Any, argv: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.argv = list(argv)  # the command line, for the hint

    def error(self, message: str) -> NoReturn:
        dashed = [a for a in self.argv if a.startswith("-") and a != "-" and os.path.exists(a)]
        if dashed:
            message += (
                f" ({dashed[0]} is read as an option; to name the file, write ./{dashed[0]} "
                f"or put -- before it)"
            )
        super().error(message)


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="paws",
        description="PAWS semi-supervised learning: pre-train, evaluate, apply.",
        argv=argv,
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, argv=argv)
        p.set_defaults(make_runner=add_args(p))
        # Also accepted after the command (paws train --quiet); SUPPRESS keeps a value given
        # before it.
        p.add_argument(
            "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output"
        )
    return parser


def _one_line(e: BaseException) -> str:
    """The user-facing line of an error, also when a data-loader worker wrapped it."""
    text = str(e)
    marker = "paws.errors.UserError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return first_line(text, limit=10**6, empty=type(e).__name__)


def quiet_idle_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    Must run before torch is imported. On a CPU shared with other work, threads spinning between
    parallel regions made a training step about 1.4 times and batch augmentation about 20 times
    slower (2 cores); a sleeping thread costs a wake-up of microseconds per region.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_trackers() -> None:
    """Trackers say only warnings and errors (unless the user chose a level): MLflow's INFO
    lines (creating its database tables, ...) would mix with paws's own. Must run before
    MLflow is imported; the command line sets it, never the library."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``paws`` console script."""
    quiet_idle_threads()
    quiet_trackers()
    # paws checks every image's size against data.max_image_pixels itself and says so in one
    # line; Pillow's warning about large images would be a second.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    argv = list(sys.argv[1:] if argv is None else argv)
    n = 0  # global flags come first, in any order; the command defaults to train
    while n < len(argv) and argv[n] in ("--quiet", "--debug"):
        n += 1
    if n == len(argv) or argv[n].startswith("-") and argv[n] not in ("-h", "--help"):
        argv = [*argv[:n], "train", *argv[n:]]
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"])
    from paws import progress

    previous = progress.set_quiet(args.quiet)  # inherited by data-loader workers
    try:
        return int(args.make_runner(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"paws: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paws: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a wrapped user error from a data-loader worker
        if not args.debug and "paws.errors.UserError: " in str(e):
            print(f"paws: error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise
    finally:
        progress.set_quiet(previous)


if __name__ == "__main__":
    sys.exit(main())

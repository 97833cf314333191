"""The ``paws`` command: thin wrappers that parse arguments, call the library and print.

:mod:`paws.cli.main` holds the entry point; the commands register themselves from
:mod:`paws.cli.training`, :mod:`paws.cli.using` and :mod:`paws.cli.labelling`.
"""

from paws.cli import labelling, training, using  # noqa: F401 - registers the commands
from paws.cli.base import COMMANDS
from paws.cli.main import main, quiet_idle_threads

__all__ = ["main", "COMMANDS", "quiet_idle_threads"]

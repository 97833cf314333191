"""``python -m paws`` (and ``torchrun -m paws``) runs the command line."""

import sys

from paws.cli import main

sys.exit(main())

"""``python -m goplug``: the ``goplug`` command (see :mod:`goplug.cli`)."""

import sys

from goplug.cli import main

sys.exit(main())

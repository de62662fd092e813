"""``python -m gpart``: see :mod:`gpart.cli`."""

import sys

from .cli import main

sys.exit(main())

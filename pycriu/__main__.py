"""``python -m pycriu``: the same as the ``pycriu`` command."""

import sys

from .cli import main

sys.exit(main())

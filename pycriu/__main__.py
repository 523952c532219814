"""``python -m pycriu``: the same as the ``pycriu`` command."""

import sys

from .command import main

sys.exit(main())

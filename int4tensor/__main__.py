"""``python -m int4tensor``: the command line (see :mod:`int4tensor.cli`)."""

import sys

from int4tensor.cli import main

sys.exit(main())

"""``python -m benchmarks.lr_transfer``: see :mod:`benchmarks.lr_transfer.cli`."""

import sys

from .cli import main

sys.exit(main())

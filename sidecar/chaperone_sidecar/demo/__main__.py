"""``python -m chaperone_sidecar.demo`` (the README quick start, ``make demo``)."""

import sys

from . import main

sys.exit(main())

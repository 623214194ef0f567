"""``python -m tiltflow.cli``."""

import sys

from . import main

sys.exit(main())

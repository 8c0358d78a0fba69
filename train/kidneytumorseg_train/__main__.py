"""``python -m kidneytumorseg_train``."""

import sys

from .cli import main

sys.exit(main())

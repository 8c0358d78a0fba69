"""``python -m KidneyTumorSegLib``: the same command as ``kidneytumorseg`` (Slicer runs it this way, because
console-script launchers are missing from some Python installs)."""

import sys

from .cli import main

sys.exit(main())

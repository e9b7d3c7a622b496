"""``python -m maptools``: the command line."""

import sys

from maptools.cli import main

sys.exit(main())

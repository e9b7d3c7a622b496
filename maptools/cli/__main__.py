"""``python -m maptools.cli``: the command line (as ``python -m maptools``)."""

import sys

from maptools.cli import main

sys.exit(main())

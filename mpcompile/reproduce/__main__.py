"""``python -m mpcompile.reproduce [a|b|c|d|all] --out DIR [--tiny]``."""

import sys

from . import main

sys.exit(main())

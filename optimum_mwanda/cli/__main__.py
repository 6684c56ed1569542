"""``python -m optimum_mwanda.cli``: the same as the ``optimum-mwanda`` console script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

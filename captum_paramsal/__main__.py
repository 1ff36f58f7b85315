"""``python -m captum_paramsal``: the same command line as the ``captum-paramsal`` script."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m alignment_callback``: the ``alignment-callback`` command line."""

import sys

from alignment_callback.reporting.cli import main

if __name__ == "__main__":
    sys.exit(main())

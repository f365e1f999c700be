"""``python -m mmconnect.integrations.cli``: the ``mmconnect`` command line."""

import sys

from mmconnect.integrations.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dpiguard.cli``: the same as the ``dpiguard`` command."""

import sys

from dpiguard.cli import main

sys.exit(main())

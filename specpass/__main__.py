"""``python -m specpass``: the same CLI as the ``specpass`` command."""

import sys

from specpass.cli import main

sys.exit(main())

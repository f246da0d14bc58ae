"""``python -m mergeit_hf`` is the ``mergeit`` command."""

import sys

from mergeit_hf.run.cli import main

sys.exit(main())

"""``python -m steadylm`` = the ``steadylm`` command (so ``torchrun -m steadylm train ...`` works)."""

import sys

from steadylm.cli import main

sys.exit(main())

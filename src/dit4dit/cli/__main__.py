"""`python -m dit4dit.cli ...` = `dit4dit ...`."""

import sys

from . import main

sys.exit(main())

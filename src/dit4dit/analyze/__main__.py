"""`python -m dit4dit.analyze [OPTIONS]` = `dit4dit analyze [OPTIONS]`.

An entry point only (nothing imports it), so it may call the command line above this package.
"""

import sys

from ..cli import main

sys.exit(main(["analyze", *sys.argv[1:]]))

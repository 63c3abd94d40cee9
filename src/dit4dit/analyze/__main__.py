"""`python -m dit4dit.analyze [OPTIONS]` = `dit4dit analyze [OPTIONS]`."""

import sys

from .cli import main

sys.exit(main(["analyze", *sys.argv[1:]]))

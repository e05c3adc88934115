"""`python -m textcl` and `accelerate launch -m textcl` enter the CLI here."""

import sys

from textcl.cli import main

sys.exit(main())

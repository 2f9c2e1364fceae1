"""`python -m omg ...`: the same as the `omg` command."""
import sys

from omg.cli import main

sys.exit(main())

"""`python -m fedshield COMMAND ...`: the `fedshield` command."""

import sys

from fedshield.simulations.cli import main

sys.exit(main())

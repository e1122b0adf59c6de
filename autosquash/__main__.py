"""`python -m autosquash` runs the CLI."""

import sys

from autosquash.cli import main

sys.exit(main())

"""`python -m sclref` runs the command line."""

import sys

from sclref.cli import main

sys.exit(main())

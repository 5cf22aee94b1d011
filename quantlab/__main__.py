"""`python -m quantlab` runs the command line."""

import sys

from quantlab.cli import main

sys.exit(main())

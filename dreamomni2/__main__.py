"""`python -m dreamomni2`: the command line, as the `dreamomni2` script runs it."""

import sys

from dreamomni2.cli import main

sys.exit(main())

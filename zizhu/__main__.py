"""`python -m zizhu ...` runs the command-line interface."""

import sys

from zizhu.cli import main

sys.exit(main())

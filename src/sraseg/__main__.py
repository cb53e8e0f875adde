"""`python -m sraseg <stage> ...`: what the workflow rules call (works inside conda envs too)."""

import sys

from sraseg.cli import main

sys.exit(main())

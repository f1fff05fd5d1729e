"""`python -m evaluate.bench ...`: runs the optimizer benchmark (see `evaluate.bench.cli`)."""

import sys

from evaluate.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())

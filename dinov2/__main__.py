"""`python -m dinov2 <command> ...`: the `panopticon` command without the console script."""
import sys

from dinov2.run.cli import main

if __name__ == "__main__":
    sys.exit(main())

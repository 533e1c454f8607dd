import sys

from e2ediff.cli import main

sys.exit(main())
